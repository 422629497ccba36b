"""The overlay driver and the peer programmer over fakes (tests/unit/netfakes.py and a
fake VXLAN adapter): what an overlay adds to its inner driver's segment, when it refuses,
what it releases, and which endpoints it programs. The data path itself is tested across
hosts in the lab (tests/integration/test_multihost.py)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import pytest

from reconciler.adapters.vxlan import Peer, VxlanSpec
from reconciler.errors import ReconcilerError
from reconciler.ipam import Allocation
from reconciler.model import AddressPool, Network, Overlay
from reconciler.network.drivers import overlay as overlay_mod
from reconciler.network.drivers.base import overlay_mac, tunnel_name
from reconciler.network.drivers.overlay import OverlayDriver
from reconciler.network.peers import PeerProgrammer

from .netfakes import NODE, FakeNetlink, Rig, make_rig

NET = Network("app", ipaddress.ip_network("10.77.5.0/24"), "br-app", "linux",
              gateway=ipaddress.ip_address("10.77.5.1"),
              pool=AddressPool(ipaddress.ip_address("10.77.5.100"),
                               ipaddress.ip_address("10.77.5.200")),
              overlay=Overlay(5005))
HOST_ADDR = ipaddress.ip_interface("10.77.5.150/24")


@dataclass
class FakeVx:
    """VXLAN devices as the kernel would have them; the host link appears in `nl`."""

    nl: FakeNetlink | None = None
    links: dict[str, VxlanSpec] = field(default_factory=dict)
    up: set[str] = field(default_factory=set)
    programmed: dict[str, set[Peer]] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)

    def observe(self, name: str) -> VxlanSpec | None:
        return self.links.get(name)

    def is_up(self, name: str) -> bool:
        return name in self.up

    def ensure(self, spec: VxlanSpec) -> list[str]:
        self.calls.append(("ensure", spec.name))
        changed = self.links.get(spec.name) != spec
        self.links[spec.name] = spec
        if self.nl is not None and spec.name not in self.nl.host:
            self.nl.add_link(spec.name, kind="vxlan", mtu=spec.mtu)
        self.up.add(spec.name)
        return ["created"] if changed else []

    def delete(self, name: str) -> bool:
        self.calls.append(("delete", name))
        self.up.discard(name)
        if self.nl is not None:
            self.nl.host.pop(name, None)
        return self.links.pop(name, None) is not None

    def peers(self, name: str) -> set[Peer]:
        return set(self.programmed.get(name, set()))

    def set_peers(self, name: str, add: set[Peer], remove: set[Peer]) -> None:
        self.calls.append(("set_peers", name))
        have = self.programmed.setdefault(name, set())
        have -= remove
        have |= add


@dataclass
class OverlayRig:
    rig: Rig
    vx: FakeVx
    driver: OverlayDriver
    routes: list[tuple[str, str, str]]
    released: list[str]
    tunnels_ready: list[int]


@pytest.fixture
def orig(monkeypatch: pytest.MonkeyPatch) -> OverlayRig:
    rig = make_rig(monkeypatch)
    vx = FakeVx(rig.nl)
    routes: list[tuple[str, str, str]] = []
    released: list[str] = []
    ready: list[int] = []
    monkeypatch.setattr(overlay_mod, "underlay_mtu", lambda local: 1500)

    def source(dev: str, subnet: str, src: str) -> bool:
        changed = (dev, subnet, src) not in routes
        routes.append((dev, subnet, src))
        return changed

    monkeypatch.setattr(overlay_mod, "ensure_subnet_source", source)
    inner = rig.segments.drivers["linux"]
    driver = OverlayDriver(inner, node=NODE, vx=vx, nl=rig.nl,  # type: ignore[arg-type]
                           advertise="198.18.0.1", host_address=lambda net: HOST_ADDR,
                           release_host_address=lambda net: released.append(net.name),
                           on_tunnel=lambda: ready.append(1))
    return OverlayRig(rig, vx, driver, routes, released, ready)


def test_a_fresh_overlay_segment_lists_the_bridge_and_the_tunnel(orig: OverlayRig) -> None:
    missing = orig.driver.observe_segment(NET)
    assert missing[0] == "create linux bridge br-app"
    assert f"create vxlan {tunnel_name('app')} (vni 5005, local 198.18.0.1)" in missing
    assert orig.driver.kind == "linux/overlay"
    assert orig.driver.mtu(NET) == 1450  # the underlay's 1500 minus VXLAN's 50


def test_ensure_builds_bridge_host_address_tunnel_and_asks_for_peers(
        orig: OverlayRig) -> None:
    changes = orig.driver.ensure_segment(NET)
    dev = tunnel_name("app")
    spec = orig.vx.links[dev]
    assert (spec.vni, spec.port, spec.local, spec.mtu) == (5005, 4789, "198.18.0.1", 1450)
    assert spec.alias == f"reconciler:app@{NODE}"
    bridge = orig.rig.nl.host["br-app"]
    assert HOST_ADDR in bridge.addresses  # the host's own address, beside the gateway
    assert bridge.mac == overlay_mac(HOST_ADDR.ip)  # what the other hosts program
    assert orig.routes == [("br-app", "10.77.5.0/24", "10.77.5.150")]
    assert orig.rig.nl.host[dev].master == "br-app"  # the tunnel is a port of the bridge
    assert orig.tunnels_ready == [1]
    assert any(c.startswith(f"vxlan {dev}") for c in changes)
    # Built: nothing missing any more, and a second ensure changes nothing of the tunnel.
    assert orig.driver.observe_segment(NET) == ()
    assert not [c for c in orig.driver.ensure_segment(NET) if c.startswith("vxlan")]


def test_a_tunnel_drifted_by_hand_is_reported(orig: OverlayRig) -> None:
    orig.driver.ensure_segment(NET)
    dev = tunnel_name("app")
    orig.vx.links[dev] = VxlanSpec(dev, 9, 4789, "198.18.0.9", 1500, "x")
    missing = orig.driver.observe_segment(NET)
    assert missing == (f"repair vxlan {dev} (vni 9 -> 5005, local 198.18.0.9 -> "
                       "198.18.0.1, mtu 1500 -> 1450)",)
    orig.vx.links[dev] = VxlanSpec(dev, 5005, 4789, "198.18.0.1", 1450, "x")
    orig.rig.nl.host[dev].master = None
    assert orig.driver.observe_segment(NET) == (f"plug vxlan {dev} into br-app",)


def test_an_mtu_that_does_not_fit_the_underlay_is_refused(orig: OverlayRig) -> None:
    big = Network(NET.name, NET.subnet, NET.bridge, NET.driver, gateway=NET.gateway,
                  mtu=1500, pool=NET.pool, overlay=NET.overlay)
    with pytest.raises(ReconcilerError, match="mtu 1500 does not fit in the underlay"):
        orig.driver.ensure_segment(big)
    assert orig.vx.links == {}


def test_no_advertised_address_no_tunnel(orig: OverlayRig,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    blind = OverlayDriver(orig.driver.inner, node=NODE, vx=orig.vx, nl=orig.rig.nl,  # type: ignore[arg-type]
                          advertise=None, host_address=lambda net: HOST_ADDR,
                          release_host_address=lambda net: None)
    with pytest.raises(ReconcilerError, match="--advertise-addr"):
        blind.ensure_segment(NET)


def test_release_removes_the_tunnel_and_the_hosts_address(orig: OverlayRig) -> None:
    orig.driver.ensure_segment(NET)
    dev = tunnel_name("app")
    assert orig.driver.release_segment(NET) == [f"vxlan {dev}"]
    assert dev not in orig.vx.links and orig.released == ["app"]
    assert orig.driver.release_segment(NET) == []  # nothing left: nothing to say


def alloc(addr: str, node: str) -> Allocation:
    return Allocation("app", ipaddress.ip_address(addr), node, "c" + addr, "eth1")


def test_the_peer_programmer_adds_moves_and_drops_endpoints() -> None:
    vx = FakeVx()
    dev = tunnel_name("app")
    vx.links[dev] = VxlanSpec(dev, 5005, 4789, "198.18.0.1", 1450, "")
    prog = PeerProgrammer(vx, "h1")
    hosts = {"h1": "198.18.0.1", "h2": "198.18.0.2", "h3": "198.18.0.3"}
    changes = prog.reconcile([NET], [alloc("10.77.5.101", "h1"), alloc("10.77.5.102", "h2")],
                             hosts)
    assert changes == ["app: peer 10.77.5.102 at 198.18.0.2"]
    assert vx.programmed[dev] == {Peer("10.77.5.102", overlay_mac("10.77.5.102"),
                                       "198.18.0.2")}
    assert prog.reconcile([NET], [alloc("10.77.5.102", "h2")], hosts) == []  # level: same
    # It moved to h3; then h3 goes (no status: not in the registry).
    moved = prog.reconcile([NET], [alloc("10.77.5.102", "h3")], hosts)
    assert moved == ["app: peer 10.77.5.102 at 198.18.0.3",
                     "app: drop peer 10.77.5.102 at 198.18.0.2"]
    gone = prog.reconcile([NET], [alloc("10.77.5.102", "h3")], {"h1": "198.18.0.1"})
    assert gone == ["app: drop peer 10.77.5.102 at 198.18.0.3"]
    assert vx.programmed[dev] == set()


def test_the_peer_programmer_leaves_networks_without_a_tunnel_here_and_dry_runs() -> None:
    vx = FakeVx()
    prog = PeerProgrammer(vx, "h1")
    assert prog.reconcile([NET], [alloc("10.77.5.102", "h2")], {"h2": "198.18.0.2"}) == []
    dev = tunnel_name("app")
    vx.links[dev] = VxlanSpec(dev, 5005, 4789, "198.18.0.1", 1450, "")
    planned = prog.reconcile([NET], [alloc("10.77.5.102", "h2")], {"h2": "198.18.0.2"},
                             dry_run=True)
    assert planned == ["app: peer 10.77.5.102 at 198.18.0.2"]
    assert ("set_peers", dev) not in vx.calls
