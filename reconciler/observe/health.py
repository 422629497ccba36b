"""Liveness and readiness: owns the checks, what makes each fail, and their report.

Like Kubernetes' /livez and /readyz (and controller-runtime's healthz): a probe is a
list of named checks; it passes when every check passes. A check is a function returning
None (ok) or the reason it fails; one that raises fails with the exception's type (never
its text: a check's output goes to whoever can reach the port).

Liveness — the process is worth keeping: its main loops run (`loops`) and no reconcile
has been stuck for longer than `stuck_after` (a deadlock in a worker). A daemon still
waiting for Consul at start is alive.

Readiness — the daemon does its job now:
- `consul-watch`: the blocking query on the prefix last succeeded;
- `docker-events`: the Docker event stream is subscribed;
- `initial-sync`: every key of the first full pass (after Consul's first snapshot and
  Docker's first list) was reconciled once;
- `reconcile-failures`: no key has been failing (retried errors; invalid input is
  reported in `reconciler status`, not here) for longer than `failing_after`.

The facts come from the daemon through `ReadinessFacts`/`LivenessFacts`; the two small
trackers the daemon feeds from its reconcile hook (`FailureClock`, `FirstSync`) live
here. Their hot-path calls are a dict pop and a bool test: no lock once synced.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

CheckFn = Callable[[], str | None]


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    reason: str = ""


class Probe:
    """A named set of checks (`livez`, `readyz`)."""

    def __init__(self, name: str, checks: Sequence[tuple[str, CheckFn]]) -> None:
        self.name = name
        self.checks = tuple(checks)

    def run(self) -> list[CheckResult]:
        out = []
        for name, check in self.checks:
            try:
                reason = check()
            except Exception as e:
                reason = f"check raised {type(e).__name__}"
            out.append(CheckResult(name, reason is None, reason or ""))
        return out


def report(probe: str, results: Sequence[CheckResult], verbose: bool) -> tuple[int, str]:
    """(HTTP status, text body): 200 "ok" when every check passes, else 503 listing the
    failing ones; `verbose` lists every check (Kubernetes' format)."""
    failed = [r for r in results if not r.ok]
    lines = [f"[-]{r.name} failed: {r.reason}" if not r.ok else f"[+]{r.name} ok"
             for r in (results if verbose else failed)]
    if failed:
        lines.append(f"{probe} check failed")
    elif verbose:
        lines.append(f"{probe} check passed")
    else:
        lines.append("ok")
    return (503 if failed else 200), "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- trackers


class FailureClock:
    """Since when each key has been failing (temporary errors only).

    `failed`/`succeeded` are called by the workers; `failing` by the probe. A plain dict:
    single operations on it are atomic under the GIL, and the reader copies it first.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since: dict[Hashable, float] = {}

    def failed(self, key: Hashable) -> None:
        self._since.setdefault(key, self._clock())

    def succeeded(self, key: Hashable) -> None:
        self._since.pop(key, None)

    def failing(self, longer_than: float) -> list[tuple[str, float]]:
        """(key, seconds) of every key failing for longer than `longer_than`, longest
        first."""
        now = self._clock()
        since = dict(self._since)  # a copy: workers may change it meanwhile
        out = [(str(k), now - t) for k, t in since.items() if now - t > longer_than]
        return sorted(out, key=lambda kv: -kv[1])


class FirstSync:
    """Done once every key of the first full pass was reconciled once.

    `expect` is called, before they are enqueued, with the keys of the first full pass
    (the daemon: at Docker's first list, the desired state known); `reconciled` after
    each reconcile that did something (not one that was only deferred). Before `expect`
    nothing counts: a sweep or a members sync before Docker's list does nothing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: set[Hashable] | None = None
        self.done = False

    def expect(self, keys: Iterable[Hashable]) -> None:
        with self._lock:
            if self._waiting is None:
                self._waiting = set(keys)
                self.done = not self._waiting

    def reconciled(self, key: Hashable) -> None:
        if self.done:  # the steady state: no lock
            return
        with self._lock:
            if self._waiting is not None:
                self._waiting.discard(key)
                self.done = not self._waiting

    def remaining(self) -> int | None:
        """Keys of the first pass not reconciled yet (None: the pass has not started)."""
        with self._lock:
            return None if self._waiting is None else len(self._waiting)


# --------------------------------------------------------------------------- checks


class ReadinessFacts(Protocol):
    """What the readiness checks read (reconciler.daemon implements it)."""

    def consul_watch_ok(self) -> bool: ...
    def docker_events_ok(self) -> bool: ...
    def first_sync_remaining(self) -> int | None: ...
    def failing(self, longer_than: float) -> list[tuple[str, float]]: ...


class LivenessFacts(Protocol):
    def loops(self) -> Mapping[str, bool]: ...
    def oldest_in_flight(self) -> tuple[str, float] | None: ...


def readiness(facts: ReadinessFacts, *, failing_after: float,
              consul_age: Callable[[], float] | None = None) -> Probe:
    def consul_watch() -> str | None:
        if facts.consul_watch_ok():
            return None
        age = consul_age() if consul_age is not None else None
        if age is None or age == float("inf"):
            return "Consul not reached yet"
        return f"Consul unreachable (last answer {age:.0f}s ago)"

    def docker_events() -> str | None:
        return None if facts.docker_events_ok() else "not subscribed to Docker's events"

    def initial_sync() -> str | None:
        left = facts.first_sync_remaining()
        if left == 0:
            return None
        if left is None:
            return "waiting for the desired state and Docker's container list"
        return f"{left} key(s) of the first pass not reconciled yet"

    def failures() -> str | None:
        bad = facts.failing(failing_after)
        if not bad:
            return None
        shown = ", ".join(f"{k} for {s:.0f}s" for k, s in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return f"{len(bad)} key(s) failing for more than {failing_after:g}s: {shown}{more}"

    return Probe("readyz", [("consul-watch", consul_watch), ("docker-events", docker_events),
                            ("initial-sync", initial_sync), ("reconcile-failures", failures)])


def liveness(facts: LivenessFacts, *, stuck_after: float) -> Probe:
    def loops() -> str | None:
        dead = sorted(name for name, alive in facts.loops().items() if not alive)
        return f"stopped: {', '.join(dead)}" if dead else None

    def reconcile_stuck() -> str | None:
        oldest = facts.oldest_in_flight()
        if oldest is None or oldest[1] <= stuck_after:
            return None
        return f"{oldest[0]} running for {oldest[1]:.0f}s (more than {stuck_after:g}s)"

    return Probe("livez", [("loops", loops), ("reconcile-stuck", reconcile_stuck)])
