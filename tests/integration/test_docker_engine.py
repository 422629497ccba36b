"""Integration tests of the Docker adapter against the real dockerd and the test image."""

from __future__ import annotations

import contextlib
import itertools
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ContainerFactory, run_in_thread, stop_process, wait_for

from reconciler.adapters.docker_engine import (
    ContainerEvent,
    ContainerInfo,
    DockerEngine,
    EventStream,
    EventWatcher,
    format_since,
)
from reconciler.adapters.procfs import start_time
from reconciler.errors import DockerError

pytestmark = pytest.mark.integration


@pytest.fixture
def engine(docker_client: Any) -> Iterator[DockerEngine]:
    """A DockerEngine on the shared dockerd (`docker_client` asserts that it answers)."""
    eng = DockerEngine()
    yield eng
    eng.close()


@pytest.fixture
def short_lived(docker_client: Any, test_image: str, run_id: str) -> Iterator[Callable[..., Any]]:
    """Create containers that exit by themselves (not waited for); removed at teardown."""
    import docker.errors

    created: list[str] = []
    counter = iter(range(1, 1000))

    def make(command: list[str], *, start: bool = True, **kwargs: Any) -> Any:
        name = f"rt-de-{run_id}-{next(counter)}"
        created.append(name)
        kwargs.setdefault("network_mode", "none")
        kwargs.setdefault("labels", {"reconciler-test.run": run_id})
        if start:
            return docker_client.containers.run(
                test_image, command, name=name, detach=True, **kwargs
            )
        return docker_client.containers.create(test_image, command, name=name, **kwargs)

    yield make
    for name in created:
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.containers.get(name).remove(force=True)


