"""End-to-end tests of issue 13 through `reconciler run` and a real HAProxy: shared
frontends routed by Host, TLS termination with SNI (certificates made here with
openssl), a broken certificate, access logs, the stats page and HAProxy's Prometheus
exporter, and progressive cutovers (share per step, automatic rollback).

Owns one daemon for the module, run with ``--haproxy-log stdout`` and
``--haproxy-stats`` (credentials in a file of the module's work directory), through
``RECONCILER_HAPROXY_*`` variables; its prefix, node, state dir and ports are unique to
the run. Backends are helpers.HttpBackend threads on 127.0.0.1; every request and every
health check stays on 127.0.0.1. Teardown stops the daemon and its HAProxy and removes
the prefix.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import secrets
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from helpers import HttpBackend, HttpBackends, KeepAliveLoad, free_ports, wait_for

from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings
from reconciler.adapters.haproxy import HaproxyProcess
from reconciler.errors import HaproxyError

from .daemon_helpers import DaemonProcess, log_during

pytestmark = pytest.mark.integration

FIGURES: dict[str, str] = {}
"""Measurements printed at the end of the module (pytest -s shows them)."""


@dataclass
class Env:
    prefix: str
    node: str
    kv: ConsulKV
    workdir: Path
    daemon: DaemonProcess
    backends: HttpBackends
    hap: HaproxyProcess
    shared_port: int
    stats_port: int
    auth: tuple[str, str]

    def put(self, rel: str, value: Any) -> None:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        assert self.kv.put(self.prefix + rel, raw)

    def status(self) -> dict[str, Any]:
        item = self.kv.get(f"{self.prefix}nodes/{self.node}/status")
        return json.loads(item.value) if item is not None else {}

    def errors(self) -> dict[str, list[str]]:
        errs: dict[str, list[str]] = self.status().get("errors") or {}
        return errs

    def config(self) -> str:
        return (self.daemon.state_dir / "haproxy.cfg").read_text()

    def applied(self, service: str, pool: str) -> bool:
        return bool((self.status().get("proxy") or {}).get("active", {}).get(service) == pool)

    def service(self, name: str, config: dict[str, Any], pools: dict[str, HttpBackend],
                active: str) -> None:
        self.put(f"services/{name}/config", config)
        for pool, srv in pools.items():
            self.put(f"services/{name}/pools/{pool}/m1",
                     {"address": "127.0.0.1", "port": srv.port})
        self.put(f"services/{name}/active", active.encode())

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return self.daemon.cli(*args, timeout=timeout)


def get(port: int, host: str | None = None, path: str = "/",
        auth: tuple[str, str] | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    headers = {"Host": host} if host else {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(
            f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def _serves(port: int, host: str, first_word: str) -> bool:
    return word(port, host) == first_word


def reloads_of(env: Env) -> int:
    """The master's reload counter (its socket is briefly away while it re-executes)."""
    return wait_for(env.hap.show_proc, ignore=(HaproxyError,), message="show proc").reloads


def word(port: int, host: str | None = None) -> str:
    try:
        code, body = get(port, host)
    except OSError:
        return "down"
    return body.split()[0] if code == 200 and body.split() else f"HTTP {code}"


