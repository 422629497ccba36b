"""The C allocator's settings for a long-running daemon: owns how much freed memory glibc
malloc may keep.

Measured by bench/soak.py with reconciler.observe.memtrace (issue 11): under container
churn the Python heap stays flat, but glibc malloc keeps memory that was freed — spread
over one arena per thread that allocated (up to 8 per core), and in holes it does not
give back — so RSS crept up by megabytes per thousand containers. Two settings bound it:

- `limit_arenas`: at most `RECONCILER_MALLOC_ARENAS` (default 2) malloc arenas, set with
  mallopt(M_ARENA_MAX) before the daemon's threads start (what MALLOC_ARENA_MAX does;
  when that variable is set, glibc has applied it and it is left alone). The daemon's
  threads mostly wait on I/O: fewer arenas cost no measurable contention.
- `trim_loop`: malloc_trim(0) every `RECONCILER_MALLOC_TRIM` seconds (default 60; 0:
  never), which returns the free pages inside every arena to the kernel. It takes a few
  milliseconds on this daemon's heap.

No-ops where the C library is not glibc.

And one setting of Python's own collector: `freeze_heap`, once the first full pass is
done, moves every object alive then (the modules, the desired state, the state of every
attached container) out of the cyclic garbage collector's generations. Its full
collections walked all of them, again and again: with 500 containers attached they were
half of the idle daemon's user CPU (perf, bench/attach.py --idle; issue 9).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc malloc.h
ENV_ARENAS = "RECONCILER_MALLOC_ARENAS"
ENV_TRIM = "RECONCILER_MALLOC_TRIM"


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError, TypeError):
        return None  # not glibc
    return libc


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name, "").strip()
    try:
        value = float(text) if text else default
    except ValueError:
        log.warning("%s=%r is not a number: using %g", name, text, default)
        return default
    return max(0.0, value)


def limit_arenas(env: Mapping[str, str] | None = None) -> int | None:
    """Cap malloc's arenas (call before starting threads); the cap set, or None."""
    env = os.environ if env is None else env
    if env.get("MALLOC_ARENA_MAX"):
        return None  # glibc read it at start
    n = int(_number(env, ENV_ARENAS, 2))
    libc = _libc()
    if n < 1 or libc is None:
        return None
    return n if libc.mallopt(M_ARENA_MAX, n) == 1 else None


def freeze_heap() -> None:
    """Collect, then exempt every object alive now from later collections (`gc.freeze`):
    call once, when the long-lived state is built. What is garbage later is collected as
    before; only what was alive now is never looked at again (nor freed, if it became
    cyclic garbage: fine for state that lives as long as the daemon)."""
    gc.collect()
    gc.freeze()


def trim() -> bool:
    """Give the free pages of every malloc arena back to the kernel; whether any were."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))


def trim_loop(stop: threading.Event, env: Mapping[str, str] | None = None) -> None:
    """malloc_trim every RECONCILER_MALLOC_TRIM seconds until `stop` (0: returns)."""
    every = _number(os.environ if env is None else env, ENV_TRIM, 60.0)
    libc = _libc()
    if every <= 0 or libc is None:
        return
    while not stop.wait(every):
        libc.malloc_trim(0)
