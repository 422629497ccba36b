"""End-to-end tests of the daemon's HAProxy side: blue-green flips, cutover, failures.

Owns the tests of `reconciler run` driving a real HAProxy from Consul KV (members put
by hand, backed by tiny HTTP servers in threads on 127.0.0.1, or published by the daemon
for labelled containers on an OVS network), of `reconciler cutover` against it, and the
helpers they need (`Env`: the module's shared daemon, a daemon_helpers.DaemonProcess run
with `--templates`, and its prefix, node, state dir and helpers.HttpBackends).

One daemon serves the whole module (its prefix, node, state dir and bind ports are
unique to the run); the tests that need it restart it. Teardown stops the daemon AND
its HAProxy master (pid file in the state dir), removes the prefix and the OVS bridge.
Adapter-level HAProxy behaviour is in test_haproxy.py; rendering in unit/test_render.py.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import secrets
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    HttpBackend,
    HttpBackends,
    KeepAliveLoad,
    free_port,
    haproxy_runtime_map,
    haproxy_servers,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

from reconciler import cli
from reconciler.adapters import consul_kv
from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings, KVItem
from reconciler.adapters.haproxy import HaproxyProcess, ProcInfo
from reconciler.cutover import Cutover
from reconciler.errors import CasConflict, HaproxyError
from reconciler.members import member_name
from reconciler.proxy.render import DEFAULT_TEMPLATES_DIR, MAIN_TEMPLATE
from reconciler.proxy.view import backend_name

from .daemon_helpers import (
    DaemonProcess,
    container_pid,
    free_subnet_octets,
    log_during,
    netns_addrs,
    run,
)

pytestmark = pytest.mark.integration

FIGURES: dict[str, str] = {}
"""Measurements printed at the end of the module (run pytest with -s to see them)."""


# --------------------------------------------------------------------------- environment


@dataclass
class Env:
    rid: str
    prefix: str
    node: str
    kv: ConsulKV
    workdir: Path
    state_dir: Path
    port: int
    """web's bind port on 127.0.0.1."""
    daemon: DaemonProcess
    backends: HttpBackends
    hap: HaproxyProcess
    """The adapter on the daemon's state dir, for inspection through the master socket."""
    good_templates: Path
    blue: HttpBackend
    """b1, web's blue member."""
    green: HttpBackend
    """g1, web's green member."""

    # -- KV
    def put(self, rel: str, value: Any) -> None:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        assert self.kv.put(self.prefix + rel, raw)

    def delete(self, rel: str) -> None:
        self.kv.delete(self.prefix + rel)

    def status(self) -> dict[str, Any]:
        item = self.kv.get(f"{self.prefix}nodes/{self.node}/status")
        if item is None:
            return {}
        doc: dict[str, Any] = json.loads(item.value)
        return doc

    def errors(self) -> dict[str, list[str]]:
        errs: dict[str, list[str]] = self.status().get("errors") or {}
        return errs

    # -- HAProxy
    def config(self) -> bytes:
        return (self.state_dir / "haproxy.cfg").read_bytes()

    def proc_info(self) -> ProcInfo:
        return self.hap.show_proc()

    def runtime_backend(self, service: str = "web") -> str | None:
        return haproxy_runtime_map(self.hap).get(service)

    def fetch(self, port: int | None = None) -> str:
        """One request on a new connection; the body's first word (the pool)."""
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=5)
        try:
            conn.request("GET", "/")
            resp = conn.getresponse()
            body = resp.read().decode()
            if resp.status != 200:
                return f"HTTP {resp.status}"
            return body.split()[0] if body.split() else ""
        finally:
            conn.close()

    def serves(self, pool: str, port: int | None = None) -> bool:
        try:
            return self.fetch(port) == pool
        except OSError:
            return False

    def set_active(self, pool: str) -> None:
        """Put `active` and wait until the daemon applied it and new requests go there."""
        self.put("services/web/active", pool.encode())
        wait_for(lambda: self.runtime_backend() == backend_name("web", pool), timeout=15,
                 ignore=(HaproxyError,), message=f"web's map entry -> {pool}")
        wait_for(lambda: self.serves(pool), timeout=10, message=f"web serving {pool}")
        wait_for(lambda: (self.status().get("proxy") or {}).get("active", {}).get("web")
                 == pool, timeout=10, message=f"status reporting web={pool}")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.daemon.cli(*args, timeout=60.0)

    def wait_ready(self, since: float = 0.0) -> None:
        """The daemon published a status after `since` with the proxy applied."""
        def ready() -> bool:
            st = self.status()
            return (float(st.get("updated") or 0) > since
                    and bool((st.get("proxy") or {}).get("config_hash")))
        wait_for(ready, timeout=30, message="the daemon's status with the proxy applied")


