"""The Consul examples in compose/ run: a single dev agent, and three servers that elect
a leader, each serving the KV API on the published port.

No registry is reachable here, so the image is made from this machine's own `consul`
binary on the local base image (scripts/base-image.sh, cached per machine); the compose
files take any image whose entrypoint is consul (CONSUL_IMAGE).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import free_ports, wait_for

from .daemon_helpers import REPO, free_subnet_octets, run

pytestmark = pytest.mark.integration

COMPOSE = REPO / "compose"
IMAGE = "reconciler-test/consul:local"


@pytest.fixture(scope="module")
def consul_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    base = run([str(REPO / "scripts" / "base-image.sh")], timeout=900).stdout.strip()
    ctx: Path = tmp_path_factory.mktemp("consul-image")
    binary = shutil.which("consul")
    assert binary, "consul missing (make deps)"
    shutil.copy2(binary, ctx / "consul")
    (ctx / "Dockerfile").write_text(
        f"FROM {base}\nCOPY consul /usr/bin/consul\nRUN mkdir -p /consul/data\n"
        'ENTRYPOINT ["/usr/bin/consul"]\n')
    # No docker0 here: RUN steps use the host network (as scripts/daemon-image.sh does).
    run(["docker", "build", "--network", "host", "-q", "-t", IMAGE, str(ctx)], timeout=600)
    return IMAGE


def _compose(argv: list[str], env: dict[str, str], *args: str, timeout: float = 180.0
             ) -> None:
    proc = subprocess.run([*argv, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
        return json.loads(r.read() or b"null")


def _kv_roundtrip(port: int) -> None:
    value = secrets.token_hex(4).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/kv/rt/compose", data=value,
                                 method="PUT")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.read().strip() == b"true"
    got = _get(port, "/v1/kv/rt/compose")
    assert base64.b64decode(got[0]["Value"]) == value


@pytest.fixture
def compose(consul_image: str) -> Iterator[list[tuple[list[str], dict[str, str]]]]:
    """Projects to bring down at the end: (compose argv prefix, environment)."""
    up: list[tuple[list[str], dict[str, str]]] = []
    yield up
    for argv, env in up:
        subprocess.run([*argv, "down", "-v", "--remove-orphans"], env=env,
                       capture_output=True, timeout=120, check=False)


def test_consul_dev_example_serves_kv(consul_image: str,
                                      compose: list[tuple[list[str], dict[str, str]]]
                                      ) -> None:
    http, serf, server = free_ports(3)
    env = {**os.environ, "CONSUL_IMAGE": consul_image, "CONSUL_HTTP_PORT": str(http),
           "CONSUL_SERF_PORT": str(serf), "CONSUL_SERVER_PORT": str(server)}
    argv = ["docker-compose", "-p", f"rtcd{secrets.token_hex(3)}", "-f",
            str(COMPOSE / "consul-dev.yml")]
    compose.append((argv, env))
    _compose(argv, env, "up", "-d")
    wait_for(lambda: _get(http, "/v1/status/leader"), timeout=60, interval=0.3,
             ignore=(OSError, urllib.error.URLError, ValueError), message="a leader")
    _kv_roundtrip(http)


def test_consul_cluster_example_elects_a_leader_of_three(
        consul_image: str, compose: list[tuple[list[str], dict[str, str]]]) -> None:
    (http,) = free_ports(1)
    octet = free_subnet_octets(1, secrets.randbelow(1000))[0]
    env = {**os.environ, "CONSUL_IMAGE": consul_image, "CONSUL_HTTP_PORT": str(http),
           "CONSUL_SUBNET": f"10.77.{octet}.0/24"}
    argv = ["docker-compose", "-p", f"rtcc{secrets.token_hex(3)}", "-f",
            str(COMPOSE / "consul-cluster.yml")]
    compose.append((argv, env))
    _compose(argv, env, "up", "-d")
    wait_for(lambda: _get(http, "/v1/status/leader"), timeout=90, interval=0.5,
             ignore=(OSError, urllib.error.URLError, ValueError), message="a leader")
    peers = wait_for(lambda: len(_get(http, "/v1/status/peers")) == 3, timeout=60,
                     interval=0.5, ignore=(OSError, urllib.error.URLError, ValueError),
                     message="three servers in the Raft configuration")
    assert peers
    _kv_roundtrip(http)
