"""The Consul watch: ONE blocking query on the whole prefix, turned into parsed snapshots.

Owns the blocking-query loop and its index discipline (consul-template's lessons):
- indices are integers; an index that goes backwards (snapshot restore, new leader)
  resets the loop to 0; an index of 0 or 1 is never sent as a blocking index;
- wake-ups whose content did not change are dropped (compared by content, not index);
- a minimum interval between queries with jitter, so a flapping key cannot make the
  daemon hammer Consul;
- a prefix that suddenly reads empty is confirmed with a consistent read before it is
  believed, so an agent restart or a leader election never causes a mass teardown;
- when Consul is unreachable the last good snapshot stays in force (we keep serving it)
  and the loop retries with capped exponential backoff — it never gives up.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from reconciler.errors import ConsulError
from reconciler.model import DesiredState, KVEntry, parse_kv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """One parsed view of the prefix."""

    index: int
    state: DesiredState
    items: tuple[KVEntry, ...]
    digest: str


class PrefixReader(Protocol):
    def read_prefix(self, prefix: str, *, index: int | None = None, wait: str | None = None,
                    consistent: bool = False) -> object: ...


def _user_keys(prefix: str, items: tuple[KVEntry, ...]) -> int:
    daemon = tuple(f"{prefix}{a}" for a in ("nodes/", "ipam/", "audit/", "locks/"))
    return sum(1 for i in items if not i.key.startswith(daemon))


def snapshot_from(prefix: str, raw: object) -> Snapshot:
    """Parse a `KVSnapshot` (adapter) into a `Snapshot` (model)."""
    index = int(getattr(raw, "index"))  # noqa: B009
    rows = getattr(raw, "items")  # noqa: B009
    items = tuple(sorted(
        (KVEntry(i.key, i.value, i.create_index, i.session, i.modify_index)
         for i in rows.values()),
        key=lambda e: e.key))
    h = hashlib.sha256()
    for e in items:
        h.update(e.key.encode() + b"\0" + e.value + b"\0" + (e.session or "").encode() + b"\0")
    return Snapshot(index, parse_kv(prefix, items), items, h.hexdigest())


class KVWatcher:
    """Calls `on_change(snapshot)` for every snapshot whose content changed."""

    def __init__(self, kv: PrefixReader, prefix: str, on_change: Callable[[Snapshot], None], *,
                 wait: str = "30s", min_interval: float = 0.05, max_backoff: float = 30.0,
                 on_error: Callable[[ConsulError], None] | None = None) -> None:
        self.kv = kv
        self.prefix = prefix
        self.on_change = on_change
        self.on_error = on_error
        self.wait = wait
        self.min_interval = min_interval
        self.max_backoff = max_backoff
        self.last: Snapshot | None = None
        self.index = 0
        self.healthy = threading.Event()

    def poll(self, consistent: bool = False) -> Snapshot | None:
        """One (blocking) read. Returns the new snapshot when the content changed."""
        raw = self.kv.read_prefix(self.prefix, index=self.index if self.index > 1 else None,
                                  wait=self.wait if self.index > 1 else None,
                                  consistent=consistent)
        snap = snapshot_from(self.prefix, raw)
        if snap.index < self.index:
            log.info("consul index went backwards (%d -> %d): resetting", self.index, snap.index)
            self.index = 0
        else:
            self.index = snap.index
        self.healthy.set()
        if self.last is not None and snap.digest == self.last.digest:
            return None
        if self.last is not None and _user_keys(self.prefix, snap.items) == 0 \
                and _user_keys(self.prefix, self.last.items) > 0 and not consistent:
            # Suddenly empty: believe it only after a consistent read says so too.
            log.warning("prefix %s reads empty; confirming with a consistent read", self.prefix)
            return self.poll(consistent=True)
        self.last = snap
        return snap

    def run(self, stop: threading.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                snap = self.poll()
            except Exception as e:  # ConsulError, and anything odd (never die: we'd go stale)
                if not isinstance(e, ConsulError):
                    log.exception("consul watch: unexpected error")
                    e = ConsulError(f"unexpected error: {e}")
                self.healthy.clear()
                failures += 1
                delay = min(self.max_backoff, 0.5 * 2 ** min(failures, 10))
                delay *= random.uniform(0.8, 1.2)
                log.warning("consul watch failed (%s); keeping the last good state, "
                            "retrying in %.1fs", e, delay)
                if self.on_error is not None:
                    self.on_error(e)
                stop.wait(delay)
                continue
            failures = 0
            if snap is not None:
                try:
                    self.on_change(snap)
                except Exception:
                    log.exception("handling a consul change failed")
            stop.wait(self.min_interval * random.uniform(1.0, 1.5))