@pytest.fixture(scope="module")
def env(consul_addr: str, ovs_datapath: str, docker_client: Any,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    rid = secrets.token_hex(3)
    prefix, node = f"rtp-{rid}/", f"rtpnode-{rid}"
    workdir = tmp_path_factory.mktemp(f"daemon-proxy-{rid}")
    good = workdir / "tpl-good"  # empty: the project's templates
    good.mkdir()
    kv = ConsulKV(ConsulSettings.from_env())
    backends = HttpBackends()
    daemon = DaemonProcess(prefix, node, workdir, resync=5.0,
                           extra_env={"RECONCILER_OVS_DATAPATH": ovs_datapath})
    state_dir = daemon.state_dir
    state_dir.mkdir()
    blue, green = backends.start("blue b1\n"), backends.start("green g1\n")
    e = Env(rid, prefix, node, kv, workdir, state_dir, free_port(), daemon, backends,
            HaproxyProcess(state_dir), good, blue, green)
    try:
        e.put("services/web/config", {"bind": f"127.0.0.1:{e.port}", "mode": "http",
                                      "balance": "roundrobin",
                                      "health": {"path": "/health", "interval_ms": 500}})
        e.put("services/web/active", b"blue")
        e.put("services/web/pools/blue/b1", {"address": "127.0.0.1", "port": blue.port})
        e.put("services/web/pools/green/g1", {"address": "127.0.0.1", "port": green.port})
        t0 = time.monotonic()
        daemon.start(good)
        wait_for(lambda: e.serves("blue"), timeout=30, message="web serving blue")
        FIGURES["daemon start to first request served"] = f"{time.monotonic() - t0:.2f}s"
        e.wait_ready()
        yield e
    finally:
        rc = daemon.stop()
        if rc not in (0, None):
            print(f"daemon exited {rc}:\n{daemon.log_text()[-4000:]}")
        HaproxyProcess(state_dir).stop()  # the master from the pid file, and its workers
        session = (state_dir / f"session-{node}")
        if session.exists():
            with contextlib.suppress(Exception):
                kv.session_destroy(session.read_text().strip())
        kv.delete(prefix, recurse=True)
        backends.close()
        kv.close()
        if FIGURES:
            print("\n----- figures (test_daemon_proxy):")
            for k, v in FIGURES.items():
                print(f"  {k}: {v}")


@pytest.fixture(autouse=True)
def _daemon_log_on_failure(env: Env) -> Iterator[None]:
    """Print what the daemon logged during the test: pytest shows it when the test fails."""
    yield from log_during(env.daemon)


# --------------------------------------------------------------------------- 1. raw flip


def test_kv_flip_moves_new_requests_without_reload(env: Env) -> None:
    env.set_active("blue")
    before, cfg = env.proc_info(), env.config()
    t0 = time.monotonic()
    env.put("services/web/active", b"green")
    wait_for(lambda: env.serves("green"), timeout=10, interval=0.005,
             message="first request answered by green")
    latency = time.monotonic() - t0
    FIGURES["KV put active -> first request on green"] = f"{latency * 1000:.0f} ms"
    assert [env.fetch() for _ in range(20)] == ["green"] * 20
    after = env.proc_info()
    assert after.master_pid == before.master_pid
    assert after.reloads == before.reloads, "a flip must not reload HAProxy"
    assert {w.pid for w in after.workers} == {w.pid for w in before.workers}
    assert env.config() == cfg, "the config bytes must not change on a flip"
    wait_for(lambda: (env.status().get("proxy") or {}).get("active") == {"web": "green"},
             timeout=10, message="status proxy.active web=green")
    assert env.status()["proxy"]["reloads"] == before.reloads
    # The map file is persisted too, so a later reload keeps green.
    assert "web be_web:green" in (env.state_dir / "active.map").read_text()


# --------------------------------------------------------------------------- 2. cutover


def _audit(env: Env) -> list[dict[str, Any]]:
    snap = env.kv.read_prefix(f"{env.prefix}audit/web/", consistent=True)
    return [json.loads(snap.items[k].value) for k in sorted(snap.items)]


def test_cutover_cli_then_rollback(env: Env) -> None:
    env.set_active("blue")
    audits = len(_audit(env))
    t0 = time.monotonic()
    proc = env.cli("cutover", "web", "--to", "green", "--timeout", "20")
    FIGURES["`reconciler cutover` wall time (incl. interpreter start)"] = \
        f"{time.monotonic() - t0:.2f}s"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "green/g1: healthy (HTTP 200)" in proc.stdout
    assert "web: switched blue -> green" in proc.stdout
    assert f"{env.node}: applied green" in proc.stdout
    assert "every live node serves green" in proc.stdout
    assert [env.fetch() for _ in range(10)] == ["green"] * 10
    records = _audit(env)
    assert len(records) == audits + 1
    assert records[-1]["from"] == "blue" and records[-1]["to"] == "green"
    assert records[-1]["outcome"] == "ok" and records[-1]["rollback"] is False

    proc = env.cli("cutover", "web", "--rollback", "--timeout", "20")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "web: switched green -> blue" in proc.stdout
    assert [env.fetch() for _ in range(10)] == ["blue"] * 10
    item = env.kv.get(f"{env.prefix}services/web/active")
    assert item is not None and item.value == b"blue"
    records = _audit(env)
    assert records[-1]["from"] == "green" and records[-1]["to"] == "blue"
    assert records[-1]["rollback"] is True


# --------------------------------------------------------------------------- 3. health gate


def test_cutover_refused_by_health_gate_min_healthy_allows(env: Env) -> None:
    env.set_active("blue")
    sick = env.backends.start("green gsick\n", health=500)
    active_key = f"{env.prefix}services/web/active"
    try:
        env.put("services/web/pools/green/gsick", {"address": "127.0.0.1", "port": sick.port})
        index = env.kv.get(active_key).modify_index  # type: ignore[union-attr]

        proc = env.cli("cutover", "web", "--to", "green", "--timeout", "10")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "green/gsick: UNHEALTHY (HTTP 500)" in proc.stdout
        assert "refused" in proc.stderr and "1 healthy of 2" in proc.stderr
        item = env.kv.get(active_key)
        assert item is not None and item.value == b"blue" and item.modify_index == index

        # Not listening at all: refused too, with the connection error as the reason.
        env.put("services/web/pools/green/gsick", {"address": "127.0.0.1",
                                                   "port": free_port()})
        proc = env.cli("cutover", "web", "--to", "green", "--timeout", "10")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "green/gsick: UNHEALTHY (Connection refused)" in proc.stdout
        assert env.kv.get(active_key).modify_index == index  # type: ignore[union-attr]
        assert env.serves("blue")

        # One healthy of two is enough with --min-healthy 1.
        proc = env.cli("cutover", "web", "--to", "green", "--min-healthy", "1",
                       "--timeout", "20")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "web: switched blue -> green" in proc.stdout
        item = env.kv.get(active_key)
        assert item is not None and item.value == b"green"
        wait_for(lambda: env.serves("green"), timeout=10, message="web serving green")
    finally:
        env.delete("services/web/pools/green/gsick")
        env.backends.stop(sick)
        env.set_active("blue")
        wait_for(lambda: b"gsick" not in env.config(), timeout=15,
                 message="gsick gone from the config")


# --------------------------------------------------------------------------- 4. CAS


class _RacingKV:
    """A ConsulKV whose check-and-set write of `key` is preceded, once, by another
    writer's unconditional put of `value`: the race between read and write, made
    deterministic."""

    def __init__(self, kv: ConsulKV, key: str, value: bytes) -> None:
        self.kv, self.key, self.value = kv, key, value
        self.interloper_index: int | None = None

    def put(self, key: str, value: bytes, *, cas: int | None = None, **kw: Any) -> bool:
        if key == self.key and cas is not None and self.interloper_index is None:
            assert self.kv.put(key, self.value)
            self.interloper_index = self.kv.get(key).modify_index  # type: ignore[union-attr]
        return self.kv.put(key, value, cas=cas, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kv, name)


def test_cutover_cas_conflict_overwrites_nothing(env: Env,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Its own prefix with no daemon: the race is between two writers of `active` only.
    prefix = f"rtpcas-{env.rid}/"
    kv = env.kv
    blue, green = env.blue, env.green
    active_key = f"{prefix}services/web/active"

    def seed() -> None:
        kv.put(f"{prefix}services/web/config",
               json.dumps({"bind": "127.0.0.1:1", "health": {"path": "/health"}}).encode())
        kv.put(active_key, b"blue")
        for pool, srv in (("blue", blue), ("green", green), ("canary", green)):
            kv.put(f"{prefix}services/web/pools/{pool}/m1",
                   json.dumps({"address": "127.0.0.1", "port": srv.port}).encode())

    try:
        seed()
        racing = _RacingKV(kv, active_key, b"canary")
        lines: list[str] = []
        with pytest.raises(CasConflict, match="changed while cutting over"):
            Cutover(racing, prefix, out=lines.append).run("web", "green", timeout=5)
        item = kv.get(active_key)
        assert item is not None and item.value == b"canary", "the other writer's value stays"
        assert item.modify_index == racing.interloper_index, "nothing written after it"
        assert not kv.read_prefix(f"{prefix}audit/").items, "no audit record of a failed cutover"
        assert not any("switched" in ln for ln in lines)

        # Through the CLI: exit 1, one line on stderr, no traceback.
        kv.put(active_key, b"blue")
        clients: list[_RacingKV] = []

        def racing_client(settings: ConsulSettings) -> _RacingKV:
            clients.append(_RacingKV(ConsulKV(settings), active_key, b"canary"))
            return clients[-1]

        monkeypatch.setattr(consul_kv, "ConsulKV", racing_client)
        capsys.readouterr()
        rc = cli.main(["--prefix", prefix, "cutover", "web", "--to", "green", "--timeout", "5"])
        out = capsys.readouterr()
        assert rc == 1
        assert "changed while cutting over" in out.err and "Traceback" not in out.err
        assert "switched" not in out.out
        item = kv.get(active_key)
        assert item is not None and item.value == b"canary"
        assert item.modify_index == clients[0].interloper_index
    finally:
        kv.delete(prefix, recurse=True)


# --------------------------------------------------------------------------- 5. templates


def test_broken_template_keeps_last_good_config(env: Env) -> None:
    env.set_active("blue")
    bad = env.workdir / "tpl-bad"
    bad.mkdir(exist_ok=True)
    # Renders fine (Jinja), but HAProxy refuses it: `haproxy -c` must stop it.
    (bad / MAIN_TEMPLATE).write_text(
        (DEFAULT_TEMPLATES_DIR / MAIN_TEMPLATE).read_text()
        + "\nglobal\n    no-such-keyword-{{ services|length }}\n")
    good_cfg, before = env.config(), env.proc_info()
    extra = env.backends.start("blue b9\n")
    try:
        env.daemon.stop()
        since = time.time()
        env.daemon.start(bad)
        # A member added while the bad templates are in use: a re-render is due.
        env.put("services/web/pools/blue/b9", {"address": "127.0.0.1", "port": extra.port})

        def refused() -> list[str] | None:
            st = env.status()
            if float(st.get("updated") or 0) <= since:
                return None
            msgs = (st.get("errors") or {}).get("haproxy") or []
            return msgs if any("haproxy -c refused" in m for m in msgs) else None

        msgs = wait_for(refused, timeout=30, message="status error for the refused config")
        assert any("no-such-keyword" in m for m in msgs), msgs
        assert env.config() == good_cfg, "a config that failed validation was written"
        after = env.proc_info()
        assert after.master_pid == before.master_pid
        assert after.reloads == before.reloads and after.failed_reloads == before.failed_reloads
        assert [env.fetch() for _ in range(5)] == ["blue"] * 5
        # The daemon retries the refused config with backoff, and a retry holds a temp
        # file while `haproxy -c` runs: between retries none may be left behind.
        wait_for(lambda: not list(env.state_dir.glob(".haproxy.cfg.tmp*")), timeout=10,
                 message="no temp config file left behind between retries")

        # A template Jinja cannot even parse (one part overridden): reported, nothing
        # written either.
        broken = env.workdir / "tpl-jinja"
        (broken / "haproxy").mkdir(parents=True, exist_ok=True)
        (broken / "haproxy" / "backend.j2").write_text("backend {% if %}\n")
        env.daemon.stop()
        since = time.time()
        env.daemon.start(broken)

        def template_error() -> list[str] | None:
            st = env.status()
            if float(st.get("updated") or 0) <= since:
                return None
            msgs: list[str] = (st.get("errors") or {}).get("templates") or []
            return msgs or None

        msgs = wait_for(template_error, timeout=30, message="status error for the template")
        assert any("rendering haproxy.cfg.j2 failed" in m for m in msgs), msgs
        assert env.config() == good_cfg
        assert env.proc_info().reloads == before.reloads
        assert env.serves("blue")
    finally:
        env.daemon.stop()
        since = time.time()
        env.daemon.start(env.good_templates)
    # Good templates again: the pending member goes in, the error goes away.
    wait_for(lambda: b"server b9 " in env.config(), timeout=30,
             message="b9 rendered with the good templates")
    wait_for(lambda: float(env.status().get("updated") or 0) > since
             and "haproxy" not in env.errors(), timeout=15, message="the error cleared")
    assert b"no-such-keyword" not in env.config()
    env.delete("services/web/pools/blue/b9")
    wait_for(lambda: b"server b9 " not in env.config(), timeout=15, message="b9 removed")
    env.backends.stop(extra)


def test_template_escaping_the_sandbox_is_refused_last_good_config_stays(env: Env) -> None:
    """A user template reaching for Python internals (the classic Jinja escape to `os`)
    is refused with a clear error naming the unsafe attribute; it runs nothing, and
    HAProxy keeps the last good config."""
    env.set_active("blue")
    evil = env.workdir / "tpl-escape"
    evil.mkdir(exist_ok=True)
    marker = env.workdir / f"escaped-{secrets.token_hex(3)}"
    (evil / MAIN_TEMPLATE).write_text(
        (DEFAULT_TEMPLATES_DIR / MAIN_TEMPLATE).read_text()
        + "\n# {{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}\n")
    good_cfg, before = env.config(), env.proc_info()
    try:
        env.daemon.stop()
        since = time.time()
        env.daemon.start(evil)

        def template_error() -> list[str] | None:
            st = env.status()
            if float(st.get("updated") or 0) <= since:
                return None
            msgs: list[str] = (st.get("errors") or {}).get("templates") or []
            return msgs or None

        msgs = wait_for(template_error, timeout=30, message="status error for the template")
        assert any("rendering haproxy.cfg.j2 failed" in m and "unsafe" in m
                   and "__init__" in m for m in msgs), msgs
        assert not marker.exists(), "the template ran a shell command"
        assert env.config() == good_cfg
        assert env.proc_info().reloads == before.reloads
        assert env.serves("blue")
        assert env.daemon.alive()
    finally:
        env.daemon.stop()
        since = time.time()
        env.daemon.start(env.good_templates)
    wait_for(lambda: float(env.status().get("updated") or 0) > since
             and "templates" not in env.errors(), timeout=30, message="the error cleared")


# --------------------------------------------------------------------------- 6. reload fails


def test_reload_failure_reverted_old_services_keep_serving(env: Env) -> None:
    env.set_active("blue")
    good_cfg, before = env.config(), env.proc_info()
    port2 = free_port()
    try:
        with KeepAliveLoad(env.port) as load:
            # Passes `haproxy -c` (it binds nothing), fails at reload: no such address.
            env.put("services/web2/config", {"bind": f"198.18.255.1:{port2}", "mode": "http"})

            def reported() -> list[str] | None:
                # The failure is attributed to the service that cannot load; it is held
                # out (never loaded), and everything else keeps being applied.
                msgs = env.errors().get(f"{env.prefix}services/web2/config") or []
                return msgs if any("198.18.255.1" in m for m in msgs) else None

            msgs = wait_for(reported, timeout=30, message="status error for the failed reload")
            after = env.proc_info()
            wait_for(lambda: load.requests > 20, timeout=10, message="load requests")
        assert any("restored and reloaded the last good config" in m for m in msgs), msgs
        assert after.master_pid == before.master_pid
        # Detected through the master's failed-reload counter (HAProxy resets it at the
        # next good reload, so the message is the evidence), then reverted: a second reload.
        assert any("failed to load the new config" in m and "cannot bind" in m
                   for m in msgs), msgs
        assert after.reloads >= before.reloads + 2
        assert env.config() == good_cfg, "the last good config was put back"
        assert b"fe_web2" not in env.config()
        assert load.failures == [], load.failures
        assert set(load.ok) == {"blue"}
        assert [env.fetch() for _ in range(5)] == ["blue"] * 5
        FIGURES["requests during the failed reload + revert"] = \
            f"{load.requests}, {len(load.failures)} failed"
    finally:
        env.delete("services/web2/config")
    wait_for(lambda: "haproxy" not in env.errors(), timeout=30,
             message="the error cleared once web2 is gone")
    assert env.serves("blue")


# --------------------------------------------------------------------------- 7/8 containers


@dataclass
class NetEnv:
    network: str
    bridge: str
    subnet: ipaddress.IPv4Network
    port: int
    """webc's bind port."""
    containers: dict[str, Any]
    """pool -> container."""
    started: float
    """time.monotonic() when the containers were started."""

    def member_key(self, env: Env, pool: str) -> str:
        name = member_name(env.node, self.containers[pool].name)
        return f"{env.prefix}members/webc/{pool}/{name}"


@pytest.fixture(scope="module")
def net_env(env: Env, docker_client: Any, test_image: str) -> Iterator[NetEnv]:
    import docker.errors

    octet = free_subnet_octets(1, int(env.rid, 16) + 3)[0]
    network, bridge, spec = f"rtpn-{env.rid}", f"rtpb{env.rid}", f"rtpc-{env.rid}"
    subnet = ipaddress.IPv4Network(f"10.77.{octet}.0/24")
    port = free_port()
    created: list[Any] = []
    try:
        env.put(f"networks/{network}", {
            "subnet": str(subnet), "bridge": bridge, "driver": "ovs", "vlan": 300 + octet,
            "gateway": f"10.77.{octet}.1", "mtu": 1450,
            "pool": {"start": f"10.77.{octet}.100", "end": f"10.77.{octet}.199"}})
        env.put(f"containers/{spec}", {"interfaces": [
            {"name": "eth1", "network": network, "address": "auto", "gateway": True}]})
        env.put("services/webc/config", {"bind": f"127.0.0.1:{port}", "mode": "http",
                                         "health": {"path": "/health", "interval_ms": 500}})
        env.put("services/webc/active", b"blue")
        containers: dict[str, Any] = {}
        started = time.monotonic()
        for pool in ("blue", "green"):
            name = f"rtp-{env.rid}-{pool}"
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.containers.get(name).remove(force=True)
            c = docker_client.containers.run(
                test_image, name=name, detach=True, network_mode="none",
                labels={"reconciler-test.run": env.rid, "reconciler.name": spec,
                        "reconciler.service": "webc", "reconciler.pool": pool,
                        "reconciler.port": "8080", "reconciler.network": network},
                command=["sh", "-c", f"mkdir -p /www && echo '{pool} {name}' >/www/index.html"
                         " && echo ok >/www/health && exec httpd -f -p 8080 -h /www"])
            created.append(c)
            containers[pool] = c
        yield NetEnv(network, bridge, subnet, port, containers, started)
    finally:
        for c in created:
            with contextlib.suppress(docker.errors.NotFound):
                c.remove(force=True)
        for rel in (f"containers/{spec}", "services/webc/config", "services/webc/active"):
            env.delete(rel)
        with contextlib.suppress(Exception):
            wait_for(lambda: not env.kv.read_prefix(f"{env.prefix}services/webc/").items,
                     timeout=15, message="webc members withdrawn")
        env.delete(f"networks/{network}")
        run(["ovs-vsctl", "--timeout=10", "--if-exists", "del-br", bridge], check=False)


def test_members_published_from_labels_and_withdrawn_on_stop(env: Env, net_env: NetEnv) -> None:
    items = {}
    for pool in ("blue", "green"):
        key = net_env.member_key(env, pool)
        items[pool] = wait_for(lambda k=key: env.kv.get(k), timeout=40,  # type: ignore[misc]
                               message=f"{pool} member published")
    FIGURES["docker run (2 containers) -> both members published"] = \
        f"{time.monotonic() - net_env.started:.2f}s"
    status_item = env.kv.get(f"{env.prefix}nodes/{env.node}/status")
    assert status_item is not None and status_item.session
    for pool, item in items.items():
        c = net_env.containers[pool]
        value = json.loads(item.value)
        addrs = netns_addrs(container_pid(c), "eth1")
        assert addrs and len(addrs) == 1
        assert value == {"address": addrs[0].split("/")[0], "port": 8080, "weight": 100}
        assert ipaddress.IPv4Address(value["address"]) in net_env.subnet
        assert item.session == status_item.session, "held by the node's session"
    # End to end: HAProxy on the host reaches the container through the bridge's gateway.
    wait_for(lambda: env.serves("blue", net_env.port), timeout=30,
             message="webc serving the blue container")

    green_key = net_env.member_key(env, "green")
    net_env.containers["green"].stop(timeout=2)
    t0 = time.monotonic()
    wait_for(lambda: env.kv.get(green_key) is None, timeout=20,
             message="green member withdrawn after docker stop")
    FIGURES["docker stop returned -> member key removed"] = f"{time.monotonic() - t0:.2f}s"
    assert env.kv.get(net_env.member_key(env, "blue")) is not None


@dataclass
class Restart:
    """What was seen across one SIGTERM + start of the daemon (the `restart` fixture)."""

    key: str
    """The blue container's member key, watched throughout."""
    first: KVItem
    seen: list[tuple[float, int | None, str | None]]
    """(time, CreateIndex or None when absent, session) of every poll of `key`."""
    answers: dict[str, int]
    """What webc answered (its pool, or the error) to a request after every poll."""
    before: ProcInfo
    after: ProcInfo
    log: str
    """What the daemon logged from the SIGTERM on."""


@pytest.fixture(scope="module")
def restart(env: Env, net_env: NetEnv) -> Restart:
    """SIGTERM the daemon and start it again (same node and state dir) while polling the
    blue member's key every ~10 ms from another thread."""
    key = net_env.member_key(env, "blue")
    first = wait_for(lambda: env.kv.get(key), timeout=40, message="blue member published")
    wait_for(lambda: env.serves("blue", net_env.port), timeout=30, message="webc serving")
    before = env.proc_info()
    seen: list[tuple[float, int | None, str | None]] = []
    answers: dict[str, int] = {}
    stop = threading.Event()

    def watch() -> None:
        kv = ConsulKV(ConsulSettings.from_env())
        try:
            while not stop.is_set():
                item = kv.get(key)
                seen.append((time.monotonic(), item.create_index if item else None,
                             item.session if item else None))
                try:
                    answer = env.fetch(net_env.port)
                except OSError as exc:
                    answer = repr(exc)
                answers[answer] = answers.get(answer, 0) + 1
                stop.wait(0.01)
        finally:
            kv.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        wait_for(lambda: len(seen) > 3, timeout=5, message="the watcher running")
        log_start = env.daemon.log_size()
        t0 = time.monotonic()
        assert env.daemon.stop() == 0
        FIGURES["daemon SIGTERM -> exited"] = f"{time.monotonic() - t0:.2f}s"
        since = time.time()
        t1 = time.monotonic()
        env.daemon.start(env.good_templates)

        def restarted() -> bool:
            st = env.status()
            return (float(st.get("updated") or 0) > since
                    and bool((st.get("proxy") or {}).get("config_hash"))
                    and (st.get("counts") or {}).get("containers", 0) >= 1)

        wait_for(restarted, timeout=30, message="the restarted daemon's status")
        FIGURES["daemon start -> status with proxy and container applied"] = \
            f"{time.monotonic() - t1:.2f}s"
        # Past the restart the key must still be the same one: watch a little longer.
        mark = len(seen)
        wait_for(lambda: len(seen) > mark + 10, timeout=5, message="more observations")
    finally:
        stop.set()
        watcher.join(5)
    return Restart(key, first, seen, answers, before, env.proc_info(),
                   env.daemon.log_text(log_start))


def test_daemon_restart_adopts_haproxy(env: Env, net_env: NetEnv, restart: Restart) -> None:
    assert restart.after.master_pid == restart.before.master_pid, "adopted, not restarted"
    assert env.serves("blue")
    wait_for(lambda: env.serves("blue", net_env.port), timeout=15, message="webc serving")


def test_daemon_restart_keeps_member_keys(restart: Restart) -> None:
    created = sorted({str(ci) for _, ci, _ in restart.seen})
    assert all(ci == restart.first.create_index for _, ci, _ in restart.seen), \
        f"the member key disappeared or was re-created (CreateIndex seen: {created})"
    assert {s for _, _, s in restart.seen} == {restart.first.session}
    assert "withdrew" not in restart.log, restart.log[-3000:]
    # So webc (a published member only) served throughout the restart...
    assert restart.answers.keys() == {"blue"}, restart.answers
    # ...and, nothing having changed, at most one reload (the flapping caused two).
    assert restart.after.reloads <= restart.before.reloads + 1


# --------------------------------------------------------------------------- 9. load


def _reloads_metric(env: Env) -> float:
    """The daemon's reloads counter (every result) from its /metrics."""
    with urllib.request.urlopen(env.daemon.url("/metrics"), timeout=5) as resp:
        body = resp.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(body)
               for s in fam.samples if s.name == "reconciler_haproxy_reloads_total")


def test_no_failed_request_during_flips_and_member_changes(env: Env) -> None:
    env.set_active("blue")
    before = env.proc_info()
    reloads_metric = _reloads_metric(env)
    extra = env.backends.start("blue b2\n", host="127.0.97.2")
    t0 = time.monotonic()
    flip_times: list[float] = []
    try:
        with KeepAliveLoad(env.port) as load:
            for i in range(10):
                pool = "green" if i % 2 == 0 else "blue"
                t = time.monotonic()
                env.put("services/web/active", pool.encode())
                want = backend_name("web", pool)
                wait_for(lambda: env.runtime_backend() == want,  # noqa: B023 - used at once
                         timeout=10, interval=0.005, ignore=(HaproxyError,),
                         message=f"flip {i} to {pool}")
                flip_times.append(time.monotonic() - t)
                if i == 3:  # a member added while the load runs: a dynamic server
                    env.put("services/web/pools/blue/b2",
                            {"address": "127.0.97.2", "port": extra.port})
                    wait_for(lambda: b"server b2 " in env.config() and (
                        "be_web:blue", "b2") in haproxy_servers(env.hap), timeout=15,
                             message="b2 added (runtime and file)")
                if i == 6:  # and removed again
                    env.delete("services/web/pools/blue/b2")
                    wait_for(lambda: b"server b2 " not in env.config() and (
                        "be_web:blue", "b2") not in haproxy_servers(env.hap), timeout=15,
                             message="b2 removed (runtime and file)")
            remaining = 2.0 - (time.monotonic() - t0)
            if remaining > 0:
                wait_for(lambda: time.monotonic() - t0 >= 2.0, timeout=remaining + 1)
        after = env.proc_info()
    finally:
        env.delete("services/web/pools/blue/b2")
        env.backends.stop(extra)
    assert load.failures == [], f"{len(load.failures)} failed of {load.requests}: " \
        f"{load.failures[:5]}"
    assert load.requests >= 50, load.requests
    assert set(load.ok) == {"blue", "green"}, load.ok
    # Neither the flips nor the member changes reloaded HAProxy: same worker throughout.
    assert (after.reloads, after.failed_reloads) == (before.reloads, before.failed_reloads)
    assert after.current_worker == before.current_worker
    assert after.master_pid == before.master_pid
    assert _reloads_metric(env) == reloads_metric
    FIGURES["load during 10 flips + a member added and removed"] = (
        f"{load.requests} keep-alive requests, {len(load.failures)} failed, "
        f"{load.ok}, reloads {after.reloads - before.reloads}")
    FIGURES["flip (KV put -> runtime map switched)"] = (
        f"median {sorted(flip_times)[len(flip_times) // 2] * 1000:.0f} ms, "
        f"max {max(flip_times) * 1000:.0f} ms")
    env.set_active("blue")


# --------------------------------------------------------------------------- 10. injection


def test_injection_attempts_rejected_config_unchanged(env: Env) -> None:
    env.set_active("blue")
    good_cfg, before = env.config(), env.proc_info()
    blue_port = env.blue.port
    evil = "services/web/pools/blue/evil"
    bad_member = "services/web/pools/blue/ev!l"
    bad_pool = "services/web/pools/bl ue/m1"
    try:
        env.put(evil, {"address": "127.0.0.1\n    server evil 1.2.3.4:80", "port": 80})
        env.put(bad_member, {"address": "127.0.0.1", "port": blue_port})
        env.put(bad_pool, {"address": "127.0.0.1", "port": blue_port})
        keys = [env.prefix + k for k in (evil, bad_member, bad_pool)]
        errors = wait_for(lambda: (lambda e: e if all(k in e for k in keys) else None)(
            env.errors()), timeout=15, message="status errors naming the three keys")
        assert any("address" in m for m in errors[keys[0]]), errors[keys[0]]
        assert any("invalid name" in m for m in errors[keys[1]]), errors[keys[1]]
        assert any("invalid name" in m for m in errors[keys[2]]), errors[keys[2]]
        # A flip after them: the reconcile that applies it necessarily saw them (it
        # reads the whole latest state), so from here on nothing of them reached HAProxy.
        env.set_active("green")
        assert env.config() == good_cfg
        cfg = env.config().decode()
        assert "1.2.3.4" not in cfg and "evil" not in cfg and "ev!l" not in cfg
        after = env.proc_info()
        assert after.reloads == before.reloads
        servers = {sv for (_, sv) in haproxy_servers(env.hap)}
        assert not {"evil", "ev!l"} & servers, servers
        assert [env.fetch() for _ in range(5)] == ["green"] * 5
        # The CLI shows the same, naming the key.
        proc = env.cli("status")
        assert proc.returncode == 0 and keys[0] in proc.stdout, proc.stdout
    finally:
        for k in (evil, bad_member, bad_pool):
            env.delete(k)
        env.set_active("blue")
    wait_for(lambda: not any(k.startswith(f"{env.prefix}services/web/pools")
                             for k in env.errors()), timeout=15, message="errors cleared")
