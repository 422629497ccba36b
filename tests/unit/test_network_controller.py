"""The network controller's decisions, over in-memory fakes of netlink, OVSDB, the bridge
firewall and IPAM (tests/unit/netfakes.py): what a reconcile of one container creates,
plugs, announces, detaches, allocates and releases, what it reports, what it leaves
alone (clean containers, built segments, a dry run), and what the sweep removes.

(The adapters themselves are covered against the real kernel and services in
tests/integration; here they are seams.)
"""

from __future__ import annotations

import dataclasses
import logging

import pytest

from reconciler.adapters.netlink import LinkExpect, host_veth_alias, host_veth_name
from reconciler.errors import (
    ConsulUnavailable,
    ContainerError,
    NetlinkError,
    OvsError,
    PoolExhausted,
    Problem,
)
from reconciler.kvlayout import Layout
from reconciler.model import AddressPool, DesiredState, InterfaceSpec, Network
from reconciler.network.controller import NAME_LABEL, spec_for, spec_key_for
from reconciler.network.drivers.base import gateway_port_name
from reconciler.network.drivers.ovs import NODE_ID

from .netfakes import (
    LNX_NET,
    NODE,
    OTHER_NODE,
    OVS_NET,
    FakeWatcher,
    Rig,
    cid_of,
    cidr,
    info,
    ip,
    itf,
    make_rig,
    state,
)

CID = cid_of(1)
OTHER = cid_of(2)
WEB = info(CID, "web")
VETH1 = host_veth_name(CID, "eth1")
VETH2 = host_veth_name(CID, "eth2")
GW_PORT = gateway_port_name("vnet")


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> Rig:
    return make_rig(monkeypatch)


def attached(rig: Rig, *itfs: InterfaceSpec) -> Rig:
    """`web` attached with `itfs` (default: eth1 on vnet) and its ports committed."""
    rig.ctrl.set_state(state({"web": list(itfs) or [itf("eth1")]}))
    rig.reconcile(WEB)
    rig.ctrl.flush_ports()
    rig.clear()
    return rig


def test_is_clean_until_an_event_or_another_process(rig: Rig) -> None:
    """What a light resync asks instead of reconciling: clean after a reconcile with this
    process, spec and networks; not after an event, with another process, or before any
    reconcile."""
    assert not rig.ctrl.is_clean(WEB)
    attached(rig)
    assert rig.ctrl.is_clean(WEB)
    assert not rig.ctrl.is_clean(dataclasses.replace(WEB, pid=WEB.pid + 1))
    rig.ctrl.mark_dirty(WEB.id)
    assert not rig.ctrl.is_clean(WEB)
    rig.reconcile(WEB)
    assert rig.ctrl.is_clean(WEB)
    rig.ctrl.set_state(state({"web": [itf("eth1"), itf("eth2")]}))
    assert not rig.ctrl.is_clean(WEB)  # its spec changed


# --------------------------------------------------------------------------- attach


def test_fresh_ovs_container_is_created_queued_and_announced_after_the_commit(
        rig: Rig) -> None:
    rig.ctrl.set_state(state({"web": [itf("eth1")]}))
    res = rig.reconcile(WEB)

    assert res.errors == []
    assert res.addresses == {"eth1": "10.77.1.10/24"}
    assert res.interfaces == {"eth1"}
    # A first attach: planned as new without reading the interface, and made so.
    assert rig.nl.called("observe") == [] and rig.nl.called("ensure_interface") == []
    [(ifname, spec)] = rig.nl.called("create_interface")
    assert ifname == "eth1"
    assert spec.addresses == (cidr("10.77.1.10/24"),)
    assert (spec.mtu, spec.tx_checksum, spec.announce) == (1400, None, False)
    assert spec.owner == host_veth_alias(NODE, CID, "eth1")
    assert rig.nl.fresh_creates == 1  # neither end was there: made without reading first
    assert rig.nl.index_lookups == 0  # the plug took the host end's index from the creation
    # The segment was built: bridge, gateway port on the VLAN, gateway address.
    assert rig.ovs.bridges["br-v"] == {NODE_ID: NODE, "reconciler-network": "vnet"}
    assert rig.ovs.ports[GW_PORT].tag == 101
    assert rig.nl.has_host_address(GW_PORT, cidr("10.77.1.1/24"))
    # The port waits for the batch: not on the switch, nobody announced yet.
    assert rig.kicks == [1]
    assert rig.ctrl.queued_containers() == [CID]
    assert VETH1 not in rig.ovs.ports
    assert rig.nl.called("announce") == []

    done = rig.ctrl.flush_ports()

    assert done.added == (VETH1,)
    port = rig.ovs.ports[VETH1]
    assert (port.bridge, port.tag) == ("br-v", 101)
    assert rig.ovs.recorded_ifindex[VETH1] == rig.nl.link_index(VETH1)
    assert port.external_ids == {NODE_ID: NODE, "reconciler-container": CID,
                                 "reconciler-interface": "eth1", "reconciler-network": "vnet"}
    assert rig.nl.called("announce") == [("eth1", (cidr("10.77.1.10/24"),))]
    # Announced inside the container, whose process is known by its start time.
    assert rig.netns.opened[-1] == (WEB.pid, WEB.start_time)
    assert rig.ctrl.queued_containers() == []
    assert all(ns.closed for ns in rig.netns.handles)


