"""The orphan sweep: removes what this node's daemon made and no longer has a reason to
exist — ports and veths of containers that are gone or no longer wanted, bridges (and
their forwarding rules) of networks that no longer exist, allocations of dead containers
and dead nodes — and re-asserts allocation keys lost while the daemon was away.

Owns that decision, made from one listing per kind per pass (not one per container),
and nothing else; drivers own their records, the address book its allocations.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from reconciler.adapters import netlink
from reconciler.adapters.docker_engine import ContainerInfo
from reconciler.model import DesiredState, InterfaceSpec
from reconciler.network.addresses import AddressBook
from reconciler.network.drivers.base import tunnel_name
from reconciler.network.segments import Segments

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepResult:
    done: list[str]
    readdress: list[str]  # containers whose address was lost: reconcile them again


class Sweeper:
    def __init__(self, *, node: str, nl: netlink.NetlinkAdapter, segments: Segments,
                 addresses: AddressBook, inspect: Callable[[str], ContainerInfo | None],
                 reclaim_grace: float, tunnels: Any = None) -> None:
        self._node = node
        self._nl = nl
        self._segments = segments
        self._addresses = addresses
        self._inspect = inspect
        self._grace = reclaim_grace
        self._tunnels = tunnels  # adapters.vxlan.VxlanAdapter

    def sweep(self, state: DesiredState, running: Iterable[ContainerInfo],
              wanted: Callable[[ContainerInfo], list[InterfaceSpec]],
              reconciled: Mapping[str, Mapping[str, str]], *, dry_run: bool = False,
              full: bool = True) -> SweepResult:
        """`reconciled`: container id -> {ifname: address/prefix} as last attached."""
        running = list(running)
        wanted_veths = {netlink.host_veth_name(info.id, itf.name)
                        for info in running for itf in wanted(info)}
        done: list[str] = []
        drivers = self._segments.drivers
        for kind, d in drivers.items():
            gw = d.gateway_ports([n for n in state.networks.values() if n.driver == kind])
            orphans = [p for p in d.owned_ports(self._node)
                       if p not in wanted_veths and p not in gw]
            done += [f"port {p}" for p in orphans]
            if orphans and not dry_run:
                d.remove_ports(orphans)
        for v in self._nl.list_owned_host_veths(node=self._node):
            if v not in wanted_veths:
                done.append(f"veth {v}")
                if not dry_run:
                    self._nl.delete_host_veth(v)
        if not dry_run and self._nl.reap_retired():  # left by a crash before a flush
            done.append("retired veths")
        done += self._sweep_tunnels(state, running, wanted, dry_run=dry_run)
        used = {n.bridge for n in state.networks.values()}
        for d in drivers.values():
            for br in d.orphan_segments(self._node, used):
                done.append(f"bridge {br}")
                if not dry_run:
                    d.remove_segment(br)
        readdress: list[str] = []
        if not dry_run:
            running_ids = {i.id for i in running}
            released, held = self._addresses.sweep(
                running_ids, lambda cid: self._inspect(cid) is None, self._grace,
                overlays={n.name for n in state.networks.values() if n.overlay is not None},
                full=full, networks={itf.network for info in running for itf in wanted(info)})
            done += released
            for info in running:
                for itf in wanted(info):
                    cidr = reconciled.get(info.id, {}).get(itf.name)
                    if cidr is None or (info.id, itf.network, itf.name) in held:
                        continue
                    net = state.networks.get(itf.network)
                    if net is None or ipaddress.ip_interface(cidr).ip not in net.subnet:
                        continue  # the interface moved to another network: reconciled anew
                    if self._addresses.reassert(info.id, itf.network, itf.name, cidr):
                        done.append(f"re-asserted allocation {itf.network}/{cidr}")
                    else:
                        log.error("%s %s: address %s was reclaimed and is now held by "
                                  "another container: re-addressing", info.name, itf.name,
                                  cidr)
                        readdress.append(info.id)
                        done.append(f"lost allocation {itf.network}/{cidr}")
        if done and not dry_run:
            self._segments.forget()
        return SweepResult(done, readdress)

    def _sweep_tunnels(self, state: DesiredState, running: list[ContainerInfo],
                       wanted: Callable[[ContainerInfo], list[InterfaceSpec]], *,
                       dry_run: bool) -> list[str]:
        """Tunnels of networks that are no longer overlays go; an overlay network with
        no container running here any more is released on this host."""
        if self._tunnels is None:
            return []
        done: list[str] = []
        overlays = {n.name: n for n in state.networks.values() if n.overlay is not None}
        for dev, net in sorted(self._tunnels.owned(self._node).items()):
            if net not in overlays:
                done.append(f"vxlan {dev}")
                if not dry_run:
                    self._tunnels.delete(dev)
        local = {itf.network for info in running for itf in wanted(info)}
        for name, net in sorted(overlays.items()):
            if name in local or self._tunnels.observe(tunnel_name(name)) is None:
                continue
            if dry_run:
                done.append(f"vxlan {tunnel_name(name)} (no container of {name} here)")
            else:
                done += self._segments.driver(net).release_segment(net)
        return done
