"""TLS to Consul, and the ACL token's secrecy (issue 11, item 7), against a real agent.

The module makes its own CA with openssl (a CA, a server certificate for 127.0.0.1 and a
client certificate, plus a second, unrelated "rogue" CA) and starts its own `consul agent
-dev` (tests/consul_agents.py: own ports and data dir) serving HTTPS on a free port with
``verify_incoming_https`` (a client certificate is required) and default-deny ACLs; its
plain HTTP port is only for the test's own bookkeeping (leader, ACL bootstrap).

Checked: the adapter over HTTPS with CONSUL_CACERT and CONSUL_CLIENT_CERT/KEY; clear,
token-free errors without the CA, with the wrong CA, without a client certificate, or
speaking plain HTTP to the HTTPS port; CONSUL_HTTP_SSL_VERIFY=false (no CA needed, the
client certificate still is); `reconciler apply`/`status` and a daemon with HAProxy over
HTTPS with a least-privilege token, which never appears in the daemon's log (debug
level), any argv (/proc/PID/cmdline of the daemon and HAProxy), the status document,
any KV value, /metrics, the CLI's output or the state directory.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from consul_agents import ConsulAgent, acl_config
from helpers import HttpBackends, free_port, wait_for

from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings, TxnOp
from reconciler.errors import ConsulAuthError, ConsulError, ConsulUnavailable

from .daemon_helpers import REPO, DaemonProcess

pytestmark = pytest.mark.integration


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, f"openssl {' '.join(args)}: {proc.stderr}"


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _make_cert(d: Path, ca: str, name: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
             f"{name}.ext", cwd=d)


@dataclass(frozen=True)
class TlsAgent:
    agent: ConsulAgent
    https_port: int
    certs: Path
    master: str
    token: str
    prefix: str

    @property
    def https_addr(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    def env(self, *, ca: str | None = "ca", client: bool = True, token: bool = True,
            verify: str | None = None) -> dict[str, str]:
        """Consul's variables for a client of this agent."""
        env = {"CONSUL_HTTP_ADDR": self.https_addr}
        if ca is not None:
            env["CONSUL_CACERT"] = str(self.certs / f"{ca}.pem")
        if client:
            env["CONSUL_CLIENT_CERT"] = str(self.certs / "client.pem")
            env["CONSUL_CLIENT_KEY"] = str(self.certs / "client.key")
        if token:
            env["CONSUL_HTTP_TOKEN"] = self.token
        if verify is not None:
            env["CONSUL_HTTP_SSL_VERIFY"] = verify
        return env

    def kv(self, **kw: object) -> ConsulKV:
        return ConsulKV(ConsulSettings.from_env(self.env(**kw)))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tls_agent(run_id: str) -> Iterator[TlsAgent]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is missing (make deps)")
    workdir = Path(tempfile.mkdtemp(prefix=f"rt-tls-{run_id}-"))
    certs = workdir / "certs"
    certs.mkdir()
    _make_ca(certs, "ca")
    _make_ca(certs, "rogue")
    _make_cert(certs, "ca", "server", "subjectAltName=IP:127.0.0.1,DNS:localhost,"
               "DNS:server.dc1.consul\nextendedKeyUsage=serverAuth,clientAuth\n")
    _make_cert(certs, "ca", "client", "extendedKeyUsage=clientAuth\n")
    agent = ConsulAgent(workdir / "agent", f"rt-tls-{run_id}")
    # Distinct from the agent's own ports (free_port releases what it found: the agent's
    # HTTP port came out twice once, and Consul refused to start).
    https_port = next(p for p in iter(free_port, 0) if p not in agent.ports)
    master = str(uuid.uuid4())
    prefix = f"rt-tls-{run_id}/"
    agent.config = acl_config(master) + (
        f"ports {{ https = {https_port} }}\n"
        f'ca_file = "{certs}/ca.pem"\n'
        f'cert_file = "{certs}/server.pem"\n'
        f'key_file = "{certs}/server.key"\n'
        "verify_incoming_https = true\n"
        "verify_incoming_rpc = false\n"
        "verify_outgoing = false\n")
    try:
        agent.start()
        agent.wait_acl_bootstrapped(master)
        rules = (f'key_prefix "{prefix}" {{ policy = "write" }}\n'
                 'session_prefix "" { policy = "write" }\n')
        token = agent.create_token(master, f"rt-tls-{run_id}", rules, "reconciler TLS test")
        yield TlsAgent(agent, https_port, certs, master, token, prefix)
    finally:
        agent.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _assert_secret_free(text: str, *secrets: str) -> None:
    for s in secrets:
        assert s not in text, "the ACL token leaked"


