"""Overlay segments: a network that spans hosts, on either driver (OVS or Linux bridge).

Owns what an overlay adds to the segment its inner driver builds on this host: one
kernel VXLAN device per overlay network (VNI and UDP port from the network, local
address = this host's advertised address, no learning, ARP answered locally), plugged
into the network's bridge as its access port (OVS: tagged with the network's VLAN);
the host's own address on the network (from the pool, so that the host reaches remote
containers with an address that is not the gateway every host shares); the MTU that
fits inside the underlay. Built only where a container of the network runs, removed
when the last one goes (`release_segment`). The remote endpoints on the device are
programmed by network.peers.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from reconciler.adapters import netlink
from reconciler.adapters.vxlan import VxlanSpec, ensure_subnet_source, underlay_mtu
from reconciler.errors import NetlinkError, ReconcilerError
from reconciler.model import Network
from reconciler.network.drivers.base import (
    Plug,
    PortOwner,
    SegmentDriver,
    overlay_mac,
    tunnel_name,
)
from reconciler.network.plan import PortObs, PortWant

VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8


class OverlayDriver:
    """Wraps the driver of the network's bridge kind."""

    def __init__(self, inner: SegmentDriver, *, node: str, vx: Any,
                 nl: netlink.NetlinkAdapter, advertise: str | None,
                 host_address: Callable[[Network], netlink.IpInterface],
                 release_host_address: Callable[[Network], None],
                 on_tunnel: Callable[[], None] | None = None) -> None:
        self.inner = inner
        self.kind = f"{inner.kind}/overlay"
        self._node = node
        self._vx = vx
        self._nl = nl
        self._advertise = advertise
        self._host_address = host_address
        self._release_host_address = release_host_address
        self._on_tunnel = on_tunnel
        self._underlay_mtu: int | None = None

    # ------------------------------------------------------------------ settings

    def _local(self, net: Network) -> str:
        if not self._advertise:
            raise ReconcilerError(f"network {net.name}: an overlay needs this host's "
                                  "advertised address (--advertise-addr)")
        return self._advertise

    def _max_mtu(self) -> int | None:
        if self._underlay_mtu is None and self._advertise:
            found = underlay_mtu(self._advertise)
            self._underlay_mtu = None if found is None else found - VXLAN_OVERHEAD
        return self._underlay_mtu

    def mtu(self, net: Network) -> int | None:
        """The network's MTU, by default what fits inside the underlay."""
        return net.mtu if net.mtu is not None else self._max_mtu()

    def _spec(self, net: Network) -> VxlanSpec:
        assert net.overlay is not None
        mtu = self.mtu(net) or 1450
        limit = self._max_mtu()
        if limit is not None and mtu > limit:
            raise ReconcilerError(
                f"network {net.name}: mtu {mtu} does not fit in the underlay (at most "
                f"{limit} with VXLAN's {VXLAN_OVERHEAD} bytes): packets would vanish")
        return VxlanSpec(tunnel_name(net.name), net.overlay.vni, net.overlay.port,
                         self._local(net), mtu, f"reconciler:{net.name}@{self._node}")

    def port_want(self, net: Network) -> PortWant:
        return self.inner.port_want(net)

    def tx_checksum(self, net: Network) -> bool | None:
        return self.inner.tx_checksum(net)

    # ------------------------------------------------------------------ segment

    def observe_segment(self, net: Network) -> tuple[str, ...]:
        missing = list(self.inner.observe_segment(net))
        spec = self._spec(net)
        have = self._vx.observe(spec.name)
        if have is None:
            missing.append(f"create vxlan {spec.name} (vni {spec.vni}, local {spec.local})")
        elif (have.vni, have.port, have.local, have.mtu) != (
                spec.vni, spec.port, spec.local, spec.mtu) or not self._vx.is_up(spec.name):
            missing.append(f"repair vxlan {spec.name} (vni {have.vni} -> {spec.vni}, "
                           f"local {have.local} -> {spec.local}, mtu {have.mtu} -> {spec.mtu})")
        if have is not None and not self.inner.device_plugged(net, spec.name):
            missing.append(f"plug vxlan {spec.name} into {net.bridge}")
        return tuple(missing)

    def ensure_segment(self, net: Network) -> list[str]:
        changes = self.inner.ensure_segment(net)
        spec = self._spec(net)
        if net.gateway is not None:
            changes += self._ensure_host_address(net)
        changes += [f"vxlan {spec.name} {c}" for c in self._vx.ensure(spec)]
        if self.inner.plug_device(net, spec.name, "tunnel"):
            changes.append(f"vxlan {spec.name} on {net.bridge}")
        if self._on_tunnel is not None:
            self._on_tunnel()  # its remote endpoints are programmed from Consul
        return changes

    def _ensure_host_address(self, net: Network) -> list[str]:
        """This host's own address on the network, on the gateway's device, with the MAC
        derived from it (remote hosts program that MAC), preferred as the source of the
        subnet's route."""
        dev = self.inner.gateway_device(net)
        if dev is None:
            return []
        cidr = self._host_address(net)
        changes = [f"host address {c}" for c in self._nl.ensure_host_address(dev, cidr)]
        if self._nl.ensure_host_mac(dev, overlay_mac(cidr.ip)):
            changes.append(f"{dev} mac")
        if ensure_subnet_source(dev, str(net.subnet), str(cidr.ip)):
            changes.append(f"route {net.subnet} src {cidr.ip}")
        return changes

    def release_segment(self, net: Network) -> list[str]:
        """No container of the network runs here any more: the tunnel goes (other hosts
        drop this host's endpoints with its allocations), the host's address too."""
        name = tunnel_name(net.name)
        out: list[str] = []
        if self._vx.observe(name) is not None:
            self.inner.unplug_device(name)
            self._vx.delete(name)
            out.append(f"vxlan {name}")
        self._release_host_address(net)
        return out + self.inner.release_segment(net)

    # ------------------------------------------------------------------ ports

    def observe_port(self, net: Network, host_veth: str, owner: PortOwner,
                     ifindex: int | None, master: str | None) -> PortObs:
        return self.inner.observe_port(net, host_veth, owner, ifindex, master)

    def plug(self, p: Plug) -> bool:
        return self.inner.plug(p)

    def unplug(self, host_veth: str) -> None:
        return None  # the inner driver (also registered on its own) does it

    def owned_ports(self, node: str) -> list[str]:
        return []  # listed by the inner driver

    def remove_ports(self, names: Collection[str]) -> None:
        return None

    def gateway_ports(self, nets: Collection[Network]) -> set[str]:
        return set()  # the inner driver counts the tunnel among its own

    def orphan_segments(self, node: str, used_bridges: Collection[str]) -> list[str]:
        return []  # tunnels: release_segment; bridges: the inner driver

    def remove_segment(self, bridge: str) -> None:
        return None

    def plug_device(self, net: Network, dev: str, role: str) -> bool:
        return self.inner.plug_device(net, dev, role)

    def device_plugged(self, net: Network, dev: str) -> bool:
        return self.inner.device_plugged(net, dev)

    def unplug_device(self, dev: str) -> None:
        self.inner.unplug_device(dev)

    def gateway_device(self, net: Network) -> str | None:
        return self.inner.gateway_device(net)


def orphan_tunnels(vx: Any, node: str, overlay_networks: Collection[str]) -> list[str]:
    """Tunnels this node made for networks that are no longer overlays here."""
    try:
        owned = vx.owned(node)
    except NetlinkError:
        return []
    return sorted(dev for dev, net in owned.items() if net not in overlay_networks)
