"""The daemon keeps the last good state while Consul is unreachable, and catches up after.

A private Consul dev agent (own ports) backs one daemon. The agent is frozen (SIGSTOP:
requests hang, then time out) and later resumed: meanwhile the container keeps its
interface, HAProxy keeps serving, and a container restarted meanwhile gets the address
it had (from the last good snapshot and the claim this node already holds). After the
resume, a new change applies and the node's status catches up.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import ContainerFactory, wait_for

from .daemon_helpers import DaemonProcess, container_pid, netns_addrs

pytestmark = pytest.mark.integration


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class Agent:
    def __init__(self, tmp: Path) -> None:
        http_port, serf_lan, serf_wan, server = _free_ports(4)
        self.addr = f"127.0.0.1:{http_port}"
        consul = shutil.which("consul")
        assert consul, "consul is missing (make deps)"
        self.proc = subprocess.Popen(
            [consul, "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
             "-http-port", str(http_port), "-dns-port", "-1", "-grpc-port", "-1",
             "-serf-lan-port", str(serf_lan), "-serf-wan-port", str(serf_wan),
             "-server-port", str(server), "-node", f"res-{http_port}",
             "-data-dir", str(tmp / "consul")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(self.leader, timeout=30, message="private consul agent leader")

    def leader(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.addr}/v1/status/leader", timeout=1) as r:
                return len(r.read()) > 4
        except OSError:
            return False

    def put(self, key: str, value: bytes) -> None:
        req = urllib.request.Request(f"http://{self.addr}/v1/kv/{key}", data=value,
                                     method="PUT")
        urllib.request.urlopen(req, timeout=5).read()

    def get_status(self, prefix: str, node: str) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(
                    f"http://{self.addr}/v1/kv/{prefix}nodes/{node}/status?raw", timeout=2) as r:
                doc: dict[str, Any] = json.loads(r.read())
                return doc
        except OSError:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.body  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path)
    yield a
    a.stop()


def _serve(body: bytes) -> tuple[ThreadingHTTPServer, int]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.body = body  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1]


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
        agent: Agent, tmp_path: Path, run_id: str,
        container_factory: ContainerFactory) -> None:
    prefix = f"res-{run_id}/"
    octet = 30 + (int(run_id, 16) + 7) % 90
    bridge = f"brr{run_id}"
    bind = _free_ports(1)[0]
    servers = [_serve(b"blue"), _serve(b"green")]
    try:
        agent.put(f"{prefix}networks/rnet", json.dumps(
            {"subnet": f"10.77.{octet}.0/24", "bridge": bridge, "driver": "linux",
             "gateway": f"10.77.{octet}.1"}).encode())
        agent.put(f"{prefix}containers/resme", json.dumps({"interfaces": [
            {"name": "eth3", "network": "rnet", "address": f"10.77.{octet}.9/24"}]}).encode())
        agent.put(f"{prefix}services/web/config",
                  json.dumps({"bind": f"127.0.0.1:{bind}"}).encode())
        agent.put(f"{prefix}services/web/active", b"blue")
        for pool, (_, port) in zip(("blue", "green"), servers, strict=True):
            agent.put(f"{prefix}services/web/pools/{pool}/m",
                      json.dumps({"address": "127.0.0.1", "port": port}).encode())
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
            os.killpg(agent.proc.pid, signal.SIGSTOP)  # Consul stops answering
            ctr.restart(timeout=0)  # needs a re-attach while Consul is away
            wait_for(lambda: container_pid(ctr) not in (0, old_pid), timeout=30,
                     message="container restarted")
            # Over a window well past the client timeouts, nothing is torn down and
            # HAProxy keeps serving the last good pool.
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:
                assert _get(bind) == "blue"
                assert daemon.alive()
            os.killpg(agent.proc.pid, signal.SIGCONT)

            # The restarted container has its address, and a new change applies.
            wait_for(lambda: netns_addrs(container_pid(ctr), "eth3") == [
                f"10.77.{octet}.9/24"], timeout=60, message="re-attached")
            agent.put(f"{prefix}services/web/active", b"green")
            wait_for(lambda: _get(bind) == "green", timeout=30, message="flip after resume")
            def status_says_green() -> bool:
                st = agent.get_status(prefix, node)
                return st is not None and st["proxy"].get("active") == {"web": "green"}

            wait_for(status_says_green, timeout=30, message="status reports green")
        finally:
            daemon.stop()
            subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)
            hp = daemon.state_dir / "haproxy.pid"
            if hp.exists():
                subprocess.run(["kill", hp.read_text().strip()], check=False)
    finally:
        for srv, _ in servers:
            srv.shutdown()
            srv.server_close()
