"""Process helpers the benchmarks share: run a command, a free local port, a percentile,
a process's CPU seconds (also per thread, with Python thread names), RSS and open fds,
stopping a child or a process by pid."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path


def sh(*args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a command (never a shell) and capture its text output."""
    return subprocess.run(list(args), check=check, capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: Iterable[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        rest = f.read().rsplit(b")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """Thread id -> (user, system) CPU seconds of each thread of a process (from
    /proc/<pid>/task/<tid>/stat; a thread that ended meanwhile is left out)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[float, float]] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    rest = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            out[int(tid)] = (int(rest[11]) / tick, int(rest[12]) / tick)
    return out


def python_thread_names(pid: int) -> dict[int, str]:
    """Thread id -> Python thread name of a Python process, from ``py-spy dump`` (next to
    this interpreter or on PATH); empty without py-spy. A trailing ``-<n>`` is dropped,
    so a pool's threads share one name."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.access(exe, os.X_OK):
        return {}
    try:
        out = subprocess.run([exe, "dump", "--pid", str(pid)], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names: dict[int, str] = {}
    for m in re.finditer(r'^Thread (0x[0-9a-fA-F]+|\d+) \([^)]*\): "([^"]*)"', out, re.M):
        tid = m.group(1)
        names[int(tid, 16) if tid.startswith("0x") else int(tid)] = \
            re.sub(r"-\d+$", "", m.group(2))
    return names


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_parts_mib(pid: int) -> tuple[float, float]:
    """(RssAnon, RssFile + RssShmem) of `pid` in MiB: memory the process allocated, and
    pages of mapped files (code and libraries, touched as code paths first run)."""
    anon = file = 0.0
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) / 1024
            elif line.startswith(("RssFile:", "RssShmem:")):
                file += int(line.split()[1]) / 1024
    return anon, file


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def stop_popen(p: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


def kill_pid(pid: int, marker: str) -> None:
    """SIGTERM (then SIGKILL) `pid` if its command line contains `marker`."""
    try:
        if marker.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return
    except OSError:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
