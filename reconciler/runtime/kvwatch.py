"""The desired-state watch: the user areas of the prefix, turned into parsed snapshots.

Owns the union of the desired-state areas (`networks/`, `containers/`, `services/`,
`policy`: one blocking query each, `runtime.areawatch.AreaWatch`, which owns the index
discipline: integer indices reset when they go backwards, unchanged wake-ups dropped,
reads spaced under churn, a suddenly empty area confirmed with a consistent read before
anything is torn down, the last good state kept while Consul is away) and its parsing:
- only entries whose ModifyIndex moved are parsed again (`model.ParseMemo`);
- a key that turns invalid keeps its last valid value (`snapshot_from`,
  `_with_last_valid`);
- daemon-owned areas (allocations, node status, audit) are not watched here at all, so
  a write there — the churn of every other host of the cluster — costs this watch
  nothing (issue 9).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from reconciler.errors import ConsulError, Problem
from reconciler.kvlayout import KVEntry, Layout, kv_digest, kv_entries
from reconciler.model import (
    DesiredState,
    Member,
    ParseMemo,
    decode_json,
    parse_active,
    parse_kv,
    parse_member,
    with_published,
)
from reconciler.runtime.areawatch import AreaChange, AreaWatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """One parsed view of the prefix."""

    index: int
    state: DesiredState
    items: tuple[KVEntry, ...]
    digest: str
    desired_digest: str = ""  # of `items` alone (without the members nodes publish)


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
                     last_valid: dict[str, KVEntry], memo: ParseMemo | None = None
                     ) -> DesiredState:
    present = {e.key for e in items}
    bad = state.invalid_keys
    swap = {k: last_valid[k] for k in bad if k in last_valid and k in present}
    if swap:
        held = [last_valid[e.key] if e.key in swap else e for e in items]
        kept = parse_kv(prefix, held, memo)
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


class _AllHealthy:
    """`is_set()` of several areas' health events: all of them."""

    def __init__(self, areas: list[AreaWatch]) -> None:
        self._areas = areas

    def is_set(self) -> bool:
        return all(a.healthy.is_set() for a in self._areas)


