"""Smoke tests: the services `make services` provides really work.

Owns nothing of the product; checks Docker (a `--net none` container from the local
image), Open vSwitch (a bridge with this machine's datapath type), HAProxy's config
check, and a Consul KV round trip over HTTP.
"""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import ContainerFactory, link_exists, ovs_vsctl, wait_for

pytestmark = pytest.mark.integration


def test_container_has_only_loopback(container_factory: ContainerFactory, run_id: str) -> None:
    container = container_factory(labels={"reconciler-test.smoke": run_id})
    code, out = container.exec_run(["ip", "-o", "link", "show"])
    assert code == 0, out
    names = [line.split(":")[1].strip().split("@")[0] for line in out.decode().splitlines()]
    assert names == ["lo"]
    code, out = container.exec_run(["sh", "-c", "which httpd nc ping sleep"])
    assert code == 0, out
    container.remove(force=True)
    container_id = container.id

    def gone() -> bool:
        import docker.errors

        try:
            container.client.containers.get(container_id)
        except docker.errors.NotFound:
            return True
        return False

    wait_for(gone, timeout=30, message="container removal")


def test_ovs_bridge_create_delete(ovs_datapath: str, run_id: str) -> None:
    bridge = f"rtsm{run_id}"
    ovs_vsctl("--may-exist", "add-br", bridge, "--", "set", "bridge", bridge,
              f"datapath_type={ovs_datapath}")
    try:
        assert bridge in ovs_vsctl("list-br").stdout.split()
        assert ovs_vsctl("get", "bridge", bridge, "datapath_type").stdout.strip().strip(
            '"') == ovs_datapath
        wait_for(lambda: link_exists(bridge), timeout=10, message=f"{bridge} device")
    finally:
        ovs_vsctl("--if-exists", "del-br", bridge)
    assert bridge not in ovs_vsctl("list-br").stdout.split()
    wait_for(lambda: not link_exists(bridge), timeout=10, message=f"{bridge} device removal")


HAPROXY_OK = """\
global
    maxconn 100
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend fe
    bind 127.0.0.1:18999
    default_backend be
backend be
    server s1 127.0.0.1:18998 check
"""


def haproxy_check(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30
    )


def test_haproxy_config_check(tmp_path: Path) -> None:
    good = tmp_path / "good.cfg"
    good.write_text(HAPROXY_OK)
    ok = haproxy_check(good)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    bad = tmp_path / "bad.cfg"
    bad.write_text(HAPROXY_OK.replace("default_backend be", "default_backend nosuchbackend"))
    broken = haproxy_check(bad)
    assert broken.returncode != 0
    assert "nosuchbackend" in broken.stdout + broken.stderr


def consul_kv(addr: str, key: str, method: str = "GET", data: bytes | None = None) -> Any:
    req = urllib.request.Request(f"http://{addr}/v1/kv/{key}", data=data, method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read().decode() or "null")


def test_consul_kv_roundtrip(consul_addr: str, run_id: str) -> None:
    key = f"reconciler-test/{run_id}/smoke"
    value = json.dumps({"run": run_id, "n": 1}).encode()
    try:
        assert consul_kv(consul_addr, key, "PUT", value) is True
        entries = consul_kv(consul_addr, key)
        assert len(entries) == 1
        assert base64.b64decode(entries[0]["Value"]) == value
    finally:
        consul_kv(consul_addr, key, "DELETE")
    with pytest.raises(urllib.error.HTTPError) as err:
        consul_kv(consul_addr, key)
    assert err.value.code == 404
