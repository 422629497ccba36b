"""Overlay networks: the model's rules for `overlay`, derived MACs and tunnel names, and
which remote endpoints each host's tunnel must know (pure parts; the data path is tested
across hosts in the lab)."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from reconciler.adapters.vxlan import Peer
from reconciler.ipam import Allocation
from reconciler.model import KVEntry, Network, Overlay, parse_kv
from reconciler.network.drivers.base import overlay_mac, tunnel_name
from reconciler.network.peers import plan_peers, wanted_peers

P = "reconciler/"
OV = {"subnet": "10.77.5.0/24", "bridge": "br-app", "vlan": 105, "gateway": "10.77.5.1",
      "pool": {"start": "10.77.5.100", "end": "10.77.5.250"}, "overlay": {"vni": 5005}}


def state(*pairs: tuple[str, Any]) -> Any:
    return parse_kv(P, [KVEntry(P + k, json.dumps(v).encode(), i + 1)
                        for i, (k, v) in enumerate(pairs)])


def test_overlay_network_parses_with_default_port() -> None:
    st = state(("networks/app", OV))
    assert st.problems == ()
    assert st.networks["app"].overlay == Overlay(5005, 4789)
    st = state(("networks/app", {**OV, "overlay": {"vni": 7, "port": 8472}}))
    assert st.networks["app"].overlay == Overlay(7, 8472)


@pytest.mark.parametrize(("overlay", "extra", "expected"), [
    ({"vni": 0}, {}, "overlay.vni"),
    ({"vni": 16777216}, {}, "overlay.vni"),
    ({"vni": "5"}, {}, "overlay.vni"),
    ({}, {}, "overlay.vni"),
    ({"vni": 5, "port": 0}, {}, "overlay.port"),
    ({"vni": 5, "color": "red"}, {}, "overlay.color"),
    ({"vni": 5}, {"pool": None}, "pool: an overlay network with a gateway needs a pool"),
    ({"vni": 5}, {"subnet": "fd00:77::/64", "gateway": "fd00:77::1",
                  "pool": {"start": "fd00:77::10", "end": "fd00:77::20"}}, "IPv4 only"),
])
def test_bad_overlays_name_the_field(overlay: dict[str, Any], extra: dict[str, Any],
                                     expected: str) -> None:
    net = {**OV, "overlay": overlay, **extra}
    if extra.get("pool", "") is None:
        del net["pool"]
    st = state(("networks/app", net))
    assert "app" not in st.networks
    assert any(expected in str(p) and "networks/app" in str(p) for p in st.problems), \
        st.problems


def test_two_overlays_cannot_share_a_vni_the_rest_stays() -> None:
    other = {**OV, "subnet": "10.77.6.0/24", "bridge": "br-other", "gateway": "10.77.6.1",
             "pool": {"start": "10.77.6.10", "end": "10.77.6.20"}}
    st = state(("networks/app", OV), ("networks/other", other))
    assert "app" in st.networks and "other" not in st.networks
    assert any("vni 5005 is already used by network 'app'" in str(p) for p in st.problems)


def test_mac_on_an_overlay_interface_is_refused() -> None:
    st = state(("networks/app", OV), ("containers/web", {"interfaces": [
        {"name": "eth1", "network": "app", "address": "auto", "mac": "02:00:00:00:00:01"}]}))
    assert "web" not in st.containers
    assert any("interfaces[0].mac" in str(p) and "derived from its address" in str(p)
               for p in st.problems)


def test_derived_mac_and_tunnel_name() -> None:
    assert overlay_mac("10.77.5.100") == "0a:58:0a:4d:05:64"
    assert overlay_mac(ipaddress.IPv4Address("10.77.5.1")) == "0a:58:0a:4d:05:01"
    assert int(overlay_mac("10.77.5.100")[:2], 16) & 1 == 0  # unicast
    name = tunnel_name("app")
    assert name.startswith("rx") and len(name) <= 15 and name != tunnel_name("app2")


NET = Network("app", ipaddress.ip_network("10.77.5.0/24"), "br-app", overlay=Overlay(5005))


def alloc(addr: str, node: str, network: str = "app") -> Allocation:
    return Allocation(network, ipaddress.ip_address(addr), node, "c" + addr, "eth1")


def test_wanted_peers_are_remote_endpoints_of_registered_hosts_only() -> None:
    allocations = [alloc("10.77.5.100", "h1"), alloc("10.77.5.101", "h2"),
                   alloc("10.77.5.102", "h3"), alloc("10.77.5.103", "gone"),
                   alloc("10.77.6.100", "h2", network="other")]
    hosts = {"h1": "198.18.0.1", "h2": "198.18.0.2", "h3": "198.18.0.3"}
    assert wanted_peers(NET, allocations, hosts, "h1") == {
        Peer("10.77.5.101", "0a:58:0a:4d:05:65", "198.18.0.2"),
        Peer("10.77.5.102", "0a:58:0a:4d:05:66", "198.18.0.3")}


def test_plan_peers_moves_an_endpoint_whose_host_changed() -> None:
    moved_from = Peer("10.77.5.101", "0a:58:0a:4d:05:65", "198.18.0.2")
    moved_to = Peer("10.77.5.101", "0a:58:0a:4d:05:65", "198.18.0.3")
    stale = Peer("", "0a:58:0a:4d:05:70", "198.18.0.2")  # an FDB entry without neighbour
    keep = Peer("10.77.5.102", "0a:58:0a:4d:05:66", "198.18.0.3")
    add, remove = plan_peers({moved_to, keep}, {moved_from, stale, keep})
    assert add == {moved_to}
    assert remove == {moved_from, stale}
    assert plan_peers({keep}, {keep}) == (set(), set())
