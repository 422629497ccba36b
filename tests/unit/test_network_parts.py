"""The decisions of the parts the network controller composes, each on its own over
in-memory fakes (tests/unit/netfakes.py): the executor (what a failure skips, who
announces), the OVS port batcher (order, transactions, retries, announcements), the
segment drivers (OVS and Linux bridge: what a segment lacks, how it is built, which
ports and bridges are this node's orphans), the address book (cache, claims, batches,
sweep), the dirty tracker, the segment memory and the sweeper.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest

from reconciler.adapters.netlink import InterfaceSpec, host_veth_name
from reconciler.adapters.ovs import NewPort
from reconciler.errors import ConsulUnavailable, NetlinkError, OvsError, ReconcilerError
from reconciler.model import Network
from reconciler.network.addresses import AddressBook
from reconciler.network.drift import DirtyTracker
from reconciler.network.drivers import build_drivers
from reconciler.network.drivers.base import Plug, PortOwner, gateway_port_name
from reconciler.network.drivers.linux import LinuxBridgeDriver
from reconciler.network.drivers.ovs import NODE_ID, OvsDriver
from reconciler.network.execute import AttachResult, Executor
from reconciler.network.plan import (
    Action,
    AllocateAddress,
    Blocked,
    CreateInterface,
    Detach,
    EnsureSegment,
    PlugPort,
    PortObs,
    PortWant,
    RepairInterface,
    Wanted,
)
from reconciler.network.portbatch import PendingPort, PortBatcher
from reconciler.network.segments import Segments
from reconciler.network.sweep import Sweeper

from .netfakes import (
    LNX_NET,
    NODE,
    OTHER_NODE,
    OVS_NET,
    FakeFirewall,
    FakeIpam,
    FakeNetlink,
    FakeNs,
    FakeOvs,
    as_ipam,
    as_nl,
    as_ns,
    cid_of,
    cidr,
    info,
    itf,
    state,
)

CID = cid_of(1)
GW_PORT = gateway_port_name("vnet")
NO_GW = dataclasses.replace(OVS_NET, gateway=None)


@dataclasses.dataclass
class Parts:
    nl: FakeNetlink
    ovs: FakeOvs
    fw: FakeFirewall
    batcher: PortBatcher
    segments: Segments
    executor: Executor
    ovs_driver: OvsDriver
    linux_driver: LinuxBridgeDriver


def parts(datapath: str = "system") -> Parts:
    nl = FakeNetlink()
    ovs = FakeOvs(nl, datapath)
    fw = FakeFirewall()
    batcher = PortBatcher(ovs, notify=lambda: None)
    ovs_driver = OvsDriver(node=NODE, ovs=ovs, nl=as_nl(nl), batcher=batcher)
    linux_driver = LinuxBridgeDriver(node=NODE, nl=as_nl(nl), fw=fw)
    segments = Segments({"ovs": ovs_driver, "linux": linux_driver})
    return Parts(nl, ovs, fw, batcher, segments,
                 Executor(node=NODE, nl=as_nl(nl), segments=segments), ovs_driver,
                 linux_driver)


def wanted(ifname: str, net: Network = OVS_NET, address: str = "10.77.1.10/24") -> Wanted:
    link = InterfaceSpec(CID, ifname, (cidr(address),), mtu=net.mtu, announce=False)
    return Wanted(net, link, PortWant(net.bridge, net.vlan))


def fresh(w: Wanted) -> list[Action]:
    """What the plan gives for a fresh interface: create it, plug it."""
    return [CreateInterface(w.network.name, w.link),
            PlugPort(w.network.name, w.link.ifname, w.link.host_veth, w.port, "new veth")]


def apply(p: Parts, ws: Sequence[Wanted], actions: Sequence[Action]) -> AttachResult:
    res = AttachResult()
    p.executor.apply(as_ns(FakeNs(4242)), CID, "web", ws, actions, res)
    return res


# --------------------------------------------------------------------------- executor


def test_executor_a_failed_interface_does_not_block_the_others() -> None:
    p = parts()
    p.nl.fail_ifnames.add("eth1")
    w1, w2 = wanted("eth1"), wanted("eth2", address="10.77.1.11/24")
    p.ovs.bridges["br-v"] = {}

    res = apply(p, [w1, w2], fresh(w1) + fresh(w2))

    assert res.errors == ["web eth1: ensure eth1: File exists"]
    assert res.addresses == {"eth2": "10.77.1.11/24"}
    assert res.interfaces == {"eth1", "eth2"}  # eth1 was touched: detached if unwanted
    assert [q.ifname for q in p.batcher.flush().announce] == ["eth2"]  # eth1 not plugged


def test_executor_a_failing_segment_skips_that_networks_interfaces() -> None:
    p = parts()
    p.ovs.fail["ensure_bridge"] = OvsError("ovsdb-server is gone")
    w = wanted("eth1")

    res = apply(p, [w], [EnsureSegment(OVS_NET, ("create ovs bridge br-v",)), *fresh(w)])

    assert res.errors == ["web: ovsdb-server is gone"]
    assert p.nl.called("ensure_interface") == []
    assert len(p.batcher) == 0
    assert res.addresses == {} and res.interfaces == set()


def test_executor_a_failing_segment_does_not_skip_another_networks_segment() -> None:
    p = parts()
    p.ovs.fail["ensure_bridge"] = OvsError("ovsdb-server is gone")
    w1, w2 = wanted("eth1"), wanted("eth2", LNX_NET, "10.88.0.10/24")
    actions: list[Action] = [EnsureSegment(OVS_NET, ("create ovs bridge br-v",)),
                             EnsureSegment(LNX_NET, ("create linux bridge br-l",)),
                             *fresh(w1), *fresh(w2)]

    res = apply(p, [w1, w2], actions)

    assert p.nl.called("ensure_linux_bridge") == [("br-l",)]
    assert res.errors == ["web: ovsdb-server is gone"]
    assert res.addresses == {"eth2": "10.88.0.10/24"}


@pytest.mark.parametrize(("changed", "announced"), [
    ("addresses", True), ("mtu", False)])
def test_executor_a_repair_announces_only_a_new_address(changed: str, announced: bool,
                                                        ) -> None:
    p = parts()
    w = wanted("eth1")
    p.nl.inside[(CID, "eth1")] = dataclasses.replace(
        w.link, **({"addresses": ()} if changed == "addresses" else {"mtu": 1500}))
    p.nl.add_link(w.link.host_veth)

    res = apply(p, [w], [RepairInterface("vnet", w.link, (f"{changed} drift",))])

    assert f"eth1 {changed}" in res.changes
    assert bool(p.nl.called("announce")) is announced
    assert res.addresses == {"eth1": "10.77.1.10/24"}


def test_executor_records_blocked_unresolved_and_detached_interfaces() -> None:
    p = parts()
    w1, w2 = wanted("eth1"), wanted("eth2")
    veth = host_veth_name(CID, "eth3")
    p.nl.add_link(veth)
    p.ovs.add_port(veth, "br-v", 101)
    actions: list[Action] = [Blocked("eth1", "eth1 exists"), AllocateAddress("eth2", "vnet"),
                             Detach("eth3", veth)]

    res = apply(p, [w1, w2], actions)

    assert res.errors == ["web eth1: eth1 exists", "web eth2: eth2: no address resolved"]
    assert res.addresses == {} and res.interfaces == set()
    assert res.changes == ["eth3 detached"]
    assert veth not in p.nl.host
    assert p.batcher.flush().deleted == (veth,)  # every driver was asked to unplug


def test_executor_with_a_reaping_batcher_retires_the_veth_and_the_flush_deletes_it(
        ) -> None:
    p = parts()
    kicks: list[int] = []
    b = PortBatcher(p.ovs, notify=lambda: kicks.append(1), reap=p.nl.reap_retired)
    executor = Executor(node=NODE, nl=as_nl(p.nl), segments=p.segments, batcher=b)
    veths = [host_veth_name(CID, f"eth{i}") for i in (3, 4)]
    for v in veths:
        p.nl.add_link(v)
        p.ovs.add_port(v, "br-v", 101)
    p.nl.inside[(CID, "eth3")] = p.nl.inside[(CID, "eth4")] = wanted("eth3").link
    res = AttachResult()

    executor.apply(as_ns(FakeNs(4242)), CID, "web", [],
                   [Detach("eth3", veths[0]), Detach("eth4", veths[1])], res)

    assert res.changes == ["eth3 detached", "eth4 detached"]
    assert p.nl.called("detach") == [] and p.nl.called("reap_retired") == []
    assert not set(veths) & set(p.nl.host)  # the names are free at once
    assert len(p.nl.retired) == 2 and (CID, "eth3") in p.nl.inside  # not deleted yet
    assert len(kicks) >= 2
    assert p.batcher.flush().deleted == tuple(sorted(veths))  # the OVS driver's batch
    b.flush()
    assert len(p.nl.called("reap_retired")) == 1  # one delete for both
    assert p.nl.retired == {} and p.nl.inside == {}
    b.flush()
    assert len(p.nl.called("reap_retired")) == 1  # nothing retired since


def test_batch_a_failed_reap_is_retried_with_the_next_flush() -> None:
    calls: list[int] = []

    def reap() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise NetlinkError("delete retired links: busy")
        return True

    b = PortBatcher(FakeOvs(), notify=lambda: None, reap=reap)
    b.retired()
    b.retired()
    assert len(b) == 1 and calls == []
    with pytest.raises(NetlinkError):
        b.flush()
    assert len(b) == 1
    b.flush()
    assert calls == [1, 1] and len(b) == 0
    assert not PortBatcher(FakeOvs()).reaps


def test_executor_plug_failure_is_that_interfaces_error() -> None:
    p = parts()
    w = wanted("eth1", LNX_NET, "10.88.0.10/24")  # no bridge br-l: enslave fails
    res = apply(p, [w], fresh(w))
    assert res.errors == [f"web eth1: enslave {w.link.host_veth} to br-l: no such link"]
    assert res.addresses == {}
    assert p.nl.called("announce") == []


# --------------------------------------------------------------------------- port batcher


def pending(name: str, container: str = CID, ifname: str = "eth1", announce: bool = True,
            ) -> PendingPort:
    return PendingPort(NewPort("br-v", name, 101, {NODE_ID: NODE}, 7), container, ifname,
                       4242, announce, (cidr("10.77.1.10/24"),))


def batcher(ovs: FakeOvs, *, notify: Callable[[], None] | None = lambda: None,
            announced: list[PendingPort] | None = None) -> PortBatcher:
    def after(ports: Sequence[PendingPort]) -> None:
        if announced is not None:
            announced.extend(ports)
    return PortBatcher(ovs, notify=notify, after_commit=after)


def test_batch_deletes_first_then_new_ports_at_once_then_the_rest_in_one_transaction(
        ) -> None:
    ovs = FakeOvs()
    ovs.add_port("old", "br-v", 101)
    ovs.add_port("x", "br-v", 5)  # exists, on the wrong VLAN: fixed through ensure_port
    b = batcher(ovs)
    b.delete("old")
    b.add(pending("x"))
    b.add(pending("y"))
    assert len(b) == 3
    assert ovs.calls == []  # queued only

    done = b.flush()

    assert ovs.calls == [("delete_ports", ("old",)),
                         ("add_ports", ("y",)),
                         ("begin",), ("ensure_port", "x"), ("commit",)]
    assert (done.added, done.deleted) == (("x", "y"), ("old",))
    assert ovs.ports["x"].tag == 101 and ovs.recorded_ifindex["y"] == 7
    assert len(b) == 0


def test_batch_of_new_ports_only_opens_no_transaction_for_the_rest() -> None:
    """Scaled-out replicas: every port is new and goes in the one direct transaction;
    no transaction of the replica is opened for nothing."""
    ovs = FakeOvs()
    b = batcher(ovs)
    for name in ("y", "z", "w"):
        b.add(pending(name))
    done = b.flush()
    assert ovs.calls == [("add_ports", ("y", "z", "w"))]
    assert set(done.added) == {"y", "z", "w"} and set(ovs.ports) == {"y", "z", "w"}


def test_batch_a_port_plugged_again_before_its_commit_still_announces() -> None:
    """A container planned again before the batch was committed (its first, unobserved
    plan found another interface of it there) plugs its new port again without an
    announcement of its own: the first plug's announcement is kept."""
    ovs = FakeOvs()
    announced: list[PendingPort] = []
    b = batcher(ovs, announced=announced)
    b.add(pending("y", announce=True))
    b.add(pending("y", announce=False))
    b.add(pending("z", announce=False))
    b.flush()
    assert [p.port.name for p in announced] == ["y"]


