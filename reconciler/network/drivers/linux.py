"""The Linux bridge segment driver: a kernel bridge per network, the gateway address on
the bridge itself, host veths enslaved to it, and the forwarding rule that lets bridged
traffic between containers through a host firewall whose FORWARD policy is DROP (Docker
sets it, and br_netfilter hands bridged frames to it).

Owns bridges this node made (ifalias ``reconciler:<network>@<node>``) and their
forwarding rules (adapters.bridgefw); a bridge made by anyone else is used as it is.
Linux ports have no record besides the veth itself: the veth sweep covers them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from typing import Any

from reconciler.adapters import netlink
from reconciler.model import Network
from reconciler.network.drivers.base import Plug, PortOwner
from reconciler.network.plan import PortObs, PortWant


class LinuxBridgeDriver:
    kind = "linux"

    def __init__(self, *, node: str, nl: netlink.NetlinkAdapter, fw: Any) -> None:
        self._node = node
        self._nl = nl
        self._fw = fw  # adapters.bridgefw.BridgeForwarding

    def port_want(self, net: Network) -> PortWant:
        return PortWant(net.bridge)

    def tx_checksum(self, net: Network) -> bool | None:
        return None

    def mtu(self, net: Network) -> int | None:
        return net.mtu

    def _gateway(self, net: Network) -> netlink.IpInterface | None:
        if net.gateway is None:
            return None
        return ipaddress.ip_interface(f"{net.gateway}/{net.subnet.prefixlen}")

    def observe_segment(self, net: Network) -> tuple[str, ...]:
        st = self._nl.bridge_state(net.bridge)
        if st is None:
            return (f"create linux bridge {net.bridge}",)
        is_bridge, mtu, up = st
        if not is_bridge:
            return (f"{net.bridge} exists and is not a bridge",)
        out = []
        if net.mtu is not None and mtu != net.mtu:
            out.append(f"bridge mtu {mtu} -> {net.mtu}")
        if not up:
            out.append("bridge down -> up")
        gw = self._gateway(net)
        if gw is not None and not self._nl.has_host_address(net.bridge, gw):
            out.append(f"gateway address {gw} on {net.bridge}")
        if not self._fw.in_place(net.bridge):
            out.append(f"forwarding rule for {net.bridge}")
        return tuple(out)

    def ensure_segment(self, net: Network) -> list[str]:
        changes = [f"bridge {c}" for c in self._nl.ensure_linux_bridge(
            net.bridge, net.name, net.mtu, node=self._node)]
        gw = self._gateway(net)
        if gw is not None:
            changes += [f"gateway {c}" for c in self._nl.ensure_host_address(net.bridge, gw)]
        if self._fw.ensure(net.bridge):
            changes.append(f"forwarding rule for {net.bridge}")
        return changes

    def observe_port(self, net: Network, host_veth: str, owner: PortOwner,
                     ifindex: int | None, master: str | None) -> PortObs:
        return PortObs(bridge=master)

    def plug(self, p: Plug) -> bool:
        self._nl.enslave(p.host_veth, p.net.bridge)
        return True

    def unplug(self, host_veth: str) -> None:
        return None  # the port is the veth itself

    def owned_ports(self, node: str) -> list[str]:
        return []

    def remove_ports(self, names: Collection[str]) -> None:
        return None

    def gateway_ports(self, nets: Collection[Network]) -> set[str]:
        return set()

    def gateway_device(self, net: Network) -> str | None:
        return net.bridge if net.gateway is not None else None

    def plug_device(self, net: Network, dev: str, role: str) -> bool:
        return self._nl.enslave(dev, net.bridge)

    def device_plugged(self, net: Network, dev: str) -> bool:
        return self._nl.master_of(dev) == net.bridge

    def unplug_device(self, dev: str) -> None:
        return None  # deleting the device takes it off the bridge

    def release_segment(self, net: Network) -> list[str]:
        return []

    def orphan_segments(self, node: str, used_bridges: Collection[str]) -> list[str]:
        # Bridges this node made, once empty; and our forwarding rules of any bridge no
        # network names (a bridge made by someone else keeps existing, without our rule).
        empty = {br for br in self._nl.list_owned_bridges(node=node)
                 if br not in used_bridges and not self._nl.bridge_has_ports(br)}
        ruled = {br for br in self._fw.owned() if br not in used_bridges}
        return sorted(empty | ruled)

    def remove_segment(self, bridge: str) -> None:
        if not self._nl.bridge_has_ports(bridge):
            self._nl.delete_linux_bridge(bridge)  # only if this node made it
        self._fw.remove(bridge)