def test_an_interface_made_before_this_process_is_found_and_planned_observed(
        rig: Rig) -> None:
    """After a restart the daemon has attached nothing yet: its first try to make an
    interface that is there (EEXIST) does nothing, and the container is planned again
    with the interface read — only what drifted is repaired, nothing is re-created."""
    rig.ctrl.set_state(state({"web": [itf("eth1")]}))
    rig.reconcile(WEB)
    rig.ctrl.flush_ports()
    rig.ctrl._results.clear()  # a new process: nothing attached by it yet
    rig.ovs.ports[VETH1] = dataclasses.replace(rig.ovs.ports[VETH1], tag=999)  # drifted
    rig.clear()

    res = rig.reconcile(WEB)

    assert res.errors == []
    assert [i for i, _ in rig.nl.called("create_interface")] == ["eth1"]  # EEXIST
    assert rig.nl.called("observe") == [("eth1",)]
    assert rig.nl.called("ensure_interface") == []  # the link itself is right
    assert res.changes == ["eth1 port"]  # only the port's tag is repaired
    assert res.interfaces == {"eth1"} and res.addresses == {"eth1": "10.77.1.10/24"}
    rig.ctrl.flush_ports()
    assert rig.ovs.ports[VETH1].tag == 101
    assert rig.nl.called("announce") == []  # nothing about the address changed


def test_fresh_linux_container_is_enslaved_and_announced_at_once(rig: Rig) -> None:
    rig.ctrl.set_state(state({"web": [itf("eth1", "lnet")]}))
    res = rig.reconcile(WEB)

    assert res.addresses == {"eth1": "10.88.0.10/24"}
    assert rig.nl.called("enslave") == [(VETH1, "br-l")]
    assert rig.nl.called("announce") == [("eth1", (cidr("10.88.0.10/24"),))]
    names = rig.nl.names()
    assert names.index("create_interface") < names.index("enslave") < names.index("announce")
    assert len(rig.batcher) == 0 and rig.kicks == []
    bridge = rig.nl.host["br-l"]
    assert (bridge.kind, bridge.mtu, bridge.up) == ("bridge", 1450, True)
    assert cidr("10.88.0.1/24") in bridge.addresses
    assert rig.fw.rules == {"br-l"}
    assert res.changes == ["bridge created", "bridge mtu", "bridge up", "gateway addresses",
                           "forwarding rule for br-l", "eth1 created", "eth1 bridge",
                           "eth1 garp"]


def test_netdev_datapath_turns_tx_checksum_offload_off(monkeypatch: pytest.MonkeyPatch,
                                                      ) -> None:
    rig = make_rig(monkeypatch, datapath="netdev")
    rig.ctrl.set_state(state({"web": [itf("eth1")]}))
    rig.reconcile(WEB)
    [(_, spec)] = rig.nl.called("create_interface")
    assert spec.tx_checksum is False


def test_without_notify_a_queued_port_is_committed_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_rig(monkeypatch, notify=False)
    rig.ctrl.set_state(state({"web": [itf("eth1")]}))
    rig.reconcile(WEB)
    assert VETH1 in rig.ovs.ports
    assert rig.ctrl.queued_containers() == []
    assert rig.nl.called("announce") == [("eth1", (cidr("10.77.1.10/24"),))]


def test_announce_of_a_container_gone_before_the_commit_is_dropped(rig: Rig) -> None:
    rig.ctrl.set_state(state({"web": [itf("eth1")]}))
    rig.reconcile(WEB)
    rig.netns.dead.add(WEB.pid)
    done = rig.ctrl.flush_ports()
    assert done.added == (VETH1,)  # committed all the same
    assert rig.nl.called("announce") == []


# --------------------------------------------------------------------------- resync


@pytest.mark.parametrize(("change", "looked"), [
    ("nothing", False),
    ("mark_dirty", True),
    ("mark_all_dirty", True),
    ("restarted (new pid)", True),
    ("network changed", True),
    ("spec changed", True),
])
def test_a_clean_container_is_not_looked_at_again(rig: Rig, change: str, looked: bool,
                                                  ) -> None:
    attached(rig)
    first = rig.ctrl.result(CID)
    assert first is not None
    i = WEB
    if change == "mark_dirty":
        rig.ctrl.mark_dirty(CID)
        assert rig.ctrl.dirty_ids() == [CID]
    elif change == "mark_all_dirty":
        rig.ctrl.mark_all_dirty()
    elif change == "restarted (new pid)":
        i = dataclasses.replace(WEB, pid=5151)
    elif change == "network changed":
        rig.ctrl.set_state(state({"web": [itf("eth1")]},
                                 [dataclasses.replace(OVS_NET, vlan=102), LNX_NET]))
    elif change == "spec changed":
        rig.ctrl.set_state(state({"web": [itf("eth1", mtu=1300)]}))

    res = rig.reconcile(i)

    assert ("observe", "eth1") in rig.nl.calls if looked else rig.nl.calls == []
    assert bool(rig.netns.opened) is looked
    assert res.addresses == first.addresses == {"eth1": "10.77.1.10/24"}
    assert rig.ctrl.dirty_ids() == []