def test_batch_falls_back_to_ensure_port_when_add_ports_cannot_apply() -> None:
    ovs = FakeOvs()
    ovs.add_ports_ok = False
    b = batcher(ovs)
    b.add(pending("y"))
    b.add(pending("z"))
    b.flush()
    assert ovs.calls == [("add_ports", ("y", "z")), ("begin",), ("ensure_port", "y"),
                         ("ensure_port", "z"), ("commit",)]
    assert set(ovs.ports) == {"y", "z"}


def test_batch_a_failed_delete_transaction_is_retried_with_the_next_flush() -> None:
    ovs = FakeOvs()
    ovs.add_port("old", "br-v")
    ovs.fail["delete_ports"] = OvsError("commit failed")
    ovs.fail_times["delete_ports"] = 1
    b = batcher(ovs)
    b.delete("old")
    b.add(pending("y"))

    with pytest.raises(OvsError):
        b.flush()

    assert ovs.calls == [("delete_ports", ("old",))]
    assert "old" in ovs.ports and "y" not in ovs.ports  # nothing added before the deletes
    assert len(b) == 2
    done = b.flush()
    assert done.deleted == ("old",) and done.added == ("y",)
    assert "old" not in ovs.ports


def test_batch_a_port_re_added_while_its_delete_failed_is_not_deleted_later() -> None:
    b: PortBatcher

    class ReAdding(FakeOvs):
        def delete_ports(self, names: Iterable[str]) -> list[str]:
            for name in names:
                b.add(pending(name))  # a reconcile queues it again meanwhile
            raise OvsError("commit failed")

    ovs = ReAdding()
    b = batcher(ovs)
    b.delete("p")
    with pytest.raises(OvsError):
        b.flush()
    ovs.calls.clear()
    done = b.flush()
    assert done.deleted == () and done.added == ("p",)
    assert "p" in ovs.ports


