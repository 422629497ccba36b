"""Blocking queries on one area of the prefix, and areas read piece by piece through an
index of generation keys.

Owns the Consul read discipline every watch of the daemon shares (consul-template's
lessons), for ONE read prefix (`AreaWatch`):
- indices are integers; an index that goes backwards (snapshot restore, new leader)
  resets the loop to 0; an index of 0 or 1 is never sent as a blocking index;
- a wake-up whose entries did not change is dropped: entries are compared by
  (ModifyIndex, session), so the caller only ever sees the keys that changed;
- a token bucket spaces reads under sustained churn (a burst is read at once, a storm
  of writes is coalesced), so a flapping key cannot make the daemon hammer Consul;
- an area that suddenly reads empty is confirmed with a consistent read before it is
  believed (optional: for areas holding desired state);
- an EMPTY area is read at most every `empty_interval` seconds: Consul answers a missing
  prefix with the global index and wakes its blocking query for writes anywhere near
  it (the watch of the closest existing node of its tree), so without this an unused
  area (no `policy` key, say) would be read again for every write of the cluster;
- while Consul is unreachable the last entries stay in force and the loop retries with
  capped, jittered backoff — it never gives up.

`IndexedArea` is for areas too large to read whole on every change (the allocations of
every network, the members every node publishes): the writers of such an area bump a
generation key `index/<area>/<piece>` with every write of `<area>/<piece>/...`; ONE
blocking query on `index/<area>/` tells which pieces changed (by ModifyIndex), and only
the pieces this host wants are read, without blocking. A host's cost per change is the
size of the index (one small key per piece) plus the piece changed, not the size of the
area. Where the pieces are many (the services), they share a fixed number of generation
keys (`bucket_of`: piece -> key), so the index read stays the same size as they grow; a
bump then makes a host read the pieces it wants of that bucket. A missed bump (a writer
that died between its write and the bump, a key deleted by hand) is caught by `refresh`,
which the daemon calls at its periodic resync.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from reconciler.errors import ConsulError
from reconciler.kvlayout import KVEntry, kv_entries

log = logging.getLogger(__name__)


class PrefixReader(Protocol):
    def read_prefix(self, prefix: str, *, index: int | None = None, wait: str | None = None,
                    consistent: bool = False) -> object: ...


def _version(e: KVEntry) -> tuple[int, str | None, bytes]:
    return (e.modify_index, e.session, e.value)


class TokenBucket:
    """`burst` reads at once, then one per `1/rate` seconds (a clock seam for tests)."""

    def __init__(self, rate: float, burst: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.clock = clock
        self.at = clock()

    def delay(self) -> float:
        """Take a token; how long to wait before using it."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


@dataclass(frozen=True)
class AreaChange:
    """What one read of an area changed: keys added or modified, keys removed."""

    index: int
    changed: frozenset[str]
    removed: frozenset[str]