@pytest.fixture(scope="module")
def env(consul_addr: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    rid = secrets.token_hex(3)
    prefix, node = f"rtf-{rid}/", f"rtfnode-{rid}"
    workdir = tmp_path_factory.mktemp(f"frontends-{rid}")
    auth = ("admin", secrets.token_urlsafe(12))
    auth_file = workdir / "stats-auth"
    auth_file.write_text(f"{auth[0]}:{auth[1]}\n")
    auth_file.chmod(0o600)
    shared_port, stats_port = free_ports(2)
    kv = ConsulKV(ConsulSettings.from_env())
    daemon = DaemonProcess(prefix, node, workdir, resync=5.0, extra_env={
        "RECONCILER_HAPROXY_LOG": "stdout",
        "RECONCILER_HAPROXY_STATS": f"127.0.0.1:{stats_port}",
        "RECONCILER_HAPROXY_STATS_AUTH": str(auth_file),
        "RECONCILER_LISTEN": "off"})
    daemon.state_dir.mkdir()
    e = Env(prefix, node, kv, workdir, daemon, HttpBackends(), HaproxyProcess(daemon.state_dir),
            shared_port, stats_port, auth)
    try:
        daemon.start()
        yield e
    finally:
        rc = daemon.stop()
        if rc not in (0, None):
            print(f"daemon exited {rc}:\n{daemon.log_text()[-4000:]}")
        HaproxyProcess(daemon.state_dir).stop()
        session = daemon.state_dir / f"session-{node}"
        if session.exists():
            with contextlib.suppress(Exception):
                kv.session_destroy(session.read_text().strip())
        kv.delete(prefix, recurse=True)
        e.backends.close()
        kv.close()
        if FIGURES:
            print("\n----- figures (test_haproxy_frontends):")
            for k, v in FIGURES.items():
                print(f"  {k}: {v}")


@pytest.fixture(autouse=True)
def _daemon_log_on_failure(env: Env) -> Iterator[None]:
    yield from log_during(env.daemon)


# --------------------------------------------------------------------------- shared bind


def test_two_services_on_one_bind_routed_by_host_each_flipped_under_load(env: Env) -> None:
    bind = f"127.0.0.1:{env.shared_port}"
    srv = {(s, p): env.backends.start(f"{s}-{p} {s}\n") for s in ("a", "b")
           for p in ("blue", "green")}
    for s in ("a", "b"):
        env.service(s, {"bind": bind, "hosts": [f"{s}.test"],
                        "health": {"path": "/health", "interval_ms": 300}},
                    {"blue": srv[(s, "blue")], "green": srv[(s, "green")]}, "blue")
    for s in ("a", "b"):
        wait_for(partial(_serves, env.shared_port, f"{s}.test", f"{s}-blue"), timeout=30,
                 message=f"{s}.test served by {s}'s blue pool")
    assert "frontend fe_bind:127.0.0.1:" in env.config()
    # curl, as a user would check it: the Host header picks the service.
    out = subprocess.run(["curl", "-s", "-H", "Host: b.test", f"http://{bind}/"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    assert out.startswith("b-blue")
    # A host nobody routes: no default service on this bind -> 503, not another service.
    assert word(env.shared_port, "nobody.test") == "HTTP 503"
    reloads = reloads_of(env)
    with KeepAliveLoad(env.shared_port, host="a.test") as la, \
            KeepAliveLoad(env.shared_port, host="b.test") as lb:
        wait_for(lambda: la.served > 50 and lb.served > 50, message="load running")
        env.put("services/a/active", b"green")
        wait_for(lambda: la.ok.get("a-green", 0) > 50, message="a on green")
        seen_b = dict(lb.ok)
        assert set(seen_b) == {"b-blue"}, seen_b  # b did not move with a
        env.put("services/b/active", b"green")
        wait_for(lambda: lb.ok.get("b-green", 0) > 50, message="b on green")
    assert la.failures == [] and lb.failures == [], (la.failures[:5], lb.failures[:5])
    assert set(la.ok) == {"a-blue", "a-green"} and set(lb.ok) == {"b-blue", "b-green"}
    assert reloads_of(env) == reloads, "flips on a shared bind must not reload"
    FIGURES["shared bind flips under load"] = (
        f"a {la.served} ok / {len(la.failures)} failed, b {lb.served} ok / "
        f"{len(lb.failures)} failed, 0 reloads")


def test_overlapping_hosts_on_one_bind_are_reported_naming_both_keys(env: Env) -> None:
    bind = f"127.0.0.1:{free_ports(1)[0]}"
    first = env.backends.start("o1 o1\n")
    env.service("o1", {"bind": bind, "hosts": ["o.test"]}, {"blue": first}, "blue")
    port = int(bind.rpartition(":")[2])
    wait_for(lambda: word(port, "o.test") == "o1", timeout=15, message="o1 served")
    env.put("services/o2/config", {"bind": bind, "hosts": ["www.test", "O.test"]})
    key = f"{env.prefix}services/o2/config"
    msgs = wait_for(lambda: env.errors().get(key), timeout=15,
                    message="overlap reported at o2's key")
    assert any("hosts: host 'o.test'" in m and f"{env.prefix}services/o1/config" in m
               for m in msgs), msgs
    assert word(port, "o.test") == "o1"  # the older claim keeps its route
    env.kv.delete(key)


# --------------------------------------------------------------------------- TLS


def _make_cert(d: Path, name: str) -> Path:
    pem = d / f"{name}.pem"
    key, crt = d / f"{name}.key.tmp", d / f"{name}.crt.tmp"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                    "-keyout", str(key), "-out", str(crt)],
                   check=True, capture_output=True, timeout=60)
    pem.write_bytes(crt.read_bytes() + key.read_bytes())
    key.unlink()
    crt.unlink()
    return pem


def _peer_cn(port: int, sni: str, ca: Path) -> str:
    ctx = ssl.create_default_context(cafile=str(ca))  # verifies the name too
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=sni) as tls:
        cert = tls.getpeercert()
        assert cert is not None
        subject: dict[str, str] = {}
        for rdn in cert["subject"]:
            for k, v in rdn:  # type: ignore[str-unpack]
                subject[str(k)] = str(v)
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
        assert answer.split(b"\r\n")[0].endswith(b" 200 OK"), answer[:100]
        return str(subject["commonName"])