def test_batch_a_port_queued_again_during_its_commit_stays_queued() -> None:
    b: PortBatcher
    newer = dataclasses.replace(pending("p"), pid=5151)

    class ReQueueing(FakeOvs):
        def add_ports(self, ports: Sequence[NewPort]) -> bool:
            b.add(newer)  # the container restarted meanwhile
            return super().add_ports(ports)

    b = batcher(ReQueueing())
    b.add(pending("p"))
    assert b.flush().added == ("p",)
    assert len(b) == 1
    [again] = b.flush().announce
    assert again is newer


def test_batch_a_failed_port_transaction_keeps_the_ports_queued() -> None:
    ovs = FakeOvs()
    ovs.add_ports_ok = False
    ovs.fail["ensure_port"] = OvsError("commit failed")
    ovs.fail_times["ensure_port"] = 1
    announced: list[PendingPort] = []
    b = batcher(ovs, announced=announced)
    b.add(pending("y"))
    with pytest.raises(OvsError):
        b.flush()
    assert b.queued_containers() == [CID] and announced == []
    assert b.flush().added == ("y",)
    assert [p.port.name for p in announced] == ["y"]


def test_batch_discard_drops_a_queued_addition_only() -> None:
    ovs = FakeOvs()
    b = batcher(ovs)
    b.add(pending("y"))
    b.delete("z")
    assert b.discard("y") is True
    assert b.discard("y") is False
    assert b.discard("z") is False  # a deletion is not an addition
    assert b.flush().added == ()
    assert "add_ports" not in ovs.names()


