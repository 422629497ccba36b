"""Deployments as users run them (issue 10): the compose files, the daemon's image built on
the local debootstrap base, the containerised daemon attaching compose replicas and
serving a cutover, and the daemon process's SIGTERM (fast, nothing torn down) and HAProxy
hardening (workers not root, modes of the state directory, its files and sockets).

Everything made here is removed: compose projects, KV prefixes, the image's build
context; the image `reconciler:dev` and the base stay (the layer cache and
/var/cache/reconciler-base are what keeps the next run's build in seconds).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port, wait_for

from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings

from .daemon_helpers import REPO, DaemonProcess, free_subnet_octets, run

pytestmark = pytest.mark.integration

COMPOSE = REPO / "compose"
IMAGE = "reconciler:dev"
FIGURES: dict[str, str] = {}


def compose(project: str, file: str, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker-compose", "-p", project, "-f", str(COMPOSE / file), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)


def cli(prefix: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / ".venv/bin/reconciler"), "--prefix", prefix, *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def fetch(port: int) -> str | None:
    proc = run(["curl", "-s", "--max-time", "1", f"http://127.0.0.1:{port}/"], check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def state_file(path: Path, octet: int, bridge: str, port: int, iface: str = "eth1") -> Path:
    """The demo's state (compose/demo-state.yaml) on a subnet, bridge and port of this run."""
    text = (COMPOSE / "demo-state.yaml").read_text()
    text = (text.replace("10.77.250.", f"10.77.{octet}.").replace("br-demo", bridge)
            .replace("vlan: 250", f"vlan: {octet}").replace("127.0.0.1:18080",
                                                            f"127.0.0.1:{port}")
            .replace("name: eth1", f"name: {iface}"))
    path.write_text(text)
    return path


def teardown_prefix(prefix: str, node: str, state_dir: Path) -> None:
    """Delete the prefix, let one pass sweep what its daemon made, delete it again."""
    kv = ConsulKV(ConsulSettings.from_env())
    try:
        kv.delete(prefix, recurse=True)
        cli(prefix, "run", "--once", "--node", node, "--state-dir", str(state_dir),
            "--listen", "off")
        kv.delete(prefix, recurse=True)
    finally:
        kv.close()


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("name", ["demo.yml", "reconciler.yml", "stack.yml", "consul-dev.yml",
                                  "consul-cluster.yml"])