def test_tls_sni_redirect_and_a_broken_certificate_keeps_the_last_good_config(env: Env
                                                                              ) -> None:
    certs = env.workdir / "certs"
    certs.mkdir()
    pem_a, pem_b = _make_cert(certs, "a.tls.test"), _make_cert(certs, "b.tls.test")
    ca_a, ca_b = env.workdir / "ca-a.pem", env.workdir / "ca-b.pem"
    ca_a.write_bytes(pem_a.read_bytes().split(b"-----BEGIN PRIVATE KEY")[0])
    ca_b.write_bytes(pem_b.read_bytes().split(b"-----BEGIN PRIVATE KEY")[0])
    tls_port, plain_port = free_ports(2)
    backend = env.backends.start("secure s1\n")
    env.service("sec", {"bind": f"127.0.0.1:{tls_port}",
                        "tls": {"certs": str(certs), "redirect_http": plain_port}},
                {"blue": backend}, "blue")
    wait_for(lambda: env.applied("sec", "blue"), timeout=30, message="sec applied")
    wait_for(lambda: _peer_cn(tls_port, "a.tls.test", ca_a) == "a.tls.test", timeout=15,
             ignore=(OSError,), message="TLS on sec's bind")
    assert _peer_cn(tls_port, "b.tls.test", ca_b) == "b.tls.test"  # SNI picks the other one
    code, _ = get(plain_port, "a.tls.test")
    assert code == 301
    conn = http.client.HTTPConnection("127.0.0.1", plain_port, timeout=5)
    conn.request("GET", "/x", headers={"Host": "a.tls.test"})
    assert (conn.getresponse().getheader("Location") or "").startswith("https://a.tls.test")
    conn.close()
    staged = [ln for ln in env.config().splitlines() if " ssl crt " in ln]
    assert staged and str(certs) not in staged[0], "HAProxy must load the validated copy"

    # Break one certificate, then change the service (a new member: a re-render is due).
    good_cfg = env.config()
    pem_b.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n"
                     "-----END CERTIFICATE-----\n")
    extra = env.backends.start("secure s2\n")
    env.put("services/sec/pools/blue/m2", {"address": "127.0.0.1", "port": extra.port})
    key = f"{env.prefix}services/sec/config"
    msgs = wait_for(lambda: env.errors().get(key), timeout=30,
                    message="the broken certificate reported at sec's key")
    assert any("tls.certs" in m and "b.tls.test.pem" in m and "last good" in m
               for m in msgs), msgs
    assert f":{extra.port}" not in env.config(), "sec must stay at its last good config"
    assert [ln for ln in env.config().splitlines() if " ssl crt " in ln] == staged
    assert good_cfg.count("ssl crt") == env.config().count("ssl crt")
    assert _peer_cn(tls_port, "b.tls.test", ca_b) == "b.tls.test"  # still served
    # Other services still change meanwhile.
    other = env.backends.start("plain p1\n")
    env.service("plain", {"bind": f"127.0.0.1:{free_ports(1)[0]}"}, {"blue": other}, "blue")
    wait_for(lambda: f":{other.port}" in env.config(), timeout=15,
             message="another service applied")
    # Fixed: applied, the error goes.
    _make_cert(certs, "b.tls.test")
    wait_for(lambda: f":{extra.port}" in env.config(), timeout=30,
             message="sec applied once its certificate is fixed")
    wait_for(lambda: key not in env.errors(), timeout=15, message="error cleared")


