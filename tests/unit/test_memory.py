"""The memory aids of the daemon: reconciler.observe.memtrace (tracemalloc snapshots, the
allocator figures, the comparison that names what grew) and reconciler.runtime.alloc
(malloc arena cap and trim)."""

from __future__ import annotations

import threading
import tracemalloc
from pathlib import Path

import pytest

from reconciler.observe import memtrace
from reconciler.runtime import alloc

_kept: list[bytes] = []


def _grow() -> None:
    _kept.extend(b"x" * 1000 + bytes([i % 256]) for i in range(2000))


def test_snapshots_and_their_comparison_name_what_grew(tmp_path: Path) -> None:
    tracer = memtrace.from_env({memtrace.ENV_PATH: str(tmp_path / "d" / "m"),
                                memtrace.ENV_FRAMES: "4"})
    assert tracer is not None
    was = tracemalloc.is_tracing()
    tracer.start()
    try:
        first = tracer.dump()
        _grow()
        second = tracer.dump()
    finally:
        if not was:
            tracemalloc.stop()
        _kept.clear()
    assert first.name == "m.000.snap" and second.name == "m.001.snap"
    assert (tmp_path / "d" / "m.001.types").read_text().strip()
    lines = memtrace.compare(first, second, top=3)
    # About 2 MB in 2,000 blocks, allocated by _grow: named first.
    growth, where = lines[1], lines[2]
    assert "+2000 blocks" in growth
    assert float(growth.split()[0]) > 1900  # KiB
    assert where.strip().startswith(__file__)


def test_figures_say_where_the_rss_is() -> None:
    fig = memtrace.memory_figures()
    assert fig["rss"] > 0
    assert fig["pymalloc_arenas"] >= 1
    assert fig["malloc_in_use"] > 0 and fig["malloc_free_held"] >= 0
    assert memtrace.describe(fig).startswith("RSS ")


@pytest.mark.parametrize("env", [{}, {memtrace.ENV_PATH: "  "}])
def test_tracing_is_off_unless_asked(env: dict[str, str]) -> None:
    assert memtrace.from_env(env) is None


def test_bad_tracing_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        memtrace.from_env({memtrace.ENV_PATH: "/tmp/x", memtrace.ENV_EVERY: "0"})


def test_arena_cap_defers_to_malloc_arena_max_and_can_be_turned_off() -> None:
    assert alloc.limit_arenas({"MALLOC_ARENA_MAX": "4"}) is None
    assert alloc.limit_arenas({alloc.ENV_ARENAS: "0"}) is None
    assert alloc.limit_arenas({alloc.ENV_ARENAS: "2"}) == 2


def test_trim_gives_freed_pages_back() -> None:
    # 32 MiB in blocks below the mmap threshold, each followed by a small block that
    # stays: freed, they are holes inside malloc's heap that only a trim gives back.
    big, small = [], []
    for _ in range(512):
        big.append(bytearray(64 * 1024))
        small.append(bytearray(100))
    del big
    assert alloc.trim() is True
    assert len(small) == 512


def test_trim_loop_returns_at_once_when_off_and_stops_with_stop() -> None:
    stop = threading.Event()
    alloc.trim_loop(stop, {alloc.ENV_TRIM: "0"})  # returns: nothing to wait for
    t = threading.Thread(target=alloc.trim_loop, args=(stop, {alloc.ENV_TRIM: "0.01"}))
    t.start()
    stop.set()
    t.join(5)
    assert not t.is_alive()
