"""The machine description both benchmarks print with their figures."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess


def describe(*version_cmd: str) -> str:
    """CPUs, memory, kernel, Python, and the first line of `version_cmd`'s output."""
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
        mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.1f} GiB"
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    tool = "?"
    if version_cmd:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(list(version_cmd), capture_output=True, text=True,
                                 timeout=10, check=False).stdout.splitlines()
            tool = out[0] if out else "?"
    return (f"{os.cpu_count()} CPUs ({model}), {mem} RAM, kernel {platform.release()}, "
            f"{tool}, Python {platform.python_version()}")
