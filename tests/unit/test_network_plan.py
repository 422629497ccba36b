"""The network plan, table-driven: for each kind of drift an observed state, and the
actions (and their descriptions) the plan must give — nothing more."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from reconciler.adapters.netlink import InterfaceSpec, ObservedInterface, Route, host_veth_name
from reconciler.model import Network
from reconciler.network import plan
from reconciler.network.plan import (
    AllocateAddress,
    Blocked,
    CreateInterface,
    Detach,
    EnsureSegment,
    Observed,
    PlugPort,
    PortObs,
    PortWant,
    Wanted,
)

CID = "c0ffee" * 10
NET = Network("vnet", ipaddress.ip_network("10.77.1.0/24"), "br-v", "ovs", vlan=101,
              gateway=ipaddress.ip_address("10.77.1.1"), mtu=1400)
ADDR = ipaddress.ip_interface("10.77.1.5/24")
GW = ipaddress.ip_address("10.77.1.1")
DEFAULT = Route(ipaddress.ip_network("0.0.0.0/0"), GW)
VETH = host_veth_name(CID, "eth1")
LINK = InterfaceSpec(CID, "eth1", (ADDR,), mac="02:00:00:00:00:05", mtu=1400, gateway=GW,
                     owner="reconciler:n1/x/eth1", tx_checksum=False, announce=False)
WANT = Wanted(NET, LINK, PortWant("br-v", 101))

GOOD = ObservedInterface(
    "eth1", VETH, exists=True, host_present=True, paired=True, mac="02:00:00:00:00:05",
    mtu=1400, up=True, addresses=frozenset({ADDR}), routes=frozenset({DEFAULT}),
    arp_notify=True, promote_secondaries=True, tx_checksum=False, host_ifindex=7,
    host_mtu=1400, host_up=True, host_alias="reconciler:n1/x/eth1")
PORT_OK = PortObs("br-v", 101)


def obs(port: PortObs = PORT_OK, **link: object) -> Observed:
    return Observed(dataclasses.replace(GOOD, **link), port)  # type: ignore[arg-type]


@pytest.mark.parametrize(("observed", "expected"), [
    # (what is there, the descriptions of the plan's actions)
    (obs(), []),
    (Observed(ObservedInterface("eth1", VETH, exists=False, host_present=False), PortObs()),
     ["eth1: attach 10.77.1.5/24 on vnet",
      f"eth1: port {VETH} on br-v vlan 101 (new veth)"]),
    (Observed(ObservedInterface("eth1", VETH, exists=False, host_present=True), PORT_OK),
     ["eth1: re-create 10.77.1.5/24 on vnet",
      f"eth1: port {VETH} on br-v vlan 101 (new veth)"]),
    (obs(addresses=frozenset({ipaddress.ip_interface("10.77.1.9/24")})),
     ["eth1: repair addresses [10.77.1.9/24] -> [10.77.1.5/24]"]),
    (obs(addresses=frozenset()), ["eth1: repair addresses none -> [10.77.1.5/24]"]),
    (obs(mtu=1500), ["eth1: repair mtu 1500 -> 1400"]),
    (obs(host_mtu=1500), ["eth1: repair host mtu 1500 -> 1400"]),
    (obs(mac="02:00:00:00:00:99"), ["eth1: repair mac 02:00:00:00:00:99 -> 02:00:00:00:00:05"]),
    (obs(mac="02:00:00:00:00:05".upper()), []),  # MACs compare case-insensitively
    (obs(routes=frozenset()), ["eth1: repair routes none -> [0.0.0.0/0 via 10.77.1.1]"]),
    (obs(up=False), ["eth1: repair link down -> up"]),
    (obs(host_up=False), ["eth1: repair host link down -> up"]),
    (obs(arp_notify=False), ["eth1: repair arp_notify 0 -> 1"]),
    (obs(arp_notify=None), []),  # unknown: not drift
    (obs(promote_secondaries=False), ["eth1: repair promote_secondaries 0 -> 1"]),
    (obs(tx_checksum=True), ["eth1: repair tx checksum on -> off"]),
    (obs(host_alias="someone"), ["eth1: repair host veth owner record"]),
    (obs(mtu=1500, up=False), ["eth1: repair mtu 1500 -> 1400; link down -> up"]),
    (obs(PortObs("br-v", 999)), [f"eth1: port {VETH} on br-v vlan 101 (vlan 999 -> 101)"]),
    (obs(PortObs("br-v", None)), [f"eth1: port {VETH} on br-v vlan 101 (vlan None -> 101)"]),
    (obs(PortObs("br-x", 101)), [f"eth1: port {VETH} on br-v vlan 101 (on br-x, not br-v)"]),
    (obs(PortObs()), [f"eth1: port {VETH} on br-v vlan 101 (missing)"]),
    (obs(PortObs("br-v", 101, stale=True)), [f"eth1: port {VETH} on br-v vlan 101 (record)"]),
    (obs(paired=False),
     [f"eth1: cannot attach: eth1 exists and is not reconciler's veth {VETH}"]),
    (obs(paired=False, host_present=False),
     [f"eth1: cannot attach: eth1 exists and is not reconciler's veth {VETH}"]),
])
def test_each_kind_of_drift_gives_exactly_its_repair(observed: Observed,
                                                     expected: list[str]) -> None:
    actions = plan.plan_container([WANT], {"eth1": observed})
    assert plan.describe(actions) == expected


def test_blocked_interface_gets_no_other_action() -> None:
    actions = plan.plan_interface(WANT, obs(paired=False, mtu=1))
    assert [type(a) for a in actions] == [Blocked]


def test_unobserved_interface_is_planned_fresh() -> None:
    actions = plan.plan_container([WANT], {})
    assert [type(a) for a in actions] == [CreateInterface, PlugPort]
    create = actions[0]
    assert isinstance(create, CreateInterface) and not create.recreate


def test_dry_run_allocation_comes_first_and_names_the_pool() -> None:
    pending = dataclasses.replace(WANT, link=dataclasses.replace(LINK, addresses=()),
                                  allocate=True)
    actions = plan.plan_container([pending], {})
    assert isinstance(actions[0], AllocateAddress)
    assert plan.describe(actions)[:2] == ["eth1: allocate an address from vnet",
                                          "eth1: attach a pool address on vnet"]


def test_segments_first_once_per_network_then_interfaces_then_detaches() -> None:
    eth2 = dataclasses.replace(WANT, link=dataclasses.replace(LINK, ifname="eth2"))
    actions = plan.plan_container(
        [WANT, eth2], {"eth1": obs()},
        segments={"vnet": ("create ovs bridge br-v",)},
        unwanted=[("eth3", "rv3"), ("eth1", VETH)])
    kinds = [type(a) for a in actions]
    assert kinds == [EnsureSegment, CreateInterface, PlugPort, Detach]
    assert plan.describe(actions)[0] == "network vnet: create ovs bridge br-v"
    assert actions[-1] == Detach("eth3", "rv3")  # eth1 is still wanted: kept


def test_segment_with_nothing_missing_is_not_planned() -> None:
    assert plan.plan_container([WANT], {"eth1": obs()}, segments={"vnet": ()}) == ()


def test_untagged_port_on_a_driver_without_tags() -> None:
    want = dataclasses.replace(WANT, port=PortWant("br-l"))
    assert plan.plan_container([want], {"eth1": obs(PortObs("br-l"))}) == ()
    assert plan.describe(plan.plan_container([want], {"eth1": obs(PortObs())})) == [
        f"eth1: port {VETH} on br-l (missing)"]


def test_no_spec_values_means_no_drift_for_them() -> None:
    bare = InterfaceSpec(CID, "eth1", (ADDR,))
    want = Wanted(NET, bare, PortWant("br-v", 101))
    # MAC, MTU, routes, tx checksum and owner unset in the spec: whatever is there is kept
    assert plan.link_drift(bare, dataclasses.replace(
        GOOD, mac="02:11:11:11:11:11", mtu=9000, host_mtu=9000, routes=frozenset(),
        tx_checksum=True, host_alias=None)) == ()
    assert plan.plan_container([want], {"eth1": obs()}) != ()  # routes differ: none wanted
