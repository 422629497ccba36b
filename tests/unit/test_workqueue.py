"""Unit tests of the work queue, backoff and controller loop, timed with `FakeClock`."""

from __future__ import annotations

import threading
import time

import pytest
from helpers import run_in_thread, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.errors import AdapterError, Problem, ValidationError
from reconciler.runtime import (
    Controller,
    ExponentialBackoff,
    FakeClock,
    MonotonicClock,
    Result,
    WorkQueue,
)


def no_jitter() -> float:
    return 0.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(clock: FakeClock) -> WorkQueue[str]:
    # Binary-exact base and steps keep virtual-time arithmetic exact.
    return WorkQueue(clock=clock, backoff=ExponentialBackoff(0.25, 60.0, rng=no_jitter))


def drain_ready(q: WorkQueue[str]) -> list[str]:
    """Take (and finish) every key that is ready now, in order."""
    out = []
    while (key := q.get(timeout=0)) is not None:
        out.append(key)
        q.done(key)
    return out


# -- WorkQueue ----------------------------------------------------------------------------


def test_add_deduplicates_and_keeps_fifo_order(queue: WorkQueue[str]) -> None:
    for key in ["a", "b", "a", "c", "b", "a"]:
        queue.add(key)
    assert len(queue) == 3
    assert drain_ready(queue) == ["a", "b", "c"]
    assert queue.get(timeout=0) is None


def test_key_added_while_processing_is_requeued_after_done(queue: WorkQueue[str]) -> None:
    queue.add("a")
    assert queue.get(timeout=0) == "a"
    queue.add("a")
    queue.add("a")
    # Not handed out again while in flight, even though it is dirty.
    assert queue.get(timeout=0) is None
    assert queue.pending() == {"a"}
    queue.done("a")
    assert queue.get(timeout=0) == "a"
    queue.done("a")
    assert queue.get(timeout=0) is None


def test_get_timeout_uses_the_clock(clock: FakeClock, queue: WorkQueue[str]) -> None:
    got: list[str | None] = []
    t = threading.Thread(target=lambda: got.append(queue.get(timeout=5)))
    t.start()
    wait_for(lambda: clock.waiting == 1, timeout=5)
    clock.advance(4.9)
    t.join(0.05)
    assert t.is_alive(), "returned before its virtual timeout"
    clock.advance(0.1)
    t.join(5)
    assert got == [None]


def test_blocked_get_wakes_on_add(queue: WorkQueue[str]) -> None:
    got: list[str | None] = []
    t = threading.Thread(target=lambda: got.append(queue.get()))
    t.start()
    queue.add("x")
    t.join(5)
    assert got == ["x"]


def test_add_after_waits_for_the_delay(clock: FakeClock, queue: WorkQueue[str]) -> None:
    queue.add_after("late", 10)
    queue.add_after("early", 2)
    assert queue.get(timeout=0) is None
    assert queue.pending() == {"late", "early"}
    clock.advance(2)
    assert drain_ready(queue) == ["early"]
    clock.advance(7.9)
    assert drain_ready(queue) == []
    clock.advance(0.1)
    assert drain_ready(queue) == ["late"]


def test_add_after_earlier_delay_wins(clock: FakeClock, queue: WorkQueue[str]) -> None:
    queue.add_after("k", 10)
    queue.add_after("k", 3)
    queue.add_after("k", 8)
    clock.advance(3)
    assert drain_ready(queue) == ["k"]
    clock.advance(10)
    assert drain_ready(queue) == [], "superseded delays must not fire again"


def test_blocked_get_wakes_when_a_delay_expires(clock: FakeClock, queue: WorkQueue[str]) -> None:
    got: list[str | None] = []
    t = threading.Thread(target=lambda: got.append(queue.get()))
    t.start()
    wait_for(lambda: clock.waiting == 1, timeout=5)
    queue.add_after("d", 1.5)
    clock.advance(1.0)
    t.join(0.05)
    assert t.is_alive()
    clock.advance(0.5)
    t.join(5)
    assert got == ["d"]