# --------------------------------------------------------------------------- logs, stats


def test_access_log_lines_appear_for_requests(env: Env) -> None:
    marker = f"/probe-{secrets.token_hex(4)}"
    code, _ = get(env.shared_port, "a.test", marker)
    assert code == 200
    log = env.daemon.state_dir / "haproxy.log"
    line = wait_for(lambda: next((ln for ln in log.read_text(errors="replace").splitlines()
                                  if marker in ln), None), timeout=10,
                    message="an access log line for the request")
    assert f"GET {marker} HTTP/1.1" in line and "fe_bind:" in line and " 200 " in line, line


def test_stats_and_metrics_need_credentials(env: Env) -> None:
    assert get(env.stats_port, path="/")[0] == 401
    assert get(env.stats_port, path="/metrics")[0] == 401
    assert get(env.stats_port, path="/metrics", auth=("admin", "wrong-password"))[0] == 401
    code, body = get(env.stats_port, path="/metrics", auth=env.auth)
    assert code == 200 and "haproxy_backend_http_responses_total" in body
    assert 'proxy="be_a:blue"' in body
    code, body = get(env.stats_port, path="/;csv", auth=env.auth)
    assert code == 200 and "be_a:green" in body
    assert env.auth[1] not in env.daemon.log_text(), "the password must not be logged"
    assert (env.daemon.state_dir / "haproxy.cfg").stat().st_mode & 0o077 == 0


# --------------------------------------------------------------------------- progressive


