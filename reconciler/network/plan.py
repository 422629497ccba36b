"""The network plan: a pure function from (what is wanted, what is observed) to actions.

Owns the decisions of container networking and nothing else: which interfaces to create,
repair or detach, which host ports to plug or re-plug, which segments to (re)build, what
blocks an interface. No I/O here: the controller observes (netlink, OVSDB), calls
`plan_container`, and the executor (network.execute) applies the actions; `--dry-run`
and `reconciler plan` print the same actions instead. So the daemon never does what the
plan would not show, and the plan shows every drift the daemon repairs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from reconciler.adapters.netlink import InterfaceSpec, ObservedInterface
from reconciler.model import Network


@dataclass(frozen=True)
class PortWant:
    """Where a host veth must be plugged: a bridge, and the VLAN tag it carries there
    (None: untagged, or a driver without tags)."""

    bridge: str
    vlan: int | None = None


@dataclass(frozen=True)
class PortObs:
    """Where a host veth is plugged now. `stale`: plugged right, but the record of it
    must be rewritten (OVS: its external_ids or the netdev it names)."""

    bridge: str | None = None
    vlan: int | None = None
    stale: bool = False


@dataclass(frozen=True)
class Wanted:
    """One interface a container must have. `link.addresses` is empty while the address
    is still to be allocated (dry-run only: the daemon allocates before planning)."""

    network: Network
    link: InterfaceSpec
    port: PortWant
    allocate: bool = False


@dataclass(frozen=True)
class Observed:
    """One interface as it is: the link in the container and its host end, and where the
    host end is plugged."""

    link: ObservedInterface
    port: PortObs


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class EnsureSegment:
    """Build or repair a network's segment (bridge, gateway port, forwarding rule...)."""

    network: Network
    missing: tuple[str, ...]

    def describe(self) -> str:
        return f"network {self.network.name}: {', '.join(self.missing)}"


@dataclass(frozen=True)
class AllocateAddress:
    ifname: str
    network: str

    def describe(self) -> str:
        return f"{self.ifname}: allocate an address from {self.network}"


@dataclass(frozen=True)
class CreateInterface:
    """A veth pair: the container end named and configured, the host end ready to plug.
    `unobserved`: planned without reading the interface (the controller's first attach
    of it): should either end exist after all, the creation stops and the container is
    planned again, observed."""

    network: str
    link: InterfaceSpec
    recreate: bool = False  # a stale host end (its peer gone) is replaced
    unobserved: bool = False

    def describe(self) -> str:
        addrs = ", ".join(str(a) for a in self.link.addresses) or "a pool address"
        verb = "re-create" if self.recreate else "attach"
        return f"{self.link.ifname}: {verb} {addrs} on {self.network}"


@dataclass(frozen=True)
class RepairInterface:
    network: str
    link: InterfaceSpec
    drift: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.link.ifname}: repair {'; '.join(self.drift)}"


@dataclass(frozen=True)
class PlugPort:
    """Put the host end on its bridge with its tag (new, moved, re-tagged, re-recorded)."""

    network: str
    ifname: str
    host_veth: str
    want: PortWant
    reason: str

    def describe(self) -> str:
        tag = f" vlan {self.want.vlan}" if self.want.vlan is not None else ""
        return (f"{self.ifname}: port {self.host_veth} on {self.want.bridge}{tag} "
                f"({self.reason})")


@dataclass(frozen=True)
class Blocked:
    """The interface cannot be made: nothing is done to it, and the reason is reported."""

    ifname: str
    reason: str

    def describe(self) -> str:
        return f"{self.ifname}: cannot attach: {self.reason}"


@dataclass(frozen=True)
class Detach:
    ifname: str
    host_veth: str

    def describe(self) -> str:
        return f"{self.ifname}: detach ({self.host_veth})"


Action = (EnsureSegment | AllocateAddress | CreateInterface | RepairInterface | PlugPort
          | Blocked | Detach)


# --------------------------------------------------------------------------- the plan