def test_compose_file_is_valid(name: str) -> None:
    proc = subprocess.run(["docker-compose", "-f", str(COMPOSE / name), "config", "-q"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_demo_state_file_is_valid() -> None:
    proc = cli("reconciler/", "validate", "-f", str(COMPOSE / "demo-state.yaml"))
    assert proc.returncode == 0, proc.stderr
    proc = cli("reconciler/", "validate", "-f", str(COMPOSE / "stack-state.yaml"))
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- image


@pytest.fixture(scope="module")
def image() -> str:
    """The daemon's image from the top-level Dockerfile on the local base (cached)."""
    t0 = time.monotonic()
    proc = run(["bash", str(REPO / "scripts/daemon-image.sh"), IMAGE], check=False,
               timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    FIGURES["image build (cached layers when unchanged)"] = f"{time.monotonic() - t0:.1f}s"
    return IMAGE


def test_image_runs_the_cli_and_has_haproxy_user(image: str) -> None:
    proc = run(["docker", "run", "--rm", "--net", "none", "--entrypoint", "sh", image, "-c",
                "reconciler --help >/dev/null && id -u haproxy && haproxy -v"], check=False)
    assert proc.returncode == 0, proc.stderr
    assert "HAProxy version" in proc.stdout
    assert proc.stdout.split()[0] != "0"


@pytest.fixture
def deployment(tmp_path: Path, image: str) -> Iterator[dict[str, str]]:
    """compose/reconciler.yml (HAProxy + daemon containers) with a prefix, state
    directory and node of this test, and the desired state of compose/demo-state.yaml on a
    free subnet and port."""
    tag = secrets.token_hex(3)
    octet = free_subnet_octets(1, seed=int(tag, 16) % 200)[0]
    port = free_port()
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    d = {"project": f"rcd{tag}", "prefix": f"test-deploy-{tag}/", "node": f"deploy-{tag}",
         "bridge": f"br-dp{tag}", "port": str(port), "state_dir": str(state_dir),
         "octet": str(octet)}
    env = {"RECONCILER_IMAGE": image, "RECONCILER_STATE_DIR": str(state_dir),
           "RECONCILER_PREFIX": d["prefix"], "RECONCILER_NODE": d["node"],
           "RECONCILER_LISTEN": "off"}
    app = f"{d['project']}app"
    try:
        proc = cli(d["prefix"], "apply", "-f",
                   str(state_file(tmp_path / "state.yaml", octet, d["bridge"], port)))
        assert proc.returncode == 0, proc.stderr
        proc = compose(d["project"], "reconciler.yml", "up", "-d", env=env)
        assert proc.returncode == 0, proc.stderr
        yield {**d, "app": app, **env}
    finally:
        logs = compose(d["project"], "reconciler.yml", "logs", "--no-color", "--tail", "60",
                       env=env)
        print(logs.stdout[-6000:])
        compose(app, "demo.yml", "down", "-t", "1")
        compose(d["project"], "reconciler.yml", "down", "-t", "2", env=env)
        teardown_prefix(d["prefix"], d["node"], state_dir)
        with contextlib.suppress(FileNotFoundError):
            pid = int((state_dir / "haproxy.pid").read_text().split()[0])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)


def haproxy_users(project: str) -> dict[str, str]:
    """pid -> user of the HAProxy processes of the project's haproxy container."""
    proc = run(["docker", "top", f"{project}_haproxy_1", "-o", "pid,user,args"], check=False)
    return {ln.split()[0]: ln.split()[1] for ln in proc.stdout.splitlines()[1:]
            if "haproxy" in ln}


def test_containerised_daemon_attaches_publishes_and_cuts_over(
        deployment: dict[str, str]) -> None:
    d, port = deployment, int(deployment["port"])
    proc = compose(d["app"], "demo.yml", "up", "-d")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: (fetch(port) or "").startswith("blue "), timeout=90,
             message="blue replicas attached, published and served by HAProxy")
    # The second replica may be published a moment after the first (a loaded machine):
    # wait until both answer in turn.
    wait_for(lambda: len({fetch(port) for _ in range(8)} - {None}) == 2, timeout=60,
             interval=0.5, message="two blue replicas answer in turn")
    # Every replica got eth1 on the network with an address from its pool.
    for c in run(["docker", "ps", "-q", "--filter",
                  f"label=com.docker.compose.project={d['app']}"]).stdout.split():
        out = run(["docker", "exec", c, "ip", "-o", "-4", "addr", "show", "eth1"]).stdout
        assert f"10.77.{d['octet']}." in out, out
    proc = cli(d["prefix"], "cutover", "web", "--to", "green", "--timeout", "30")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_for(lambda: (fetch(port) or "").startswith("green "), timeout=10)
    users = haproxy_users(d["project"])
    assert "root" in users.values(), users  # the master
    assert any(u not in ("root", "0") for u in users.values()), \
        f"HAProxy workers run as root: {users}"
    # The daemon's container stopped: HAProxy (another container) and interfaces stay.
    t0 = time.monotonic()
    proc = compose(d["project"], "reconciler.yml", "stop", "-t", "10", "reconciler",
                   env={k: v for k, v in d.items() if k.isupper()})
    assert proc.returncode == 0, proc.stderr
    FIGURES["containerised daemon: docker-compose stop"] = f"{time.monotonic() - t0:.2f}s"
    assert time.monotonic() - t0 < 5
    assert all((fetch(port) or "").startswith("green ") for _ in range(4))
    proc = cli(d["prefix"], "cutover", "web", "--rollback", "--timeout", "3")
    assert proc.returncode == 1, "no daemon: the switch is made but not applied"


# --------------------------------------------------------------------------- process


@pytest.fixture
def process_daemon(tmp_path: Path) -> Iterator[tuple[DaemonProcess, int, int]]:
    tag = secrets.token_hex(3)
    octet = free_subnet_octets(1, seed=int(tag, 16) % 200 + 3)[0]
    port = free_port()
    prefix, node = f"test-sigterm-{tag}/", f"sigterm-{tag}"
    daemon = DaemonProcess(prefix, node, tmp_path, resync=5.0,
                           extra_env={"RECONCILER_LISTEN": "off"})
    name = f"sigterm-{tag}"
    try:
        proc = cli(prefix, "apply", "-f", str(state_file(tmp_path / "s.yaml", octet,
                                                         f"br-st{tag}", port)))
        assert proc.returncode == 0, proc.stderr
        run(["docker", "run", "-d", "--name", name, "--net", "none",
             "-l", "reconciler.name=demo-web", "-l", "reconciler.service=web",
             "-l", "reconciler.pool=blue", "-l", "reconciler.port=8080",
             "reconciler-test/busybox:latest", "sh", "-c",
             "mkdir -p /www && echo blue >/www/index.html && echo ok >/www/health "
             "&& exec httpd -f -p 8080 -h /www"])
        daemon.start()
        yield daemon, port, octet
    finally:
        daemon.stop()
        run(["docker", "rm", "-f", name], check=False)
        teardown_prefix(prefix, node, daemon.state_dir)
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int((daemon.state_dir / "haproxy.pid").read_text().split()[0])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)


