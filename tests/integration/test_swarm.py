"""compose/stack.yml on a single-node swarm (issue 10): `docker swarm init`, `docker stack
deploy`, the daemon and its HAProxy as `global` services (cap_add, no privileged, host
network), the app's replicated tasks attached on eth2 (swarm gave them eth0 on the
stack's overlay and eth1 on docker_gwbridge) and published as members, scaling up and
down with the members following, a cutover, then `docker stack rm`, `docker swarm leave
--force` and nothing left: services, networks, containers, KV keys, bridges.

A swarm left active by an earlier run is left first (it can only be a test's: nothing
else on this machine uses swarm mode); docker_gwbridge, which swarm creates and leaving
does not remove, is removed too.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port, wait_for

from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings

from .daemon_helpers import REPO, free_subnet_octets, run
from .test_deploy import cli, fetch, teardown_prefix

pytestmark = pytest.mark.integration

IMAGE = "reconciler:dev"


def docker(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0,
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)


def swarm_state() -> str:
    return docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip()


def leave_swarm() -> None:
    if swarm_state() != "inactive":
        proc = docker("swarm", "leave", "--force")
        assert proc.returncode == 0, proc.stderr
    # Swarm makes docker_gwbridge for its tasks and leaving keeps it; nothing else uses it.
    if docker("network", "inspect", "docker_gwbridge").returncode == 0:
        docker("network", "rm", "docker_gwbridge")


def task_containers(stack: str, service: str) -> dict[str, str]:
    """Running containers of a stack's service: id -> name."""
    out = docker("ps", "--filter", f"label=com.docker.swarm.service.name={stack}_{service}",
                 "--format", "{{.ID}} {{.Names}}").stdout
    return dict(ln.split() for ln in out.splitlines() if ln.strip())


def members(kv: ConsulKV, prefix: str, pool: str) -> set[str]:
    """The member names published under members/web/<pool>/."""
    snap = kv.read_prefix(f"{prefix}members/web/{pool}/")
    return {k.rsplit("/", 1)[1] for k in snap.items}


def members_are(kv: ConsulKV, prefix: str, stack: str, pool: str) -> bool:
    """The pool's members are exactly its running tasks (member keys end with the
    container's name)."""
    names = set(task_containers(stack, pool).values())
    got = members(kv, prefix, pool)
    return bool(names) and len(got) == len(names) and all(
        any(m.endswith(n) for m in got) for n in names)


@pytest.fixture(scope="module")
def image() -> str:
    """The daemon's image (scripts/daemon-image.sh: cached, seconds when unchanged)."""
    proc = run(["bash", str(REPO / "scripts/daemon-image.sh"), IMAGE], check=False,
               timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return IMAGE


@pytest.fixture
def stack(tmp_path: Path, image: str) -> Iterator[dict[str, str]]:
    tag = secrets.token_hex(3)
    octet = free_subnet_octets(1, seed=int(tag, 16) % 200 + 11)[0]
    port = free_port()
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    d = {"stack": f"rsw{tag}", "prefix": f"test-swarm-{tag}/", "node": f"swarm-{tag}",
         "bridge": f"br-sw{tag}", "port": str(port), "octet": str(octet),
         "state_dir": str(state_dir)}
    env = {"RECONCILER_IMAGE": image, "RECONCILER_STATE_DIR": str(state_dir),
           "RECONCILER_PREFIX": d["prefix"], "RECONCILER_NODE": d["node"],
           "RECONCILER_LISTEN": "off"}
    text = ((REPO / "compose/stack-state.yaml").read_text()
            .replace("10.77.251.", f"10.77.{octet}.").replace("br-stack", d["bridge"])
            .replace("vlan: 251", f"vlan: {octet}")
            .replace("127.0.0.1:18081", f"127.0.0.1:{port}"))
    (tmp_path / "stack-state.yaml").write_text(text)
    had_gwbridge = docker("network", "inspect", "docker_gwbridge").returncode == 0

    def cleanup() -> None:
        if swarm_state() == "active":
            docker("stack", "rm", d["stack"])
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not docker("ps", "-aq", "--filter",
                                            f"label=com.docker.stack.namespace={d['stack']}"
                                            ).stdout.strip()
                         and docker("network", "inspect", f"{d['stack']}_default"
                                    ).returncode != 0,
                         timeout=60, interval=0.3)
        leave_swarm()
        teardown_prefix(d["prefix"], d["node"], state_dir)

    d["cleanup_ok"] = ""
    try:
        leave_swarm()  # an earlier run's swarm, if any
        proc = docker("swarm", "init", "--advertise-addr", "127.0.0.1")
        assert proc.returncode == 0, proc.stderr
        proc = cli(d["prefix"], "apply", "-f", str(tmp_path / "stack-state.yaml"))
        assert proc.returncode == 0, proc.stderr
        yield {**d, **env, "had_gwbridge": "1" if had_gwbridge else ""}
    finally:
        if swarm_state() == "active":
            logs = docker("service", "logs", "--tail", "40", f"{d['stack']}_reconciler")
            print(logs.stdout[-5000:], logs.stderr[-2000:])
        cleanup()


