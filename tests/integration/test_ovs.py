"""Integration tests of reconciler.adapters.ovs (with netlink) against the real OVS.

Bridges are named ``rto<hex>`` per test and deleted in fixtures; targets are processes in
fresh network namespaces (``unshare --net sleep``); subnets are in 10.77.0.0/16.
"""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from helpers import NetnsFactory, ip_if, ovs_vsctl, pings, wait_for

from reconciler.adapters.netlink import ContainerNetns, InterfaceSpec, NetlinkAdapter
from reconciler.adapters.ovs import (
    IFINDEX_KEY,
    NODE_KEY,
    OWNER,
    OWNER_KEY,
    NewPort,
    OvsAdapter,
    PortEvent,
    detect_datapath,
)
from reconciler.errors import OvsError

pytestmark = pytest.mark.integration


def vsctl_get(table: str, record: str, column: str) -> str:
    return ovs_vsctl("get", table, record, column).stdout.strip().strip('"')


@pytest.fixture(scope="module")
def octet() -> int:
    return 180 + secrets.randbelow(50)


@pytest.fixture(scope="module")
def ovs() -> Iterator[OvsAdapter]:
    adapter = OvsAdapter()
    yield adapter
    adapter.close()


@pytest.fixture
def bridge(ovs: OvsAdapter) -> Iterator[str]:
    """An owned OVS bridge, unique to the test, removed afterwards."""
    name = f"rto{secrets.token_hex(4)}"
    assert ovs.ensure_bridge(name) is True
    yield name
    ovs_vsctl("--if-exists", "del-br", name, check=False)


@pytest.fixture
def veth(cleanup_links: list[str]) -> Callable[[], str]:
    """Make a host veth pair (up) and return the name of one end."""

    def make() -> str:
        name = f"rtv{secrets.token_hex(4)}"
        subprocess.run(
            ["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"], check=True
        )
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        cleanup_links.append(name)
        return name

    return make


def test_datapath_detection_matches_a_real_probe(ovs: OvsAdapter, ovs_datapath: str) -> None:
    assert detect_datapath() == ovs_datapath
    assert ovs.datapath == ovs_datapath
    with pytest.raises(OvsError):
        OvsAdapter(datapath="bogus")


def test_bridge_ownership(ovs: OvsAdapter, bridge: str) -> None:
    assert ovs.ensure_bridge(bridge) is False
    assert ovs.bridge_owned(bridge)
    assert ovs.bridge_port_names(bridge) == []  # its own local port does not count
    assert bridge not in ovs.list_owned_bridges(node="n1")
    assert ovs.ensure_bridge(bridge, external_ids={NODE_KEY: "n1"}) is True  # ids merged
    assert bridge in ovs.list_owned_bridges(node="n1")
    assert bridge not in ovs.list_owned_bridges(node="n2")
    assert vsctl_get("Bridge", bridge, "datapath_type") == ovs.datapath
    assert bridge in ovs.list_owned_bridges()
    assert vsctl_get("Bridge", bridge, f"external_ids:{OWNER_KEY}") == OWNER

    foreign = f"rtf{secrets.token_hex(4)}"
    ovs_vsctl("add-br", foreign, "--", "set", "bridge", foreign, f"datapath_type={ovs.datapath}")
    try:
        wait_for(lambda: ovs.bridge_exists(foreign), timeout=5)
        assert ovs.ensure_bridge(foreign) is False  # used as it is, never claimed
        assert not ovs.bridge_owned(foreign)
        assert ovs.delete_bridge(foreign) is False
        assert ovs_vsctl("br-exists", foreign, check=False).returncode == 0
        assert foreign not in ovs.list_owned_bridges()
    finally:
        ovs_vsctl("--if-exists", "del-br", foreign, check=False)

    assert ovs.delete_bridge(bridge) is True
    assert ovs.delete_bridge(bridge) is False
    assert ovs_vsctl("br-exists", bridge, check=False).returncode != 0


