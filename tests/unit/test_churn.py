"""Container churn leaves nothing behind in the daemon's memory (issue 11, soak).

Every container id and member name is new, so any per-container or per-member map that
is filled and never pruned grows for as long as the daemon runs. These tests drive many
start/remove cycles of containers (each a member of a pool, with a new name, and some
failing their first attach) through the real daemon, network controller and work queue
over in-memory fakes, then check that (a) every per-container structure is back to
empty and (b) the bytes Python holds (tracemalloc) are back to what they were after the
warm-up, give or take far less than one entry per cycle.
"""

from __future__ import annotations

import gc
import json
import logging
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from reconciler.adapters.consul_kv import KVItem, KVSnapshot
from reconciler.adapters.docker_engine import ContainerEvent, ContainerInfo
from reconciler.daemon import Daemon, DaemonOptions
from reconciler.errors import NetlinkError
from reconciler.members import member_key
from reconciler.runtime.kvwatch import snapshot_from
from reconciler.runtime.workqueue import WorkQueue
from reconciler.workkeys import WorkKey

from .netfakes import NODE, FakeWatcher, Rig, cid_of, make_rig

P = "churn/"
NET = {"subnet": "10.77.1.0/24", "bridge": "br-v", "driver": "ovs", "vlan": 101,
       "gateway": "10.77.1.1", "pool": {"start": "10.77.1.10", "end": "10.77.1.20"}}
SPEC = {"interfaces": [{"name": "eth1", "network": "vnet", "address": "auto"}]}
SVC = {"bind": "127.0.0.1:18080"}
LABELS = {"reconciler.name": "web", "reconciler.service": "svc", "reconciler.pool": "blue",
          "reconciler.port": "80"}
WARMUP, CYCLES = 30, 300
# Bytes per cycle that may stay (allocator and interning noise). One leaked entry per
# cycle — a 64-digit container id alone is 113 bytes — stays above it.
SLACK_PER_CYCLE = 40


class FakeDocker:
    def __init__(self) -> None:
        self.running: dict[str, ContainerInfo] = {}

    def inspect(self, cid: str) -> ContainerInfo | None:
        return self.running.get(cid)


class FakeKV:
    """What the status publisher and the member sync ask of Consul: puts and deletes of
    member keys are kept (and must be gone again)."""

    def __init__(self) -> None:
        self.keys: dict[str, KVItem] = {}

    def read_prefix(self, prefix: str, **kw: Any) -> KVSnapshot:
        return KVSnapshot(1, {k: i for k, i in self.keys.items() if k.startswith(prefix)})

    def get(self, key: str, **kw: Any) -> KVItem | None:
        return self.keys.get(key)

    def put(self, key: str, value: bytes, acquire: str | None = None, **kw: Any) -> bool:
        held = self.keys.get(key)
        if acquire and held is not None and held.session not in (None, acquire):
            return False  # a lock held by another session: Consul answers false
        self.keys[key] = KVItem(key, value, modify_index=1, create_index=1, session=acquire)
        return True

    def delete(self, key: str, **kw: Any) -> bool:
        self.keys.pop(key, None)
        return True

    def session_create(self, *a: Any, **kw: Any) -> str:
        return "s1"

    def session_renew(self, sid: str) -> bool:
        return True

    def session_destroy(self, sid: str) -> bool:
        return True


def snap(index: int) -> Any:
    kv = {"networks/vnet": NET, "containers/web": SPEC, "services/svc/config": SVC}
    return snapshot_from(P, KVSnapshot(index, {
        P + k: KVItem(P + k, json.dumps(v).encode(), modify_index=1, create_index=1)
        for k, v in kv.items()}))


class Watcher(FakeWatcher):
    """The namespace watcher's fake, forgetting a container when it is removed (as
    NetnsWatcher does), so that only the daemon's own memory is measured."""

    def remove(self, key: str) -> None:
        super().remove(key)
        self.expected.pop(key, None)


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> Rig:
    return make_rig(monkeypatch, notify=False, watcher=Watcher())


@pytest.fixture
def traced() -> Iterator[None]:
    # The injected failures are logged as warnings, which pytest's log capture would
    # keep (memory of the test, not of the daemon): only errors are logged here.
    logger = logging.getLogger("reconciler")
    level = logger.level
    logger.setLevel(logging.ERROR)
    tracemalloc.start(1)
    try:
        yield
    finally:
        tracemalloc.stop()
        logger.setLevel(level)