def test_https_with_ca_and_client_certificate(tls_agent: TlsAgent) -> None:
    p = f"{tls_agent.prefix}adapter/"
    with tls_agent.kv() as kv:
        assert kv.settings.scheme == "https"
        assert kv.put(p + "one", b"1") is True
        kv.txn([TxnOp.set(f"{p}t/{i}", b"x") for i in range(70)])  # two chunks
        snap = kv.read_prefix(p)
        assert len(snap.items) == 71
        again = kv.read_prefix(p, index=snap.index, wait="1s")  # a blocking query
        assert again.index == snap.index
        sid = kv.session_create("rt-tls", ttl="10s", behavior="delete")
        kv.session_destroy(sid)
        kv.delete(p, recurse=True)
        assert kv.read_prefix(p).items == {}
    # The token still matters over TLS: outside its policy, refused.
    with tls_agent.kv() as kv, pytest.raises(ConsulAuthError) as denied:
        kv.put(f"rt-elsewhere-{uuid.uuid4().hex[:6]}/k", b"1")
    _assert_secret_free(str(denied.value), tls_agent.token)


@pytest.mark.parametrize(("case", "kw", "expect"), [
    ("system CAs only", {"ca": None}, "unable to get local issuer certificate"),
    ("another CA", {"ca": "rogue"}, "unable to get local issuer certificate"),
    ("no client certificate", {"client": False}, "TLS error"),
    ("verify off, still no client certificate", {"ca": None, "client": False,
                                                 "verify": "false"}, "TLS error"),
])
def test_tls_failures_are_clear_and_token_free(tls_agent: TlsAgent, case: str,
                                               kw: dict[str, object], expect: str) -> None:
    with tls_agent.kv(**kw) as kv, pytest.raises(ConsulUnavailable) as info:
        kv.read_prefix(tls_agent.prefix)
    message = str(info.value)
    assert message.startswith(f"cannot reach Consul at {tls_agent.https_addr}: "), message
    assert expect in message, f"{case}: {message}"
    assert "\n" not in message and "Traceback" not in message
    _assert_secret_free(message + repr(info.value), tls_agent.token)


def test_plain_http_to_the_https_port_is_a_clear_error(tls_agent: TlsAgent) -> None:
    env = {**tls_agent.env(), "CONSUL_HTTP_ADDR": f"http://127.0.0.1:{tls_agent.https_port}"}
    with ConsulKV(ConsulSettings.from_env(env)) as kv, pytest.raises(ConsulError) as info:
        kv.read_prefix(tls_agent.prefix)
    assert f"at http://127.0.0.1:{tls_agent.https_port} failed: 400 Client sent an HTTP " \
        "request to an HTTPS server" in str(info.value)
    _assert_secret_free(str(info.value), tls_agent.token)