def test_port_lifecycle_and_drift(ovs: OvsAdapter, bridge: str, veth: Callable[[], str]) -> None:
    port = veth()
    ids = {NODE_KEY: "node-a", "reconciler-network": "vnet1"}
    events: list[PortEvent] = []
    unsubscribe = ovs.subscribe(events.append)
    try:
        assert ovs.ensure_port(bridge, port, 101, ids) is True
        # tag and ownership were there from the very first row version
        first = wait_for(
            lambda: next(
                (e for e in events if e.kind == "create" and e.table == "Port" and e.name == port),
                None,
            ),
            timeout=5,
        )
        assert first.owned and first.external_ids[NODE_KEY] == "node-a"
    finally:
        unsubscribe()
    assert vsctl_get("Port", port, "tag") == "101"
    assert vsctl_get("Interface", port, f"external_ids:{OWNER_KEY}") == OWNER
    assert vsctl_get("Port", port, "external_ids:reconciler-network") == "vnet1"
    got = ovs.get_port(port)
    assert got is not None and got.bridge == bridge and got.tag == 101
    dp = ovs.datapath_state([port])[port]
    assert dp.ofport is not None and dp.ofport > 0  # the datapath really took the port
    assert dp.error is None and dp.ifindex is not None and dp.ifindex > 0

    assert ovs.ensure_port(bridge, port, 101, ids) is False
    assert ovs.ensure_port(bridge, port, 102, ids) is True
    assert vsctl_get("Port", port, "tag") == "102"

    # drift by hand: wrong tag, our key changed, a foreign key added (kept)
    ovs_vsctl(
        "set", "Port", port, "tag=999", "external_ids:reconciler-network=x", "external_ids:foo=bar"
    )
    wait_for(lambda: (p := ovs.get_port(port)) is not None and p.tag == 999, timeout=5)
    assert ovs.ensure_port(bridge, port, 102, ids) is True
    assert vsctl_get("Port", port, "tag") == "102"
    assert vsctl_get("Port", port, "external_ids:reconciler-network") == "vnet1"
    assert vsctl_get("Port", port, "external_ids:foo") == "bar"

    assert [p.name for p in ovs.list_owned_ports(node="node-a") if p.bridge == bridge] == [port]
    assert not [p for p in ovs.list_owned_ports(node="node-b") if p.bridge == bridge]

    # moved to another bridge by hand (the same row): seen, and moved back
    other = f"rto{secrets.token_hex(4)}"
    assert ovs.ensure_bridge(other) is True
    try:
        uuid = ovs_vsctl("get", "Port", port, "_uuid").stdout.strip()
        ovs_vsctl("remove", "Bridge", bridge, "ports", uuid, "--",
                  "add", "Bridge", other, "ports", uuid)
        wait_for(lambda: (p := ovs.get_port(port)) is not None and p.bridge == other,
                 timeout=5, message="the move seen in the replica")
        assert ovs.port_differs(bridge, port, 102, ids) is True
        assert ovs.ensure_port(bridge, port, 102, ids) is True
        assert ovs_vsctl("port-to-br", port).stdout.strip() == bridge
        got = ovs.get_port(port)
        assert got is not None and got.bridge == bridge
        assert ovs.port_differs(bridge, port, 102, ids) is False
    finally:
        ovs_vsctl("--if-exists", "del-br", other, check=False)

    assert ovs.delete_port(port) is True
    assert ovs.delete_port(port) is False
    assert ovs_vsctl("port-to-br", port, check=False).returncode != 0


def test_delete_ports_removes_owned_rows_in_one_commit_without_waiting(
        ovs: OvsAdapter, bridge: str, veth: Callable[[], str]) -> None:
    ours = [veth() for _ in range(3)]
    for p in ours:
        ovs.ensure_port(bridge, p, 7, {})
    foreign = veth()
    ovs_vsctl("add-port", bridge, foreign)
    wait_for(lambda: foreign in ovs.bridge_port_names(bridge), timeout=5)

    assert ovs.delete_ports([*ours, foreign, "rtvmissing"]) == ours
    # the rows are gone from the database when it returns
    left = ovs_vsctl("list-ports", bridge).stdout.split()
    assert left == [foreign]
    assert ovs_vsctl("--columns=name", "find", "Interface", f"name={ours[0]}").stdout == ""
    wait_for(lambda: set(ovs.bridge_port_names(bridge)) == {foreign}, timeout=5,
             message="the deletion seen in the replica")
    assert ovs.delete_ports(ours) == [] and ovs.delete_ports([]) == []


def test_foreign_port_is_left_alone(ovs: OvsAdapter, bridge: str, veth: Callable[[], str]) -> None:
    port = veth()
    ovs_vsctl("add-port", bridge, port)
    wait_for(lambda: ovs_vsctl("port-to-br", port, check=False).returncode == 0, timeout=5)
    assert ovs.delete_port(port) is False
    assert port not in [p.name for p in ovs.list_owned_ports()]
    assert ovs_vsctl("port-to-br", port).stdout.strip() == bridge


