"""The machine description the benchmarks print with their figures, and CPU accounts of
the machine's processes over a measured window."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time


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


# --------------------------------------------------------------------------- CPU accounts

_PF_KTHREAD = 0x00200000
_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process `pid` (all its threads), from /proc/<pid>/stat;
    (0, 0) if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(rest[11]) / _TCK, int(rest[12]) / _TCK


def all_processes() -> dict[int, tuple[str, bool, int]]:
    """pid -> (command name, kernel thread?, CPU ticks so far) of every process."""
    out: dict[int, tuple[str, bool, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                head, rest = f.read().rsplit(b")", 1)
        except OSError:
            continue
        v = rest.split()
        comm = head.split(b"(", 1)[1].decode(errors="replace")
        out[int(entry.name)] = (comm, bool(int(v[6]) & _PF_KTHREAD), int(v[11]) + int(v[12]))
    return out


def machine_cpu() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine, all cores, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / _TCK, (idle + iowait) / _TCK


def pid_of(*names: str) -> dict[str, int]:
    """Name -> pid of the named daemons that run (pid files of Open vSwitch, else the first
    process of that name)."""
    out: dict[str, int] = {}
    for name in names:
        with contextlib.suppress(OSError, ValueError), \
                open(f"/var/run/openvswitch/{name}.pid", encoding="ascii") as f:
            out[name] = int(f.read().strip())
        if name in out:
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError, IndexError):
            pids = subprocess.run(["pidof", "-s", name], capture_output=True, text=True,
                                  timeout=10, check=False).stdout.split()
            if pids:
                out[name] = int(pids[0])
    return out


class CpuAccounts:
    """CPU seconds spent between `start()` and `stop()` by: the named processes (user and
    system apart), kernel threads, this process, the whole machine (busy and idle), and
    (`others`) the busiest other processes by command name — the machine is shared."""

    def __init__(self, procs: dict[str, int]) -> None:
        self.procs = dict(procs)
        self._t0: dict[str, float] = {}
        self._all0: dict[int, tuple[str, bool, int]] = {}
        self._all: dict[int, tuple[str, bool, int]] = {}
        self.spent: dict[str, float] = {}
        self.others: dict[str, float] = {}
        self.wall = 0.0

    def _sample(self) -> dict[str, float]:
        s: dict[str, float] = {}
        for name, pid in self.procs.items():
            u, k = proc_cpu(pid)
            s[f"{name} user"], s[f"{name} sys"] = u, k
        self._all = all_processes()
        s["kernel threads"] = sum(t for _, k, t in self._all.values() if k) / _TCK
        t = os.times()
        s["bench (waiter)"] = t.user + t.system
        s["machine busy"], s["machine idle"] = machine_cpu()
        s["wall"] = time.perf_counter()
        return s

    def start(self) -> None:
        self._t0 = self._sample()
        self._all0 = self._all

    def stop(self) -> dict[str, float]:
        s = self._sample()
        self.spent = {k: s[k] - self._t0[k] for k in s}
        self.wall = self.spent.pop("wall")
        mine = {*self.procs.values(), os.getpid()}
        others: dict[str, float] = {}
        for pid, (comm, kthread, ticks) in self._all.items():
            if pid in mine or kthread:
                continue
            before = self._all0.get(pid)
            spent = ticks - (before[2] if before is not None and before[0] == comm else 0)
            if spent > 0:
                others[comm] = others.get(comm, 0.0) + spent / _TCK
        self.others = dict(sorted(others.items(), key=lambda kv: -kv[1]))
        return self.spent