def test_batch_add_and_delete_of_one_name_cancel_each_other() -> None:
    ovs = FakeOvs()
    ovs.add_port("p", "br-v", 101)
    b = batcher(ovs)
    b.delete("p")
    b.add(pending("p"))  # the delete is dropped
    assert b.flush().deleted == ()
    assert "p" in ovs.ports
    b.add(pending("q"))
    b.delete("q")  # the addition is dropped
    assert b.flush().added == ()
    assert "q" not in ovs.ports


def test_batch_queued_containers_and_who_announces() -> None:
    ovs = FakeOvs()
    announced: list[PendingPort] = []
    b = batcher(ovs, announced=announced)
    other = cid_of(2)
    b.add(pending("a", other))
    b.add(pending("b", CID, announce=False))
    b.add(pending("c", CID, ifname="eth2"))
    assert b.queued_containers() == sorted([CID, other])

    done = b.flush()

    assert [p.port.name for p in done.announce] == ["a", "c"]
    assert announced == list(done.announce)
    assert b.queued_containers() == []
    b.add(pending("d", announce=False))
    b.flush()
    assert len(announced) == 2  # nothing more to announce


@pytest.mark.parametrize("notify", [True, False])
def test_batch_notify_defers_the_commit_else_it_is_immediate(notify: bool) -> None:
    ovs = FakeOvs()
    kicks: list[int] = []
    b = batcher(ovs, notify=(lambda: kicks.append(1)) if notify else None)
    b.add(pending("y"))
    b.delete("z")
    assert kicks == ([1, 1] if notify else [])
    assert ("y" in ovs.ports) is not notify
    assert len(b) == (2 if notify else 0)


# --------------------------------------------------------------------------- OVS driver


@pytest.mark.parametrize(("datapath", "want"), [("netdev", False), ("system", None)])
def test_ovs_tx_checksum_is_off_only_on_the_userspace_datapath(datapath: str,
                                                               want: bool | None) -> None:
    assert parts(datapath).ovs_driver.tx_checksum(OVS_NET) is want
    assert parts(datapath).linux_driver.tx_checksum(LNX_NET) is None


def test_drivers_port_want_and_registry() -> None:
    p = parts()
    assert p.ovs_driver.port_want(OVS_NET) == PortWant("br-v", 101)
    assert p.linux_driver.port_want(LNX_NET) == PortWant("br-l", None)
    drivers = build_drivers(node=NODE, nl=as_nl(p.nl), ovs=p.ovs, fw=p.fw, batcher=p.batcher)
    assert {k: type(d) for k, d in drivers.items()} == {"ovs": OvsDriver,
                                                        "linux": LinuxBridgeDriver}


def _built(p: Parts) -> None:
    p.ovs_driver.ensure_segment(OVS_NET)


def _no_gw_link(p: Parts) -> None:
    _built(p)
    del p.nl.host[GW_PORT]


def _gw_wrong_vlan(p: Parts) -> None:
    _built(p)
    p.ovs.ports[GW_PORT] = dataclasses.replace(p.ovs.ports[GW_PORT], tag=7)


def _gw_no_address(p: Parts) -> None:
    _built(p)
    p.nl.host[GW_PORT].addresses.clear()


def _bridge_only(p: Parts) -> None:
    p.ovs.bridges["br-v"] = {}


@pytest.mark.parametrize(("setup", "net", "missing"), [
    (None, OVS_NET, ("create ovs bridge br-v", f"create gateway port {GW_PORT} (vlan 101)")),
    (None, NO_GW, ("create ovs bridge br-v",)),
    (_bridge_only, NO_GW, ()),
    (_bridge_only, OVS_NET, (f"create gateway port {GW_PORT} (vlan 101)",)),
    (_no_gw_link, OVS_NET, (f"create gateway port {GW_PORT} (vlan 101)",)),
    (_gw_wrong_vlan, OVS_NET, (f"create gateway port {GW_PORT} (vlan 101)",)),
    (_gw_no_address, OVS_NET, (f"gateway address 10.77.1.1/24 on {GW_PORT}",)),
    (_built, OVS_NET, ()),
])
def test_ovs_observe_segment(setup: Callable[[Parts], None] | None, net: Network,
                             missing: tuple[str, ...]) -> None:
    p = parts()
    if setup is not None:
        setup(p)
    p.ovs.calls.clear()
    assert p.ovs_driver.observe_segment(net) == missing
    assert p.ovs.mutations() == []