def test_a_dirty_container_without_drift_changes_nothing(rig: Rig) -> None:
    attached(rig)
    rig.ctrl.mark_dirty(CID)
    res = rig.reconcile(WEB)
    assert rig.nl.names() == ["observe"]
    assert rig.ovs.mutations() == [] and len(rig.batcher) == 0
    assert res.changes == []
    assert res.addresses == {"eth1": "10.77.1.10/24"}


@pytest.mark.parametrize(("drift", "change", "announced"), [
    # the address was changed inside: repaired, and neighbours must learn it at once
    ({"addresses": (cidr("10.77.1.99/24"),)}, "eth1 addresses", True),
    # an MTU changed inside: repaired, nothing to announce
    ({"mtu": 1500}, "eth1 mtu", False),
])
def test_drift_inside_is_repaired_without_replugging(rig: Rig, drift: dict[str, object],
                                                    change: str, announced: bool) -> None:
    attached(rig)
    key = (CID, "eth1")
    rig.nl.inside[key] = dataclasses.replace(rig.nl.inside[key], **drift)  # type: ignore[arg-type]
    rig.ctrl.mark_dirty(CID)

    res = rig.reconcile(WEB)

    assert change in res.changes
    assert rig.nl.inside[key].addresses == (cidr("10.77.1.10/24"),)
    assert rig.nl.inside[key].mtu == 1400
    assert len(rig.batcher) == 0  # the port is right: not re-plugged
    assert bool(rig.nl.called("announce")) is announced


def test_an_ovs_port_moved_off_its_vlan_is_replugged(rig: Rig) -> None:
    attached(rig)
    rig.ovs.ports[VETH1] = dataclasses.replace(rig.ovs.ports[VETH1], tag=999)
    rig.ctrl.mark_dirty(CID)
    res = rig.reconcile(WEB)
    assert rig.nl.called("ensure_interface") == []
    assert "eth1 port" in res.changes
    rig.ctrl.flush_ports()
    assert rig.ovs.ports[VETH1].tag == 101
    assert rig.nl.called("announce") == []  # the link did not change: nothing to announce


def test_a_veth_taken_off_its_linux_bridge_is_enslaved_again(rig: Rig) -> None:
    attached(rig, itf("eth1", "lnet"))
    rig.nl.host[VETH1].master = None
    rig.ctrl.mark_dirty(CID)
    res = rig.reconcile(WEB)
    assert rig.nl.called("enslave") == [(VETH1, "br-l")]
    assert res.changes == ["eth1 bridge"]
    assert rig.nl.called("announce") == []  # the link did not change: nothing to announce


# --------------------------------------------------------------------------- errors


def test_a_blocked_interface_is_not_created_reported_and_not_published(rig: Rig) -> None:
    rig.ctrl.set_state(state({"web": [itf("eth1"), itf("eth2")]}))
    rig.nl.foreign.add((CID, "eth1"))  # someone else's eth1 is in the container

    with pytest.raises(ContainerError, match="web eth1: eth1 exists and is not "
                                             "reconciler's veth"):
        rig.reconcile(WEB)

    res = rig.ctrl.result(CID)
    assert res is not None
    # Planned as new, eth1 was found there (not ours): nothing done to it, and the
    # container planned again, observed.
    assert [i for i, _ in rig.nl.called("create_interface")] == ["eth1"]
    assert [i for i, _ in rig.nl.called("ensure_interface")] == ["eth2"]
    assert res.addresses == {"eth2": "10.77.1.11/24"}  # the other interface is attached
    assert "eth1" not in res.interfaces
    rig.ctrl.flush_ports()
    assert VETH1 not in rig.ovs.ports and VETH2 in rig.ovs.ports
    # Not recorded clean: the next resync looks again.
    rig.clear()
    with pytest.raises(ContainerError):
        rig.reconcile(WEB)
    assert ("observe", "eth1") in rig.nl.calls


def test_a_static_address_held_by_another_container_is_a_conflict(rig: Rig) -> None:
    rig.ipam.hold(OVS_NET, "10.77.1.5", OTHER, "eth0", node=OTHER_NODE)
    rig.ctrl.set_state(state({"web": [itf("eth1", address="10.77.1.5/24"), itf("eth2")]}))

    with pytest.raises(ContainerError, match=r"web eth1: static address 10\.77\.1\.5 on "
                                             r"network 'vnet' is held by container "
                                             r"000200020002 \(eth0\) on node n2"):
        rig.reconcile(WEB)

    res = rig.ctrl.result(CID)
    assert res is not None
    assert res.addresses == {"eth2": "10.77.1.10/24"}
    assert "eth1" not in res.interfaces
    assert (CID, "eth1") in rig.nl.called("detach")  # the loser must not keep it
    assert [i for i, _ in rig.nl.called("create_interface")] == ["eth2"]
    assert ("vnet", "10.77.1.5", OTHER, "eth0") in rig.ipam.held()