def test_rate_limited_backoff_grows_caps_and_forget_resets(
    clock: FakeClock, queue: WorkQueue[str]
) -> None:
    def delay_of_next_requeue() -> float:
        start = clock.now()
        queue.add_rate_limited("k")
        step = 0.03125
        while (key := queue.get(timeout=0)) is None:
            clock.advance(step)
        queue.done(key)
        return clock.now() - start

    delays = [delay_of_next_requeue() for _ in range(12)]
    assert delays[:8] == [0.25, 0.5, 1, 2, 4, 8, 16, 32]
    assert delays[8:] == [60.0, 60.0, 60.0, 60.0]  # 0.25 * 2**8 = 64 > cap
    assert queue.num_requeues("k") == 12
    queue.forget("k")
    assert queue.num_requeues("k") == 0
    assert delay_of_next_requeue() == 0.25


def test_backoff_jitter_stays_within_bounds() -> None:
    values = iter([0.0, 0.999, 0.5])
    b = ExponentialBackoff(1.0, 8.0, jitter=0.2, rng=lambda: next(values))
    assert b.next_delay("k") == pytest.approx(1.0)
    assert b.next_delay("k") == pytest.approx(2.0 * (1 - 0.2 * 0.999))
    assert b.next_delay("k") == pytest.approx(4.0 * 0.9)
    # Huge failure counts neither overflow nor exceed the cap.
    assert ExponentialBackoff(0.2, 60.0, rng=no_jitter).delay_for(10_000) == 60.0
    assert b.failures("k") == 3 and b.failures("other") == 0


def test_backoff_is_per_key(queue: WorkQueue[str]) -> None:
    queue.add_rate_limited("a")
    queue.add_rate_limited("a")
    queue.add_rate_limited("b")
    assert (queue.num_requeues("a"), queue.num_requeues("b")) == (2, 1)


def test_shutdown_wakes_getters_and_ignores_adds(queue: WorkQueue[str]) -> None:
    results: list[str | None] = []
    threads = [threading.Thread(target=lambda: results.append(queue.get())) for _ in range(3)]
    for t in threads:
        t.start()
    queue.shutdown()
    for t in threads:
        t.join(5)
    assert results == [None, None, None]
    queue.add("x")
    assert queue.get(timeout=0) is None


def test_drain_waits_for_in_flight_work() -> None:
    q: WorkQueue[str] = WorkQueue(clock=MonotonicClock())
    q.add("a")
    assert q.get(timeout=0) == "a"
    q.shutdown()
    assert q.drain(timeout=0.05) is False
    threading.Timer(0.05, q.done, args=("a",)).start()
    assert q.drain(timeout=5) is True
    assert q.in_flight() == set()


