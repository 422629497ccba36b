"""Remote endpoints of overlay networks: which (address, MAC, host) each local tunnel
must know, from Consul, and the programming of the difference.

Owns that decision. Every host knows every allocation (who holds which address, on
which node) and every live host's advertised address (its status, session-held): an
endpoint is programmed while its host is registered, and goes when its allocation does
or its host's session ends. MACs are derived from addresses (drivers.base.overlay_mac).
Only tunnels present on this host are programmed (a host without a container of the
network has no tunnel for it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from reconciler.adapters.vxlan import Peer
from reconciler.ipam import Allocation
from reconciler.model import Network
from reconciler.network.drivers.base import overlay_mac, tunnel_name


def wanted_peers(net: Network, allocations: Iterable[Allocation], hosts: Mapping[str, str],
                 node: str) -> set[Peer]:
    """The remote endpoints of `net` this node's tunnel must reach."""
    out: set[Peer] = set()
    for a in allocations:
        if a.network != net.name or a.node == node or a.address.version != 4:
            continue
        host = hosts.get(a.node)
        if host:  # a host that is gone (no session) is dropped from the tunnels
            out.add(Peer(str(a.address), overlay_mac(a.address), host))
    return out


def plan_peers(wanted: set[Peer], observed: set[Peer]) -> tuple[set[Peer], set[Peer]]:
    """(to add, to remove): a peer whose host or MAC changed is removed and added."""
    return wanted - observed, observed - wanted


class PeerProgrammer:
    def __init__(self, vx: Any, node: str) -> None:
        self._vx = vx  # adapters.vxlan.VxlanAdapter
        self._node = node
        # Overlay network -> remote endpoints its tunnel here should know (metrics);
        # replaced whole by each reconcile.
        self.counts: Mapping[str, int] = {}

    def reconcile(self, networks: Iterable[Network], allocations: list[Allocation],
                  hosts: Mapping[str, str], *, dry_run: bool = False) -> list[str]:
        changes: list[str] = []
        counts: dict[str, int] = {}
        for net in networks:
            if net.overlay is None:
                continue
            dev = tunnel_name(net.name)
            if self._vx.observe(dev) is None:
                continue
            wanted = wanted_peers(net, allocations, hosts, self._node)
            counts[net.name] = len(wanted)
            add, remove = plan_peers(wanted, self._vx.peers(dev))
            if not add and not remove:
                continue
            changes += [f"{net.name}: peer {p.ip} at {p.host}" for p in sorted(
                add, key=lambda p: (p.ip, p.host))]
            changes += [f"{net.name}: drop peer {p.ip or p.mac} at {p.host or '?'}"
                        for p in sorted(remove, key=lambda p: (p.ip, p.host))]
            if not dry_run:
                self._vx.set_peers(dev, add, remove)
        self.counts = counts
        return changes
