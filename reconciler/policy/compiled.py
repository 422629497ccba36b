"""The compiled model of the group policy: pure, one input for every backend.

Owns the meaning of the policy in the data path (contract v2, "Group policy"); the
backends (nft for Linux bridges, OpenFlow for OVS) only translate it. `compile_policy`
takes the desired state, every allocation in the cluster, which container each local
port belongs to and which spec each container matches, and returns per bridge:

- **ports**: every local container port (host veth) with the addresses allocated to it
  and its MAC when known: only those may leave the port (anti-spoofing), so a container
  cannot change its group by changing its address or MAC;
- per network on the bridge: its conntrack **zone**, the **isolated** destination
  groups with their local addresses, the **sources**: group -> addresses, and which
  (source, destination) pairs are **allowed**.

Semantics:
- Nothing at all is compiled while no group is isolated (adding groups and a policy
  without `isolate` changes no packet's fate).
- Identity is the source address as recorded in the allocations (`ipam/<network>/
  <address>`: holder container -> its spec -> the spec's `group`). The sources of a
  network are that network's own allocations for addresses inside its subnet, and other
  networks' allocations for addresses outside it (routed through the host's gateway);
  an address held in several networks (overlapping subnets) by different groups is in
  each group's set, and backends check denials first: ambiguity denies, never allows.
- Every address no allocation names is `external` (the host, its gateway addresses,
  the outside world, overlay host addresses). A container whose entry has no `group`
  is UNGROUPED: never `external`, and allowed into no isolated group. A remote holder
  whose spec this host does not know is UNGROUPED too (fails closed).
- An isolated group's ports accept a packet in the original direction of a connection
  only when its source group is allowed; replies always pass (stateful). Every original
  packet is judged (not only the first): a policy change cuts a now-denied established
  connection at once, and one that stays allowed is untouched.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from reconciler.ipam import Allocation
from reconciler.model import EXTERNAL, DesiredState, IPAddress

UNGROUPED = ""
"""The group of a container interface whose entry names none (or is not known here)."""

HOST_HOLDER = "host:"
"""Allocations held by a host itself (its overlay address) are not container interfaces."""


def group_label(group: str) -> str:
    """How a group is named in metrics and reports (UNGROUPED has no name)."""
    return group if group != UNGROUPED else "(none)"


def zone_of(network: str) -> int:
    """The conntrack zone (and OVS register value) of a network: stable across restarts
    and across changes of other networks, 1..65000."""
    return 1 + int(hashlib.sha256(f"zone/{network}".encode()).hexdigest()[:8], 16) % 65000


@dataclass(frozen=True)
class LocalPort:
    """One container interface plugged on this host: the host end of its veth."""

    network: str
    port: str
    container: str
    addresses: tuple[IPAddress, ...]
    mac: str | None = None


@dataclass(frozen=True)
class PortRules:
    """What may leave a local container port (anti-spoofing) and its group."""

    port: str
    network: str
    group: str
    addresses: tuple[IPAddress, ...]
    mac: str | None = None


@dataclass(frozen=True)
class NetworkRules:
    """The isolation of one network on a bridge."""

    network: str
    zone: int
    subnet: str
    isolated: Mapping[str, tuple[IPAddress, ...]]
    """Isolated destination group -> its local addresses on this network."""
    sources: Mapping[str, tuple[IPAddress, ...]]
    """Source group (UNGROUPED included) -> addresses classified as that group here."""
    allowed: frozenset[tuple[str, str]]
    """(source group, isolated destination group) pairs that may open connections;
    EXTERNAL as a source means every address in no source set."""

    def denied(self) -> list[tuple[str, str]]:
        """Every (source, destination) pair that is denied here, sources with addresses
        first then EXTERNAL: what the backends drop and count."""
        out = [(s, d) for d in sorted(self.isolated) for s in sorted(self.sources)
               if (s, d) not in self.allowed]
        out += [(EXTERNAL, d) for d in sorted(self.isolated)
                if (EXTERNAL, d) not in self.allowed]
        return out


@dataclass(frozen=True)
class BridgeRules:
    """Everything one bridge enforces."""

    bridge: str
    driver: str
    ports: tuple[PortRules, ...] = ()
    networks: tuple[NetworkRules, ...] = ()

    @property
    def enforcing(self) -> bool:
        """Whether any local port of the bridge is in an isolated group."""
        return any(n.isolated for n in self.networks)

    def digest(self) -> str:
        return hashlib.sha256(_canonical(self).encode()).hexdigest()


@dataclass(frozen=True)
class CompiledPolicy:
    bridges: Mapping[str, BridgeRules] = field(default_factory=dict)

    def digest(self) -> str:
        return hashlib.sha256("".join(b.digest() for _, b in sorted(
            self.bridges.items())).encode()).hexdigest()


def compile_policy(state: DesiredState, allocations: Iterable[Allocation],
                   ports: Iterable[LocalPort], specs: Mapping[str, str],
                   ) -> CompiledPolicy:
    """The rules of this host's bridges. `allocations`: every allocation of every node
    (what the watch read); `ports`: this host's container ports as attached; `specs`:
    container id -> the name of its `containers/<name>` entry (local containers, and
    remote ones where known)."""
    policy = state.policy
    if not policy.isolate:
        return CompiledPolicy()
    groups = {name: spec.group or UNGROUPED for name, spec in state.containers.items()}

    def group_of(container: str) -> str | None:
        if container.startswith(HOST_HOLDER):
            return None  # a host's own address: external
        spec = specs.get(container)
        return groups.get(spec, UNGROUPED) if spec is not None else UNGROUPED

    # (network, address) -> groups holding it
    held: dict[str, dict[IPAddress, set[str]]] = {}
    for a in allocations:
        g = group_of(a.container)
        if g is not None and a.network in state.networks:
            held.setdefault(a.network, {}).setdefault(a.address, set()).add(g)
    local = [p for p in ports if p.network in state.networks]
    by_bridge: dict[str, list[LocalPort]] = {}
    for p in local:
        by_bridge.setdefault(state.networks[p.network].bridge, []).append(p)
    out: dict[str, BridgeRules] = {}
    for bridge, bports in sorted(by_bridge.items()):
        driver = state.networks[bports[0].network].driver
        prules = tuple(sorted((PortRules(
            p.port, p.network, group_of(p.container) or UNGROUPED,
            tuple(sorted(set(p.addresses), key=_addr_key)), p.mac) for p in bports),
            key=lambda r: r.port))
        nets: list[NetworkRules] = []
        for netname in sorted({p.network for p in bports}):
            nets.append(_network_rules(state, netname, prules, held, policy.allow))
        out[bridge] = BridgeRules(bridge, driver, prules, tuple(nets))
    return CompiledPolicy(out)


def _network_rules(state: DesiredState, netname: str, ports: tuple[PortRules, ...],
                   held: Mapping[str, Mapping[IPAddress, set[str]]],
                   allow: Iterable[tuple[str, str]]) -> NetworkRules:
    net = state.networks[netname]
    isolated: dict[str, set[IPAddress]] = {}
    for p in ports:
        if p.network == netname and p.group in state.policy.isolate:
            isolated.setdefault(p.group, set()).update(p.addresses)
    sources: dict[str, set[IPAddress]] = {}
    for other, addrs in held.items():
        for addr, gs in addrs.items():
            inside = addr.version == net.subnet.version and addr in net.subnet
            if inside != (other == netname):
                continue  # own network inside the subnet; the others only outside it
            for g in gs:
                sources.setdefault(g, set()).add(addr)
    # Local ports' own addresses count even before the watch shows their allocation.
    for p in ports:
        if p.network == netname:
            sources.setdefault(p.group, set()).update(p.addresses)
    allowed = frozenset((s, d) for s, d in allow if d in isolated)
    return NetworkRules(
        netname, zone_of(netname), str(net.subnet),
        {g: tuple(sorted(a, key=_addr_key)) for g, a in sorted(isolated.items()) if a},
        {g: tuple(sorted(a, key=_addr_key)) for g, a in sorted(sources.items()) if a},
        allowed)


def _addr_key(a: IPAddress) -> tuple[int, int]:
    return a.version, int(a)


def _canonical(b: BridgeRules) -> str:
    def conv(o: object) -> object:
        if isinstance(o, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return str(o)
        if isinstance(o, Mapping):
            return {str(k): conv(v) for k, v in sorted(o.items())}
        if isinstance(o, frozenset | set):
            return sorted(conv(v) for v in o)  # type: ignore[type-var]
        if isinstance(o, tuple | list):
            return [conv(v) for v in o]
        if hasattr(o, "__dataclass_fields__"):
            return {k: conv(getattr(o, k)) for k in o.__dataclass_fields__}
        return o
    return json.dumps(conv(b), sort_keys=True)
