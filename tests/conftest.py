"""Session fixtures for the real services the integration tests use.

Owns: `consul_addr`, `docker_client`, `test_image`, `run_id`, `ovs_datapath`,
`container_factory`, and the function-scoped `http_backends` (threaded HTTP servers on
loopback), `nl` (a NetlinkAdapter), `netns_factory` (processes in fresh network
namespaces) and `cleanup_links` (host links deleted at teardown). A service that does
not answer fails the test (never skips): run ``make services`` first. Also puts
``tests/`` on ``sys.path`` so tests can ``from helpers import wait_for``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import (
    ContainerFactory,
    HttpBackends,
    NetnsFactory,
    detect_ovs_datapath,
    wait_for,
)

if TYPE_CHECKING:
    from reconciler.adapters.netlink import ContainerNetns, NetlinkAdapter

TEST_IMAGE = os.environ.get("RECONCILER_TEST_IMAGE", "reconciler-test/busybox:latest")
SERVICES_HINT = "run `make services`"


@pytest.fixture(scope="session")
def run_id() -> str:
    """Short random hex, unique to this pytest run, for names of things tests create."""
    return secrets.token_hex(3)


@pytest.fixture(scope="session")
def consul_addr() -> str:
    """``host:port`` of the Consul HTTP API; the agent is asserted to have a leader."""
    addr = os.environ.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500").removeprefix("http://")
    url = f"http://{addr}/v1/status/leader"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            leader = json.loads(resp.read().decode())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        pytest.fail(f"Consul agent at {addr} does not answer ({exc}); {SERVICES_HINT}")
    if not leader:
        pytest.fail(f"Consul agent at {addr} has no leader; {SERVICES_HINT}")
    return addr


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    """A `docker.DockerClient` from the environment, asserted to reach the daemon."""
    import docker
    import docker.errors

    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except (docker.errors.DockerException, OSError) as exc:
        pytest.fail(f"Docker daemon unreachable ({exc}); {SERVICES_HINT}")
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def test_image(docker_client: Any) -> str:
    """Name of the local test image (busybox: sh, ip, ping, httpd, nc, sleep)."""
    import docker.errors

    try:
        docker_client.images.get(TEST_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"test image {TEST_IMAGE} is missing; {SERVICES_HINT}")
    return TEST_IMAGE


@pytest.fixture(scope="session")
def ovs_datapath() -> str:
    """The OVS datapath type bridges must use here: ``system`` or ``netdev``."""
    try:
        return detect_ovs_datapath()
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"Open vSwitch does not work ({exc}); {SERVICES_HINT}")


@pytest.fixture
def container_factory(
    docker_client: Any, test_image: str, run_id: str
) -> Iterator[ContainerFactory]:
    """Run `--net none` containers from the test image; all removed at teardown."""
    import docker.errors

    created: list[Any] = []
    counter = itertools.count(1)

    def make(
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        command: Sequence[str] | str | None = None,
        **kwargs: Any,
    ) -> Any:
        cname = name or f"rt-{run_id}-{next(counter)}"
        all_labels = {"reconciler-test.run": run_id, **(labels or {})}
        kwargs.setdefault("network_mode", "none")
        cmd: list[str] | str
        if command is None:
            cmd = ["sleep", "3600"]
        elif isinstance(command, str):
            cmd = command
        else:
            cmd = list(command)
        container = docker_client.containers.run(
            test_image,
            command=cmd,
            name=cname,
            labels=all_labels,
            detach=True,
            **kwargs,
        )
        created.append(container)

        def running() -> bool:
            container.reload()
            return bool(container.status == "running")

        wait_for(running, timeout=30, message=f"container {cname} to run")
        return container

    yield make

    for container in reversed(created):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)


@pytest.fixture
def http_backends() -> Iterator[HttpBackends]:
    """Threaded HTTP servers on loopback (see `helpers.HttpBackend`); all stopped at teardown."""
    backends = HttpBackends()
    yield backends
    backends.close()


@pytest.fixture
def nl() -> Iterator[NetlinkAdapter]:
    from reconciler.adapters.netlink import NetlinkAdapter

    with NetlinkAdapter() as adapter:
        yield adapter


@pytest.fixture
def netns_factory() -> Iterator[NetnsFactory]:
    """Start processes (``unshare --net sleep``) in fresh network namespaces; yields a
    factory of open handles. Handles closed and processes killed at teardown."""
    from reconciler.adapters.netlink import ContainerNetns, process_start_time

    procs: list[subprocess.Popen[bytes]] = []
    handles: list[ContainerNetns] = []
    host = os.stat("/proc/self/ns/net").st_ino

    def make() -> ContainerNetns:
        proc = subprocess.Popen(["unshare", "--net", "sleep", "600"])
        procs.append(proc)
        wait_for(
            lambda: os.stat(f"/proc/{proc.pid}/ns/net").st_ino != host,
            timeout=10,
            message="unshare to enter its netns",
            ignore=(FileNotFoundError,),
        )
        ns = ContainerNetns.open(proc.pid, expected_start_time=process_start_time(proc.pid))
        handles.append(ns)
        return ns

    yield make
    for ns in handles:
        ns.close()
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def cleanup_links() -> Iterator[list[str]]:
    """Names of host links to delete at teardown (tolerating already-gone)."""
    names: list[str] = []
    yield names
    for name in names:
        subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=10)