def test_ovs_ensure_segment_builds_what_is_missing_and_then_nothing() -> None:
    p = parts()
    assert p.ovs_driver.ensure_segment(OVS_NET) == [
        "bridge br-v created", f"gateway port {GW_PORT}", "gateway addresses"]
    assert p.ovs.bridges["br-v"] == {NODE_ID: NODE, "reconciler-network": "vnet"}
    assert p.ovs.ports[GW_PORT].external_ids == {
        NODE_ID: NODE, "reconciler-network": "vnet", "reconciler-role": "gateway"}
    assert p.ovs_driver.ensure_segment(OVS_NET) == []
    assert parts().ovs_driver.ensure_segment(NO_GW) == ["bridge br-v created"]


def test_ovs_observe_port() -> None:
    p = parts()
    veth = host_veth_name(CID, "eth1")
    owner = PortOwner(NODE, CID, "eth1", "vnet")
    assert p.ovs_driver.observe_port(OVS_NET, veth, owner, 7, None) == PortObs()
    p.ovs_driver.plug(Plug(OVS_NET, veth, owner, 7, announce=False))
    p.batcher.flush()
    assert p.ovs_driver.observe_port(OVS_NET, veth, owner, 7, None) == PortObs("br-v", 101)
    # The veth was recreated: the port names a dead netdev.
    assert p.ovs_driver.observe_port(OVS_NET, veth, owner, 8, None) \
        == PortObs("br-v", 101, stale=True)
    # Its record names another interface.
    other = dataclasses.replace(owner, ifname="eth9")
    assert p.ovs_driver.observe_port(OVS_NET, veth, other, 7, None).stale is True


def test_ovs_plug_queues_the_port_for_the_batch() -> None:
    p = parts()
    veth = host_veth_name(CID, "eth1")
    addrs = (cidr("10.77.1.10/24"),)
    done = p.ovs_driver.plug(Plug(OVS_NET, veth, PortOwner(NODE, CID, "eth1", "vnet", 4242),
                                  7, announce=True, addresses=addrs))
    assert done is False
    assert p.ovs.calls == []
    [q] = p.batcher.flush().announce
    assert (q.container, q.ifname, q.pid, q.addresses) == (CID, "eth1", 4242, addrs)
    assert q.port == NewPort("br-v", veth, 101, {
        NODE_ID: NODE, "reconciler-container": CID, "reconciler-interface": "eth1",
        "reconciler-network": "vnet"}, 7)


@pytest.mark.parametrize(("node", "queued", "deleted"), [
    (NODE, False, True),        # our port: deleted with the next batch
    (OTHER_NODE, False, False),  # another node's daemon owns it: left alone
    (None, True, False),        # only queued: dropped from the queue
])
def test_ovs_unplug_only_this_nodes_ports(node: str | None, queued: bool, deleted: bool,
                                          ) -> None:
    p = parts()
    if node is not None:
        p.ovs.add_port("rv1", "br-v", 101, node=node)
    if queued:
        p.batcher.add(pending("rv1"))
    p.ovs_driver.unplug("rv1")
    done = p.batcher.flush()
    assert done.deleted == (("rv1",) if deleted else ())
    assert done.added == ()
    assert ("rv1" in p.ovs.ports) is (node is not None and not deleted)


def test_ovs_owned_ports_gateways_and_orphan_bridges() -> None:
    p = parts()
    p.ovs.add_port("a", "br-v", 101)
    p.ovs.add_port("b", "br-v", 101, node=OTHER_NODE)
    assert p.ovs_driver.owned_ports(NODE) == ["a"]
    assert p.ovs_driver.gateway_ports([OVS_NET, NO_GW]) == {GW_PORT}
    p.ovs.bridges.update({"br-v": {NODE_ID: NODE}, "br-old": {NODE_ID: NODE},
                          "br-theirs": {NODE_ID: OTHER_NODE}, "br-full": {NODE_ID: NODE}})
    p.ovs.add_port("c", "br-full")
    assert p.ovs_driver.orphan_segments(NODE, {"br-v"}) == ["br-old"]
    p.ovs_driver.remove_segment("br-old")
    assert "br-old" not in p.ovs.bridges

    p.ovs.calls.clear()
    p.ovs_driver.remove_ports([])
    assert p.ovs.calls == []  # nothing: no transaction
    p.ovs_driver.remove_ports(["a", "c"])
    assert p.ovs.calls == [("delete_ports", ("a", "c"))]


# --------------------------------------------------------------------------- Linux driver


def _lb(**kw: Any) -> Callable[[Parts], None]:
    def setup(p: Parts) -> None:
        p.linux_driver.ensure_segment(LNX_NET)
        for k, v in kw.items():
            setattr(p.nl.host["br-l"], k, v)
    return setup


def _no_rule(p: Parts) -> None:
    _lb()(p)
    p.fw.rules.clear()


def _not_a_bridge(p: Parts) -> None:
    p.nl.add_link("br-l", "veth")


