"""The daemon runtime: keyed work queue, controller loop, clocks and backoff.

Synchronous Python with threads (no asyncio). `WorkQueue` de-duplicates keys and never hands
one key to two workers; `Controller` runs the workers and the periodic resync; `Clock` /
`FakeClock` are the timing seam for tests.
"""

from reconciler.runtime.backoff import Clock, ExponentialBackoff, FakeClock, MonotonicClock
from reconciler.runtime.workqueue import Controller, Result, WorkQueue

__all__ = [
    "Clock",
    "Controller",
    "ExponentialBackoff",
    "FakeClock",
    "MonotonicClock",
    "Result",
    "WorkQueue",
]