def test_ssl_verify_false_needs_no_ca(tls_agent: TlsAgent) -> None:
    p = f"{tls_agent.prefix}noverify/"
    with tls_agent.kv(ca=None, verify="false") as kv:
        assert kv.settings.verify is False
        assert kv.put(p + "k", b"v") is True
        assert kv.get(p + "k") is not None
        kv.delete(p, recurse=True)
    # The CLI too; it says nothing of the token either way.
    env = {**os.environ, **tls_agent.env(ca=None, verify="false")}
    proc = subprocess.run([*_cli(p), "status", "--json"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    _assert_secret_free(proc.stdout + proc.stderr, tls_agent.token)


def _cli(prefix: str) -> list[str]:
    return [sys.executable, "-m", "reconciler", "--prefix", prefix]


def _get(port: int) -> str | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/")
        body = conn.getresponse().read().decode().strip()
        conn.close()
        return body
    except (OSError, http.client.HTTPException):
        return None


def test_cli_and_daemon_over_https_never_show_the_token(
        tls_agent: TlsAgent, tmp_path: Path, http_backends: HttpBackends) -> None:
    prefix = f"{tls_agent.prefix}daemon/"
    node = f"rt-tls-node-{uuid.uuid4().hex[:6]}"
    token = tls_agent.token
    env = tls_agent.env()
    bind = free_port()
    blue, green = http_backends.start("blue\n"), http_backends.start("green\n")
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"services": {"web": {
        "config": {"bind": f"127.0.0.1:{bind}"}, "active": "blue",
        "pools": {"blue": {"b1": {"address": "127.0.0.1", "port": blue.port}},
                  "green": {"g1": {"address": "127.0.0.1", "port": green.port}}}}}}))
    daemon = DaemonProcess(prefix, node, tmp_path, resync=2.0,
                           extra_env={**env, "RECONCILER_LOG_LEVEL": "debug"})
    outputs: list[str] = []

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        proc = daemon.cli(*args)
        outputs.append(proc.stdout + proc.stderr)
        return proc

    try:
        applied = cli("apply", "-f", str(state))
        assert applied.returncode == 0, applied.stdout + applied.stderr
        daemon.start()
        wait_for(lambda: _get(bind) == "blue", timeout=60, message="serving blue")
        with tls_agent.kv() as kv:
            kv.put(f"{prefix}services/web/active", b"green")
            wait_for(lambda: _get(bind) == "green", timeout=30,
                     message="a flip read over https applied")

            def status_ok() -> dict[str, object] | None:
                proc = cli("status", "--json")
                if proc.returncode != 0:
                    return None
                doc: dict[str, object] = json.loads(proc.stdout).get(node) or {}
                proxy = doc.get("proxy") or {}
                return doc if isinstance(proxy, dict) and \
                    proxy.get("active") == {"web": "green"} else None

            doc = wait_for(status_ok, timeout=30, message="status over https")
            assert not doc.get("errors"), doc
            # Everything the daemon wrote to Consul: status document, session-held keys.
            values = kv.read_prefix(prefix).items
            assert f"{prefix}nodes/{node}/status" in values
            kv_text = "\n".join(i.value.decode(errors="replace") for i in values.values())
        with urllib.request.urlopen(daemon.url("/metrics"), timeout=5) as resp:
            metrics = resp.read().decode()
        assert "reconciler_reconciles_total" in metrics
        cmdlines = [Path(f"/proc/{daemon.pid}/cmdline").read_bytes().decode()]
        hp = daemon.state_dir / "haproxy.pid"
        for word in hp.read_text().split():
            cmdlines.append(Path(f"/proc/{word}/cmdline").read_bytes().decode())
        assert "https" in Path(f"/proc/{daemon.pid}/environ").read_bytes().decode()
        state_files = "\n".join(
            p.read_bytes().decode(errors="replace") for p in daemon.state_dir.rglob("*")
            if p.is_file())
        log = daemon.log_text()
        assert " DEBUG " in log  # the most talkative level was on
        for what, text in [("log", log), ("argv", "\n".join(cmdlines)), ("KV", kv_text),
                           ("metrics", metrics), ("CLI output", "\n".join(outputs)),
                           ("state dir", state_files)]:
            assert token not in text, f"the ACL token appears in the {what}"
            assert tls_agent.master not in text
    finally:
        daemon.stop()
        hp = daemon.state_dir / "haproxy.pid"
        if hp.exists():
            subprocess.run(["kill", *hp.read_text().split()], check=False)
        with tls_agent.kv() as kv:
            kv.delete(prefix, recurse=True)
