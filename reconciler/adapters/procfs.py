"""The host's /proc, as the daemon reads it to know which process a pid is now.

Owns `HOST_PROC` (the host's /proc: ``RECONCILER_HOST_PROC`` when the daemon runs in a
container with the host's /proc mounted elsewhere) and the reads of a process's start
time and cgroup. Each is one open, one read and one close: the daemon reads them for
every container it attaches (bench/attach.py at 500 containers), and Python's buffered
text `open()` took seven system calls per file (fstat, the tty ioctl, lseek, a read
until empty), each a release and retake of the GIL among busy workers.
"""

from __future__ import annotations

import os

HOST_PROC = os.environ.get("RECONCILER_HOST_PROC", "/proc")
"""Where other processes' /proc entries are read: ``/proc``, or the host's /proc mounted
into the daemon's container (``-v /proc:/host/proc:ro``), so a containerised daemon
reaches container namespaces without the host PID namespace (swarm services cannot
have it; issue 10). The daemon's own entries (``/proc/thread-self``) stay ``/proc``."""

_CHUNK = 1 << 16


def read_proc_file(path: str, *, one_record: bool = False) -> bytes:
    """The whole of a /proc file, read until an empty read: a seq_file hands out whole
    records of up to a page per read, so a short read is not its end (smaps: 3912 bytes
    of a longer file). `one_record`: a file the kernel writes in one go (`single_open`:
    /proc/<pid>/stat, cgroup), which a read with room to spare returns all of: one read,
    not a second one to see the end."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, _CHUNK)
        if one_record and len(data) < _CHUNK:
            return data
        chunks = [data]
        while data:
            data = os.read(fd, _CHUNK)
            chunks.append(data)
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_start_time(stat: bytes) -> int | None:
    """Field 22 of a /proc/<pid>/stat line (start time in clock ticks since boot)."""
    # Field 2 (comm) is in parentheses and may itself contain spaces and ')'.
    end = stat.rfind(b")")
    if end < 0:
        return None
    fields = stat[end + 2 :].split()
    try:
        return int(fields[22 - 3])
    except (IndexError, ValueError):
        return None


def start_time(pid: int, proc: str = HOST_PROC) -> int | None:
    """Start time of process `pid` in clock ticks since boot; None if there is none.
    With the pid, it names one process: a pid is reused, a (pid, start time) is not."""
    if pid <= 0:
        return None
    try:
        return parse_start_time(read_proc_file(f"{proc}/{pid}/stat", one_record=True))
    except OSError:
        return None


def cgroup(pid: int, proc: str = HOST_PROC) -> str:
    """/proc/<pid>/cgroup (docker's container id is in its paths); OSError if gone."""
    return read_proc_file(f"{proc}/{pid}/cgroup", one_record=True).decode("utf-8", "replace")