class Collector:
    """Thread-safe sink for watcher callbacks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[ContainerEvent] = []
        self.lists: list[list[ContainerInfo]] = []

    def on_event(self, event: ContainerEvent) -> None:
        with self.lock:
            self.events.append(event)

    def on_list(self, containers: list[ContainerInfo]) -> None:
        with self.lock:
            self.lists.append(containers)

    def actions_for(self, container_id: str) -> list[str]:
        with self.lock:
            return [e.action for e in self.events if e.id == container_id]

    def listed_ids(self) -> set[str]:
        with self.lock:
            return {c.id for batch in self.lists for c in batch}


def is_subsequence(wanted: list[str], actual: list[str]) -> bool:
    it = iter(actual)
    return all(any(a == w for a in it) for w in wanted)


# -- list / inspect -----------------------------------------------------------------------


def test_inspect_and_list_a_net_none_container(
    engine: DockerEngine, container_factory: ContainerFactory, run_id: str
) -> None:
    c = container_factory(labels={"reconciler.name": f"web-{run_id}", "tier": "front"})
    info = engine.inspect(c.id)
    assert info is not None
    assert info.id == c.id
    assert info.name == c.name and not info.name.startswith("/")
    assert info.running is True
    assert info.pid > 0
    assert info.labels["reconciler.name"] == f"web-{run_id}"
    assert info.labels["tier"] == "front"
    assert dict(info.networks) == {"none": (None, None)}
    assert info.started_at.startswith("20") or info.started_at[:2].isdigit()
    assert info.start_time is not None
    assert info.start_time == start_time(info.pid)
    assert info.node is None
    # Inspect by name gives the same thing.
    assert engine.inspect(c.name) == info

    listed = {i.id: i for i in engine.list_containers()}
    assert listed[c.id].pid == info.pid
    assert all(i.running for i in listed.values())
    assert engine.inspect(f"no-such-container-{run_id}") is None


def test_list_all_includes_stopped_containers(
    engine: DockerEngine, short_lived: Callable[..., Any]
) -> None:
    created = short_lived(["true"], start=False)
    assert created.id not in {i.id for i in engine.list_containers()}
    stopped = {i.id: i for i in engine.list_containers(all=True)}
    assert created.id in stopped
    assert stopped[created.id].running is False
    assert stopped[created.id].pid == 0 and stopped[created.id].start_time is None


def test_swarm_node_and_compose_labels_are_exposed(
    engine: DockerEngine, container_factory: ContainerFactory, run_id: str
) -> None:
    c = container_factory(
        labels={
            "com.docker.compose.project": f"proj{run_id}",
            "com.docker.compose.service": "api",
            "com.docker.swarm.node.id": "node123",
        }
    )
    info = engine.inspect(c.id)
    assert info is not None
    assert info.node == "node123"
    assert info.labels["com.docker.compose.project"] == f"proj{run_id}"
    assert info.labels["com.docker.compose.service"] == "api"


def test_unreachable_daemon_raises_docker_error(tmp_path: Any) -> None:
    bad = DockerEngine(f"unix://{tmp_path}/no-docker.sock", timeout=5)
    with pytest.raises(DockerError):
        bad.list_containers()
    with pytest.raises(DockerError):
        bad.inspect("anything")
    with pytest.raises(DockerError):
        bad.open_events()


# -- events -------------------------------------------------------------------------------


def test_events_arrive_in_order(engine: DockerEngine, short_lived: Callable[..., Any]) -> None:
    stop = threading.Event()
    seen: list[ContainerEvent] = []
    # Subscribe first (open_events is eager), then create the container; setting `stop`
    # closes the stream, as in EventWatcher.
    since = format_since(engine.system_time_nano())
    stream = engine.open_events(since=since)
    cancel = stream.close_when(stop)

    def consume() -> None:
        for ev in stream:
            seen.append(ev)

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    c = short_lived(["sleep", "30"], labels={"color": "blue"})
    wait_for(lambda: "start" in [e.action for e in seen if e.id == c.id], timeout=20)
    c.remove(force=True)
    wait_for(
        lambda: "destroy" in [e.action for e in seen if e.id == c.id],
        timeout=20,
        message="destroy event",
    )
    mine = [e for e in seen if e.id == c.id]
    actions = [e.action for e in mine]
    assert is_subsequence(["start", "die", "destroy"], actions), actions
    assert "create" not in actions, "only the default actions are streamed"
    assert [e.time_nano for e in mine] == sorted(e.time_nano for e in mine)
    assert all(e.name == c.name for e in mine)
    assert mine[0].labels["color"] == "blue"
    assert "image" not in mine[0].labels and "image" in mine[0].attributes
    die = next(e for e in mine if e.action == "die")
    assert "exitCode" in die.attributes and "exitCode" not in die.labels
    stop.set()
    t.join(5)
    assert not t.is_alive(), "the stream did not end after stop was set"
    assert stream.closed
    cancel()


def test_events_until_returns_history(
    engine: DockerEngine, short_lived: Callable[..., Any]
) -> None:
    t0 = engine.system_time_nano()
    c = short_lived(["true"])
    wait_for(lambda: (c.reload(), c.status)[1] == "exited", timeout=20)
    t1 = engine.system_time_nano() + 1
    stream = engine.open_events(since=format_since(t0), until=format_since(t1))
    try:
        events = list(stream)  # ends at `until`
    finally:
        stream.close()
    actions = [e.action for e in events if e.id == c.id]
    assert is_subsequence(["start", "die"], actions), actions


# -- watcher ------------------------------------------------------------------------------


class HookedEngine(DockerEngine):
    """A real engine with test hooks around open_events / list_containers."""

    def __init__(self) -> None:
        super().__init__()
        self.before_list: list[Callable[[], None]] = []
        self.before_open: list[Callable[[], None]] = []
        self.streams: list[EventStream] = []
        self.open_calls = 0

    def open_events(self, *args: Any, **kwargs: Any) -> EventStream:
        self.open_calls += 1
        if self.before_open:
            self.before_open.pop(0)()
        stream = super().open_events(*args, **kwargs)
        self.streams.append(stream)
        return stream

    def list_containers(self, all: bool = False) -> list[ContainerInfo]:
        if self.before_list:
            self.before_list.pop(0)()
        return super().list_containers(all)


def test_watcher_misses_nothing_between_subscribe_and_list(
    container_factory: ContainerFactory, short_lived: Callable[..., Any]
) -> None:
    engine = HookedEngine()
    before = container_factory()
    between: dict[str, Any] = {}

    def start_containers_after_subscribing() -> None:
        # The stream is open now, the list has not been taken yet.
        between["running"] = container_factory()
        gone = short_lived(["true"])
        wait_for(lambda: (gone.reload(), gone.status)[1] == "exited", timeout=20)
        gone.remove()
        between["gone"] = gone

    engine.before_list.append(start_containers_after_subscribing)
    sink = Collector()
    with run_in_thread(EventWatcher(engine, sink.on_event, sink.on_list).run, "watcher",
                       join_timeout=5):
        wait_for(lambda: sink.lists, timeout=30, message="first list")
        after = container_factory()
        wait_for(lambda: "start" in sink.actions_for(after.id), timeout=20)
        running, gone = between["running"], between["gone"]
        # Running before or started between subscribe and list: in the list.
        assert {before.id, running.id} <= sink.listed_ids()
        # Started between subscribe and list: also (at least once) as an event.
        wait_for(lambda: "start" in sink.actions_for(running.id), timeout=20)
        assert sink.actions_for(running.id).count("start") == 1
        # Started and removed between subscribe and list: only the stream can tell.
        wait_for(lambda: "destroy" in sink.actions_for(gone.id), timeout=20)
        assert is_subsequence(["start", "die", "destroy"], sink.actions_for(gone.id))
        assert gone.id not in sink.listed_ids()
        # Started after the list: an event, not in any list.
        assert after.id not in sink.listed_ids()
        assert len(sink.lists) == 1 and engine.open_calls == 1


def test_watcher_reconnects_resumes_and_relists(short_lived: Callable[..., Any]) -> None:
    engine = HookedEngine()
    sink = Collector()
    watcher = EventWatcher(engine, sink.on_event, sink.on_list, backoff_base=0.05)
    with run_in_thread(watcher.run, "watcher", join_timeout=5):
        wait_for(lambda: sink.lists, timeout=30, message="first list")
        first = short_lived(["sleep", "30"])
        wait_for(lambda: "start" in sink.actions_for(first.id), timeout=20)

        missed: dict[str, Any] = {}

        def container_comes_and_goes_while_disconnected() -> None:
            c = short_lived(["true"])
            wait_for(lambda: (c.reload(), c.status)[1] == "exited", timeout=20)
            c.remove()
            missed["c"] = c

        engine.before_open.append(container_comes_and_goes_while_disconnected)
        # Break the connection the way a dockerd restart does, without asking to stop.
        engine.streams[-1].close()
        wait_for(lambda: len(sink.lists) == 2, timeout=30, message="re-list after reconnect")
        assert engine.open_calls == 2 and watcher.connections == 2
        # Events that happened while disconnected are replayed from the last one seen.
        c = missed["c"]
        wait_for(lambda: "destroy" in sink.actions_for(c.id), timeout=20)
        assert is_subsequence(["start", "die", "destroy"], sink.actions_for(c.id))
        assert first.id in {i.id for i in sink.lists[-1]}


def test_watcher_backs_off_while_docker_is_unreachable(tmp_path: Any) -> None:
    engine = DockerEngine(f"unix://{tmp_path}/no-docker.sock", timeout=5)
    sink = Collector()
    watcher = EventWatcher(engine, sink.on_event, sink.on_list, backoff_base=0.1)
    attempts: list[float] = []
    original = engine.system_time_nano

    def counting() -> int:
        attempts.append(time.monotonic())
        return original()

    engine.system_time_nano = counting  # type: ignore[method-assign]
    with run_in_thread(watcher.run, "watcher", join_timeout=5):
        wait_for(lambda: len(attempts) >= 4, timeout=10)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.09 and gaps[2] >= 0.35, gaps  # 0.1, 0.2, 0.4 ...
    assert sink.lists == [] and sink.events == []


def test_watcher_stops_within_bounded_time(engine: DockerEngine) -> None:
    sink = Collector()
    watcher = EventWatcher(engine, sink.on_event, sink.on_list)
    stop = threading.Event()
    t = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    t.start()
    wait_for(lambda: sink.lists, timeout=30, message="first list")
    began = time.monotonic()
    stop.set()
    t.join(5)
    assert not t.is_alive()
    assert time.monotonic() - began < 1.0


# -- a dockerd restart, on a private daemon so the shared one is left alone ---------------


class PrivateDockerd:
    """A second dockerd on its own socket and data root (vfs, no networking of its own)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.host = f"unix://{base}/d.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        b = self.base
        cmd = [
            "dockerd",
            f"--host={self.host}",
            f"--data-root={b}/root",
            f"--exec-root={b}/exec",
            f"--pidfile={b}/d.pid",
            "--storage-driver=vfs",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
        ]
        with open(b / "dockerd.log", "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
        wait_for(self.answers, timeout=60, message=f"private dockerd at {self.host}")

    def answers(self) -> bool:
        return self.docker("info", check=False).returncode == 0

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, timeout=60)
        self.proc = None

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", "-H", self.host, *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
        )