@pytest.mark.parametrize(("setup", "missing"), [
    (None, ("create linux bridge br-l",)),
    (_not_a_bridge, ("br-l exists and is not a bridge",)),
    (_lb(mtu=1500), ("bridge mtu 1500 -> 1450",)),
    (_lb(up=False), ("bridge down -> up", "gateway address 10.88.0.1/24 on br-l")),
    (_lb(addresses=set()), ("gateway address 10.88.0.1/24 on br-l",)),
    (_no_rule, ("forwarding rule for br-l",)),
    (_lb(), ()),
])
def test_linux_observe_segment(setup: Callable[[Parts], None] | None,
                               missing: tuple[str, ...]) -> None:
    p = parts()
    if setup is not None:
        setup(p)
    p.nl.calls.clear()
    p.fw.calls.clear()
    assert p.linux_driver.observe_segment(LNX_NET) == missing
    assert p.nl.mutations() == [] and p.fw.mutations() == []


def test_linux_ensure_segment_builds_what_is_missing_and_then_nothing() -> None:
    p = parts()
    assert p.linux_driver.ensure_segment(LNX_NET) == [
        "bridge created", "bridge mtu", "bridge up", "gateway addresses",
        "forwarding rule for br-l"]
    assert p.nl.list_owned_bridges(NODE) == {"br-l": "lnet"}
    assert p.linux_driver.ensure_segment(LNX_NET) == []
    no_gw = dataclasses.replace(LNX_NET, gateway=None, mtu=None)
    q = parts()
    assert q.linux_driver.ensure_segment(no_gw) == ["bridge created", "bridge up",
                                                    "forwarding rule for br-l"]
    assert q.linux_driver.observe_segment(no_gw) == ()


def test_linux_ports_are_the_veths_themselves() -> None:
    p = parts()
    p.linux_driver.ensure_segment(LNX_NET)
    veth = host_veth_name(CID, "eth1")
    p.nl.add_link(veth)
    owner = PortOwner(NODE, CID, "eth1", "lnet")
    assert p.linux_driver.observe_port(LNX_NET, veth, owner, 7, None) == PortObs()
    assert p.linux_driver.plug(Plug(LNX_NET, veth, owner, 7, announce=True)) is True
    assert p.nl.host[veth].master == "br-l"
    assert p.linux_driver.observe_port(LNX_NET, veth, owner, 7, "br-l") == PortObs("br-l")
    p.linux_driver.unplug(veth)
    p.linux_driver.remove_ports([veth])
    assert veth in p.nl.host  # the veth sweep removes it, not the driver
    assert p.linux_driver.owned_ports(NODE) == []
    assert p.linux_driver.gateway_ports([LNX_NET]) == set()


def test_linux_orphan_segments_are_unused_empty_bridges_and_unused_rules() -> None:
    p = parts()
    alias = "reconciler:{}@{}"
    p.nl.add_link("br-l", "bridge", alias=alias.format("lnet", NODE))
    p.nl.add_link("br-empty", "bridge", alias=alias.format("old", NODE))
    p.nl.add_link("br-busy", "bridge", alias=alias.format("old2", NODE))
    p.nl.add_link("rv0000000000000", master="br-busy")
    p.nl.add_link("br-ruled", "bridge", alias=alias.format("old3", NODE))
    p.nl.add_link("rv0000000000001", master="br-ruled")
    p.nl.add_link("br-theirs", "bridge", alias=alias.format("x", OTHER_NODE))
    p.nl.add_link("br-docker", "bridge")
    p.fw.rules |= {"br-l", "br-docker", "br-ruled"}

    orphans = p.linux_driver.orphan_segments(NODE, {"br-l"})

    # Not br-busy: a container still uses it (and there is no rule of ours to drop).
    assert orphans == ["br-docker", "br-empty", "br-ruled"]
    for br in orphans:
        p.linux_driver.remove_segment(br)
    # Only the empty bridge we made is deleted; every unused rule of ours goes.
    assert {"br-busy", "br-ruled", "br-docker", "br-theirs", "br-l"} <= set(p.nl.host)
    assert "br-empty" not in p.nl.host
    assert p.fw.rules == {"br-l"}
    assert ("delete_linux_bridge", "br-ruled") not in p.nl.calls


# --------------------------------------------------------------------------- addresses


def book(view: Any = None) -> tuple[AddressBook, FakeIpam]:
    ipam = FakeIpam()
    b = AddressBook(as_ipam(ipam), NODE)
    if view is not None:
        b.set_view(view)
    return b, ipam


def test_addresses_claim_is_cached_a_conflict_is_not() -> None:
    b, ipam = book()
    addr = cidr("10.77.1.5/24").ip
    assert b.claim(OVS_NET, addr, CID, "eth1") is None
    assert b.claim(OVS_NET, addr, CID, "eth1") is None
    assert len(ipam.called("claim")) == 1  # the second came from the cache
    holder = b.claim(OVS_NET, addr, cid_of(2), "eth1")
    assert holder is not None and holder.container == CID
    assert b.cached((cid_of(2), "vnet", "eth1")) is None
    assert b.holder(OVS_NET, addr, CID) is None  # its own address
    held = b.holder(OVS_NET, addr, cid_of(2))
    assert held is not None and held.container == CID