class KVWatcher:
    """Calls `on_change(snapshot)` for every snapshot whose content changed.

    `areas`: the read prefixes holding desired state (default: the whole prefix, one
    area). The daemon watches the user areas apart (`Layout.desired_areas`), each with
    its own blocking query, so that a write in a daemon-owned area (an allocation,
    another node's status) wakes none of them; the snapshot is the union of the areas.
    An entry is parsed again only when its ModifyIndex moved (`memo`)."""

    def __init__(self, kv: PrefixReader, prefix: str, on_change: Callable[[Snapshot], None], *,
                 areas: list[str] | None = None,
                 wait: str = "30s", min_interval: float = 0.05, max_backoff: float = 2.0,
                 on_error: Callable[[ConsulError], None] | None = None) -> None:
        self.kv = kv
        self.prefix = prefix
        self.on_change = on_change
        self.on_error = on_error
        self.areas = [AreaWatch(kv, a, wait=wait, confirm_empty=True,
                                rate=1.0 / max(min_interval, 1e-3), max_backoff=max_backoff)
                      for a in (areas if areas is not None else [prefix])]
        self.last: Snapshot | None = None
        self.last_valid: dict[str, KVEntry] = {}
        self.memo = ParseMemo()
        self.healthy = _AllHealthy(self.areas)
        self._lock = threading.Lock()
        self._deliver = threading.Lock()  # one snapshot handed on at a time, in order
        # The members nodes publish (`members/<service>/`), parsed per service.
        self._published: dict[str, tuple[dict[str, dict[str, Member]], str]] = {}
        self._published_version = 0
        # The desired areas as last parsed, kept while no area changed: a change of the
        # published members alone is merged into it (`with_published`), not re-parsed.
        self._generations: tuple[int, ...] = ()
        self._items: tuple[KVEntry, ...] = ()
        self._desired_digest = ""
        self._desired = DesiredState()
        self._position: dict[str, int] = {}  # key -> its place in `_items`
        # Keys changed since the last parse, as the area loops reported them (None:
        # not known, e.g. after a `poll`: parse everything).
        self._pending: set[str] | None = None

    @property
    def index(self) -> int:
        """The highest Consul index of the areas (what a change was applied up to)."""
        return max(a.index for a in self.areas)

    @property
    def reads(self) -> int:
        """Consul requests made by this watch (tests, bench/scale.py)."""
        return sum(a.reads for a in self.areas)

    def _snapshot(self) -> Snapshot | None:
        """The union of the areas as a Snapshot, when its content differs from the last."""
        with self._lock:
            generations = tuple(a.generation for a in self.areas)
            pending, self._pending = self._pending, set()
            if generations != self._generations or self.last is None or pending:
                # (An area whose loop has not reported yet is parsed when it does.)
                self._generations = generations
                if not (self.last is not None and pending and self._flipped(pending)):
                    self._parse()
            digest = f"{self._desired_digest}/{self._published_version}"
            if self.last is not None and digest == self.last.digest:
                return None
            state = with_published(self._desired, self._published)
            self.last = Snapshot(self.index, state, self._items, digest,
                                 self._desired_digest)
            return self.last

    def _parse(self) -> None:
        """Parse the union of the areas (entries parsed before come from the memo)."""
        items = tuple(sorted((e for a in self.areas for e in a.entries.values()),
                             key=lambda e: e.key))
        desired = kv_digest(items)
        if desired == self._desired_digest and self.last is not None:
            return
        state = parse_kv(self.prefix, items, memo=self.memo)
        state = _with_last_valid(self.prefix, items, state, self.last_valid, self.memo)
        self.memo.sweep()
        self._items, self._desired_digest, self._desired = items, desired, state
        self._position = {e.key: i for i, e in enumerate(items)}

    def _flipped(self, keys: set[str]) -> bool:
        """The fast path of a flip: when every changed key is the `active` of a service
        that has a valid config, was there before and names a pool now, only those
        services' `active` change (no parse of the desired state, whose cost grows with
        the cluster: issue 9). False, changing nothing, when that does not hold."""
        layout = Layout(self.prefix)
        entries = {k: e for a in self.areas for k, e in a.entries.items() if k in keys}
        services = dict(self._desired.services)
        flips: list[tuple[KVEntry, str]] = []
        bad = self._desired.invalid_keys
        for key in keys:
            ref = layout.parse(key)
            e = entries.get(key)
            if ref is None or ref.kind != "service_active" or e is None \
                    or key not in self._position or key in bad or ref.name not in services:
                return False
            active, problems = parse_active(key, e.value)
            if problems or active is None:
                return False
            flips.append((e, active))
        items = list(self._items)
        h = hashlib.sha256(self._desired_digest.encode())
        for e, active in flips:
            name = layout.parse(e.key).name  # type: ignore[union-attr]
            services[name] = replace(services[name], active=active)
            items[self._position[e.key]] = e
            self.last_valid[e.key] = e
            h.update(e.key.encode() + b"\0" + e.value + b"\0" + str(e.modify_index).encode())
        self._items = tuple(items)
        self._desired = replace(self._desired, services=services)
        self._desired_digest = h.hexdigest()
        return True

    def set_published(self, pieces: Mapping[str, Mapping[str, KVEntry]],
                      changed: Collection[str], deliver: bool = True) -> None:
        """The members nodes publish, by service (`members/<service>/` as read by the
        daemon's `IndexedArea`): the `changed` services are parsed again (the others are
        kept as they are), then a snapshot is handed on (`deliver`)."""
        layout = Layout(self.prefix)
        with self._lock:
            for svc in changed:
                entries = pieces.get(svc)
                pools: dict[str, dict[str, Member]] = {}
                for e in (entries or {}).values():
                    ref = layout.parse(e.key)
                    if ref is None or ref.kind != "member" or ref.name != svc:
                        continue
                    raw, problems = decode_json(e.key, e.value)
                    mem = None if problems else \
                        parse_member(e.key, ref.member, raw, e.session)[0]
                    if mem is not None:  # (nodes write valid members; junk is skipped)
                        pools.setdefault(ref.pool, {})[mem.name] = mem
                if pools:
                    self._published[svc] = (pools, layout.service_config(svc))
                else:
                    self._published.pop(svc, None)
            self._published_version += 1
        if deliver:
            self._area_changed(None)

    def poll(self, consistent: bool = False) -> Snapshot | None:
        """One read of every area, blocking unless `consistent` (a confirmation or a
        first read must not wait for the next change; with several areas only the run
        loops block). Returns the new snapshot when the content changed."""
        changed = False
        for a in self.areas:
            changed = a.poll(consistent=consistent, block=len(self.areas) == 1) is not None \
                or changed
        return self._snapshot() if changed or self.last is None else None

    def _area_changed(self, change: AreaChange | None) -> None:
        if change is not None:
            with self._lock:
                if self._pending is not None:
                    self._pending |= change.changed | change.removed
        with self._deliver:
            snap = self._snapshot()
            if snap is not None:
                self.on_change(snap)

    def run(self, stop: threading.Event) -> None:
        """One loop per area (threads), until `stop`."""
        threads = [threading.Thread(target=a.run, args=(stop, self._area_changed,
                                                        self.on_error),
                                    name=f"kv-watch-{i}", daemon=True)
                   for i, a in enumerate(self.areas)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