def test_a_static_address_is_claimed_and_never_handed_out_from_a_pool(rig: Rig) -> None:
    rig.ctrl.set_state(state({"web": [itf("eth1", address="10.77.1.10/24")],
                              "db": [itf("eth1")]}))
    db = info(OTHER, "db", pid=4343)
    res = rig.reconcile(db)  # before web claimed its address
    assert res.addresses == {"eth1": "10.77.1.11/24"}
    res = rig.reconcile(WEB)
    assert res.addresses == {"eth1": "10.77.1.10/24"}
    assert ("vnet", "10.77.1.10", CID, "eth1") in rig.ipam.held()


def test_an_ipam_error_is_reported_for_that_interface(rig: Rig) -> None:
    full = dataclasses.replace(OVS_NET, pool=OVS_NET.pool and dataclasses.replace(
        OVS_NET.pool, end=OVS_NET.pool.start))
    rig.ipam.hold(full, "10.77.1.10", OTHER)
    rig.ctrl.set_state(state({"web": [itf("eth1"), itf("eth2", "lnet")]}, [full, LNX_NET]))
    with pytest.raises(ContainerError, match="web eth1: network vnet: pool exhausted"):
        rig.reconcile(WEB)
    res = rig.ctrl.result(CID)
    assert res is not None and res.addresses == {"eth2": "10.88.0.10/24"}


def test_an_ipam_error_leaves_an_attached_interface_waiting(rig: Rig) -> None:
    # "an IPAM error: this interface waits" (controller._reconcile_in): the pool was
    # edited (the cached address is no longer in it) while IPAM fails; the attached
    # interface must stay as it is until an address can be had, not be torn down as if
    # no longer wanted.
    attached(rig, itf("eth1"))
    rig.ipam.fail["allocate"] = PoolExhausted("pool 10.77.1.200-10.77.1.201 is full")
    moved = Network(OVS_NET.name, OVS_NET.subnet, OVS_NET.bridge, OVS_NET.driver,
                    OVS_NET.vlan, OVS_NET.gateway, OVS_NET.mtu,
                    AddressPool(ip("10.77.1.200"), ip("10.77.1.201")))
    rig.ctrl.set_state(state({"web": [itf("eth1")]}, [moved]))

    with pytest.raises(ContainerError, match=r"web eth1: pool 10\.77\.1\.200-\S+ is full"):
        rig.reconcile(WEB)

    assert rig.nl.called("detach") == []
    assert (CID, "eth1") in rig.nl.inside and VETH1 in rig.nl.host
    rig.ctrl.flush_ports()
    assert VETH1 in rig.ovs.ports


def test_a_static_address_is_attached_from_the_cached_state_while_consul_is_away(
        rig: Rig) -> None:
    # Consul unreachable: the static address (the user's own, in the cached desired
    # state) is attached at once, claimed when Consul answers; the container is not
    # recorded clean meanwhile, so the next reconcile tries the claim again.
    rig.ipam.fail["claim"] = ConsulUnavailable("connection refused")
    rig.ctrl.set_state(state({"web": [itf("eth1", address="10.77.1.6/24")]}))
    res = rig.reconcile(WEB)
    assert res.addresses == {"eth1": "10.77.1.6/24"}
    assert rig.ctrl.claim_pending(CID)
    # Another local container with the same static address gives way meanwhile.
    other = info(OTHER, "web", pid=4343)
    with pytest.raises(ContainerError, match="is held by container"):
        rig.ctrl.reconcile_container(OTHER, other)
    # Consul is back: claimed, nothing pending.
    del rig.ipam.fail["claim"]
    rig.reconcile(WEB)
    assert not rig.ctrl.claim_pending(CID)
    assert ("vnet", "10.77.1.6", CID, "eth1") in rig.ipam.held()


def test_an_unopenable_namespace_is_a_container_error(rig: Rig) -> None:
    rig.ctrl.set_state(state({"web": [itf("eth1")]}))
    rig.netns.dead.add(WEB.pid)
    with pytest.raises(ContainerError, match="web: cannot open netns of pid 4242"):
        rig.reconcile(WEB)
    res = rig.ctrl.result(CID)
    assert res is not None and res.errors and res.addresses == {}
    assert rig.nl.calls == [] and rig.ipam.mutations() == []


# --------------------------------------------------------------------------- detach


