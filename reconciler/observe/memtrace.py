"""Opt-in memory tracing of the daemon: owns the tracemalloc snapshots and their comparison.

Off unless `RECONCILER_TRACEMALLOC` names a path prefix. Then `install()` starts
tracemalloc (`RECONCILER_TRACEMALLOC_FRAMES` frames per allocation, default 16; 0: no
tracing, only the allocator figures below) and writes a snapshot to `<prefix>.<n>.snap` on
SIGUSR2 and, when `RECONCILER_TRACEMALLOC_EVERY` is a number of seconds, that often. Each
snapshot is taken after a full garbage collection and is joined by `<prefix>.<n>.types`
(the count of live objects per type, which shows what piles up even where tracemalloc
groups it under an allocator's line) and one log line of where the RSS is: Python's own
allocations (traced), pymalloc's arenas (1 MiB each, returned only when empty), and
glibc malloc's bytes in use and free-but-held (`mallinfo2`). RSS that grows while the
traced bytes stay flat is the allocators keeping memory (fragmentation), not a Python
leak; growing traced bytes are a leak, and the comparison below says where. Tracing makes
every allocation slower (a few tens of percent of the daemon's CPU): a debugging aid,
never on by default.

`python -m reconciler.observe.memtrace OLD.snap NEW.snap [--top N] [--group lineno|traceback]`
prints what grew between two snapshots, largest first (and the object-count deltas when
both `.types` files exist).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import tracemalloc
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_PATH = "RECONCILER_TRACEMALLOC"
ENV_FRAMES = "RECONCILER_TRACEMALLOC_FRAMES"
ENV_EVERY = "RECONCILER_TRACEMALLOC_EVERY"


class MemTracer:
    """Writes numbered snapshots under `prefix` when asked (`request`) or every `every` s."""

    def __init__(self, prefix: str, frames: int = 16, every: float | None = None) -> None:
        self.prefix = prefix
        self.frames = frames
        self.every = every
        self.written = 0
        self._wake = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        if self.frames and not tracemalloc.is_tracing():
            tracemalloc.start(self.frames)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)

    def request(self) -> None:
        """Ask for a snapshot (safe from a signal handler: it only sets an event)."""
        self._wake.set()

    def dump(self) -> Path:
        """Take a snapshot now; its path."""
        with self._lock:
            n = self.written
            self.written += 1
        gc.collect()
        path = Path(f"{self.prefix}.{n:03d}.snap")
        if tracemalloc.is_tracing():
            snap = tracemalloc.take_snapshot().filter_traces((
                tracemalloc.Filter(False, tracemalloc.__file__),
                tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
            ))
            snap.dump(str(path))
        types = Counter(type(o).__qualname__ for o in gc.get_objects())
        Path(f"{self.prefix}.{n:03d}.types").write_text(
            "".join(f"{c} {t}\n" for t, c in types.most_common()), encoding="utf-8")
        log.info("tracemalloc: %s: %s", path, describe(memory_figures()))
        return path

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._wake.wait(self.every)
            self._wake.clear()
            if stop.is_set():
                return
            try:
                self.dump()
            except Exception:  # a failed dump never stops the daemon
                log.exception("tracemalloc: snapshot failed")


# --------------------------------------------------------------------------- figures


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mallinfo2() -> _MallInfo2 | None:
    """glibc's malloc statistics (None: not glibc, or older than 2.33)."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).mallinfo2
    except (OSError, AttributeError, TypeError):
        return None
    fn.restype = _MallInfo2
    return fn()  # type: ignore[no-any-return]


def _pymalloc_arenas() -> int | None:
    """pymalloc's arenas allocated now, read from sys._debugmallocstats (it writes to the
    C stderr: fd 2 is pointed at a file for that moment)."""
    stats = getattr(sys, "_debugmallocstats", None)
    if stats is None:
        return None
    with tempfile.TemporaryFile() as f:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(f.fileno(), 2)
            stats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        m = re.search(rb"# arenas allocated current\s*=\s*([\d,]+)", f.read())
    return int(m.group(1).replace(b",", b"")) if m else None


def rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def memory_figures() -> dict[str, float]:
    """Where this process's memory is, in MiB (keys missing when not measurable)."""
    out: dict[str, float] = {"rss": rss_kib() / 1024}
    if tracemalloc.is_tracing():
        out["traced"] = tracemalloc.get_traced_memory()[0] / 2**20
    with contextlib.suppress(OSError):
        arenas = _pymalloc_arenas()
        if arenas is not None:
            out["pymalloc_arenas"] = float(arenas)  # 1 MiB each (Python 3.10+, 64-bit)
    info = _mallinfo2()
    if info is not None:
        out["malloc_in_use"] = (info.uordblks + info.hblkhd) / 2**20
        out["malloc_free_held"] = info.fordblks / 2**20
    return out


