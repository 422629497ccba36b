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
    cut: frozenset[tuple[str, str]] = frozenset()
    """Denied (source, destination) pairs whose reverse is denied too (the source group
    is isolated and may not be reached from the destination group): their connections'
    conntrack entries are flushed when they become denied (`cuts`)."""

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


def source_networks(state: DesiredState, local_groups: Iterable[str]) -> set[str]:
    """The networks whose allocations a host needs, beyond those it has containers on, to
    classify sources: none unless one of its containers is in an isolated group (no
    policy, no cost: issue 9); then every network with a gateway, since a container of
    any of them, on any host, may be routed into this host's networks (a gateway is
    where traffic leaves a network)."""
    if not set(local_groups) & set(state.policy.isolate):
        return set()
    return {name for name, net in state.networks.items() if net.gateway is not None}


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
    rules = NetworkRules(
        netname, zone_of(netname), str(net.subnet),
        {g: tuple(sorted(a, key=_addr_key)) for g, a in sorted(isolated.items()) if a},
        {g: tuple(sorted(a, key=_addr_key)) for g, a in sorted(sources.items()) if a},
        allowed)
    both = frozenset((s, d) for s, d in rules.denied() if not state.policy.allows(d, s))
    return NetworkRules(rules.network, rules.zone, rules.subnet, rules.isolated,
                        rules.sources, allowed, both)


@dataclass(frozen=True)
class CutBlock:
    """Connections to cut on one network: every tracked connection whose original
    source is in `sources` and original destination in `destinations`."""

    network: str
    zone: int
    sources: frozenset[IPAddress]
    destinations: frozenset[IPAddress]

    def matches(self, src: IPAddress, dst: IPAddress) -> bool:
        return src in self.sources and dst in self.destinations


def cuts(old: CompiledPolicy, new: CompiledPolicy) -> dict[str, list[CutBlock]]:
    """Bridge -> the connections that became denied both ways between `old` and `new`
    (a pair newly denied; an address that moved into a denied group). Their conntrack
    entries are flushed: their packets are dropped either way, but a reply of an entry
    left in place would still pass.

    Only pairs denied both ways (`NetworkRules.cut`): when the reverse is allowed, an
    entry flushed would come back from the other side's next packet (conntrack picks
    up an established TCP connection mid-stream, as if that side had opened it, and the
    policy lets that side open connections), so the entry is kept and the original
    direction stays dropped; its replies are packets the policy allows anyway.
    Addresses new to the network (a container that just started) have no connections
    to cut. Without old rules for a network (the daemon started, the first isolated
    container came), everything denied both ways is cut."""
    out: dict[str, list[CutBlock]] = {}
    for bridge, b in new.bridges.items():
        prev = old.bridges.get(bridge)
        olds = {n.network: n for n in prev.networks} if prev is not None else {}
        blocks: list[CutBlock] = []
        for n in b.networks:
            on = olds.get(n.network)
            for s, d in sorted(n.cut):
                src = frozenset(n.sources.get(s, ()))
                dst = frozenset(n.isolated.get(d, ()))
                if on is None:
                    pieces = [(src, dst)]
                else:
                    known_src = {a for addrs in on.sources.values() for a in addrs}
                    known_dst = known_src | {a for addrs in on.isolated.values()
                                             for a in addrs}
                    src, dst = src & known_src, dst & known_dst
                    if (s, d) in on.cut:  # only addresses that moved into s or d
                        pieces = [(src - set(on.sources.get(s, ())), dst),
                                  (src, dst - set(on.isolated.get(d, ())))]
                    else:
                        pieces = [(src, dst)]
                blocks += [CutBlock(n.network, n.zone, frozenset(ps), frozenset(pd))
                           for ps, pd in pieces if ps and pd]
        if blocks:
            out[bridge] = blocks
    return out


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