class AreaWatch:
    """The entries under one read prefix, kept current by blocking queries."""

    def __init__(self, kv: PrefixReader, prefix: str, *, wait: str = "30s",
                 confirm_empty: bool = False, rate: float = 20.0, burst: float = 5.0,
                 max_backoff: float = 2.0, empty_interval: float = 0.5,
                 versions_only: bool = False) -> None:
        self.kv = kv
        self.prefix = prefix
        self.wait = wait
        self.confirm_empty = confirm_empty
        self.bucket = TokenBucket(rate, burst)
        self.max_backoff = max_backoff
        self.empty_interval = empty_interval
        # Only (ModifyIndex, session) of each key matter (an index of generation keys):
        # read them without the values when the reader can (`read_versions`).
        self.versions_only = versions_only and hasattr(kv, "read_versions")
        self.index = 0
        self.entries: dict[str, KVEntry] = {}
        self.read_once = False
        self.generation = 0  # moves with every change of `entries`
        self.reads = 0  # Consul requests made (observability and tests)
        self.healthy = threading.Event()

    def poll(self, consistent: bool = False, block: bool = True) -> AreaChange | None:
        """One read, blocking unless `consistent`, not `block` or before the first read.
        Returns what changed, or None when nothing did."""
        block = block and self.index > 1 and not consistent and self.read_once
        self.reads += 1
        new: dict[str, KVEntry]
        if self.versions_only:
            index, versions = getattr(self.kv, "read_versions")(  # noqa: B009
                self.prefix, index=self.index if block else None,
                wait=self.wait if block else None, consistent=consistent)
            new = {k: KVEntry(k, b"", 0, sess, mi) for k, (mi, sess) in versions.items()}
        else:
            raw = self.kv.read_prefix(self.prefix, index=self.index if block else None,
                                      wait=self.wait if block else None,
                                      consistent=consistent)
            index = int(getattr(raw, "index"))  # noqa: B009
            new = {e.key: e for e in kv_entries(getattr(raw, "items").values())}  # noqa: B009
        if index < self.index:
            log.info("consul index of %s went backwards (%d -> %d): resetting", self.prefix,
                     self.index, index)
            self.index = 0
        else:
            self.index = index
        self.healthy.set()
        if self.confirm_empty and not new and self.entries and not consistent:
            # Suddenly empty: believe it only after a consistent read says so too.
            log.warning("%s reads empty; confirming with a consistent read", self.prefix)
            return self.poll(consistent=True)
        old = self.entries
        changed = frozenset(k for k, e in new.items()
                            if k not in old or _version(old[k]) != _version(e))
        removed = frozenset(k for k in old if k not in new)
        first = not self.read_once
        self.read_once = True
        self.entries = new
        if not changed and not removed and not first:
            return None
        self.generation += 1
        return AreaChange(index, changed, removed)

    def run(self, stop: threading.Event, on_change: Callable[[AreaChange], None],
            on_error: Callable[[ConsulError], None] | None = None) -> None:
        failures = 0
        while not stop.is_set():
            try:
                change = self.poll()
            except Exception as e:  # ConsulError, and anything odd (never die: we'd go stale)
                if not isinstance(e, ConsulError):
                    log.exception("consul watch of %s: unexpected error", self.prefix)
                    e = ConsulError(f"unexpected error: {e}")
                self.healthy.clear()
                failures += 1
                delay = min(self.max_backoff, 0.5 * 2 ** min(failures, 10))
                delay *= random.uniform(0.8, 1.2)
                # Tried every 2 s at most (convergence within seconds of Consul's
                # return); said at the first failure and every minute or so after.
                log.log(logging.WARNING if failures == 1 or failures % 30 == 0
                        else logging.DEBUG, "consul watch of %s failed (%s); keeping the "
                        "last good state, retrying in %.1fs (attempt %d)", self.prefix, e,
                        delay, failures)
                if on_error is not None:
                    on_error(e)
                stop.wait(delay)
                continue
            failures = 0
            if change is not None:
                try:
                    on_change(change)
                except Exception:
                    log.exception("handling a change of %s failed", self.prefix)
            wait = self.bucket.delay()
            if not self.entries:
                wait = max(wait, self.empty_interval)
            if wait > 0:
                stop.wait(wait * random.uniform(1.0, 1.2))