def test_port_delete_notification(ovs: OvsAdapter, bridge: str, veth: Callable[[], str]) -> None:
    port = veth()
    ovs.ensure_port(bridge, port, 5, {})
    deleted: list[PortEvent] = []
    unsubscribe = ovs.subscribe(
        lambda e: deleted.append(e) if e.kind == "delete" and e.name == port else None
    )
    try:
        ovs_vsctl("del-port", port)
        t0 = time.monotonic()
        wait_for(lambda: deleted, timeout=2, message="Port/Interface delete event")
        assert time.monotonic() - t0 < 2
        assert all(e.owned for e in deleted)
        assert {e.table for e in wait_for(lambda: len(deleted) >= 2 and deleted, 2)} == {
            "Port",
            "Interface",
        }
    finally:
        unsubscribe()
    assert ovs.ensure_port(bridge, port, 5, {}) is True  # and the next ensure repairs it


def test_own_port_deletions_are_not_reported_back(
        ovs: OvsAdapter, bridge: str, veth: Callable[[], str]) -> None:
    """A port the adapter deletes itself (a batch of them, as the port batcher does) is
    no news to its subscribers; a port deleted by someone else still is."""
    ours, theirs = [veth() for _ in range(3)], veth()
    for p in [*ours, theirs]:
        ovs.ensure_port(bridge, p, 5, {})
    deleted: list[str] = []
    unsubscribe = ovs.subscribe(
        lambda e: deleted.append(e.name) if e.kind == "delete" and e.table == "Port" else None)
    try:
        with ovs.transaction():
            for p in ours:
                assert ovs.delete_port(p) is True
        ovs_vsctl("del-port", theirs)
        wait_for(lambda: theirs in deleted, timeout=5, message="foreign delete event")
    finally:
        unsubscribe()
    assert not set(ours) & set(deleted)
    assert not {p.name for p in ovs.list_owned_ports() if p.bridge == bridge}


def test_a_subscriber_gets_only_the_changes_it_asked_for(
        ovs: OvsAdapter, bridge: str, veth: Callable[[], str]) -> None:
    """The daemon asks for deletions of ports only; everyone else still gets everything."""
    port = veth()
    asked: list[tuple[str, str]] = []
    everything: list[tuple[str, str]] = []
    unsub_asked = ovs.subscribe(lambda e: asked.append((e.kind, e.table)),
                                kinds={"delete"}, tables={"Port"})
    unsub_all = ovs.subscribe(lambda e: everything.append((e.kind, e.table)))
    try:
        ovs.ensure_port(bridge, port, 7, {})
        wait_for(lambda: ("create", "Interface") in everything, timeout=5,
                 message="create events")
        assert asked == []
        ovs_vsctl("del-port", port)
        wait_for(lambda: ("delete", "Port") in asked, timeout=5, message="the delete")
        wait_for(lambda: ("delete", "Interface") in everything, timeout=5,
                 message="the Interface delete")
    finally:
        unsub_asked()
        unsub_all()
    assert set(asked) == {("delete", "Port")}
    assert {("create", "Port"), ("delete", "Port")} <= set(everything)


def test_the_replica_is_not_woken_by_what_vswitchd_writes_about_a_port(
        ovs: OvsAdapter, bridge: str, veth: Callable[[], str]) -> None:
    """ovs-vswitchd rewrites an interface's link state (and ofport, ifindex, error) as it
    opens it and as its carrier changes: those columns are read on demand, and the
    replica, which the daemon's readers share under one lock, does not parse them."""
    port = veth()
    subprocess.run(["ip", "link", "set", port + "p", "down"], check=True)
    ovs.ensure_port(bridge, port, 9, {})
    wait_for(lambda: ovs.datapath_state([port]).get(port), timeout=5, message="the row")
    assert wait_for(lambda: ovs.datapath_state([port])[port].link_state == "down", timeout=5)
    updates: list[str] = []
    unsubscribe = ovs.subscribe(lambda e: updates.append(e.name) if e.name == port else None)
    try:
        subprocess.run(["ip", "link", "set", port + "p", "up"], check=True)
        assert wait_for(lambda: ovs.datapath_state([port])[port].link_state == "up",
                        timeout=10, message="vswitchd writing link_state up")
        ovs.ensure_port(bridge, port, 10, {})  # a change of ours, after vswitchd's
        wait_for(lambda: updates, timeout=5, message="the update of the tag")
    finally:
        unsubscribe()
    assert updates == [port]  # the Port's tag; nothing of the Interface
    assert ovs.datapath_state([port, "no-such-port"]).keys() == {port}


