"""The multi-host lab (`scripts/lab`, issue 8): it comes up and goes down twice in a row
leaving nothing behind, and while up each host has its own Docker engine, Open vSwitch,
Consul agent (one cluster) and reconciler daemon, and the hosts reach each other over
the underlay and nothing else.

Owns the module fixture `fresh_lab`: a lab brought up from nothing (an earlier lab is
taken down first, and brought back up at the end, so a session-wide `lab` fixture of
another module survives this module), and `up_lab`: that lab, checked up before each
test (`up` returns at once when it is), so the tests do not depend on their order.
"""

from __future__ import annotations

import itertools
import secrets
import subprocess
import time
from collections.abc import Iterator

import pytest
from lab import Lab, leftovers

pytestmark = pytest.mark.integration

HOSTS = 3
IMAGE = "reconciler-test/busybox:latest"


def assert_nothing_left() -> None:
    left = leftovers()
    assert not left, "the lab left behind:\n" + "\n".join(left)


@pytest.fixture(scope="module")
def fresh_lab() -> Iterator[Lab]:
    prior = Lab.recorded_hosts()
    lab = Lab(hosts=HOSTS)
    lab.down()
    assert_nothing_left()
    started = time.monotonic()
    lab.up()
    print(f"lab up ({HOSTS} hosts) in {time.monotonic() - started:.1f} s")
    try:
        yield lab
    finally:
        started = time.monotonic()
        lab.down()
        print(f"lab down in {time.monotonic() - started:.1f} s")
        try:
            assert_nothing_left()
        finally:
            if prior is not None:
                Lab(hosts=prior).up()


@pytest.fixture
def up_lab(fresh_lab: Lab) -> Lab:
    fresh_lab.up()
    return fresh_lab


def test_status_reports_every_host_up(up_lab: Lab) -> None:
    st = up_lab.status()
    assert st.returncode == 0, st.stdout + st.stderr
    for name in up_lab.names:
        assert f"{name}  netns lab-{name} up, eth0 {up_lab.address(name)}/24" in st.stdout
    assert "DOWN" not in st.stdout


def test_each_host_has_its_own_docker_engine(up_lab: Lab) -> None:
    ids = {}
    for name in up_lab.names:
        info = up_lab.docker(name, "info", "--format", "{{.ID}} {{.DockerRootDir}}")
        engine_id, root = info.stdout.split()
        assert root == f"/var/lib/lab/{name}/docker"
        ids[name] = engine_id
        run = up_lab.docker(name, "run", "--rm", "--net", "none", IMAGE, "true", check=False)
        assert run.returncode == 0, f"{name}: {run.stderr}"
    root_id = subprocess.run(["docker", "info", "--format", "{{.ID}}"], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert len(set(ids.values()) | {root_id}) == len(ids) + 1, ids


def test_each_host_has_its_own_ovs(up_lab: Lab) -> None:
    br = f"labt{secrets.token_hex(3)}"
    first, *others = up_lab.names
    up_lab.ovs_vsctl(first, "add-br", br, "--", "set", "bridge", br, "datapath_type=netdev")
    try:
        assert br in up_lab.ovs_vsctl(first, "list-br").stdout.split()
        for name in others:
            assert br not in up_lab.ovs_vsctl(name, "list-br").stdout.split(), name
        # The host's OVSDB from the root namespace too, and not the system's OVS.
        rundir = str(up_lab.ovs_rundir(first))
        assert subprocess.run(["ovs-vsctl", f"--db=unix:{rundir}/db.sock", "br-exists", br],
                              check=False).returncode == 0
        assert subprocess.run(["ovs-vsctl", "br-exists", br], check=False).returncode == 2
        # The bridge's port is a tap device in that host's namespace only.
        link = up_lab.exec(first, "ip", "link", "show", "dev", br)
        assert link.returncode == 0, link.stderr
        assert up_lab.exec(others[0], "ip", "link", "show", "dev", br).returncode != 0
    finally:
        up_lab.ovs_vsctl(first, "--if-exists", "del-br", br)


def test_consul_cluster_has_every_host_and_one_leader(up_lab: Lab) -> None:
    leaders = {up_lab.consul_get(name, "/v1/status/leader") for name in up_lab.names}
    assert len(leaders) == 1 and "" not in leaders, leaders
    members = up_lab.consul_get(up_lab.names[0], "/v1/agent/members")
    alive = sorted(m["Name"] for m in members if m["Status"] == 1)
    assert alive == up_lab.names
    assert len(up_lab.consul_get(up_lab.names[0], "/v1/status/peers")) == min(HOSTS, 3)
    # The consul CLI inside a host reaches its own agent on 127.0.0.1:8500.
    out = up_lab.exec(up_lab.names[-1], "consul", "members", check=True).stdout
    assert out.count(" alive ") == HOSTS


def test_hosts_reach_each_other_over_the_underlay(up_lab: Lab) -> None:
    for src, dst in itertools.permutations(up_lab.names, 2):
        ping = up_lab.exec(src, "busybox", "ping", "-c", "1", "-W", "2", up_lab.address(dst))
        assert ping.returncode == 0, f"{src} -> {dst}: {ping.stdout}{ping.stderr}"
    # (nsenter --net keeps the root namespace's /sys: ask netlink, not /sys/class/net.)
    link = up_lab.exec(up_lab.names[0], "ip", "-o", "link", "show", "dev", "eth0")
    assert " mtu 1500 " in link.stdout, link.stdout


def test_the_underlay_has_no_route_out(up_lab: Lab) -> None:
    for name in up_lab.names:
        route = up_lab.exec(name, "ip", "route", "get", "8.8.8.8")
        assert route.returncode != 0, f"{name}: {route.stdout}"
        assert up_lab.exec(name, "ip", "route", "show", "default").stdout.strip() == ""


def test_each_host_runs_its_reconciler_daemon(up_lab: Lab) -> None:
    pids = {name: up_lab.daemon_pid(name) for name in up_lab.names}
    assert all(pids.values()), pids
    assert len(set(pids.values())) == HOSTS
    out = up_lab.exec(up_lab.names[0], "reconciler", "status", check=True).stdout
    for name in up_lab.names:
        assert any(line.split()[:2] == [name, up_lab.address(name)]
                   for line in out.splitlines()), out


def test_stop_and_start_one_daemon(up_lab: Lab) -> None:
    name = up_lab.names[-1]
    up_lab.stop_daemon(name)
    assert up_lab.daemon_pid(name) is None
    st = up_lab.status()
    assert st.returncode == 0 and "stopped" in st.stdout, st.stdout
    up_lab.start_daemon(name)
    assert up_lab.daemon_pid(name) is not None


def test_second_cycle_up_down_leaves_nothing(up_lab: Lab) -> None:
    lab = up_lab
    started = time.monotonic()
    lab.down()
    assert_nothing_left()
    lab.up()
    up_s = time.monotonic() - started
    assert lab.status().returncode == 0
    again = time.monotonic()
    assert "already up" in lab.up().stdout
    assert time.monotonic() - again < 10
    lab.down()
    assert_nothing_left()
    lab.down()  # idempotent
    print(f"second cycle: down+up {up_s:.1f} s, total {time.monotonic() - started:.1f} s")
