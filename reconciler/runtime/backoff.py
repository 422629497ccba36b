"""Clocks and per-key exponential backoff: the timing seams of the daemon runtime.

Everything in `reconciler.runtime` that waits or measures time does it through a `Clock`,
so unit tests can swap in `FakeClock` and test timing and ordering without real sleeps.

- `Clock` — `now()` (monotonic seconds) and `wait_until(cond, deadline)`, a
  `threading.Condition.wait` whose deadline is measured on this clock.
- `MonotonicClock` — the real one (`time.monotonic`).
- `FakeClock` — virtual time that moves only when a test calls `advance()`; waiters are
  woken on every advance and re-check their deadline.
- `ExponentialBackoff` — per-key failure counter giving `base * factor**n` capped at `cap`,
  with proportional jitter (the delay lies in `[d * (1 - jitter), d]`, so never above `cap`).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Hashable
from typing import Protocol


class Clock(Protocol):
    """Time source of the runtime; `wait_until` must be called with `cond` held."""

    def now(self) -> float:
        """Monotonic seconds."""
        ...

    def wait_until(self, cond: threading.Condition, deadline: float | None) -> None:
        """Wait on `cond` until notified, until `deadline` (on this clock), or spuriously.

        Callers re-check their own predicate in a loop, as with `Condition.wait`.
        """
        ...


class MonotonicClock:
    """The real clock: `time.monotonic` and `Condition.wait` with a computed timeout."""

    def now(self) -> float:
        return time.monotonic()

    def wait_until(self, cond: threading.Condition, deadline: float | None) -> None:
        if deadline is None:
            cond.wait()
            return
        remaining = deadline - time.monotonic()
        if remaining > 0:
            cond.wait(remaining)


class FakeClock:
    """Virtual time for tests. `advance(dt)` moves time and wakes every waiter.

    A waiter registers its condition before checking the deadline, and `advance` moves time
    before taking its snapshot of waiters, so a wake-up cannot be lost between the two.
    Waits also return after `real_guard` real seconds so a test bug never hangs forever
    (callers loop, so an early return is harmless).
    """

    def __init__(self, start: float = 1000.0, *, real_guard: float = 0.5) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._waiters: dict[int, threading.Condition] = {}
        self._real_guard = real_guard

    def now(self) -> float:
        with self._lock:
            return self._now

    @property
    def waiting(self) -> int:
        """How many threads are currently inside `wait_until`."""
        with self._lock:
            return len(self._waiters)

    def wait_until(self, cond: threading.Condition, deadline: float | None) -> None:
        token = id(threading.current_thread())
        with self._lock:
            self._waiters[token] = cond
            if deadline is not None and self._now >= deadline:
                del self._waiters[token]
                return
        try:
            cond.wait(self._real_guard)
        finally:
            with self._lock:
                self._waiters.pop(token, None)

    def advance(self, seconds: float) -> None:
        """Move virtual time forward and wake every waiter so it re-checks its deadline."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        with self._lock:
            self._now += seconds
            conds = list({id(c): c for c in self._waiters.values()}.values())
        for cond in conds:
            with cond:
                cond.notify_all()


class ExponentialBackoff:
    """Per-key exponential backoff with jitter; thread-safe.

    `next_delay(key)` counts one more failure of `key` and returns how long to wait before
    retrying it; `forget(key)` resets the count after a success.
    """

    def __init__(
        self,
        base: float = 0.2,
        cap: float = 60.0,
        *,
        factor: float = 2.0,
        jitter: float = 0.1,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if base <= 0 or cap < base or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("need 0 < base <= cap, factor >= 1, 0 <= jitter < 1")
        self.base = base
        self.cap = cap
        self.factor = factor
        self.jitter = jitter
        self._rng = rng
        self._failures: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def next_delay(self, key: Hashable) -> float:
        """Record a failure of `key`; return the delay before its next attempt."""
        with self._lock:
            n = self._failures.get(key, 0)
            self._failures[key] = n + 1
        return self.delay_for(n)

    def delay_for(self, failures: int) -> float:
        """The delay after `failures` earlier failures (0 → about `base`)."""
        # Cap the exponent first: factor**n overflows a float long before n stops growing.
        exponent = min(failures, 1024)
        try:
            raw = min(self.cap, self.base * self.factor**exponent)
        except OverflowError:
            raw = self.cap
        return raw * (1.0 - self.jitter * self._rng())

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._failures.pop(key, None)

    def failures(self, key: Hashable) -> int:
        with self._lock:
            return self._failures.get(key, 0)
