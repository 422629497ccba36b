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

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from reconciler.errors import ConsulError, Problem
from reconciler.kvlayout import KVEntry, Layout, kv_digest, kv_entries
from reconciler.model import DesiredState, parse_kv

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
    layout = Layout(prefix)
    return sum(1 for i in items if not layout.is_daemon_owned(i.key))


def snapshot_from(prefix: str, raw: object,
                  last_valid: dict[str, KVEntry] | None = None) -> Snapshot:
    """Parse a `KVSnapshot` (adapter) into a `Snapshot` (model).

    `last_valid` (updated in place) holds the last value each key had while it was valid.
    A key that exists and was valid before but is invalid now keeps its last valid value
    in the model, and its problems are reported with "keeping its last valid value": a
    typo in `consul kv put` never tears down what the key describes (the network's
    attachments, the service's frontend). A deleted key is gone: that is intended."""
    index = int(getattr(raw, "index"))  # noqa: B009
    rows = getattr(raw, "items")  # noqa: B009
    items = kv_entries(rows.values())
    state = parse_kv(prefix, items)
    if last_valid is not None:
        state = _with_last_valid(prefix, items, state, last_valid)
    return Snapshot(index, state, items, kv_digest(items))


def _with_last_valid(prefix: str, items: tuple[KVEntry, ...], state: DesiredState,
                     last_valid: dict[str, KVEntry]) -> DesiredState:
    present = {e.key for e in items}
    bad = state.invalid_keys
    swap = {k: last_valid[k] for k in bad if k in last_valid and k in present}
    if swap:
        held = [last_valid[e.key] if e.key in swap else e for e in items]
        kept = parse_kv(prefix, held)
        # A swapped key whose own value did not change was only invalid through a key it
        # depends on, which is held now: what the held state says about it is the truth.
        changed = {e.key for e in items if e.key in swap and e.value != swap[e.key].value}
        notes = [Problem(p.key, p.field, f"{p.reason}; keeping its last valid value",
                         p.value) for p in state.problems if p.key in changed]
        rest = [p for p in kept.problems if p.key not in changed]
        state = replace(kept, problems=tuple(sorted(set(notes) | set(rest))))
    for e in items:
        if e.key not in bad:
            last_valid[e.key] = e
    for k in list(last_valid):
        if k not in present:
            del last_valid[k]
    return state


class KVWatcher:
    """Calls `on_change(snapshot)` for every snapshot whose content changed."""

    def __init__(self, kv: PrefixReader, prefix: str, on_change: Callable[[Snapshot], None], *,
                 wait: str = "30s", min_interval: float = 0.05, max_backoff: float = 2.0,
                 on_error: Callable[[ConsulError], None] | None = None) -> None:
        self.kv = kv
        self.prefix = prefix
        self.on_change = on_change
        self.on_error = on_error
        self.wait = wait
        self.min_interval = min_interval
        self.max_backoff = max_backoff
        self.last: Snapshot | None = None
        self.last_valid: dict[str, KVEntry] = {}
        self.index = 0
        self.healthy = threading.Event()

    def poll(self, consistent: bool = False) -> Snapshot | None:
        """One read, blocking unless `consistent` (a confirmation or a first read must
        not wait for the next change). Returns the new snapshot when the content
        changed."""
        block = self.index > 1 and not consistent
        raw = self.kv.read_prefix(self.prefix, index=self.index if block else None,
                                  wait=self.wait if block else None,
                                  consistent=consistent)
        snap = snapshot_from(self.prefix, raw, self.last_valid)
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
                # Tried every 2 s at most (convergence within seconds of Consul's
                # return); said at the first failure and every minute or so after.
                log.log(logging.WARNING if failures == 1 or failures % 30 == 0
                        else logging.DEBUG, "consul watch failed (%s); keeping the last "
                        "good state, retrying in %.1fs (attempt %d)", e, delay, failures)
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
