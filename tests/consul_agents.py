"""Private Consul dev agents for tests that need one of their own.

Owns `ConsulAgent`: a `consul agent -dev` on free loopback ports (HTTP, serf LAN/WAN,
server; no DNS, no gRPC), optionally with an HCL config file written 0600 (ACL master
tokens go there, never on argv), its log in the work dir, started in its own session so
it can be frozen (`freeze`/`thaw`: SIGSTOP/SIGCONT), and a tiny HTTP API client; and
`start_acl_agent`: such an agent with default-deny ACLs (`acl_config`), bootstrapped, and
a token for a policy of the test's rules (`AclAgent`). What a test does with the agent
(its rules, its keys) stays in the test.

Import as ``from consul_agents import ConsulAgent`` (``tests/`` is on sys.path through
the root conftest).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from helpers import free_ports, stop_process, wait_for


def acl_config(master: str) -> str:
    """HCL: ACLs on, default deny, `master` as the master token (no token persistence)."""
    return (
        "acl {\n"
        "  enabled = true\n"
        '  default_policy = "deny"\n'
        "  enable_token_persistence = false\n"
        f'  tokens {{ master = "{master}" }}\n'
        "}\n"
    )


class ConsulAgent:
    """`consul agent -dev` on free ports of 127.0.0.1; `start` returns once it has a leader."""

    def __init__(self, workdir: Path, node: str | None = None, config: str | None = None
                 ) -> None:
        self.workdir = workdir
        self.config = config
        self.http_port, self._lan, self._wan, self._server = free_ports(4)
        self.node = node or f"rt-consul-{self.http_port}"
        self.log_path = workdir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: TextIO | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def ports(self) -> frozenset[int]:
        """Every port the agent listens on (to pick further ones that differ)."""
        return frozenset({self.http_port, self._lan, self._wan, self._server})

    def command(self) -> list[str]:
        consul = shutil.which("consul")
        assert consul, "the consul binary is missing (run make deps)"
        argv = [
            consul, "agent", "-dev", "-node", self.node,
            "-bind", "127.0.0.1", "-client", "127.0.0.1",
            "-http-port", str(self.http_port), "-dns-port", "-1", "-grpc-port", "-1",
            "-serf-lan-port", str(self._lan), "-serf-wan-port", str(self._wan),
            "-server-port", str(self._server),
        ]  # fmt: skip
        if self.config is not None:
            path = self.workdir / "agent.hcl"
            path.touch(mode=0o600)  # before the secrets go in
            path.write_text(self.config)
            argv += ["-config-file", str(path)]
        return argv

    def start(self, timeout: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = self.command()
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(self.has_leader, timeout=timeout, interval=0.2,
                 message=f"private consul agent {self.node} to elect itself leader")

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except FileNotFoundError:
            return ""

    def assert_running(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, self.log_tail()

    def has_leader(self) -> bool:
        self.assert_running()
        try:
            return len(self.request("GET", "/v1/status/leader", timeout=1)) > 4  # not '""'
        except OSError:
            return False

    def request(self, method: str, path: str, data: bytes | None = None,
                token: str | None = None, timeout: float = 5.0) -> bytes:
        """One HTTP request to the agent; the raw response body. HTTP errors raise."""
        headers = {"X-Consul-Token": token} if token is not None else {}
        req = urllib.request.Request(f"http://{self.addr}{path}", data=data, method=method,
                                     headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body: bytes = resp.read()
            return body

    def api(self, method: str, path: str, token: str | None = None, body: Any = None) -> Any:
        """`request` with a JSON body (if any) and a decoded JSON answer (``null``: None)."""
        data = None if body is None else json.dumps(body).encode()
        return json.loads(self.request(method, path, data, token).decode() or "null")

    def wait_acl_bootstrapped(self, master: str, timeout: float = 60.0) -> None:
        """Wait until the master token (see `acl_config`) is accepted."""

        def bootstrapped() -> bool:
            self.assert_running()
            return bool(self.api("GET", "/v1/acl/token/self", master))

        wait_for(bootstrapped, timeout=timeout, interval=0.2,
                 message=f"ACL bootstrap of private consul agent {self.node}",
                 ignore=(urllib.error.URLError, OSError, ValueError))

    def create_token(self, master: str, name: str, rules: str, description: str) -> str:
        """A new ACL policy `name` with `rules`, and the SecretID of a token holding it."""
        policy = self.api("PUT", "/v1/acl/policy", master, {"Name": name, "Rules": rules})
        token = self.api("PUT", "/v1/acl/token", master,
                         {"Description": description, "Policies": [{"ID": policy["ID"]}]})
        return str(token["SecretID"])

    def freeze(self) -> None:
        """SIGSTOP the agent: requests to it hang until `thaw`."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Resume it if frozen, SIGTERM it (SIGKILL after 15 s); close the log."""
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.thaw()
            stop_process(self.proc, timeout=15, kill_timeout=15)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass(frozen=True)
class AclAgent:
    """A running agent with default-deny ACLs, its master token, and `token`: a token whose
    policy is the test's rules (typically: write under `prefix` only)."""

    agent: ConsulAgent
    master: str
    token: str
    prefix: str
    unix_socket: str | None = None
    """Path of the agent's HTTP unix socket, if it was asked for one."""

    @property
    def addr(self) -> str:
        return self.agent.addr


@contextlib.contextmanager
def start_acl_agent(node: str, prefix: str, rules: str, policy: str, description: str,
                    unix_socket: bool = False) -> Iterator[AclAgent]:
    """Start an ACL agent (see `AclAgent`) in a fresh temp dir; stop it and remove the
    dir after the block. The master token only ever goes in a 0600 config file."""
    master = str(uuid.uuid4())
    # Short path: unix socket paths are limited to 107 bytes.
    workdir = Path(tempfile.mkdtemp(prefix=f"{node}-"))
    sock = str(workdir / "http.sock") if unix_socket else None
    config = acl_config(master)
    if sock is not None:
        config += f'addresses {{ http = "127.0.0.1 unix://{sock}" }}\n'
    agent = ConsulAgent(workdir, node, config)
    try:
        agent.start()
        agent.wait_acl_bootstrapped(master)
        token = agent.create_token(master, policy, rules, description)
        yield AclAgent(agent, master, token, prefix, sock)
    finally:
        agent.stop()
        shutil.rmtree(workdir, ignore_errors=True)