def test_swarm_stack_attaches_publishes_scales_cuts_over_and_leaves_nothing(
        stack: dict[str, str]) -> None:
    d, port, name = stack, int(stack["port"]), stack["stack"]
    env = {k: v for k, v in d.items() if k.isupper()}
    t0 = time.monotonic()
    times: dict[str, float] = {}
    proc = docker("stack", "deploy", "-c", str(REPO / "compose/stack.yml"), name, env=env)
    assert proc.returncode == 0, proc.stderr

    # The daemon runs as a global service task, with capabilities and not privileged.
    daemon_id = wait_for(lambda: next(iter(task_containers(name, "reconciler")), None),
                         timeout=60, message="the daemon's task running")
    host = json.loads(docker("inspect", daemon_id).stdout)[0]["HostConfig"]
    assert host["Privileged"] is False
    assert {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"} <= set(host["CapAdd"] or []), host["CapAdd"]
    assert host["NetworkMode"] == "host"

    # Blue served through the stack's HAProxy; every app task has eth2 on the network.
    wait_for(lambda: (fetch(port) or "").startswith("blue "), timeout=120, interval=0.2,
             message="blue tasks attached, published and served")
    times["deploy -> blue served"] = time.monotonic() - t0
    # The second task may be published a moment after the first: wait for both in turn.
    wait_for(lambda: len({fetch(port) for _ in range(8)} - {None}) == 2, timeout=60,
             interval=0.5, message="two blue tasks answer in turn")
    apps = {**task_containers(name, "blue"), **task_containers(name, "green")}
    assert len(apps) == 4, apps
    for cid in apps:
        links = run(["docker", "exec", cid, "ip", "-o", "-4", "addr"]).stdout
        eth2 = [ln for ln in links.splitlines() if " eth2 " in ln]
        assert eth2 and f"10.77.{d['octet']}." in eth2[0], links
        assert " eth0 " in links and " eth1 " in links, "swarm's own interfaces stay"

    kv = ConsulKV(ConsulSettings.from_env())
    try:
        wait_for(lambda: members_are(kv, d["prefix"], name, "blue")
                 and members_are(kv, d["prefix"], name, "green"), timeout=30,
                 message="two members per pool")
        # Scale up and down: the members follow the tasks.
        t1 = time.monotonic()
        assert docker("service", "scale", "-d", f"{name}_green=3").returncode == 0
        wait_for(lambda: len(task_containers(name, "green")) == 3
                 and members_are(kv, d["prefix"], name, "green"), timeout=90, interval=0.2,
                 message="three green members")
        times["scale green 2 -> 3, members follow"] = time.monotonic() - t1
        proc = cli(d["prefix"], "cutover", "web", "--to", "green", "--timeout", "30")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        wait_for(lambda: (fetch(port) or "").startswith("green "), timeout=10)
        wait_for(lambda: len({fetch(port) for _ in range(9)} - {None}) == 3, timeout=60,
                 interval=0.5, message="three green tasks answer")  # once health-checked
        t1 = time.monotonic()
        assert docker("service", "scale", "-d", f"{name}_green=1").returncode == 0
        wait_for(lambda: len(task_containers(name, "green")) == 1
                 and members_are(kv, d["prefix"], name, "green"), timeout=90, interval=0.2,
                 message="one green member")
        times["scale green 3 -> 1, members follow"] = time.monotonic() - t1
        # HAProxy follows the members: every answer comes from the remaining green task.
        last = next(iter(task_containers(name, "green")))
        wait_for(lambda: {fetch(port) for _ in range(4)} == {f"green {last}"}, timeout=20,
                 message="HAProxy serving only the remaining green task")

        # Down: stack rm, swarm leave, the prefix swept; then nothing is left.
        t1 = time.monotonic()
        assert docker("stack", "rm", name).returncode == 0
        wait_for(lambda: not docker("ps", "-aq", "--filter",
                                    f"label=com.docker.stack.namespace={name}").stdout.strip()
                 and docker("network", "inspect", f"{name}_default").returncode != 0,
                 timeout=60, interval=0.3, message="the stack's containers and network gone")
        leave_swarm()
        teardown_prefix(d["prefix"], d["node"], Path(d["state_dir"]))
        times["stack rm + swarm leave + sweep"] = time.monotonic() - t1
        assert swarm_state() == "inactive"
        assert not docker("ps", "-aq", "--filter",
                          f"label=com.docker.stack.namespace={name}").stdout.strip()
        nets = docker("network", "ls", "--format", "{{.Name}}").stdout.split()
        assert not [n for n in nets if n.startswith(name) or n in ("ingress",
                                                                     "docker_gwbridge")], nets
        assert not kv.read_prefix(d["prefix"]).items
        assert run(["ip", "link", "show", d["bridge"]], check=False).returncode != 0
        assert d["bridge"] not in run(["ovs-vsctl", "list-br"]).stdout.split()
        assert fetch(port) is None, "the stack's HAProxy stopped with it"
    finally:
        kv.close()
    times["total"] = time.monotonic() - t0
    for k, v in times.items():
        print(f"swarm: {k}: {v:.1f}s")
    assert times["total"] < 300
