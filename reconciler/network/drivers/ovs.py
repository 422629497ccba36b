"""The Open vSwitch segment driver: a bridge per network (VLAN-tagged access ports, so
networks with overlapping subnets stay isolated), an internal port for the gateway.

Owns what reconciler does on OVS for networks: bridges and gateway ports (external_ids
record owner, node and network), container ports (owner, node, container, interface,
network and the netdev's ifindex) queued through the port batcher, and which of those
are orphans. OVSDB access goes through adapters.ovs; host links through adapters.netlink.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Collection
from typing import Any

from reconciler.adapters import netlink
from reconciler.adapters.ovs import NewPort
from reconciler.errors import NetlinkError
from reconciler.model import Network
from reconciler.network.drivers.base import Plug, PortOwner, gateway_port_name, tunnel_name
from reconciler.network.plan import PortObs, PortWant
from reconciler.network.portbatch import PendingPort, PortBatcher

NODE_ID = "reconciler-node"


class OvsDriver:
    kind = "ovs"

    def __init__(self, *, node: str, ovs: Any, nl: netlink.NetlinkAdapter,
                 batcher: PortBatcher) -> None:
        self._node = node
        self._ovs = ovs
        self._nl = nl
        self._batcher = batcher

    def _ids(self, **extra: str) -> dict[str, str]:
        ids = {NODE_ID: self._node}
        ids.update({f"reconciler-{k}": v for k, v in extra.items()})
        return ids

    # ------------------------------------------------------------------ segment

    def port_want(self, net: Network) -> PortWant:
        return PortWant(net.bridge, net.vlan)

    def tx_checksum(self, net: Network) -> bool | None:
        # OVS's userspace (netdev) datapath does not complete checksums that the veth
        # leaves to "hardware": TCP from the container would be dropped (ping works, TCP
        # does not). So the container computes them itself there.
        return False if self._ovs.datapath == "netdev" else None

    def mtu(self, net: Network) -> int | None:
        return net.mtu

    def _gateway(self, net: Network) -> tuple[str, netlink.IpInterface] | None:
        if net.gateway is None:
            return None
        return gateway_port_name(net.name), ipaddress.ip_interface(
            f"{net.gateway}/{net.subnet.prefixlen}")

    def observe_segment(self, net: Network) -> tuple[str, ...]:
        if not self._ovs.bridge_exists(net.bridge):
            out = [f"create ovs bridge {net.bridge}"]
            if net.gateway is not None:
                out.append(f"create gateway port {gateway_port_name(net.name)} "
                           f"(vlan {net.vlan})")
            return tuple(out)
        gw = self._gateway(net)
        if gw is None:
            return ()
        port, cidr = gw
        ids = self._ids(network=net.name, role="gateway")
        if not self._nl.link_exists(port) or self._ovs.port_differs(
                net.bridge, port, net.vlan, ids):
            return (f"create gateway port {port} (vlan {net.vlan})",)
        if not self._nl.has_host_address(port, cidr):
            return (f"gateway address {cidr} on {port}",)
        return ()

    def ensure_segment(self, net: Network) -> list[str]:
        changes: list[str] = []
        if self._ovs.ensure_bridge(net.bridge, external_ids=self._ids(network=net.name)):
            changes.append(f"bridge {net.bridge} created")
        gw = self._gateway(net)
        if gw is not None:
            port, cidr = gw
            if self._ovs.ensure_internal_port(net.bridge, port, net.vlan, self._ids(
                    network=net.name, role="gateway"), mtu=net.mtu):
                changes.append(f"gateway port {port}")
            self._wait_link(port)
            changes += [f"gateway {c}" for c in self._nl.ensure_host_address(port, cidr)]
        return changes

    def _wait_link(self, name: str, timeout: float = 5.0) -> None:
        # vswitchd creates an internal port's netdev asynchronously after the commit.
        ev = threading.Event()
        for _ in range(int(timeout / 0.02)):
            if self._nl.link_exists(name):
                return
            ev.wait(0.02)
        raise NetlinkError(f"internal port {name} did not appear as a host link")

    # ------------------------------------------------------------------ ports

    def _port_ids(self, owner: PortOwner) -> dict[str, str]:
        return self._ids(container=owner.container, interface=owner.ifname,
                         network=owner.network)

    def observe_port(self, net: Network, host_veth: str, owner: PortOwner,
                     ifindex: int | None, master: str | None) -> PortObs:
        p = self._ovs.get_port(host_veth)
        if p is None:
            return PortObs()
        stale = self._ovs.port_differs(p.bridge, host_veth, p.tag, self._port_ids(owner),
                                       ifindex)
        return PortObs(bridge=p.bridge, vlan=p.tag, stale=stale)

    def plug(self, p: Plug) -> bool:
        self._batcher.add(PendingPort(
            NewPort(p.net.bridge, p.host_veth, p.net.vlan, self._port_ids(p.owner),
                    p.ifindex),
            p.owner.container, p.owner.ifname, p.owner.pid, p.announce, p.addresses,
            p.owner.start_time))
        return False

    def unplug(self, host_veth: str) -> None:
        # The row goes with the next batch (the veth it names is gone already); a port
        # still queued is dropped from the queue. Another node's port is left alone.
        self._batcher.discard(host_veth)
        p = self._ovs.get_port(host_veth)
        if p is not None and p.external_ids.get(NODE_ID) == self._node:
            self._batcher.delete(host_veth)

    def owned_ports(self, node: str) -> list[str]:
        return [p.name for p in self._ovs.list_owned_ports(node=node)]

    def remove_ports(self, names: Collection[str]) -> None:
        if names:
            self._ovs.delete_ports(sorted(names))  # one commit for all of them

    def gateway_ports(self, nets: Collection[Network]) -> set[str]:
        return {gateway_port_name(n.name) for n in nets if n.gateway is not None} \
            | {tunnel_name(n.name) for n in nets if n.overlay is not None}

    def gateway_device(self, net: Network) -> str | None:
        return gateway_port_name(net.name) if net.gateway is not None else None

    def plug_device(self, net: Network, dev: str, role: str) -> bool:
        return bool(self._ovs.ensure_port(net.bridge, dev, net.vlan,
                                          self._ids(network=net.name, role=role),
                                          ifindex=self._nl.link_index(dev)))

    def device_plugged(self, net: Network, dev: str) -> bool:
        return not self._ovs.port_differs(net.bridge, dev, net.vlan, self._ids(
            network=net.name, role="tunnel"), self._nl.link_index(dev))

    def unplug_device(self, dev: str) -> None:
        self._ovs.delete_port(dev)

    def release_segment(self, net: Network) -> list[str]:
        return []

    def orphan_segments(self, node: str, used_bridges: Collection[str]) -> list[str]:
        return [br for br in self._ovs.list_owned_bridges(node=node)
                if br not in used_bridges and not self._ovs.bridge_port_names(br)]

    def remove_segment(self, bridge: str) -> None:
        self._ovs.delete_bridge(bridge)