@pytest.fixture
def private_dockerd(test_image: str, run_id: str) -> Iterator[PrivateDockerd]:
    # A short path: unix socket paths are limited to 107 bytes.
    base = Path(tempfile.mkdtemp(prefix=f"rtdk{run_id}-", dir="/tmp"))
    daemon = PrivateDockerd(base)
    try:
        daemon.start()
        saved = subprocess.run(
            ["docker", "save", test_image], capture_output=True, check=True, timeout=120
        )
        subprocess.run(
            ["docker", "-H", daemon.host, "load"],
            input=saved.stdout,
            capture_output=True,
            check=True,
            timeout=120,
        )
        yield daemon
    finally:
        if daemon.proc is not None:
            ids = daemon.docker("ps", "-aq", check=False).stdout.split()
            if ids:
                daemon.docker("rm", "-f", *ids, check=False)
        daemon.stop()
        # dockerd bind-mounts its data root onto itself.
        subprocess.run(["umount", "-R", str(base / "root")], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_watcher_survives_a_dockerd_restart(
    private_dockerd: PrivateDockerd, test_image: str, run_id: str
) -> None:
    engine = DockerEngine(private_dockerd.host, timeout=10)
    sink = Collector()
    watcher = EventWatcher(engine, sink.on_event, sink.on_list, backoff_base=0.1, backoff_cap=1)

    def run(name: str, *extra: str) -> str:
        out = private_dockerd.docker(
            "run", "-d", "--name", name, "--net", "none", "--stop-signal", "KILL",
            *extra, test_image, "sleep", "600",
        )  # fmt: skip
        return out.stdout.strip()

    with run_in_thread(watcher.run, "watcher", join_timeout=5):
        wait_for(lambda: sink.lists, timeout=30, message="first list")
        keeper = run(f"rt-keep-{run_id}", "--restart", "always")
        wait_for(lambda: "start" in sink.actions_for(keeper), timeout=20)

        private_dockerd.stop()  # the stream breaks; the watcher retries with backoff
        wait_for(lambda: "die" in sink.actions_for(keeper), timeout=30, message="die on stop")
        private_dockerd.start()

        # After reconnecting, the watcher lists again: dockerd restarted `keeper`.
        wait_for(lambda: len(sink.lists) >= 2, timeout=30, message="re-list after restart")
        assert keeper in {c.id for c in sink.lists[-1]}
        later = run(f"rt-later-{run_id}")
        wait_for(lambda: "start" in sink.actions_for(later), timeout=20, message="new event")
        assert watcher.connections >= 2
