"""`reconciler plan` and `run --dry-run` show this host's real actions and change nothing;
`run --once` applies them; a Linux-bridge network with a static address end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ContainerFactory, link_exists

from reconciler.adapters.netlink import host_veth_name

pytestmark = pytest.mark.integration


def _kv_delete_tree(prefix: str) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:8500/v1/kv/{prefix}?recurse=true",
                                 method="DELETE")
    urllib.request.urlopen(req, timeout=5).read()


@pytest.fixture
def env(run_id: str, tmp_path: Path, consul_addr: str) -> Iterator[dict[str, Any]]:
    prefix = f"rtplan-{run_id}/"
    octet = 30 + int(run_id, 16) % 90
    e: dict[str, Any] = {"prefix": prefix, "node": f"plan-{run_id}",
                         "state": str(tmp_path / "state"), "bridge": f"brp{run_id}",
                         "octet": octet, "tmp": tmp_path}
    yield e
    # Sweep what we attached (spec removed -> detach), then drop the prefix and bridge.
    _kv_delete_tree(prefix + "containers/")
    cli(e, "run", "--once")
    _kv_delete_tree(prefix)
    subprocess.run(["ip", "link", "del", str(e["bridge"])], capture_output=True, check=False)


def cli(e: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "reconciler", "--prefix", e["prefix"], *args]
    if args[0] in ("run", "plan"):
        cmd += ["--node", e["node"], "--state-dir", e["state"]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CONSUL_HTTP_ADDR": "127.0.0.1:8500"})


def test_plan_dry_run_then_apply(env: dict[str, Any],
                                 container_factory: ContainerFactory) -> None:
    o = env["octet"]
    state = env["tmp"] / "state.json"
    state.write_text(json.dumps({
        "networks": {"lnet": {"subnet": f"10.77.{o}.0/24", "bridge": env["bridge"],
                              "driver": "linux", "gateway": f"10.77.{o}.1"}},
        "containers": {"planme": {"interfaces": [
            {"name": "eth5", "network": "lnet", "address": f"10.77.{o}.20/24",
             "mtu": 1400}]}},
    }))
    assert cli(env, "apply", "-f", str(state)).returncode == 0
    ctr = container_factory(labels={"reconciler.name": "planme"})
    veth = host_veth_name(ctr.id, "eth5")

    plan = cli(env, "plan")
    assert plan.returncode == 0, plan.stderr
    assert f"create linux bridge {env['bridge']}" in plan.stdout
    assert f"eth5: attach 10.77.{o}.20/24 on lnet" in plan.stdout
    dry = cli(env, "run", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"eth5: attach 10.77.{o}.20/24 on lnet" in dry.stdout
    # Nothing was changed by either.
    assert not link_exists(env["bridge"]) and not link_exists(veth), dry.stdout

    once = cli(env, "run", "--once")
    assert once.returncode == 0, once.stderr
    assert link_exists(veth) and link_exists(env["bridge"]), once.stdout + once.stderr
    inside = ctr.exec_run(["ip", "-o", "addr", "show", "eth5"]).output.decode()
    link = ctr.exec_run(["ip", "-o", "link", "show", "eth5"]).output.decode()
    assert f"10.77.{o}.20/24" in inside and "mtu 1400" in link, (inside, link, once.stderr)
    ping = subprocess.run(["busybox", "ping", "-c1", "-W2", f"10.77.{o}.20"],
                          capture_output=True, text=True, check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr

    again = cli(env, "plan")
    assert "network (" in again.stdout and "no changes" in again.stdout, again.stdout

    # Drift: the host veth deleted by hand -> plan says repair, dry-run leaves it missing.
    subprocess.run(["ip", "link", "del", veth], check=True)
    drift = cli(env, "plan")
    assert "eth5: attach" in drift.stdout or "repair" in drift.stdout, drift.stdout
    assert not link_exists(veth)
    repaired = cli(env, "run", "--once")
    assert repaired.returncode == 0, repaired.stderr
    assert link_exists(veth), repaired.stdout + repaired.stderr


def _ovs(*args: str) -> str:
    return subprocess.run(["ovs-vsctl", *args], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


def test_plan_shows_a_hand_made_vlan_tag_change_and_run_once_repairs_it(
        env: dict[str, Any], container_factory: ContainerFactory) -> None:
    o = env["octet"]
    bridge = f"bro{env['node'][-6:]}"
    state = env["tmp"] / "state.json"
    state.write_text(json.dumps({
        "networks": {"onet": {"subnet": f"10.77.{o}.0/24", "bridge": bridge, "vlan": 101}},
        "containers": {"tagme": {"interfaces": [
            {"name": "eth1", "network": "onet", "address": f"10.77.{o}.21/24"}]}},
    }))
    assert cli(env, "apply", "-f", str(state)).returncode == 0
    ctr = container_factory(labels={"reconciler.name": "tagme"})
    port = host_veth_name(ctr.id, "eth1")
    try:
        once = cli(env, "run", "--once")
        assert once.returncode == 0, once.stderr
        assert _ovs("get", "port", port, "tag") == "101"
        clean = cli(env, "plan")
        assert "no changes" in clean.stdout, clean.stdout

        _ovs("set", "port", port, "tag=999")  # by hand
        drift = cli(env, "plan")
        assert f"{ctr.name} eth1: port {port} on {bridge} vlan 101 (vlan 999 -> 101)" \
            in drift.stdout, drift.stdout
        assert sum("network (" in line for line in drift.stdout.splitlines()) == 1, \
            drift.stdout  # the tag, and nothing the daemon would not do
        assert _ovs("get", "port", port, "tag") == "999"  # plan changed nothing

        repaired = cli(env, "run", "--once")
        assert repaired.returncode == 0, repaired.stderr
        assert _ovs("get", "port", port, "tag") == "101"
        assert "no changes" in cli(env, "plan").stdout
    finally:
        _kv_delete_tree(env["prefix"] + "containers/")
        cli(env, "run", "--once")
        subprocess.run(["ovs-vsctl", "--if-exists", "del-br", bridge], check=False,
                       capture_output=True)
