"""The data-path batcher: queues OVS port additions and deletions, and the deletion of
retired host veths; commits each kind at once.

Owns the queue and its lock, nothing else. vswitchd reconfigures a bridge once per
transaction, at a cost that grows with its port count: one port per transaction made
attaching N containers O(N^2) (bench/attach.py). Deleting a veth waits for an RCU grace
period (~15-20 ms here): detaches retire their veths (`NetlinkAdapter.retire_host_veth`)
and one group delete per flush removes them all. Reconciles queue work here; whoever
owns the scheduling (the daemon's `ovs-ports` work key) calls `flush`. Without a
`notify` callback (one-shot runs) a queued change is committed at once.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from reconciler.adapters.netlink import IpInterface
from reconciler.adapters.ovs import NewPort
from reconciler.errors import AdapterError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingPort:
    """An OVS port to commit with the next batch, and whom to announce after."""

    port: NewPort
    container: str
    ifname: str
    pid: int
    announce: bool
    addresses: tuple[IpInterface, ...] = field(default=(), hash=False)
    start_time: int | None = None  # of `pid`: the announcement's namespace is its


@dataclass(frozen=True)
class Committed:
    """What one flush did: port names added or fixed, names deleted, and the ports whose
    containers should announce themselves now that they are on the switch."""

    added: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    announce: tuple[PendingPort, ...] = ()


class PortBatcher:
    """Queued OVS port changes of all reconciles, committed together."""

    def __init__(self, ovs: Any, *, notify: Callable[[], None] | None = None,
                 after_commit: Callable[[Sequence[PendingPort]], None] | None = None,
                 reap: Callable[[], object] | None = None) -> None:
        self._ovs = ovs
        self._notify = notify
        self._after_commit = after_commit
        self._reap = reap
        self._lock = threading.Lock()
        self._adds: dict[str, PendingPort] = {}
        self._deletes: set[str] = set()
        self._retired = False

    @property
    def reaps(self) -> bool:
        """Whether retired host veths are deleted by `flush` (else delete them at once)."""
        return self._reap is not None

    def retired(self) -> None:
        """A host veth was retired: delete the retired ones with the next flush."""
        with self._lock:
            self._retired = True
        self._kick()

    def add(self, p: PendingPort) -> None:
        with self._lock:
            self._deletes.discard(p.port.name)
            queued = self._adds.get(p.port.name)
            if queued is not None and queued.announce and not p.announce:
                # Plugged again before the commit (its container planned again): the
                # announcement the first plug asked for still has to happen.
                p = dataclasses.replace(p, announce=True)
            self._adds[p.port.name] = p
        self._kick()

    def delete(self, name: str) -> None:
        with self._lock:
            self._adds.pop(name, None)
            self._deletes.add(name)
        self._kick()

    def discard(self, name: str) -> bool:
        """Drop a queued addition of port `name`; whether there was one."""
        with self._lock:
            return self._adds.pop(name, None) is not None

    def _kick(self) -> None:
        if self._notify is not None:
            self._notify()
        else:
            self.flush()

    def flush(self) -> Committed:
        """Commit every queued deletion, then every queued port, each kind in one
        transaction; then hand the ports to announce to `after_commit`."""
        with self._lock:
            pending = dict(self._adds)
            deletes, self._deletes = self._deletes, set()
            reap, self._retired = self._retired, False
        if deletes:
            # One transaction for all, not waiting for ovs-vswitchd: one per port cost
            # ~20 ms each, which made removing 200 replicas take seconds.
            try:
                self._ovs.delete_ports(sorted(deletes))
            except AdapterError:
                with self._lock:  # retried with the next flush
                    self._deletes |= deletes - set(self._adds)
                    self._retired |= reap
                raise
        if reap and self._reap is not None:
            try:
                self._reap()
            except AdapterError:
                with self._lock:
                    self._retired = True
                raise
        if not pending:
            return Committed(deleted=tuple(sorted(deletes)))
        # New ports (the common case: containers scaled out) go in one transaction sent
        # straight to ovsdb-server; anything else (a port to fix, a race) goes through
        # the replica, which compares and repairs.
        fresh = [p.port for p in pending.values() if not self._ovs.port_exists(p.port.name)]
        if not (fresh and self._ovs.add_ports(fresh)):
            fresh = []
        added = {n.name for n in fresh}
        rest = [p.port for p in pending.values() if p.port.name not in added]
        if rest:  # (a set: a list's `in` compared every pair of a batch of 500 ports)
            with self._ovs.transaction():
                for n in rest:
                    self._ovs.ensure_port(n.bridge, n.name, n.vlan, n.external_ids,
                                          ifindex=n.ifindex)
        with self._lock:
            for name, p in pending.items():
                if self._adds.get(name) is p:
                    del self._adds[name]
        announce = tuple(p for p in pending.values() if p.announce)
        if announce and self._after_commit is not None:
            self._after_commit(announce)
        return Committed(tuple(pending), tuple(sorted(deletes)), announce)

    def queued_containers(self) -> list[str]:
        """The containers whose ports wait for the next commit."""
        with self._lock:
            return sorted({p.container for p in self._adds.values()})

    def __len__(self) -> int:
        with self._lock:
            return len(self._adds) + len(self._deletes) + int(self._retired)