def test_sigterm_exits_fast_and_leaves_networking_and_haproxy(
        process_daemon: tuple[DaemonProcess, int, int]) -> None:
    daemon, port, octet = process_daemon
    wait_for(lambda: fetch(port) == "blue", timeout=60, message="served through HAProxy")
    master = int((daemon.state_dir / "haproxy.pid").read_text().split()[0])
    addrs = run(["ip", "-o", "-4", "addr", "show"]).stdout
    assert f"10.77.{octet}.1/" in addrs
    assert daemon.proc is not None
    t0 = time.monotonic()
    daemon.proc.terminate()
    rc = daemon.proc.wait(10)
    took = time.monotonic() - t0
    FIGURES["daemon process SIGTERM -> exited"] = f"{took:.2f}s"
    daemon.stop()
    assert rc == 0
    assert took < 2.0, f"SIGTERM -> exit took {took:.2f}s"
    assert os.path.exists(f"/proc/{master}"), "HAProxy's master stopped with the daemon"
    assert all(fetch(port) == "blue" for _ in range(4))
    assert f"10.77.{octet}.1/" in run(["ip", "-o", "-4", "addr", "show"]).stdout


def test_haproxy_hardening_modes_and_worker_user(
        process_daemon: tuple[DaemonProcess, int, int]) -> None:
    daemon, port, _ = process_daemon
    wait_for(lambda: fetch(port) == "blue", timeout=60, message="served through HAProxy")
    sd = daemon.state_dir
    assert stat.S_IMODE(sd.stat().st_mode) == 0o700
    for p in sd.iterdir():
        mode = stat.S_IMODE(p.lstat().st_mode)
        if stat.S_ISSOCK(p.lstat().st_mode):
            assert mode == 0o600, f"{p.name}: {oct(mode)}"
        elif p.is_file() and not p.name.startswith("session-"):
            assert mode & 0o137 == 0, f"{p.name}: {oct(mode)} (at most 0640)"
    assert stat.S_IMODE((sd / "haproxy.cfg").stat().st_mode) == 0o600
    master = int((sd / "haproxy.pid").read_text().split()[0])
    children = run(["ps", "-o", "user=", "--ppid", str(master)]).stdout.split()
    assert children and all(u == "haproxy" for u in children), children
    assert run(["ps", "-o", "user=", "-p", str(master)]).stdout.strip() == "root"
    # SIGHUP: templates and settings read again, HAProxy reloaded only if bytes changed.
    assert daemon.proc is not None
    size = daemon.log_size()
    daemon.proc.send_signal(1)
    wait_for(lambda: "SIGHUP: settings and templates reloaded" in daemon.log_text(size),
             timeout=10)
    assert daemon.alive()
    assert fetch(port) == "blue"


def test_zz_figures() -> None:
    for k, v in FIGURES.items():
        print(f"{k}: {v}")