def settle(queue: WorkQueue[WorkKey], process: Callable[[float], bool]) -> None:
    """Run every key, the delayed ones (retries after a backoff) when they are due."""
    while queue.pending() or queue.in_flight():
        process(1.0)


def traced_bytes() -> int:
    gc.collect()  # garbage in reference cycles (raised exceptions) is not kept memory
    return tracemalloc.get_traced_memory()[0]


def test_container_churn_through_the_daemon_leaves_no_state(rig: Rig, traced: None) -> None:
    docker = FakeDocker()
    kv = FakeKV()
    d = Daemon(DaemonOptions(NODE, P, workers=1), kv=kv, docker=docker,  # type: ignore[arg-type]
               netctl=rig.ctrl)
    watcher = rig.watcher
    assert watcher is not None
    q = d.controller.queue
    d._on_snapshot(snap(5))
    d._on_docker_list([])

    def cycle(n: int) -> None:
        cid = cid_of(n)
        info = docker.running[cid] = ContainerInfo(
            id=cid, name=f"web-{n}", labels=LABELS, running=True, pid=4000 + n,
            start_time=None)
        if n % 25 == 0:  # its first attach fails: an error, a backoff, a failing key
            rig.nl.fail["create_interface"] = NetlinkError("injected")
            rig.nl.fail_times["create_interface"] = 1
        member = member_key(P, NODE, info)
        assert member is not None
        if n % 7 == 0:  # its member key is held by another node's session: an error
            kv.keys[member] = KVItem(member, b"{}", 1, 1, session="other")
        d._on_docker_event(ContainerEvent("start", cid, f"web-{n}", n))
        settle(q, d.controller.process_next)
        attached = rig.ctrl.result(cid)
        assert attached is not None and attached.addresses
        assert member in kv.keys, "published as a member"
        if n % 7 == 0:
            assert member in d.members.publisher.errors
        del docker.running[cid]
        d._on_docker_event(ContainerEvent("destroy", cid, f"web-{n}", n))
        settle(q, d.controller.process_next)
        if n % 7 == 0:
            del kv.keys[member]  # the other node let go of it
        assert member not in kv.keys, "withdrawn"
        assert ("remove", cid) in watcher.calls, "its namespace no longer watched"
        rig.clear()  # the fakes' call logs are not the daemon's memory
        rig.netns.handles.clear()
        watcher.calls.clear()

    for n in range(1, WARMUP + 1):
        cycle(n)
    before = traced_bytes()
    for n in range(WARMUP + 1, WARMUP + CYCLES + 1):
        cycle(n)
    grown = traced_bytes() - before

    # Every per-container structure is empty again ...
    assert d.known.containers == {}
    assert d.known.errors == {}
    assert d._stale == set()
    assert d.failures.failing(-1) == []
    assert q.pending() == set() and q.in_flight() == set()
    assert q._backoff._failures == {}  # the backoff map of the work queue
    assert rig.ctrl.results() == {}
    assert rig.ctrl.dirty_ids() == []
    assert rig.ctrl._dirty._clean == {}
    assert rig.addresses._cache == {} and rig.addresses._unclaimed == {}
    assert watcher.expected == {}
    # No error about a member whose container is gone (it was reported in the node's
    # status for ever).
    assert d.members.publisher.errors == {}
    assert rig.ipam.allocs == []
    # ... and nothing else grew with the cycles either.
    assert grown < SLACK_PER_CYCLE * CYCLES, f"{grown} bytes kept over {CYCLES} cycles"


def test_the_growth_check_sees_one_leaked_entry_per_cycle(rig: Rig, traced: None) -> None:
    """The tracemalloc bound above is not vacuous: a map keeping one container id per
    cycle (what an unpruned per-container dict does) exceeds it."""
    leak: dict[str, float] = {}
    before = traced_bytes()
    for n in range(CYCLES):
        leak[cid_of(n + 10_000).upper()] = float(n)  # a new str per cycle, as an id is
    assert traced_bytes() - before > SLACK_PER_CYCLE * CYCLES