def describe(fig: Mapping[str, float]) -> str:
    parts = [f"RSS {fig['rss']:.1f} MiB"]
    if "traced" in fig:
        parts.append(f"traced {fig['traced']:.2f} MiB")
    if "pymalloc_arenas" in fig:
        parts.append(f"pymalloc arenas {fig['pymalloc_arenas']:.0f}")
    if "malloc_in_use" in fig:
        parts.append(f"malloc in use {fig['malloc_in_use']:.1f} MiB, free but held "
                     f"{fig['malloc_free_held']:.1f} MiB")
    return ", ".join(parts)


def from_env(env: Mapping[str, str] | None = None) -> MemTracer | None:
    """The tracer `RECONCILER_TRACEMALLOC*` asks for (None: off)."""
    env = os.environ if env is None else env
    prefix = env.get(ENV_PATH, "").strip()
    if not prefix:
        return None
    frames = int(env.get(ENV_FRAMES, "16").strip() or 16)
    every_text = env.get(ENV_EVERY, "").strip()
    every = float(every_text) if every_text else None
    if frames < 0 or (every is not None and every <= 0):
        raise ValueError(f"{ENV_FRAMES} must be >= 0 and {ENV_EVERY} > 0")
    return MemTracer(prefix, frames, every)


def install(stop: threading.Event) -> MemTracer | None:
    """Main thread only: start tracing when the environment asks for it, snapshot on
    SIGUSR2 (and periodically), from a thread that ends with `stop`."""
    tracer = from_env()
    if tracer is None:
        return None
    tracer.start()
    signal.signal(signal.SIGUSR2, lambda signum, frame: tracer.request())
    threading.Thread(target=tracer.run, args=(stop,), name="tracemalloc",
                     daemon=True).start()
    log.warning("tracemalloc %s: snapshots %s.NNN.snap on SIGUSR2%s",
                f"on ({tracer.frames} frames)" if tracer.frames else "off (figures only)",
                tracer.prefix,
                f" and every {tracer.every:g}s" if tracer.every else "")
    return tracer


# --------------------------------------------------------------------------- compare


def _types(path: Path) -> Counter[str]:
    out: Counter[str] = Counter()
    for line in path.read_text(encoding="utf-8").splitlines():
        count, _, name = line.partition(" ")
        out[name] = int(count)
    return out


def compare(old: Path, new: Path, *, top: int = 15, group: str = "traceback",
            frames: int = 8) -> list[str]:
    """What grew between two snapshots, as printable lines, largest growth first."""
    a = tracemalloc.Snapshot.load(str(old))
    b = tracemalloc.Snapshot.load(str(new))
    stats = b.compare_to(a, group)
    total = sum(s.size_diff for s in stats)
    lines = [f"traced: {sum(s.size for s in stats) / 2**20:.2f} MiB, "
             f"growth {total / 2**10:+.1f} KiB in {sum(s.count_diff for s in stats):+d} "
             f"blocks"]
    for s in sorted(stats, key=lambda s: -s.size_diff)[:top]:
        lines.append(f"{s.size_diff / 2**10:+9.1f} KiB {s.count_diff:+7d} blocks "
                     f"(now {s.size / 2**10:.1f} KiB in {s.count})")
        tb: Any = s.traceback
        for fr in list(tb)[-frames:][::-1]:
            lines.append(f"      {fr.filename}:{fr.lineno}")
    ta, tb_ = old.with_suffix(".types"), new.with_suffix(".types")
    if ta.exists() and tb_.exists():
        ca, cb = _types(ta), _types(tb_)
        diff = Counter({k: cb[k] - ca[k] for k in set(ca) | set(cb) if cb[k] != ca[k]})
        lines.append("live objects per type, growth:")
        lines += [f"  {n:+7d} {t}" for t, n in sorted(diff.items(), key=lambda kv: -kv[1])
                  [:top]]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="What grew between two tracemalloc snapshots")
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--group", choices=("lineno", "traceback", "filename"),
                   default="traceback")
    p.add_argument("--frames", type=int, default=8, help="frames shown per traceback")
    args = p.parse_args(argv)
    print("\n".join(compare(args.old, args.new, top=args.top, group=args.group,
                            frames=args.frames)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