# -- hypothesis: random add/get/done sequences --------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "d"])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), KEYS),
        st.tuples(st.just("add_after"), KEYS, st.integers(1, 5)),
        st.tuples(st.just("get")),
        st.tuples(st.just("done"), st.integers(0, 3)),
        st.tuples(st.just("advance"), st.integers(1, 3)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_random_sequences_keep_the_invariants(ops: list[tuple[object, ...]]) -> None:
    clock = FakeClock()
    q: WorkQueue[str] = WorkQueue(clock=clock, backoff=ExponentialBackoff(rng=no_jitter))
    in_flight: list[str] = []
    # For every key: has it been added (now or via a due delay) since it was last handed out?
    owed: dict[str, bool] = {}
    delayed: dict[str, float] = {}

    def take() -> None:
        key = q.get(timeout=0)
        if key is None:
            return
        assert key not in in_flight, f"{key} handed out twice at once"
        in_flight.append(key)
        owed[key] = False

    def settle_delays() -> None:
        for key, at in list(delayed.items()):
            if clock.now() >= at:
                owed[key] = True
                del delayed[key]

    for op in ops:
        match op:
            case ("add", str(key)):
                q.add(key)
                owed[key] = True
            case ("add_after", str(key), int(delay)):
                settle_delays()
                q.add_after(key, delay)
                at = clock.now() + delay
                delayed[key] = min(at, delayed.get(key, at))
            case ("get",):
                settle_delays()
                take()
            case ("done", int(i)):
                if in_flight:
                    q.done(in_flight.pop(i % len(in_flight)))
            case ("advance", int(dt)):
                clock.advance(dt)
                settle_delays()
        assert len(q) <= len({"a", "b", "c", "d"})

    # Finish everything in flight, let every delay expire, then drain.
    for busy in in_flight:
        q.done(busy)
    in_flight.clear()
    clock.advance(10)
    settle_delays()
    while (ready := q.get(timeout=0)) is not None:
        owed[ready] = False
        q.done(ready)
    assert not any(owed.values()), f"added but never processed after: {owed}"


# -- Controller ---------------------------------------------------------------------------


def test_controller_never_runs_one_key_concurrently() -> None:
    lock = threading.Lock()
    active: dict[str, int] = {}
    max_seen: dict[str, int] = {}
    calls: list[str] = []
    overall_max = 0
    current = 0

    def reconcile(key: str) -> None:
        nonlocal overall_max, current
        with lock:
            active[key] = active.get(key, 0) + 1
            max_seen[key] = max(max_seen.get(key, 0), active[key])
            current += 1
            overall_max = max(overall_max, current)
            calls.append(key)
        time.sleep(0.002)
        with lock:
            active[key] -= 1
            current -= 1

    ctl: Controller[str] = Controller(reconcile, workers=4)
    with run_in_thread(ctl.run, "controller"):
        for _ in range(50):
            for key in ["a", "b", "c", "d", "e"]:
                ctl.queue.add(key)
            time.sleep(0.001)
        wait_for(lambda: not ctl.queue.pending() and not ctl.queue.in_flight(), timeout=10)
    assert max(max_seen.values()) == 1, max_seen
    assert overall_max > 1, "the workers should have run different keys in parallel"
    assert set(calls) == {"a", "b", "c", "d", "e"}
    assert len(calls) < 250, "adds of a pending key must be de-duplicated"


def test_controller_outcomes(clock: FakeClock) -> None:
    """Success forgets, temporary errors back off, terminal errors are reported once."""
    attempts: dict[str, int] = {}
    errors: list[tuple[str, str, bool]] = []
    successes: list[str] = []

    def reconcile(key: str) -> Result | None:
        attempts[key] = attempts.get(key, 0) + 1
        if key == "flaky" and attempts[key] <= 3:
            raise AdapterError(f"down #{attempts[key]}")
        if key == "boom" and attempts[key] == 1:
            raise RuntimeError("unexpected")
        if key == "bad":
            raise ValidationError([Problem("containers/bad", "interfaces", "missing")])
        if key == "poll" and attempts[key] == 1:
            return Result(requeue_after=30)
        return None

    ctl: Controller[str] = Controller(
        reconcile,
        clock=clock,
        on_error=lambda k, e, terminal: errors.append((k, type(e).__name__, terminal)),
        on_success=successes.append,
        queue=WorkQueue(clock=clock, backoff=ExponentialBackoff(1.0, 60.0, rng=no_jitter)),
    )
    for key in ["ok", "flaky", "boom", "bad", "poll"]:
        ctl.queue.add(key)

    def step() -> int:
        n = 0
        while ctl.process_next(timeout=0):
            n += 1
        return n

    assert step() == 5
    assert errors == [
        ("flaky", "AdapterError", False),
        ("boom", "RuntimeError", False),
        ("bad", "ValidationError", True),
    ]
    assert successes == ["ok", "poll"]
    assert ctl.queue.num_requeues("flaky") == 1
    assert ctl.queue.num_requeues("bad") == 0
    clock.advance(1.0)  # flaky (1 s) and boom (1 s) are due
    assert step() == 2
    assert attempts["flaky"] == 2 and attempts["boom"] == 2
    clock.advance(1.9)
    assert step() == 0, "second backoff of flaky is 2 s"
    clock.advance(0.1)
    assert step() == 1
    clock.advance(4.0)
    assert step() == 1
    assert attempts["flaky"] == 4 and ctl.queue.num_requeues("flaky") == 0  # forgotten
    clock.advance(30)
    assert step() == 1, "poll asked to be looked at again after 30 s"
    assert attempts == {"ok": 1, "flaky": 4, "boom": 2, "bad": 1, "poll": 2}
    clock.advance(1000)
    assert step() == 0, "the terminal error must not be retried"
    assert [e for e in errors if e[0] == "bad"] == [("bad", "ValidationError", True)]


def test_controller_requeue_result_uses_backoff(clock: FakeClock) -> None:
    seen: list[float] = []

    def reconcile(key: str) -> Result:
        seen.append(clock.now())
        return Result(requeue=True)

    ctl: Controller[str] = Controller(
        reconcile,
        clock=clock,
        queue=WorkQueue(clock=clock, backoff=ExponentialBackoff(0.5, 60.0, rng=no_jitter)),
    )
    ctl.queue.add("k")
    for _ in range(4):
        while not ctl.process_next(timeout=0):
            clock.advance(0.25)
    assert [t - seen[0] for t in seen] == [0, 0.5, 1.5, 3.5]


def test_controller_resync_adds_every_key_periodically(clock: FakeClock) -> None:
    listed: list[float] = []
    processed: list[tuple[float, str]] = []
    lock = threading.Lock()

    def list_keys() -> list[str]:
        listed.append(clock.now())
        return ["x", "y", "z"]

    def reconcile(key: str) -> None:
        with lock:
            processed.append((clock.now(), key))

    ctl: Controller[str] = Controller(
        reconcile, workers=2, clock=clock, list_keys=list_keys, resync=60
    )
    t0 = clock.now()
    with run_in_thread(ctl.run, "controller"):
        wait_for(lambda: len(processed) == 3, timeout=5, message="initial sync")
        assert listed == [t0]
        clock.advance(59)
        wait_for(lambda: clock.waiting >= 3, timeout=5)  # resync loop + 2 idle workers
        assert len(listed) == 1
        clock.advance(1)
        wait_for(lambda: len(processed) == 6, timeout=5, message="periodic resync")
        assert listed == [t0, t0 + 60]
    assert sorted(k for _, k in processed) == ["x", "x", "y", "y", "z", "z"]


def test_controller_resync_listing_failure_retries_soon(clock: FakeClock) -> None:
    calls: list[float] = []

    def list_keys() -> list[str]:
        calls.append(clock.now())
        if len(calls) == 1:
            raise AdapterError("consul down")
        return ["k"]

    done = threading.Event()
    ctl: Controller[str] = Controller(
        lambda key: done.set(), clock=clock, list_keys=list_keys, resync=300
    )
    with run_in_thread(ctl.run, "controller"):
        wait_for(lambda: len(calls) == 1, timeout=5)
        wait_for(lambda: clock.waiting >= 2, timeout=5)
        clock.advance(1.0)
        assert done.wait(5), "retried listing after 1 s, not after the 300 s period"
        assert calls[1] - calls[0] == 1.0


def test_controller_shutdown_drains_in_flight_work() -> None:
    started = threading.Event()
    release = threading.Event()
    finished: list[str] = []

    def reconcile(key: str) -> None:
        started.set()
        release.wait(5)
        finished.append(key)

    ctl: Controller[str] = Controller(reconcile, workers=2, drain_timeout=5)
    stop = threading.Event()
    t = threading.Thread(target=ctl.run, args=(stop,))
    t.start()
    ctl.queue.add("slow")
    assert started.wait(5)
    ctl.queue.add("never")  # still pending when we stop... or taken by worker 2
    stop.set()
    t.join(0.3)
    assert t.is_alive(), "run must wait for the in-flight reconcile"
    release.set()
    t.join(5)
    assert not t.is_alive()
    assert "slow" in finished
    ctl.queue.add("after")
    assert ctl.queue.get(timeout=0) is None


def test_controller_drain_timeout_bounds_shutdown() -> None:
    release = threading.Event()
    started = threading.Event()

    def reconcile(key: str) -> None:
        started.set()
        release.wait(10)

    ctl: Controller[str] = Controller(reconcile, drain_timeout=0.2)
    stop = threading.Event()
    t = threading.Thread(target=ctl.run, args=(stop,))
    t.start()
    ctl.queue.add("stuck")
    assert started.wait(5)
    began = time.monotonic()
    stop.set()
    t.join(5)
    elapsed = time.monotonic() - began
    release.set()
    assert not t.is_alive()
    assert 0.2 <= elapsed < 2.0
