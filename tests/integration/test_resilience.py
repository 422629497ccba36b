"""The daemon keeps the last good state while Consul is unreachable, and catches up after.

A private Consul dev agent (own ports, tests/consul_agents.py) backs one daemon. The
agent is frozen (SIGSTOP: requests hang, then time out) and later resumed: meanwhile the
container keeps its interface, HAProxy keeps serving, and a container restarted meanwhile
gets the address it had (from the last good snapshot and the claim this node already
holds). After the resume, a new change applies and the node's status catches up.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from consul_agents import ConsulAgent
from helpers import ContainerFactory, HttpBackends, free_port, wait_for

from .daemon_helpers import DaemonProcess, container_pid, netns_addrs

pytestmark = pytest.mark.integration


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[ConsulAgent]:
    a = ConsulAgent(tmp_path / "consul")
    a.start()
    yield a
    a.stop()


def put(agent: ConsulAgent, key: str, value: bytes) -> None:
    agent.request("PUT", f"/v1/kv/{key}", value)


def get_status(agent: ConsulAgent, prefix: str, node: str) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = json.loads(
            agent.request("GET", f"/v1/kv/{prefix}nodes/{node}/status?raw", timeout=2))
        return doc
    except OSError:
        return None


def _get(port: int) -> str | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/")
        body = conn.getresponse().read().decode()
        conn.close()
        return body
    except OSError:
        return None


def test_consul_unreachable_keeps_last_good_state(
        agent: ConsulAgent, tmp_path: Path, run_id: str,
        container_factory: ContainerFactory, http_backends: HttpBackends) -> None:
    prefix = f"res-{run_id}/"
    octet = 30 + (int(run_id, 16) + 7) % 90
    bridge = f"brr{run_id}"
    bind = free_port()
    servers = [http_backends.start("blue"), http_backends.start("green")]
    put(agent, f"{prefix}networks/rnet", json.dumps(
        {"subnet": f"10.77.{octet}.0/24", "bridge": bridge, "driver": "linux",
         "gateway": f"10.77.{octet}.1"}).encode())
    put(agent, f"{prefix}containers/resme", json.dumps({"interfaces": [
        {"name": "eth3", "network": "rnet", "address": f"10.77.{octet}.9/24"}]}).encode())
    put(agent, f"{prefix}services/web/config", json.dumps({"bind": f"127.0.0.1:{bind}"}).encode())
    put(agent, f"{prefix}services/web/active", b"blue")
    for pool, srv in zip(("blue", "green"), servers, strict=True):
        put(agent, f"{prefix}services/web/pools/{pool}/m",
            json.dumps({"address": "127.0.0.1", "port": srv.port}).encode())
    ctr = container_factory(labels={"reconciler.name": "resme"})
    node = f"res-{run_id}"
    daemon = DaemonProcess(prefix, node, tmp_path, resync=2.0,
                           extra_env={"CONSUL_HTTP_ADDR": agent.addr})
    daemon.start()
    try:
        wait_for(lambda: netns_addrs(container_pid(ctr), "eth3") == [f"10.77.{octet}.9/24"],
                 timeout=30, message="attached")
        wait_for(lambda: _get(bind) == "blue", timeout=30, message="serving blue")

        old_pid = container_pid(ctr)
        agent.freeze()  # Consul stops answering
        ctr.restart(timeout=0)  # needs a re-attach while Consul is away
        wait_for(lambda: container_pid(ctr) not in (0, old_pid), timeout=30,
                 message="container restarted")
        # Over a window well past the client timeouts, nothing is torn down and
        # HAProxy keeps serving the last good pool.
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            assert _get(bind) == "blue"
            assert daemon.alive()
        agent.thaw()

        # The restarted container has its address, and a new change applies.
        wait_for(lambda: netns_addrs(container_pid(ctr), "eth3") == [
            f"10.77.{octet}.9/24"], timeout=60, message="re-attached")
        put(agent, f"{prefix}services/web/active", b"green")
        wait_for(lambda: _get(bind) == "green", timeout=30, message="flip after resume")

        def status_says_green() -> bool:
            st = get_status(agent, prefix, node)
            return st is not None and st["proxy"].get("active") == {"web": "green"}

        wait_for(status_says_green, timeout=30, message="status reports green")
    finally:
        daemon.stop()
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)
        hp = daemon.state_dir / "haproxy.pid"
        if hp.exists():
            subprocess.run(["kill", hp.read_text().strip()], check=False)