def test_interfaces_no_longer_wanted_are_detached(rig: Rig) -> None:
    attached(rig, itf("eth1"), itf("eth2"))
    rig.ctrl.set_state(state({"web": [itf("eth1")]}))

    res = rig.reconcile(WEB)

    assert rig.nl.called("detach") == [(CID, "eth2")]
    assert res.interfaces == {"eth1"}
    assert res.addresses == {"eth1": "10.77.1.10/24"}
    assert "eth2 detached" in res.changes
    done = rig.ctrl.flush_ports()
    assert done.deleted == (VETH2,)
    assert VETH1 in rig.ovs.ports and VETH2 not in rig.ovs.ports


def test_a_stopped_container_is_detached_and_a_removed_one_released(rig: Rig) -> None:
    attached(rig)
    stopped = info(CID, "web", running=False)

    res = rig.ctrl.reconcile_container(CID, stopped)

    assert rig.nl.called("detach") == [(CID, "eth1")]
    assert rig.ctrl.flush_ports().deleted == (VETH1,)
    assert res.interfaces == set() and res.addresses == {}
    assert rig.ctrl.result(CID) == res
    assert ("vnet", "10.77.1.10", CID, "eth1") in rig.ipam.held()  # a stop keeps it
    assert rig.addresses.cached((CID, "vnet", "eth1")) is None  # a restart asks IPAM

    res = rig.ctrl.reconcile_container(CID, None)

    assert "released 1 address(es)" in res.changes
    assert rig.ipam.held() == set()
    assert rig.ctrl.result(CID) is None
    assert rig.nl.called("detach") == [(CID, "eth1")]  # not again


def test_a_container_removed_while_attached_is_detached_and_released(rig: Rig) -> None:
    attached(rig)
    res = rig.ctrl.reconcile_container(CID, None)
    assert rig.nl.called("detach") == [(CID, "eth1")]
    assert res.changes == ["eth1 detached", "released 1 address(es)"]
    assert rig.ctrl.veth_owner(VETH1) is None


def test_veth_owner_names_the_attached_container(rig: Rig) -> None:
    attached(rig)
    assert rig.ctrl.veth_owner(VETH1) == CID
    assert rig.ctrl.veth_owner(host_veth_name(OTHER, "eth1")) is None
    assert set(rig.ctrl.results()) == {CID}


# --------------------------------------------------------------------------- dry run


def test_dry_run_plans_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_rig(monkeypatch, dry_run=True, watcher=FakeWatcher())
    rig.ipam.hold(OVS_NET, "10.77.1.5", OTHER, "eth0", node=OTHER_NODE)
    rig.ipam.hold(OVS_NET, "10.77.1.12", CID, "eth3")
    rig.ctrl.set_state(state({"web": [itf("eth1"), itf("eth2", address="10.77.1.5/24"),
                                      itf("eth3")]}))

    res = rig.reconcile(WEB)

    assert rig.ctrl.planned == [
        "web eth2: cannot attach: conflict: static address 10.77.1.5 on network 'vnet' "
        "is held by container 000200020002 (eth0) on node n2",
        f"network vnet: create ovs bridge br-v, create gateway port {GW_PORT} (vlan 101)",
        "web eth1: allocate an address from vnet",
        "web eth1: attach a pool address on vnet",
        f"web eth1: port {VETH1} on br-v vlan 101 (new veth)",
        "web eth3: attach 10.77.1.12/24 on vnet",
        f"web eth3: port {host_veth_name(CID, 'eth3')} on br-v vlan 101 (new veth)",
    ]
    assert rig.mutations() == []
    assert len(rig.batcher) == 0 and rig.kicks == []
    assert res.addresses == {} and res.errors == []
    assert rig.watcher is not None and rig.watcher.calls == []
    # Never recorded clean: a dry run looks every time.
    rig.reconcile(WEB)
    assert len(rig.ctrl.planned) == 14