def test_batched_ports(ovs: OvsAdapter, bridge: str, veth: Callable[[], str]) -> None:
    ports = [veth() for _ in range(20)]
    with ovs.transaction():
        results = [ovs.ensure_port(bridge, p, 200 + i, {}) for i, p in enumerate(ports)]
        assert ovs.get_port(ports[0]) is None  # nothing is committed inside the block
    assert results == [True] * 20
    owned = {p.name: p for p in ovs.list_owned_ports() if p.bridge == bridge}
    assert {n: owned[n].tag for n in ports} == {p: 200 + i for i, p in enumerate(ports)}
    assert ovs.bridge_port_names(bridge) == sorted(ports)
    with ovs.transaction():
        assert [ovs.ensure_port(bridge, p, 200 + i, {}) for i, p in enumerate(ports)] == [
            False
        ] * 20
    with ovs.transaction():
        for p in ports:
            ovs.delete_port(p)
    assert not [p for p in ovs.list_owned_ports() if p.bridge == bridge]


def test_add_ports_in_one_transaction_like_ensure_port(
        ovs: OvsAdapter, bridge: str, veth: Callable[[], str]) -> None:
    ports = [veth() for _ in range(30)]
    ids = {NODE_KEY: "n1", "reconciler-container": "c"}
    new = [NewPort(bridge, p, 300 + i if i else None, ids, ifindex=1000 + i)
           for i, p in enumerate(ports)]
    assert ovs.add_ports(new) is True
    # Applied by vswitchd when it returns: every port is open (ofport) and in the replica.
    owned = {p.name: p for p in ovs.list_owned_ports(node="n1") if p.bridge == bridge}
    assert set(owned) == set(ports)
    assert owned[ports[0]].tag is None and owned[ports[5]].tag == 305
    opened = ovs.datapath_state(ports)
    assert set(opened) == set(ports)
    assert all((d.ofport or 0) > 0 for d in opened.values()), opened
    assert owned[ports[3]].external_ids[IFINDEX_KEY] == "1003"
    assert vsctl_get("Interface", ports[3], "external_ids:reconciler-owner") == OWNER
    assert vsctl_get("Port", ports[5], "tag") == "305"
    # What ensure_port would write: nothing left to change.
    with ovs.transaction():
        assert not any(ovs.ensure_port(bridge, n.name, n.vlan, ids, ifindex=n.ifindex)
                       for n in new)
    # Not for existing ports, nor missing bridges: False, and nothing is written.
    extra = veth()
    assert ovs.add_ports([NewPort(bridge, extra, 5, ids), new[0]]) is False
    assert ovs.add_ports([NewPort(f"rto{secrets.token_hex(4)}", extra, 5, ids)]) is False
    assert ovs.get_port(extra) is None
    with pytest.raises(OvsError, match="vlan 5000 out of range"):
        ovs.add_ports([NewPort(bridge, extra, 5000, ids)])


def test_failed_batch_raises_ovs_error(ovs: OvsAdapter, veth: Callable[[], str]) -> None:
    with pytest.raises(OvsError, match="does not exist"):
        ovs.ensure_port(f"rtx{secrets.token_hex(4)}", veth(), 1, {})


@dataclass
class Rig:
    """What an attach test needs: both adapters, an owned bridge, fresh network
    namespaces, host links to delete at teardown and the module's third octet."""

    ovs: OvsAdapter
    nl: NetlinkAdapter
    bridge: str
    netns: NetnsFactory
    links: list[str]
    octet: int

    def attach(
        self, ns: ContainerNetns, vlan: int, address: str, gateway: str | None = None
    ) -> InterfaceSpec:
        spec = InterfaceSpec(
            f"test-{secrets.token_hex(4)}",
            "eth1",
            (ip_if(address),),
            mtu=1400,
            gateway=ipaddress.ip_address(gateway) if gateway else None,
        )
        self.links.append(spec.host_veth)
        self.nl.ensure_interface(ns, spec)
        self.ovs.ensure_port(
            self.bridge, spec.host_veth, vlan, {"reconciler-container": spec.container_id}
        )
        return spec


@pytest.fixture
def rig(
    ovs: OvsAdapter,
    nl: NetlinkAdapter,
    bridge: str,
    netns_factory: NetnsFactory,
    cleanup_links: list[str],
    octet: int,
) -> Rig:
    return Rig(ovs, nl, bridge, netns_factory, cleanup_links, octet)