def test_addresses_allocate_is_cached_until_the_pool_moves() -> None:
    b, ipam = book()
    assert str(b.allocate(OVS_NET, CID, "eth1", ())) == "10.77.1.10"
    assert str(b.allocate(OVS_NET, CID, "eth1", ())) == "10.77.1.10"
    assert len(ipam.called("allocate")) == 1
    assert OVS_NET.pool is not None
    moved = dataclasses.replace(OVS_NET, pool=dataclasses.replace(
        OVS_NET.pool, start=cidr("10.77.1.50/24").ip, end=cidr("10.77.1.60/24").ip))
    b.allocate(moved, CID, "eth1", ())
    assert len(ipam.called("allocate")) == 2  # the cached address is outside the pool
    assert b.find(OVS_NET, CID, "eth1") == cidr("10.77.1.10/24").ip
    assert b.find(OVS_NET, CID, "eth9") is None


def test_addresses_allocate_many() -> None:
    wants = [(OVS_NET, CID, "eth1"), (OVS_NET, CID, "eth2")]
    b, ipam = book()
    # No watched view yet (a network new to this host): read once here, in the batch,
    # rather than once per reconcile.
    assert b.allocate_many(wants, ()) == 2
    assert len(ipam.called("allocate_many")) == 1
    assert b.cached((CID, "vnet", "eth2")) == cidr("10.77.1.11/24").ip

    b, ipam = book(view={})
    assert b.allocate_many(wants[:1], ()) == 0  # one alone: the reconcile does it
    assert b.allocate_many(wants, ()) == 2
    assert b.cached((CID, "vnet", "eth2")) == cidr("10.77.1.11/24").ip
    ipam.calls.clear()
    assert b.allocate_many(wants, ()) == 0  # all cached
    assert ipam.calls == []


def test_addresses_allocate_many_failure_is_left_to_the_reconciles(
        caplog: pytest.LogCaptureFixture) -> None:
    b, ipam = book(view={})
    ipam.fail["allocate_many"] = ConsulUnavailable("no agent")
    with caplog.at_level(logging.WARNING):
        n = b.allocate_many([(OVS_NET, CID, "eth1"), (OVS_NET, CID, "eth2")], ())
    assert n == 0
    assert "batch address allocation failed" in caplog.text
    assert b.cached((CID, "vnet", "eth1")) is None


def test_addresses_forget_release_and_reassert() -> None:
    b, ipam = book()
    b.allocate(OVS_NET, CID, "eth1", ())
    b.allocate(OVS_NET, cid_of(2), "eth1", ())
    b.forget(CID)
    assert b.cached((CID, "vnet", "eth1")) is None
    assert b.cached((cid_of(2), "vnet", "eth1")) is not None
    assert b.release_container(CID) == 1
    assert b.reassert(cid_of(3), "vnet", "eth1", "10.77.1.15/24") is True
    assert b.cached((cid_of(3), "vnet", "eth1")) == cidr("10.77.1.15/24").ip
    ipam.reassert_ok = False
    assert b.reassert(cid_of(4), "vnet", "eth1", "10.77.1.16/24") is False
    assert b.cached((cid_of(4), "vnet", "eth1")) is None


def test_addresses_sweep_releases_the_gone_and_rebuilds_the_cache() -> None:
    b, ipam = book()
    running, stopped, gone = cid_of(1), cid_of(2), cid_of(3)
    ipam.hold(OVS_NET, "10.77.1.10", running)
    ipam.hold(OVS_NET, "10.77.1.11", stopped)
    ipam.hold(OVS_NET, "10.77.1.12", gone)
    ipam.hold(OVS_NET, "10.77.1.13", cid_of(4), node=OTHER_NODE)
    ipam.dead = [ipam.hold(LNX_NET, "10.88.0.10", cid_of(5), node="n3")]
    b.allocate(OVS_NET, cid_of(6), "eth1", ())  # cached, then lost behind our back
    ipam.allocs = [a for a in ipam.allocs if a.container != cid_of(6)]

    done, held = b.sweep({running}, lambda c: c == gone, 60.0)

    assert done == ["reclaimed lnet/10.88.0.10 of node n3", "allocation vnet/10.77.1.12"]
    assert ipam.called("reclaim_dead_nodes") == [(60.0,)]
    assert held == {(running, "vnet", "eth1"): cidr("10.77.1.10/24").ip,
                    (stopped, "vnet", "eth1"): cidr("10.77.1.11/24").ip}
    assert b.cached((cid_of(6), "vnet", "eth1")) is None
    assert b.cached((stopped, "vnet", "eth1")) == cidr("10.77.1.11/24").ip


def test_addresses_sweep_remembers_the_entry_the_held_records_name() -> None:
    """A container holding an address under the entry it matches now is not read again
    by its next allocate (500 of them re-attached read their network 500 times); one
    whose record names another entry is, once (the record is rewritten)."""
    b, ipam = book()
    same, moved = cid_of(1), cid_of(2)
    ipam.hold(OVS_NET, "10.77.1.10", same, spec="web")
    ipam.hold(OVS_NET, "10.77.1.11", moved, spec="web")
    b.sweep({same, moved}, lambda c: False, 60.0)
    assert str(b.allocate(OVS_NET, same, "eth1", (), spec="web")) == "10.77.1.10"
    assert ipam.called("allocate") == []
    assert str(b.allocate(OVS_NET, moved, "eth1", (), spec="api")) == "10.77.1.11"
    assert len(ipam.called("allocate")) == 1
    b.allocate(OVS_NET, moved, "eth1", (), spec="api")
    assert len(ipam.called("allocate")) == 1  # remembered since


