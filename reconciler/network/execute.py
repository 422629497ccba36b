"""The executor: applies a container's planned actions through the drivers and netlink.

Owns the order-dependent details of applying (an interface's port is plugged only after
its link was made; an interface whose segment failed is left alone; who announces a new
address, and when) and the record of what was done. Decides nothing the plan did not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from reconciler.adapters import netlink
from reconciler.errors import AdapterError, ReconcilerError
from reconciler.network.drivers.base import Plug, PortOwner
from reconciler.network.plan import (
    Action,
    AllocateAddress,
    Blocked,
    CreateInterface,
    Detach,
    EnsureSegment,
    PlugPort,
    RepairInterface,
    Wanted,
)
from reconciler.network.portbatch import PortBatcher
from reconciler.network.segments import Segments


class EndExists(Exception):
    """An interface planned without observing it (`CreateInterface.unobserved`) has an
    end already: nothing was done to it; plan the container again, observed."""


# A change after which neighbours (the host's gateway too) must learn the address/MAC.
_ANNOUNCE_AFTER = frozenset({netlink.Change.CREATED, netlink.Change.RECREATED,
                             netlink.Change.ADDRESSES, netlink.Change.MAC})


@dataclass
class AttachResult:
    """What one reconcile of a container did. `addresses`: ifname -> address/prefix of
    the interfaces that are up and right (only these are published as members);
    `interfaces`: every interface of ours it touched (detached when no longer wanted)."""

    changes: list[str] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    interfaces: set[str] = field(default_factory=set)
    wanted: list[Wanted] = field(default_factory=list)  # as resolved for this reconcile


class Executor:
    def __init__(self, *, node: str, nl: netlink.NetlinkAdapter, segments: Segments,
                 batcher: PortBatcher | None = None) -> None:
        self._node = node
        self._nl = nl
        self._segments = segments
        self._batcher = batcher

    def apply(self, ns: netlink.ContainerNetns, cid: str, name: str,
              wanted: Sequence[Wanted], actions: Sequence[Action], res: AttachResult) -> None:
        by_if: Mapping[str, Wanted] = {w.link.ifname: w for w in wanted}
        changed: dict[str, tuple[netlink.Change, ...]] = {}
        plugged: dict[str, bool] = {}  # ifname -> announced by the driver after commit
        failed: set[str] = set()
        failed_nets: set[str] = set()
        for a in actions:
            ifname = _ifname(a)
            w = by_if.get(ifname) if ifname else None
            if ifname in failed or (w is not None and w.network.name in failed_nets):
                continue
            try:
                if isinstance(a, EnsureSegment):
                    try:
                        res.changes += self._segments.ensure(a.network)
                    except (AdapterError, ReconcilerError):
                        failed_nets.add(a.network.name)
                        raise
                elif isinstance(a, CreateInterface) and a.unobserved:
                    try:
                        made = self._nl.create_interface(ns, a.link)
                    except (AdapterError, ReconcilerError):
                        res.interfaces.add(ifname)  # made in part, perhaps: ours
                        raise
                    if made is None:  # an end is there (ours or not): nothing was done
                        raise EndExists(ifname)
                    res.interfaces.add(ifname)
                    changed[ifname] = made
                    res.changes += [f"{ifname} {c}" for c in made]
                elif isinstance(a, CreateInterface | RepairInterface):
                    res.interfaces.add(ifname)
                    # Neither end was there a moment ago: made without reading first.
                    fresh = isinstance(a, CreateInterface) and not a.recreate
                    ch = self._nl.ensure_interface(ns, a.link, fresh=fresh)
                    changed[ifname] = ch
                    res.changes += [f"{ifname} {c}" for c in ch]
                elif isinstance(a, PlugPort):
                    assert w is not None
                    plugged[ifname] = not self._plug(ns, cid, w, a, changed.get(ifname, ()),
                                                     res)
                elif isinstance(a, Blocked):
                    failed.add(ifname)
                    res.errors.append(f"{name} {ifname}: {a.reason}")
                elif isinstance(a, Detach):
                    self.detach(cid, a.ifname, a.host_veth, res)
                elif isinstance(a, AllocateAddress):  # resolved before planning here
                    raise ReconcilerError(f"{ifname}: no address resolved")
            except (AdapterError, ReconcilerError) as e:
                if ifname:  # a segment's failure is its network's (failed_nets)
                    failed.add(ifname)
                where = f"{name} {ifname}" if ifname else name
                res.errors.append(f"{where}: {e}")
        for ifname, w in by_if.items():
            if ifname in failed or w.network.name in failed_nets:
                continue
            res.interfaces.add(ifname)
            if w.link.addresses:
                res.addresses[ifname] = str(w.link.addresses[0])
            readdressed = any(c in _ANNOUNCE_AFTER for c in changed.get(ifname, ()))
            if ifname not in plugged and readdressed:
                self._announce(ns, w, res)

    def _plug(self, ns: netlink.ContainerNetns, cid: str, w: Wanted, a: PlugPort,
              changed: tuple[netlink.Change, ...], res: AttachResult) -> bool:
        """Plug the port; True when done now (announced here if needed), False when the
        driver queued it (and announces after its commit)."""
        owner = PortOwner(self._node, cid, a.ifname, w.network.name, ns.pid,
                          ns.start_time)
        index = changed.host_index if isinstance(changed, netlink.Changes) else None
        done = self._segments.driver(w.network).plug(Plug(
            w.network, a.host_veth, owner,
            index if index is not None else self._nl.link_index(a.host_veth),
            announce=bool(changed), addresses=w.link.addresses))
        res.changes.append(f"{a.ifname} {'bridge' if done else 'port'}")
        if done and changed:
            self._announce(ns, w, res)
        return done

    def _announce(self, ns: netlink.ContainerNetns, w: Wanted, res: AttachResult) -> None:
        self._nl.announce(ns, w.link.ifname, w.link.mac, w.link.addresses)
        res.changes.append(f"{w.link.ifname} garp")

    def detach(self, cid: str, ifname: str, host_veth: str, res: AttachResult) -> None:
        """Remove an interface of ours and its port, on whichever driver has it. With a
        batcher that reaps, the veth is retired now (down, renamed, its name free) and
        deleted with the batch's next flush, together with the others."""
        for d in self._segments.drivers.values():
            d.unplug(host_veth)
        if self._batcher is not None and self._batcher.reaps:
            if self._nl.retire_host_veth(host_veth):
                res.changes.append(f"{ifname} detached")
                self._batcher.retired()
        elif self._nl.detach(cid, ifname):
            res.changes.append(f"{ifname} detached")


def _ifname(a: Action) -> str:
    if isinstance(a, CreateInterface | RepairInterface):
        return a.link.ifname
    if isinstance(a, EnsureSegment):
        return ""
    return a.ifname