def test_dry_run_does_not_preallocate_or_release(monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_rig(monkeypatch, dry_run=True)
    rig.ipam.hold(OVS_NET, "10.77.1.12", CID, "eth1")
    rig.ctrl.set_state(state({"web": [itf("eth1"), itf("eth2")]}))
    rig.ctrl.set_ipam_view({})
    assert rig.ctrl.preallocate([WEB]) == 0
    rig.ctrl.reconcile_container(CID, None)
    assert rig.mutations() == []
    assert rig.ipam.held() == {("vnet", "10.77.1.12", CID, "eth1")}


# --------------------------------------------------------------------------- batches


def test_preallocate_batches_auto_addresses_of_running_containers_only(rig: Rig) -> None:
    nopool = Network("fixed", cidr("10.99.0.0/24").network, "br-f", "linux")
    rig.ctrl.set_state(state(
        {"web": [itf("eth1"), itf("eth2"), itf("eth3", address="10.77.1.10/24"),
                 itf("eth4", "fixed", address="10.99.0.5/24")],
         "db": [itf("eth1")]},
        [OVS_NET, LNX_NET, nopool]))
    rig.ctrl.set_ipam_view({})
    db = info(OTHER, "db", running=False)

    n = rig.ctrl.preallocate([WEB, db])

    assert n == 2
    assert rig.ipam.called("allocate_many") == [([("vnet", CID, "eth1"),
                                                  ("vnet", CID, "eth2")],)]
    # The static address in the pool was reserved.
    assert {("vnet", "10.77.1.11", CID, "eth1"),
            ("vnet", "10.77.1.12", CID, "eth2")} <= rig.ipam.held()
    rig.clear()
    res = rig.reconcile(WEB)
    assert rig.ipam.called("allocate") == []  # the reconcile found them cached
    assert res.addresses["eth2"] == "10.77.1.12/24"


def test_preallocate_of_one_address_is_left_to_the_reconcile(rig: Rig) -> None:
    rig.ctrl.set_state(state({"web": [itf("eth1")]}))
    rig.ctrl.set_ipam_view({})
    assert rig.ctrl.preallocate([WEB]) == 0
    assert rig.ipam.calls == []


# --------------------------------------------------------------------------- segments


def test_a_segment_is_ensured_once_until_its_network_changes(rig: Rig) -> None:
    db = info(OTHER, "db", pid=4343)
    rig.ctrl.set_state(state({"web": [itf("eth1")], "db": [itf("eth1")]}))
    rig.reconcile(WEB)
    assert len(rig.ovs.called("ensure_bridge")) == 1

    rig.clear()
    rig.reconcile(db)
    assert rig.ovs.called("bridge_exists") == []  # known built: not even looked at
    assert rig.ovs.called("ensure_bridge") == []

    # The same definition again: still known.
    rig.ctrl.set_state(state({"web": [itf("eth1")], "db": [itf("eth1")]}))
    rig.ctrl.mark_dirty(OTHER)
    rig.reconcile(db)
    assert rig.ovs.called("bridge_exists") == []

    # A deep pass looks again, and rebuilds what someone removed.
    del rig.ovs.bridges["br-v"]
    rig.ctrl.mark_all_dirty()
    rig.reconcile(db)
    assert rig.ovs.called("bridge_exists") == [("br-v",)]
    assert len(rig.ovs.called("ensure_bridge")) == 1

    # A changed network is looked at again.
    rig.clear()
    rig.ctrl.set_state(state({"web": [itf("eth1")], "db": [itf("eth1")]},
                             [dataclasses.replace(OVS_NET, mtu=1500), LNX_NET]))
    rig.reconcile(db)
    assert rig.ovs.called("bridge_exists") == [("br-v",)]


def test_a_failing_segment_leaves_its_interfaces_alone(rig: Rig) -> None:
    rig.ovs.fail["ensure_bridge"] = OvsError("ovsdb-server is gone")
    rig.ctrl.set_state(state({"web": [itf("eth1"), itf("eth2", "lnet")]}))
    with pytest.raises(ContainerError, match="web: ovsdb-server is gone"):
        rig.reconcile(WEB)
    res = rig.ctrl.result(CID)
    assert res is not None
    assert [i for i, _ in rig.nl.called("create_interface")] == ["eth2"]  # not eth1
    # The other network's segment is still built, and its interface attached.
    assert rig.nl.called("ensure_linux_bridge") == [("br-l",)]
    assert rig.fw.rules == {"br-l"}
    assert res.addresses == {"eth2": "10.88.0.10/24"}


# --------------------------------------------------------------------------- watcher


def test_the_namespace_is_watched_with_what_is_expected_of_it(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    w = FakeWatcher()
    rig = make_rig(monkeypatch, watcher=w)
    rig.ctrl.set_state(state({"web": [itf("eth1"), itf("eth2", mtu=1300,
                                                       mac="02:00:00:00:00:02")]}))
    rig.reconcile(WEB)
    assert w.called("add") == [(CID,)]
    assert w.expected[CID] == {"eth1": LinkExpect(mtu=1400),
                               "eth2": LinkExpect(mtu=1300, mac="02:00:00:00:00:02")}

    w.fail["add"] = NetlinkError("too many open files")
    rig.ctrl.mark_dirty(CID)
    with caplog.at_level(logging.WARNING):
        res = rig.reconcile(WEB)  # drift then waits for the deep resync: not an error
    assert res.errors == []
    assert "web: cannot watch its namespace: too many open files" in caplog.text

    rig.ctrl.reconcile_container(CID, None)
    assert w.called("remove") == [(CID,)]


# --------------------------------------------------------------------------- specs


def test_a_spec_applies_by_name_or_by_label() -> None:
    st = state({"web": [itf("eth1")]})
    layout = Layout("reconciler/")
    by_label = spec_for(st, "web-7f3a", {NAME_LABEL: "web"})
    assert by_label is not None and by_label.name == "web"
    assert spec_for(st, "web", {NAME_LABEL: "other"}) is st.containers["web"]
    assert spec_for(st, "db", {}) is None
    assert spec_key_for(layout, "web-7f3a", {NAME_LABEL: "web"}, st) \
        == "reconciler/containers/web"
    assert spec_key_for(layout, "db", {}, st) is None
    bad = DesiredState(problems=(Problem("reconciler/containers/db", "", "invalid"),))
    assert spec_key_for(layout, "db", {}, bad) == "reconciler/containers/db"


def test_a_labelled_container_gets_its_specs_interfaces(rig: Rig) -> None:
    rig.ctrl.set_state(state({"web": [itf("eth1")]}))
    replica = info(OTHER, "web.1.xyz", labels={NAME_LABEL: "web"})
    assert [i.name for i in rig.ctrl.wanted(replica)] == ["eth1"]
    assert rig.ctrl.wanted(info(OTHER, "unrelated")) == []
    res = rig.reconcile(replica)
    assert res.addresses == {"eth1": "10.77.1.10/24"}


# --------------------------------------------------------------------------- sweep


def test_sweep_removes_orphans_and_keeps_what_is_used(rig: Rig) -> None:
    attached(rig, itf("eth1"), itf("eth2", "lnet"))
    gone, stopped = cid_of(9), cid_of(8)
    orphan = host_veth_name(gone, "eth1")
    theirs = host_veth_name(cid_of(7), "eth1")
    rig.ovs.add_port(orphan, "br-v", 101)
    rig.ovs.add_port(theirs, "br-v", 101, node=OTHER_NODE)
    rig.nl.add_owned_veth(gone, "eth1")
    rig.nl.add_owned_veth(cid_of(7), "eth1", node=OTHER_NODE)
    rig.ovs.bridges["br-old"] = {NODE_ID: NODE}
    rig.ovs.bridges["br-busy"] = {NODE_ID: NODE}
    rig.ovs.add_port("vm1", "br-busy", node=OTHER_NODE)
    rig.nl.add_link("br-gone", "bridge", alias=f"reconciler:gone@{NODE}")
    rig.fw.rules |= {"br-gone", "br-foreign"}
    rig.infos[stopped] = info(stopped, "stopped", running=False)
    rig.ipam.hold(OVS_NET, "10.77.1.18", gone)
    rig.ipam.hold(OVS_NET, "10.77.1.17", stopped)
    rig.ipam.hold(OVS_NET, "10.77.1.16", cid_of(7), node=OTHER_NODE)
    rig.ipam.dead = [rig.ipam.hold(OVS_NET, "10.77.1.19", cid_of(6), node="n3")]

    done = rig.ctrl.sweep([WEB])

    assert sorted(done) == sorted([
        f"port {orphan}", f"veth {orphan}", "bridge br-old", "bridge br-foreign",
        "bridge br-gone", "reclaimed vnet/10.77.1.19 of node n3",
        "allocation vnet/10.77.1.18"])
    assert set(rig.ovs.ports) == {VETH1, GW_PORT, theirs, "vm1"}
    assert ("delete_ports", (orphan,)) in rig.ovs.calls
    assert set(rig.ovs.bridges) == {"br-v", "br-busy"}
    assert orphan not in rig.nl.host and theirs in rig.nl.host
    assert "br-gone" not in rig.nl.host and rig.fw.rules == {"br-l"}
    assert {a for _, a, _, _ in rig.ipam.held()} == {"10.77.1.10", "10.88.0.10",
                                                     "10.77.1.17", "10.77.1.16"}
    # What the sweep changed may have been a segment: looked at again.
    rig.ctrl.mark_dirty(CID)
    rig.reconcile(WEB)
    assert ("bridge_exists", "br-v") in rig.ovs.calls


def test_sweep_keeps_gateway_ports_and_forgets_nothing_when_idle(rig: Rig) -> None:
    attached(rig)
    assert rig.ctrl.sweep([WEB]) == []
    assert GW_PORT in rig.ovs.ports and VETH1 in rig.ovs.ports
    rig.ctrl.mark_dirty(CID)
    rig.reconcile(WEB)
    assert rig.ovs.called("bridge_exists") == []  # segments still known


def test_sweep_reasserts_a_lost_allocation(rig: Rig) -> None:
    attached(rig)
    rig.ipam.allocs.clear()  # reclaimed while the daemon was away
    done = rig.ctrl.sweep([WEB])
    assert done == ["re-asserted allocation vnet/10.77.1.10/24"]
    assert rig.ipam.held() == {("vnet", "10.77.1.10", CID, "eth1")}
    assert rig.ctrl.dirty_ids() == []


def test_sweep_readdresses_a_container_whose_address_was_taken(rig: Rig) -> None:
    attached(rig)
    rig.ipam.allocs.clear()
    rig.ipam.hold(OVS_NET, "10.77.1.10", OTHER, node=OTHER_NODE)
    rig.ipam.reassert_ok = False

    done = rig.ctrl.sweep([WEB])

    assert done == ["lost allocation vnet/10.77.1.10/24"]
    assert rig.ctrl.dirty_ids() == [CID]
    res = rig.reconcile(WEB)
    assert res.addresses == {"eth1": "10.77.1.11/24"}
    assert rig.nl.inside[(CID, "eth1")].addresses == (cidr("10.77.1.11/24"),)
    assert rig.nl.called("announce")  # neighbours learn the new address


def test_sweep_does_not_reassert_an_address_on_another_network(rig: Rig) -> None:
    # eth1 moved from vnet to lnet in the spec; the sweep runs before web's reconcile.
    # Its last address (10.77.1.10/24, of vnet) must not be asserted as an allocation
    # of lnet (10.88.0.0/24): the last result records addresses by interface name only.
    attached(rig)
    rig.ctrl.set_state(state({"web": [itf("eth1", "lnet")]}))

    rig.ctrl.sweep([WEB])

    assert rig.ipam.called("reassert") == []
    assert not any(n == "lnet" and a.startswith("10.77.") for n, a, _, _ in rig.ipam.held())


def test_dry_run_sweep_reports_and_removes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_rig(monkeypatch, dry_run=True)
    rig.ctrl.set_state(state({"web": [itf("eth1")]}))
    gone = cid_of(9)
    orphan = host_veth_name(gone, "eth1")
    rig.ovs.add_port(orphan, "br-v", 101)
    rig.nl.add_owned_veth(gone, "eth1")
    rig.nl.add_link("br-gone", "bridge", alias=f"reconciler:gone@{NODE}")
    rig.ipam.hold(OVS_NET, "10.77.1.18", gone)

    done = rig.ctrl.sweep([WEB])

    assert done == [f"port {orphan}", f"veth {orphan}", "bridge br-gone"]
    assert rig.ctrl.planned == [f"remove orphan {d}" for d in done]
    assert rig.mutations() == []
    assert orphan in rig.ovs.ports and orphan in rig.nl.host and "br-gone" in rig.nl.host


def test_dry_run_shows_detaches_from_the_host_veths_owner_records(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A dry run (a fresh process: no previous result) still shows what the daemon would
    detach: interfaces of ours the spec no longer asks for, and a stopped container's."""
    rig = make_rig(monkeypatch, dry_run=True)
    rig.ipam.hold(OVS_NET, "10.77.1.12", CID, "eth1")
    rig.ctrl.set_state(state({"web": [itf("eth1")]}))
    gone = rig.nl.add_owned_veth(CID, "eth9")
    rig.nl.add_owned_veth(CID, "eth8", node=OTHER_NODE)  # another node's: not ours
    rig.reconcile(WEB)
    assert f"web eth9: detach ({gone})" in rig.ctrl.planned
    assert not any("eth8" in line for line in rig.ctrl.planned)
    rig.ctrl.planned.clear()
    rig.ctrl.reconcile_container(CID, info(CID, "web", running=False))
    assert f"{CID[:12]} eth9: detach ({gone})" in rig.ctrl.planned
    assert rig.mutations() == []


def test_sweep_releases_the_hosts_overlay_address_once_the_network_is_no_overlay(
        rig: Rig) -> None:
    # The host's own address on an overlay (held by "host:<node>") is not a container's:
    # kept while the overlay exists, released when the network is gone or no overlay.
    rig.ctrl.set_state(state({}))  # vnet exists, but is no overlay
    rig.ipam.hold(OVS_NET, "10.77.1.50", f"host:{NODE}", "host")
    rig.ipam.hold(OVS_NET, "10.77.1.51", f"host:{OTHER_NODE}", "host", node=OTHER_NODE)
    done = rig.ctrl.sweep([])
    assert "allocation vnet/10.77.1.50" in done
    assert ("vnet", "10.77.1.50", f"host:{NODE}", "host") not in rig.ipam.held()
    assert ("vnet", "10.77.1.51", f"host:{OTHER_NODE}", "host") in rig.ipam.held()


def test_allocations_record_the_entry_the_container_matches(rig: Rig) -> None:
    # The group policy classifies another host's containers by it (issue 12).
    rig.ctrl.set_state(state({"web": [itf("eth1"), itf("eth2"),
                                      itf("eth3", address="10.77.1.10/24")]}))
    rig.ctrl.set_ipam_view({})
    assert rig.ctrl.preallocate([WEB]) == 2
    rig.reconcile(WEB)
    assert {(str(a.address), a.spec) for a in rig.ipam.allocs} == {
        ("10.77.1.11", "web"), ("10.77.1.12", "web"), ("10.77.1.10", "web")}
    rig.ipam.allocs.clear()  # reclaimed while the daemon was away
    rig.ctrl.sweep([WEB])
    assert {a.spec for a in rig.ipam.allocs} == {"web"}


def test_without_a_namespace_watch_every_reconcile_looks_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon that could not watch container namespaces (no CAP_NET_BROADCAST) cannot
    know a container stayed as it left it: it is never clean, and each reconcile looks
    inside again (and repairs what it finds)."""
    rig = make_rig(monkeypatch, watch=False)
    attached(rig)
    assert not rig.ctrl.is_clean(WEB)
    rig.clear()
    rig.reconcile(WEB)
    assert rig.netns.opened, "the reconcile did not look inside the container"
