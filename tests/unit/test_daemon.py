"""The daemon's decisions about which keys to enqueue, with fakes as the ordering seam.

(The real work is covered against the real services in tests/integration; these pin the
event -> key rules whose mistakes showed up there as feedback loops and flaps.)
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from reconciler.adapters.consul_kv import KVItem, KVSnapshot
from reconciler.adapters.docker_engine import (
    ContainerEvent,
    ContainerInfo,
)
from reconciler.adapters.procfs import start_time
from reconciler.daemon import Daemon, DaemonOptions
from reconciler.model import DesiredState
from reconciler.network.execute import AttachResult
from reconciler.runtime.kvwatch import snapshot_from
from reconciler.workkeys import MEMBERS, PEERS, PORTS, PROXY, SWEEP, ContainerKey, WorkKey

P = "reconciler/"
NET = json.dumps({"subnet": "10.77.1.0/24", "bridge": "br-a"}).encode()
SPEC = json.dumps({"interfaces": [{"name": "eth1", "network": "n", "address": "10.77.1.5/24"}]}
                  ).encode()
SVC = json.dumps({"bind": "127.0.0.1:18080"}).encode()


def snap(index: int, **kv: bytes) -> Any:
    return snapshot_from(P, KVSnapshot(index, {
        P + k: KVItem(P + k, v, modify_index=1, create_index=1) for k, v in kv.items()}))


@dataclass
class FakeNetctl:
    state: DesiredState = field(default_factory=DesiredState)
    attached: dict[str, AttachResult] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    ipam_view: Any = None
    reconciled: list[str] = field(default_factory=list)
    preallocated: list[list[str]] = field(default_factory=list)
    clean: set[str] = field(default_factory=set)  # containers a reconcile would not touch

    def set_state(self, state: DesiredState) -> None:
        self.state = state

    def set_ipam_view(self, view: Any, covered: Any = None) -> None:
        self.ipam_view = view

    def result(self, cid: str) -> AttachResult | None:
        return self.attached.get(cid)

    def results(self) -> dict[str, AttachResult]:
        return dict(self.attached)

    def dirty_ids(self) -> list[str]:
        return []

    def queued_containers(self) -> list[str]:
        return []

    def preallocate(self, containers: Any) -> int:
        self.preallocated.append(sorted(c.id for c in containers))
        return 0

    def mark_dirty(self, cid: str) -> None:
        self.dirty.add(cid)

    def mark_all_dirty(self) -> None:
        self.dirty.add("*")

    def reconcile_container(self, cid: str, info: Any = None) -> AttachResult:
        self.reconciled.append(cid)
        return AttachResult()

    def wanted(self, info: Any) -> list[Any]:
        return []

    def is_clean(self, info: ContainerInfo) -> bool:
        return info.id in self.clean

    def claim_pending(self, cid: str) -> bool:
        return False


class FakeDocker:
    def inspect(self, cid: str) -> ContainerInfo | None:
        return ContainerInfo(cid, f"c-{cid}", running=True, pid=1)


class FakeKV:
    def __init__(self) -> None:
        self.puts: list[str] = []

    def read_prefix(self, prefix: str, **kw: Any) -> Any:
        return KVSnapshot(1, {})

    def session_renew(self, sid: str) -> bool:
        return True

    def session_create(self, *a: Any, **kw: Any) -> str:
        return "s1"

    def put(self, key: str, value: bytes, **kw: Any) -> bool:
        self.puts.append(key)
        return True

    def delete(self, key: str, **kw: Any) -> bool:
        return True


def make(proxy: bool = True) -> tuple[Daemon, FakeNetctl]:
    class FakeProxy:
        def set_state(self, state: DesiredState) -> None: ...
        def quiet_delay(self) -> float:
            return 0.0

        def reconcile(self) -> dict[str, Any]:
            return {}

        def errors(self) -> dict[str, list[str]]:
            return {}

        def status(self) -> dict[str, Any]:
            return {}

        def poll_after(self) -> float | None:
            return None

    nc = FakeNetctl()
    d = Daemon(DaemonOptions("n1", P), kv=FakeKV(), docker=FakeDocker(),  # type: ignore[arg-type]
               netctl=nc, proxy=FakeProxy() if proxy else None)  # type: ignore[arg-type]
    return d, nc


def drain(d: Daemon) -> list[WorkKey]:
    keys = []
    while len(d.controller.queue):
        k = d.controller.queue.get(timeout=0)
        assert k is not None
        keys.append(k)
        d.controller.queue.done(k)
    return keys


def test_user_change_enqueues_everything_proxy_first() -> None:
    d, _ = make()
    d._on_docker_list([ContainerInfo("a", "ca", running=True, pid=1)])
    drain(d)
    d._on_snapshot(snap(5, **{"networks/n": NET, "containers/c": SPEC}))
    keys = drain(d)
    assert keys[0] == PROXY  # a flip never waits behind every container
    assert set(keys) == {PROXY, ContainerKey("a"), SWEEP, MEMBERS, PEERS}


def test_daemon_area_changes_enqueue_nothing_but_overlay_peers() -> None:
    # Our own status write wakes the watch: acting on it was a feedback loop.
    d, _ = make()
    d._on_snapshot(snap(5, **{"networks/n": NET}))
    drain(d)
    d._on_snapshot(snap(6, **{"networks/n": NET, "nodes/n1/status": b"{}"}))
    d._on_snapshot(snap(7, **{"networks/n": NET, "nodes/n1/status": b'{"x":1}'}))
    assert drain(d) == []
    assert d.status.index == 5  # the last applied user state
    # Daemon-owned areas are not watched with the desired state at all (issue 9): an
    # allocation of a network here or a host's address comes from their own watches, and
    # makes only overlay endpoints to program.
    d._on_allocations({"n"})
    assert drain(d) == [PEERS]
    d._on_hosts(None)
    assert drain(d) == [PEERS]


def test_services_only_change_skips_containers_and_sweep() -> None:
    d, _ = make()
    d._on_docker_list([ContainerInfo("a", "ca", running=True, pid=1)])
    d._on_snapshot(snap(5, **{"networks/n": NET, "services/web/config": SVC}))
    drain(d)
    d._on_snapshot(snap(6, **{"networks/n": NET, "services/web/config": SVC,
                              "services/web/active": b"green"}))
    assert set(drain(d)) == {PROXY, MEMBERS}


def test_container_changes_preallocate_for_every_running_container_first() -> None:
    d, nc = make()
    d._on_docker_list([ContainerInfo("a", "ca", running=True, pid=1),
                       ContainerInfo("b", "cb", running=True, pid=2),
                       ContainerInfo("z", "cz", running=False)])
    assert nc.preallocated == []  # nothing desired known yet
    drain(d)
    d._on_snapshot(snap(5, **{"networks/n": NET, "containers/c": SPEC}))
    assert nc.preallocated == [["a", "b"]]  # before the keys were reconciled
    drain(d)
    d._on_snapshot(snap(6, **{"networks/n": NET, "containers/c": SPEC,
                              "services/web/config": SVC}))
    assert nc.preallocated == [["a", "b"]]  # services only: no container can differ
    d._on_docker_list([ContainerInfo("a", "ca", running=True, pid=1)])
    assert nc.preallocated == [["a", "b"], ["a"]]


def test_members_wait_for_dockers_first_list() -> None:
    d, _ = make()
    d._on_snapshot(snap(5, **{"networks/n": NET}))
    drain(d)
    kv: FakeKV = d.kv
    d._reconcile(MEMBERS)
    assert kv.puts == []  # nothing known yet: withdrawing everything would flap
    d._on_docker_list([])
    assert MEMBERS in drain(d)


def test_events_mark_dirty_and_enqueue() -> None:
    d, nc = make()
    d._on_snapshot(snap(5, **{"networks/n": NET}))
    drain(d)
    d._on_docker_event(ContainerEvent("die", "abc", "c", 1))
    d.on_netns_event("def")
    assert nc.dirty == {"abc", "def"}
    assert set(drain(d)) == {ContainerKey("abc"), MEMBERS, ContainerKey("def")}
    d.on_ports_pending()
    assert drain(d) == [PORTS]


def test_deep_pass_every_tenth_resync() -> None:
    d, nc = make()
    d._on_snapshot(snap(5, **{"networks/n": NET}))
    for _ in range(9):
        d._resync_keys()
    assert "*" not in nc.dirty
    d._resync_keys()
    assert "*" in nc.dirty


def test_light_resync_queues_only_containers_that_may_have_changed() -> None:
    """Between deep passes, a container whose reconcile would do nothing (clean, the same
    process) is checked without going through the queue; every DEEP_EVERY-th resync
    queues them all."""
    d, nc = make()
    me = os.getpid()
    started = start_time(me)
    same, dirty, restarted = (ContainerInfo(c, f"n-{c}", running=True, pid=me,
                                            start_time=started) for c in ("a", "b", "c"))
    restarted = dataclasses.replace(restarted, start_time=(started or 0) - 1)  # pid reused
    d._on_snapshot(snap(5, **{"networks/n": NET}))
    d._on_docker_list([same, dirty, restarted])
    drain(d)
    nc.clean = {"a", "c"}  # "b" had an event since its last reconcile
    queued = {k for k in d._resync_keys() if isinstance(k, ContainerKey)}
    assert queued == {ContainerKey("b"), ContainerKey("c")}
    for _ in range(8):
        d._resync_keys()
    deep = {k for k in d._resync_keys() if isinstance(k, ContainerKey)}  # the 10th
    assert deep == {ContainerKey("a"), ContainerKey("b"), ContainerKey("c")}


def test_nothing_before_the_first_snapshot() -> None:
    d, nc = make()
    assert d._resync_keys() == []
    d._on_docker_list([ContainerInfo("a", "ca", running=True, pid=1)])
    assert d._reconcile(ContainerKey("a")) is not None  # requeued: nothing is known yet
    assert nc.reconciled == []


def test_members_that_could_not_be_published_stay_in_the_status() -> None:
    d, _ = make()
    refused = {"reconciler/members/web/blue/n1_c": ["held by another node's session"]}
    with d._lock:
        d.known.errors[MEMBERS] = refused  # as _handle_members records them
    d._on_success(MEMBERS)  # the work queue's report of that run
    assert d.build_status().errors == refused
    d._on_success(PROXY)
    assert d.build_status().errors == refused