def link_drift(want: InterfaceSpec, obs: ObservedInterface) -> tuple[str, ...]:
    """What differs between an existing, paired interface and its spec: each item names
    the setting and shows the observed and wanted values."""
    out: list[str] = []
    addrs = frozenset(want.addresses)
    if obs.addresses != addrs:
        out.append(f"addresses {_list(obs.addresses)} -> {_list(addrs)}")
    if want.mac is not None and (obs.mac or "").lower() != want.mac.lower():
        out.append(f"mac {obs.mac} -> {want.mac.lower()}")
    if want.mtu is not None and obs.mtu != want.mtu:
        out.append(f"mtu {obs.mtu} -> {want.mtu}")
    if want.mtu is not None and obs.host_mtu != want.mtu:
        out.append(f"host mtu {obs.host_mtu} -> {want.mtu}")
    routes = want.wanted_routes()
    if obs.routes != routes:
        out.append(f"routes {_list(f'{r.dst} via {r.via}' for r in obs.routes)} -> "
                   f"{_list(f'{r.dst} via {r.via}' for r in routes)}")
    if not obs.up:
        out.append("link down -> up")
    if not obs.host_up:
        out.append("host link down -> up")
    if obs.arp_notify is False:
        out.append("arp_notify 0 -> 1")
    if obs.promote_secondaries is False:
        out.append("promote_secondaries 0 -> 1")
    if want.tx_checksum is not None and obs.tx_checksum is not None \
            and obs.tx_checksum != want.tx_checksum:
        out.append(f"tx checksum {_onoff(obs.tx_checksum)} -> {_onoff(want.tx_checksum)}")
    if want.owner is not None and obs.host_alias != want.owner:
        out.append("host veth owner record")
    return tuple(out)


def port_drift(want: PortWant, obs: PortObs) -> str | None:
    """Why the host end must be (re-)plugged, or None when it is right."""
    if obs.bridge is None:
        return "missing"
    if obs.bridge != want.bridge:
        return f"on {obs.bridge}, not {want.bridge}"
    if obs.vlan != want.vlan:
        return f"vlan {obs.vlan} -> {want.vlan}"
    if obs.stale:
        return "record"
    return None


def plan_interface(want: Wanted, obs: Observed | None) -> tuple[Action, ...]:
    """The actions for one wanted interface. `obs` None: not observed (a first attach,
    or a dry run of a container whose namespace cannot be read) — planned as a fresh
    attachment."""
    ifname = want.link.ifname
    net = want.network.name
    out: list[Action] = []
    if want.allocate:
        out.append(AllocateAddress(ifname, net))
    link = obs.link if obs is not None else None
    if link is not None and link.exists and not link.paired:
        return (Blocked(ifname, f"{ifname} exists and is not reconciler's veth "
                                f"{want.link.host_veth}"),)
    fresh = link is None or not link.exists
    if fresh:
        out.append(CreateInterface(net, want.link, recreate=bool(link and link.host_present),
                                   unobserved=obs is None))
    else:
        assert link is not None
        drift = link_drift(want.link, link)
        if drift:
            out.append(RepairInterface(net, want.link, drift))
    if fresh:
        reason: str | None = "new veth"
    else:
        assert obs is not None
        reason = port_drift(want.port, obs.port)
    if reason is not None:
        out.append(PlugPort(net, ifname, want.link.host_veth, want.port, reason))
    return tuple(out)


def plan_container(wanted: Sequence[Wanted], observed: Mapping[str, Observed],
                   segments: Mapping[str, tuple[str, ...]] | None = None,
                   unwanted: Iterable[tuple[str, str]] = ()) -> tuple[Action, ...]:
    """Every action that makes one container's interfaces equal to `wanted`.

    `observed`: ifname -> what is there (absent: nothing observed, treated as missing);
    `segments`: network name -> what its segment lacks (absent or empty: nothing);
    `unwanted`: (ifname, host veth) of ours that the spec no longer asks for.
    Segments come first (an interface is plugged into them), in the order of `wanted`;
    then each interface's own actions; detaches last."""
    out: list[Action] = []
    seen: set[str] = set()
    for w in wanted:
        missing = (segments or {}).get(w.network.name, ())
        if missing and w.network.name not in seen:
            out.append(EnsureSegment(w.network, tuple(missing)))
        seen.add(w.network.name)
    for w in wanted:
        out += plan_interface(w, observed.get(w.link.ifname))
    keep = {w.link.ifname for w in wanted}
    out += [Detach(ifname, veth) for ifname, veth in sorted(unwanted) if ifname not in keep]
    return tuple(out)


def describe(actions: Iterable[Action]) -> list[str]:
    return [a.describe() for a in actions]


def _list(items: Iterable[object]) -> str:
    shown = sorted(str(i) for i in items)
    return "[" + ", ".join(shown) + "]" if shown else "none"


def _onoff(v: bool) -> str:
    return "on" if v else "off"
