"""Unit tests of reconciler.adapters.procfs: the reads of a process's identity."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.adapters.procfs import parse_start_time, read_proc_file, start_time


def _stat_line(comm: str, start: int) -> bytes:
    # Fields 3..52 after "pid (comm)": field 22 is the start time.
    rest = ["S"] + [str(i) for i in range(4, 22)] + [str(start)] + ["0"] * 30
    return f"4242 ({comm}) {' '.join(rest)}\n".encode()


def test_start_time_is_field_22_whatever_the_command_name_holds() -> None:
    assert parse_start_time(_stat_line("sleep", 123456)) == 123456
    # comm may hold spaces and parentheses: the fields start after the last ')'.
    assert parse_start_time(_stat_line("a) (b c) 9 9", 777)) == 777
    assert parse_start_time(b"4242 (truncated") is None
    assert parse_start_time(b"4242 (x) S 1 2") is None


def test_start_time_of_this_process_and_of_none() -> None:
    want = parse_start_time(Path(f"/proc/{os.getpid()}/stat").read_bytes())
    assert want is not None and start_time(os.getpid()) == want
    assert start_time(0) is None
    assert start_time(1 << 30) is None  # above any pid_max: no such process


@pytest.fixture
def sleeper() -> Iterator[int]:
    """A process whose /proc files hold still (it sleeps)."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        # Started (loaded, mapped) once it waits in its nanosleep.
        while b"nanosleep" not in Path(f"/proc/{proc.pid}/wchan").read_bytes():
            assert time.monotonic() < deadline, "sleep did not start"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_proc_file_is_read_whole_and_a_one_record_file_in_one_read(sleeper: int) -> None:
    smaps = f"/proc/{sleeper}/smaps"
    got = read_proc_file(smaps)
    # A seq_file of many records: a read hands out at most a page of whole records, so
    # a short read is not the end of it. Every mapping is there (the sizes in between
    # may move while the process starts).
    assert len(got) > 2 * 4096
    headers = [line for line in got.splitlines() if re.match(rb"[0-9a-f]+-[0-9a-f]+ ", line)]
    assert headers == Path(f"/proc/{sleeper}/maps").read_bytes().splitlines()
    cgroup = f"/proc/{sleeper}/cgroup"
    assert read_proc_file(cgroup, one_record=True) == Path(cgroup).read_bytes()
    stat = read_proc_file(f"/proc/{sleeper}/stat", one_record=True)
    assert stat.endswith(b"\n") and len(stat[stat.rfind(b")") + 2:].split()) == 50
    assert start_time(sleeper) == parse_start_time(stat) is not None
