"""Level-triggered keyed work queue and the controller loop that drains it with threads.

Modelled on client-go's workqueue and controller-runtime's reconcile contract:

- Events carry no work; they only `add(key)`. A key pending in the queue is pending once, no
  matter how often it is added (de-duplication).
- A key is never handed to two workers at once. A key added while it is being processed is
  remembered ("dirty") and queued again when the worker calls `done(key)`.
- `add_after(key, delay)` queues later; `add_rate_limited(key)` queues after the key's
  exponential backoff, which `forget(key)` resets.
- `Controller` runs N worker threads calling `reconcile(key)`:

  ============================== =================================================
  reconcile outcome              what the controller does
  ============================== =================================================
  returns None / ``Result()``    success: forget the backoff, `on_success(key)`
  ``Result(requeue_after=s)``    success, and look again in `s` seconds
  ``Result(requeue=True)``       queue again after the key's backoff (not an error)
  raises ValidationError         terminal: `on_error(key, exc, terminal=True)`, no retry
  raises any other Exception     temporary: logged, `on_error(..., terminal=False)`,
                                 queued again after the key's backoff
  ============================== =================================================

  A periodic resync adds every key of `list_keys()` (at start, then every `resync` seconds),
  so a missed event is repaired by the next resync.

  `observe(key, outcome, seconds)` is told how each reconcile ended — "ok", "requeued"
  (a Result asking to look again), "error" (retried) or "invalid" (terminal) — and how
  long it took (metrics, readiness); `oldest_in_flight()` and `workers_alive()` tell
  liveness whether a worker is stuck or gone.

All timing goes through a `Clock` (see `reconciler.runtime.backoff`) so unit tests drive it
with `FakeClock`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from reconciler.errors import ReconcilerError, ValidationError
from reconciler.runtime.backoff import Clock, ExponentialBackoff, MonotonicClock

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    """A thread-safe, de-duplicating, delaying, rate-limited queue of keys."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        backoff: ExponentialBackoff | None = None,
        name: str = "workqueue",
    ) -> None:
        self.name = name
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        self._backoff = backoff if backoff is not None else ExponentialBackoff()
        self._cond = threading.Condition()
        self._queue: deque[K] = deque()  # ready keys in FIFO order; each also in _dirty
        self._dirty: set[K] = set()  # keys that need processing (queued or to re-queue)
        self._processing: set[K] = set()  # keys handed out and not yet done()
        # Delayed keys: a heap of (ready_at, seq, key) with lazy deletion; _waiting holds
        # each key's earliest ready time, the authoritative entry.
        self._heap: list[tuple[float, int, K]] = []
        self._waiting: dict[K, float] = {}
        self._seq = itertools.count()
        self._shutting_down = False

    # -- adding -----------------------------------------------------------------------------

    def add(self, key: K) -> None:
        """Mark `key` as needing processing. Ignored after `shutdown()`."""
        with self._cond:
            self._add_locked(key)

    def _add_locked(self, key: K) -> None:
        if self._shutting_down or key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._processing:
            return  # queued again by done()
        self._queue.append(key)
        self._cond.notify()

    def add_after(self, key: K, delay: float) -> None:
        """Add `key` after `delay` seconds; an earlier pending delay for the key wins."""
        if delay <= 0:
            self.add(key)
            return
        with self._cond:
            if self._shutting_down:
                return
            # Promote what is already due first, so a due-but-untaken entry for this key is
            # queued now rather than absorbing this later request.
            self._promote_due_locked()
            ready_at = self._clock.now() + delay
            current = self._waiting.get(key)
            if current is not None and current <= ready_at:
                return
            self._waiting[key] = ready_at
            heapq.heappush(self._heap, (ready_at, next(self._seq), key))
            # A getter may be sleeping until a later deadline: let it recompute.
            self._cond.notify_all()

    def add_rate_limited(self, key: K) -> None:
        """Add `key` after its exponential backoff (which grows with every call)."""
        self.add_after(key, self._backoff.next_delay(key))

    def forget(self, key: K) -> None:
        """Reset `key`'s backoff (after a success). Does not remove a pending add."""
        self._backoff.forget(key)

    def num_requeues(self, key: K) -> int:
        """How many rate-limited requeues `key` has had since its last `forget`."""
        return self._backoff.failures(key)

    # -- taking -----------------------------------------------------------------------------

    def _promote_due_locked(self) -> float | None:
        """Move due delayed keys to the queue; return the next pending ready time, if any."""
        now = self._clock.now()
        while self._heap:
            ready_at, _, key = self._heap[0]
            if self._waiting.get(key) != ready_at:
                heapq.heappop(self._heap)  # superseded by an earlier add_after
                continue
            if ready_at > now:
                return ready_at
            heapq.heappop(self._heap)
            del self._waiting[key]
            self._add_locked(key)
        return None

    def get(self, timeout: float | None = None) -> K | None:
        """Take the next ready key, blocking up to `timeout` seconds (None: forever).

        Returns None on timeout or once the queue is shut down. The caller must call
        `done(key)` when finished with it.
        """
        with self._cond:
            deadline = None if timeout is None else self._clock.now() + timeout
            while True:
                if self._shutting_down:
                    return None
                next_ready = self._promote_due_locked()
                if self._queue:
                    key = self._queue.popleft()
                    self._dirty.discard(key)
                    self._processing.add(key)
                    return key
                if deadline is not None and self._clock.now() >= deadline:
                    return None
                wake = deadline
                if next_ready is not None:
                    wake = next_ready if wake is None else min(wake, next_ready)
                self._clock.wait_until(self._cond, wake)

    def done(self, key: K) -> None:
        """Finish processing `key`; if it was added meanwhile, queue it again."""
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty and not self._shutting_down:
                self._queue.append(key)
            self._cond.notify_all()  # a getter, or drain() waiting for in-flight work

    # -- lifecycle --------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop handing out keys: every blocked and later `get` returns None."""
        with self._cond:
            self._shutting_down = True
            self._cond.notify_all()

    @property
    def shutting_down(self) -> bool:
        with self._cond:
            return self._shutting_down

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until no key is being processed; True if that happened within `timeout`."""
        with self._cond:
            deadline = None if timeout is None else self._clock.now() + timeout
            while self._processing:
                if deadline is not None and self._clock.now() >= deadline:
                    return False
                self._clock.wait_until(self._cond, deadline)
            return True

    # -- introspection ----------------------------------------------------------------------

    def __len__(self) -> int:
        """Keys ready to be handed out now (not counting delayed or in-flight ones)."""
        with self._cond:
            return len(self._queue)

    def pending(self) -> set[K]:
        """Every key that will be handed out: ready, re-queued after done, or delayed."""
        with self._cond:
            return set(self._dirty) | set(self._waiting)

    def in_flight(self) -> set[K]:
        with self._cond:
            return set(self._processing)


@dataclass(frozen=True)
class Result:
    """What a successful reconcile asks for next.

    `requeue_after`: look at the key again after this many seconds (backoff is reset).
    `requeue`: look again after the key's backoff (e.g. waiting on something external).
    """

    requeue: bool = False
    requeue_after: float | None = None


class Controller(Generic[K]):
    """Runs worker threads that reconcile keys from a `WorkQueue`, plus a periodic resync."""

    def __init__(
        self,
        reconcile: Callable[[K], Result | None],
        *,
        name: str = "controller",
        workers: int = 1,
        list_keys: Callable[[], Iterable[K]] | None = None,
        resync: float | None = None,
        on_error: Callable[[K, BaseException, bool], None] | None = None,
        on_success: Callable[[K], None] | None = None,
        queue: WorkQueue[K] | None = None,
        clock: Clock | None = None,
        drain_timeout: float = 30.0,
        observe: Callable[[K, str, float], None] | None = None,
    ) -> None:
        """
        reconcile: called with one key at a time per key (never concurrently for one key).
        list_keys: every key that exists, for the initial and periodic resync.
        resync: seconds between full resyncs (None: only the initial one).
        on_error: called as `on_error(key, exc, terminal)` after a failed reconcile.
        on_success: called with the key after a successful reconcile.
        drain_timeout: how long `run` waits for in-flight reconciles at shutdown.
        observe: called as `observe(key, outcome, seconds)` after every reconcile.
        """
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if resync is not None and resync <= 0:
            raise ValueError("resync must be > 0")
        self.name = name
        self._reconcile = reconcile
        self._workers = workers
        self._list_keys = list_keys
        self._resync = resync
        self._on_error = on_error
        self._on_success = on_success
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        # Not `queue or ...`: an empty WorkQueue is falsy (it has __len__).
        self.queue: WorkQueue[K] = (
            queue if queue is not None else WorkQueue(clock=self._clock, name=name)
        )
        self._drain_timeout = drain_timeout
        self._observe = observe
        # key -> when its reconcile started (time.monotonic: the real duration, whatever
        # the clock). One item set and popped per reconcile: atomic under the GIL.
        self._started: dict[K, float] = {}
        self._threads: list[threading.Thread] = []
        self._cond = threading.Condition()  # resync loop sleeps on it; stop wakes it
        self._stopping = False

    # -- one step (used by the workers; also handy in tests) --------------------------------

    def process_next(self, timeout: float | None = None) -> bool:
        """Take one key, reconcile it, and handle the outcome. False if none was taken."""
        key = self.queue.get(timeout)
        if key is None:
            return False
        try:
            self._handle(key)
        finally:
            self.queue.done(key)
        return True

    def _handle(self, key: K) -> None:
        started = self._started[key] = time.monotonic()
        outcome = "error"
        try:
            outcome = self._handle_timed(key)
        finally:
            self._started.pop(key, None)
            if self._observe is not None:
                try:
                    self._observe(key, outcome, time.monotonic() - started)
                except Exception:
                    log.exception("%s: observe hook failed for %r", self.name, key)

    def _handle_timed(self, key: K) -> str:
        try:
            result = self._reconcile(key)
        except ValidationError as exc:
            # Terminal: the input can never apply as it is; a new add (the input changed)
            # or the next resync will look again, but we do not hammer it with retries.
            self.queue.forget(key)
            log.warning("%s: %r: invalid, not retrying: %s", self.name, key, exc)
            self._call_on_error(key, exc, terminal=True)
            return "invalid"
        except Exception as exc:
            self.queue.add_rate_limited(key)
            log.warning(
                "%s: %r: reconcile failed (attempt %d), retrying with backoff: %s",
                self.name,
                key,
                self.queue.num_requeues(key),
                exc,
                exc_info=not _is_expected(exc),
            )
            self._call_on_error(key, exc, terminal=False)
            return "error"
        if result is not None and result.requeue:
            self.queue.add_rate_limited(key)
            return "requeued"
        self.queue.forget(key)
        if result is not None and result.requeue_after is not None:
            self.queue.add_after(key, result.requeue_after)
        if self._on_success is not None:
            try:
                self._on_success(key)
            except Exception:
                log.exception("%s: on_success hook failed for %r", self.name, key)
        return "ok" if result is None or result.requeue_after is None else "requeued"

    def _call_on_error(self, key: K, exc: BaseException, *, terminal: bool) -> None:
        if self._on_error is None:
            return
        try:
            self._on_error(key, exc, terminal)
        except Exception:
            log.exception("%s: on_error hook failed for %r", self.name, key)

    def resync_now(self) -> bool:
        """Add every key of `list_keys()`. False (logged) if listing failed."""
        if self._list_keys is None:
            return True
        try:
            keys = list(self._list_keys())
        except Exception as exc:
            log.warning("%s: resync: listing keys failed: %s", self.name, exc)
            return False
        for key in keys:
            self.queue.add(key)
        return True

    # -- the blocking loop ------------------------------------------------------------------

    def _worker(self) -> None:
        while not self.queue.shutting_down:
            self.process_next(timeout=None)

    def oldest_in_flight(self) -> tuple[K, float] | None:
        """The key whose reconcile has been running longest, and for how many seconds."""
        started = dict(self._started)  # a copy: workers change it meanwhile
        if not started:
            return None
        key = min(started, key=started.__getitem__)
        return key, time.monotonic() - started[key]

    def workers_alive(self) -> int:
        """Worker threads running (0 before `run` and after it returned)."""
        return sum(1 for t in self._threads if t.is_alive())

    def stop(self) -> None:
        """Ask `run` to return (same as setting its stop event)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def run(self, stop: threading.Event | None = None) -> None:
        """Run workers and the resync loop until `stop` is set (or `stop()` is called).

        On the way out the queue is shut down (pending keys are dropped: the next start
        resyncs everything) and in-flight reconciles get `drain_timeout` seconds to finish.
        """
        if stop is not None:
            # threading.Event cannot wake our condition; a small watcher thread bridges it.
            threading.Thread(
                target=self._bridge_stop, args=(stop,), name=f"{self.name}-stop", daemon=True
            ).start()
        threads = [
            threading.Thread(target=self._worker, name=f"{self.name}-worker-{i}", daemon=True)
            for i in range(self._workers)
        ]
        self._threads = threads
        for t in threads:
            t.start()
        try:
            self._resync_loop()
        finally:
            self.queue.shutdown()
            if not self.queue.drain(self._drain_timeout):
                log.warning(
                    "%s: %d reconcile(s) still running after %.1fs; leaving them",
                    self.name,
                    len(self.queue.in_flight()),
                    self._drain_timeout,
                )
            for t in threads:
                t.join(timeout=0.1)

    def _bridge_stop(self, stop: threading.Event) -> None:
        # `stop.wait` returns as soon as `stop` is set; the timeout only bounds how late
        # this thread notices that the controller stopped by itself. At 0.1 s its ten
        # wake-ups a second were a tenth of the idle CPU with 500 containers attached.
        while not stop.wait(1.0):
            with self._cond:
                if self._stopping:
                    return
        self.stop()

    def _resync_loop(self) -> None:
        """Initial sync at once, then every `resync` seconds; returns when stopping."""
        retry = 1.0
        next_at: float | None = self._clock.now()
        while True:
            with self._cond:
                while not self._stopping and (next_at is None or self._clock.now() < next_at):
                    self._clock.wait_until(self._cond, next_at)
                if self._stopping:
                    return
            if self.resync_now():
                retry = 1.0
                next_at = None if self._resync is None else self._clock.now() + self._resync
            else:
                # Listing failed (e.g. Consul down): retry sooner than a full period.
                delay = retry if self._resync is None else min(retry, self._resync)
                next_at = self._clock.now() + delay
                retry = min(retry * 2, 60.0)


def _is_expected(exc: BaseException) -> bool:
    """Our own errors (adapter failures) are expected: log them without a traceback."""
    return isinstance(exc, ReconcilerError)