def _cutover(env: Env, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(env.daemon.command("cutover", *args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env.daemon.env)


def _applied_weight(env: Env, service: str) -> int:
    cut = (env.status().get("proxy") or {}).get("cutover") or {}
    return int((cut.get(service) or {}).get("weight") or 0)


def _weight_is(env: Env, service: str, weight: int) -> bool:
    return _applied_weight(env, service) == weight


def _share(port: int, n: int, green: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    hits = 0
    try:
        for _ in range(n):
            conn.request("GET", "/")
            resp = conn.getresponse()
            body = resp.read().decode()
            assert resp.status == 200, body
            hits += body.startswith(green)
    finally:
        conn.close()
    return 100.0 * hits / n


def test_progressive_cutover_moves_the_share_in_steps(env: Env) -> None:
    port = free_ports(1)[0]
    blue, green = env.backends.start("pblue p1\n"), env.backends.start("pgreen p2\n")
    env.service("prog", {"bind": f"127.0.0.1:{port}",
                         "health": {"path": "/health", "interval_ms": 300}},
                {"blue": blue, "green": green}, "blue")
    wait_for(lambda: word(port) == "pblue", timeout=30, message="prog on blue")
    reloads = reloads_of(env)
    proc = _cutover(env, "prog", "--to", "green", "--steps", "10,50,100", "--interval", "10s",
                    "--max-error-rate", "1%")
    shares = {}
    try:
        for step in (10, 50, 100):
            wait_for(partial(_weight_is, env, "prog", step), timeout=30,
                     message=f"step {step}% applied")
            shares[step] = _share(port, 1200, "pgreen")
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    for step, share in shares.items():
        assert abs(share - step) <= 5, (shares, out)
    FIGURES["progressive 10/50/100: measured share of green"] = ", ".join(
        f"{s}% -> {v:.1f}%" for s, v in shares.items())
    item = env.kv.get(f"{env.prefix}services/prog/active")
    assert item is not None and item.value == b"green"
    wait_for(lambda: _applied_weight(env, "prog") == 0 and env.applied("prog", "green"),
             timeout=15, message="share gone, green active")
    assert word(port) == "pgreen"
    assert reloads_of(env) == reloads, "a progressive cutover must not reload"
    audit = env.kv.read_prefix(f"{env.prefix}audit/prog/", consistent=True)
    records = [json.loads(audit.items[k].value) for k in sorted(audit.items)]
    assert [r.get("weight") for r in records if r["outcome"] == "step"] == [10, 50, 100]
    assert records[-1]["outcome"] == "ok" and records[-1]["to"] == "green"
    status = env.cli("status")
    assert "cutover prog: blue -> green: done" in status.stdout, status.stdout


def test_progressive_cutover_rolls_back_a_failing_pool_within_one_interval(env: Env) -> None:
    port = free_ports(1)[0]
    blue = env.backends.start("rblue r1\n")
    bad = env.backends.start("rgreen r2\n", status=500)  # healthy checks, failing requests
    env.service("roll", {"bind": f"127.0.0.1:{port}",
                         "health": {"path": "/health", "interval_ms": 300}},
                {"blue": blue, "green": bad}, "blue")
    wait_for(lambda: word(port) == "rblue", timeout=30, message="roll on blue")
    interval = 5.0
    with KeepAliveLoad(port, think=0.002) as load:
        wait_for(lambda: load.served > 50, message="load running")
        t0 = time.monotonic()
        proc = _cutover(env, "roll", "--to", "green", "--steps", "20,100", "--interval",
                        f"{interval:g}s", "--max-error-rate", "1%")
        wait_for(lambda: _applied_weight(env, "roll") == 20, timeout=30,
                 message="step 20% applied")
        t_applied = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        t_done = time.monotonic()
        wait_for(lambda: _applied_weight(env, "roll") == 0, timeout=10, message="share gone")
        after = load.served
        wait_for(lambda: load.served > after + 100, message="more requests after rollback")
        failures_after = len(load.failures)
        wait_for(lambda: load.served > after + 200, message="still more")
    assert proc.returncode == 1, out
    assert "ROLLED BACK at 20%" in out and "error rate" in out, out
    assert t_done - t_applied < interval, f"rollback took {t_done - t_applied:.2f}s"
    assert load.failures, "the bad pool answered some requests with 500 before rollback"
    assert all(f.startswith("HTTP 500: 'rgreen") for f in load.failures), load.failures[:5]
    assert len(load.failures) == failures_after, "no failure once rolled back"
    item = env.kv.get(f"{env.prefix}services/roll/active")
    assert item is not None and item.value == b"blue"
    audit = env.kv.read_prefix(f"{env.prefix}audit/roll/", consistent=True)
    last = json.loads(audit.items[sorted(audit.items)[-1]].value)
    assert last["outcome"] == "rolled_back" and last["rollback"] is True
    assert "error rate" in last["reason"], last
    status = env.cli("status").stdout
    assert "cutover roll: blue -> green: rolled_back (error rate" in status, status
    FIGURES["rollback of a pool answering 500"] = (
        f"{t_done - t_applied:.2f}s from step applied to rollback confirmed (interval "
        f"{interval:g}s), {len(load.failures)} failed of {load.requests} requests (all "
        f"answered by the bad pool), started {t_applied - t0:.2f}s after the command")