# --------------------------------------------------------------------------- dirty tracker


def test_dirty_tracker() -> None:
    d = DirtyTracker()
    assert not d.is_clean("a", 1)  # never reconciled
    d.record_clean("a", 1)
    d.record_clean("b", 1)
    assert d.is_clean("a", 1)
    assert not d.is_clean("a", 2)  # its inputs changed
    d.mark_dirty("a")
    assert not d.is_clean("a", 1) and d.dirty_ids() == ["a"]
    d.begin("a")
    assert d.dirty_ids() == [] and not d.is_clean("a", 1)
    # An event during the reconcile keeps it dirty past its record.
    d.mark_dirty("a")
    d.record_clean("a", 1)
    assert not d.is_clean("a", 1)
    d.begin("a")
    d.record_clean("a", 1)
    d.mark_all_dirty()
    assert sorted(d.dirty_ids()) == ["a", "b"]
    d.mark_all_dirty()
    assert sorted(d.dirty_ids()) == ["a", "b"]
    fresh_tracker = DirtyTracker()
    fresh_tracker.mark_all_dirty()
    assert fresh_tracker.dirty_ids() == []  # only what was clean is marked


# --------------------------------------------------------------------------- segments


def test_segments_remember_what_was_built() -> None:
    p = parts()
    seg = p.segments
    assert seg.missing(OVS_NET) == ("create ovs bridge br-v",
                                    f"create gateway port {GW_PORT} (vlan 101)")
    assert seg.missing(OVS_NET) != ()  # still missing: looked at again
    assert len(p.ovs.called("bridge_exists")) == 2
    assert seg.ensure(OVS_NET)[0] == "bridge br-v created"
    p.ovs.calls.clear()
    assert seg.missing(OVS_NET) == ()
    assert p.ovs.called("bridge_exists") == []  # known built
    assert seg.missing(OVS_NET, fresh=True) == ()
    assert seg.missing(dataclasses.replace(OVS_NET, mtu=9000)) == ()  # changed: looked
    assert len(p.ovs.called("bridge_exists")) == 2
    seg.forget()
    seg.missing(dataclasses.replace(OVS_NET, mtu=9000))
    assert len(p.ovs.called("bridge_exists")) == 3


def test_segments_observed_complete_is_remembered_too() -> None:
    p = parts()
    p.ovs_driver.ensure_segment(OVS_NET)
    assert p.segments.missing(OVS_NET) == ()
    p.ovs.calls.clear()
    assert p.segments.missing(OVS_NET) == ()
    assert p.ovs.called("bridge_exists") == []


def test_segments_unknown_driver() -> None:
    with pytest.raises(ReconcilerError, match="network vnet: no driver 'ovs'"):
        Segments({}).driver(OVS_NET)


# --------------------------------------------------------------------------- sweeper


def test_sweeper_an_interface_no_longer_wanted_is_an_orphan() -> None:
    p = parts()
    ipam = FakeIpam()
    web = info(CID, "web")
    st = state({"web": [itf("eth1")]})
    keep = p.nl.add_owned_veth(CID, "eth1")
    drop = p.nl.add_owned_veth(CID, "eth2")
    p.ovs.add_port(keep, "br-v", 101)
    p.ovs.add_port(drop, "br-v", 101)
    p.ovs.add_port(GW_PORT, "br-v", 101)
    ipam.hold(OVS_NET, "10.77.1.10", CID)
    sweeper = Sweeper(node=NODE, nl=as_nl(p.nl), segments=p.segments,
                      addresses=AddressBook(as_ipam(ipam), NODE), inspect=lambda c: None,
                      reclaim_grace=5.0)

    def wants(i: Any) -> list[Any]:
        return list(st.containers["web"].interfaces)

    out = sweeper.sweep(st, [web], wants, {CID: {"eth1": "10.77.1.10/24"}})

    assert out.done == [f"port {drop}", f"veth {drop}"]
    assert out.readdress == []
    assert set(p.ovs.ports) == {keep, GW_PORT}
    assert keep in p.nl.host and drop not in p.nl.host
    assert ipam.called("reassert") == []  # its allocation is held
    assert ipam.called("reclaim_dead_nodes") == [(5.0,)]


def test_sweeper_without_a_known_address_reasserts_nothing() -> None:
    p = parts()
    ipam = FakeIpam()
    st = state({"web": [itf("eth1")]})
    sweeper = Sweeper(node=NODE, nl=as_nl(p.nl), segments=p.segments,
                      addresses=AddressBook(as_ipam(ipam), NODE), inspect=lambda c: None,
                      reclaim_grace=5.0)
    out = sweeper.sweep(st, [info(CID, "web")],
                        lambda i: list(st.containers["web"].interfaces), {})
    assert out.done == [] and ipam.called("reassert") == []