def test_vlan_isolation_on_one_bridge(rig: Rig) -> None:
    octet = rig.octet
    a, b, c = rig.netns(), rig.netns(), rig.netns()
    rig.attach(a, 10, f"10.77.{octet}.10/24")
    rig.attach(b, 20, f"10.77.{octet}.11/24")
    rig.attach(c, 10, f"10.77.{octet}.12/24")
    assert wait_for(lambda: pings(a.pid, f"10.77.{octet}.12"), timeout=10)  # same VLAN
    assert not pings(a.pid, f"10.77.{octet}.11", count=2)  # same subnet, other VLAN
    assert not pings(b.pid, f"10.77.{octet}.12", count=2)


def test_internal_port_gateway_and_recreated_veth(rig: Rig) -> None:
    ovs, nl, bridge, octet = rig.ovs, rig.nl, rig.bridge, rig.octet
    gw_port = f"rtg{secrets.token_hex(4)}"
    assert ovs.ensure_internal_port(bridge, gw_port, 30, {"reconciler-network": "n"}, mtu=1400)
    assert ovs.ensure_internal_port(bridge, gw_port, 30, {"reconciler-network": "n"}, mtu=1400) is (
        False
    )
    # with the netdev datapath the internal port is a tap device on the host
    wait_for(lambda: nl.link_exists(gw_port), timeout=5, message="internal port netdev")
    gw = ip_if(f"10.77.{octet}.1/24")
    nl.ensure_host_address(gw_port, gw)
    ns = rig.netns()
    spec = rig.attach(ns, 30, f"10.77.{octet}.40/24", gateway=str(gw.ip))
    assert wait_for(lambda: pings(None, f"10.77.{octet}.40"), timeout=10)
    assert pings(ns.pid, str(gw.ip))

    # The host veth vanishes (its peer with it). ensure_interface recreates the pair under
    # the same name; the new ifindex makes ensure_port re-create the port (the userspace
    # datapath would keep reading the dead netdev), and an announce refreshes neighbours.
    ids = {"reconciler-container": spec.container_id}
    old_ifindex = nl.link_index(spec.host_veth)
    assert ovs.ensure_port(bridge, spec.host_veth, 30, ids, ifindex=old_ifindex) is True
    assert ovs.ensure_port(bridge, spec.host_veth, 30, ids, ifindex=old_ifindex) is False
    subprocess.run(["ip", "link", "del", spec.host_veth], check=True)
    assert not pings(None, f"10.77.{octet}.40")
    nl.ensure_interface(ns, spec)
    new_ifindex = nl.observe(ns, spec.container_id, "eth1").host_ifindex
    assert new_ifindex is not None and new_ifindex != old_ifindex
    assert ovs.ensure_port(bridge, spec.host_veth, 30, ids, ifindex=new_ifindex) is True
    got = ovs.get_port(spec.host_veth)
    assert got is not None and got.external_ids[IFINDEX_KEY] == str(new_ifindex)
    assert got.tag == 30
    assert nl.announce(ns, "eth1") == 1
    assert wait_for(lambda: pings(None, f"10.77.{octet}.40"), timeout=10)


def test_attach_cost_50(rig: Rig) -> None:
    """50 attaches: netlink per container, the OVS ports in one batch. Printed, and bounded."""
    ovs, nl, bridge, octet = rig.ovs, rig.nl, rig.bridge, rig.octet
    handles = [rig.netns() for _ in range(50)]
    specs = []
    for i in range(50):
        spec = InterfaceSpec(
            f"test-{secrets.token_hex(4)}",
            "eth1",
            (ip_if(f"10.77.{octet}.{100 + i}/24"),),
            mtu=1400,
        )
        specs.append(spec)
        rig.links.append(spec.host_veth)
    t0 = time.perf_counter()
    for ns, spec in zip(handles, specs, strict=True):
        nl.ensure_interface(ns, spec)
    t1 = time.perf_counter()
    with ovs.transaction():
        for spec in specs:
            ovs.ensure_port(bridge, spec.host_veth, 40, {"reconciler-container": spec.container_id})
    t2 = time.perf_counter()
    per_nl, per_ovs = (t1 - t0) / 50 * 1000, (t2 - t1) / 50 * 1000
    print(
        f"\n50 attaches: netlink {per_nl:.1f} ms + ovs {per_ovs:.1f} ms "
        f"= {per_nl + per_ovs:.1f} ms per attach"
    )
    assert per_nl + per_ovs < 100
    opened = ovs.datapath_state([s.host_veth for s in specs])
    assert all(opened[s.host_veth].ofport for s in specs)
    assert wait_for(lambda: pings(handles[0].pid, f"10.77.{octet}.149"), timeout=10)