class IndexedArea:
    """An area read piece by piece (`<data>/<piece>/...`), told which pieces changed by the
    generation keys `<index>/<piece>` (ONE blocking query for all of them).

    `wanted()` names the pieces this host needs (None: every piece). `on_change(pieces)`
    is called with the pieces whose entries changed."""

    def __init__(self, kv: PrefixReader, data_prefix: str, index_prefix: str, *,
                 wanted: Callable[[], Collection[str] | None] = lambda: None,
                 wait: str = "30s", rate: float = 10.0, burst: float = 5.0,
                 bucket_of: Callable[[str], str] | None = None) -> None:
        self.kv = kv
        self.data_prefix = data_prefix
        self.index = AreaWatch(kv, index_prefix, wait=wait, rate=rate, burst=burst,
                               versions_only=True)
        self.wanted = wanted
        self.bucket_of = bucket_of
        self._lock = threading.Lock()
        self._pieces: dict[str, dict[str, KVEntry]] = {}
        self._seen: dict[str, int] = {}  # piece -> ModifyIndex of its index key when read
        self._names: set[str] = set()  # buckets, every piece wanted: the pieces listed
        self._names_at: dict[str, int] | None = None  # the buckets' gens when listed
        self.piece_reads = 0

    @property
    def healthy(self) -> threading.Event:
        return self.index.healthy

    def piece(self, name: str) -> Mapping[str, KVEntry]:
        with self._lock:
            return dict(self._pieces.get(name, {}))

    def pieces(self) -> dict[str, Mapping[str, KVEntry]]:
        with self._lock:
            return {k: dict(v) for k, v in self._pieces.items()}

    def entries(self) -> dict[str, KVEntry]:
        """Every entry of every piece held, by key."""
        with self._lock:
            return {k: e for p in self._pieces.values() for k, e in p.items()}

    def _piece_of(self, index_key: str) -> str:
        return index_key[len(self.index.prefix):]

    def _read_piece(self, name: str) -> bool:
        """Read one piece (not blocking); True when its entries changed."""
        raw: Any = self.kv.read_prefix(f"{self.data_prefix}{name}/")
        self.piece_reads += 1
        new = {e.key: e for e in kv_entries(raw.items.values())}
        with self._lock:
            old = self._pieces.get(name, {})
            same = old.keys() == new.keys() and all(
                _version(old[k]) == _version(e) for k, e in new.items())
            if new:
                self._pieces[name] = new
            else:
                self._pieces.pop(name, None)
        return not same

    def sync(self, force: Collection[str] = ()) -> set[str]:
        """Bring the held pieces in line with the index as last read: read the wanted
        pieces whose generation moved (and those in `force`), drop the unwanted ones.
        Returns the pieces whose entries changed."""
        wanted = self.wanted()
        gens = self._generations(wanted)
        changed: set[str] = set()
        with self._lock:
            held = set(self._pieces) | set(self._seen)
        want = set(gens) if wanted is None else set(wanted)
        for name in sorted(held - want):
            with self._lock:
                if self._pieces.pop(name, None) is not None:
                    changed.add(name)
                self._seen.pop(name, None)
        for name in sorted(want):
            gen = gens.get(name, 0)
            if name not in force and self._seen.get(name) == gen:
                continue
            if self._read_piece(name):  # raises ConsulError: read again next time
                changed.add(name)
            self._seen[name] = gen
        return changed

    def poll(self, consistent: bool = False) -> set[str]:
        """Read the index once (blocking unless `consistent` or first), then the pieces
        that moved."""
        self.index.poll(consistent=consistent)
        return self.sync()

    def refresh(self) -> set[str]:
        """Re-read every wanted piece (a bump missed; the set of wanted pieces grew)."""
        wanted = self.wanted()
        self._names_at = None  # buckets: list the pieces again
        names = set(self._seen) if wanted is None else set(wanted)
        return self.sync(force=names)

    def _generations(self, wanted: Collection[str] | None) -> dict[str, int]:
        """piece -> the ModifyIndex of its generation key, for the pieces to consider:
        every piece named in the index (one key per piece), or with buckets (several
        pieces share a key, `bucket_of`) the wanted ones, or every piece that exists."""
        index = {self._piece_of(k): e.modify_index for k, e in self.index.entries.items()}
        if self.bucket_of is None:
            return index
        names = set(wanted) if wanted is not None else self._all_pieces(index)
        return {n: index.get(self.bucket_of(n), 0) for n in names}

    def _all_pieces(self, buckets: dict[str, int]) -> set[str]:
        """Every piece that exists (listed again when a bucket moved), when the reader
        can list them (`list_children`); else the pieces held."""
        lister = getattr(self.kv, "list_children", None)
        if lister is None:
            with self._lock:
                return set(self._pieces) | set(self._seen)
        if buckets != self._names_at:
            self._names = set(lister(self.data_prefix))  # raises ConsulError: next time
            self._names_at = dict(buckets)
        return set(self._names)

    def run(self, stop: threading.Event, on_change: Callable[[set[str]], None],
            on_error: Callable[[ConsulError], None] | None = None) -> None:
        def changed(_: AreaChange) -> None:
            pieces = self.sync()
            if pieces:
                on_change(pieces)
        self.index.run(stop, changed, on_error)
