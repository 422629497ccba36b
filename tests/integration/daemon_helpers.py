"""Helpers for the daemon's end-to-end tests (test_daemon_network.py, test_daemon_proxy.py,
test_resilience.py).

Owns: running `reconciler run` as a subprocess (`DaemonProcess`: start, optionally with
`--templates`, SIGTERM, kill -9, its log; `log_during` prints what it logged during a
test), reading a container's interfaces from the host (`netns_*`, through `nsenter`
with the host's `ip`: ~5 ms, against ~150 ms for `docker exec`), OVS port lookups by the
daemon's external_ids, and picking /24s of 10.77.0.0/16 that no host route uses yet (other
tests and engineers share this machine).

Verification only: the product never shells out; tests may.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from helpers import free_port, stop_process

REPO = Path(__file__).resolve().parents[2]


def run(args: Sequence[str], check: bool = True, timeout: float = 30.0,
        ) -> subprocess.CompletedProcess[str]:
    """Run a command (never a shell), capturing text output."""
    return subprocess.run(list(args), check=check, capture_output=True, text=True,
                          timeout=timeout)


# --------------------------------------------------------------------------- daemon


class DaemonProcess:
    """`python -m reconciler --prefix P run --node N ...` with its log in a file.

    Each daemon serves /livez, /readyz and /metrics on a free loopback port of its own
    (`listen`, `url`), so test daemons never compete for the default 127.0.0.1:9901;
    `listen="off"` disables it, `listen=""` passes no --listen (the default, or
    $RECONCILER_LISTEN). `run_args` go after `run` (e.g. --log-format json)."""

    def __init__(self, prefix: str, node: str, workdir: Path, resync: float = 2.0,
                 extra_env: dict[str, str] | None = None, listen: str | None = None,
                 run_args: Sequence[str] = ()) -> None:
        self.listen = listen if listen is not None else f"127.0.0.1:{free_port()}"
        self.run_args = list(run_args)
        self.prefix = prefix
        self.node = node
        self.workdir = workdir
        self.resync = resync
        self.log_path = workdir / f"daemon-{node}.log"
        self.state_dir = workdir / "state"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: TextIO | None = None
        self.starts = 0

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "reconciler", "--prefix", self.prefix, *extra]

    def start(self, templates: Path | None = None) -> None:
        """Start `reconciler run` (with ``--templates`` if given); returns at once."""
        assert self.proc is None, "already running"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        self.starts += 1
        self._log.write(f"===== start #{self.starts} at {time.time():.3f}"
                        + (f" (templates {templates})" if templates is not None else "") + "\n")
        self._log.flush()
        args = ["run", "--node", self.node, "--resync", str(self.resync),
                "--state-dir", str(self.state_dir), *self.run_args]
        if self.listen:
            args += ["--listen", self.listen]
        if templates is not None:
            args += ["--templates", str(templates)]
        self.proc = subprocess.Popen(self.command(*args), stdout=self._log,
                                     stderr=subprocess.STDOUT, env=self.env, cwd=REPO)

    def url(self, path: str) -> str:
        """http://HOST:PORT/path of the daemon's health and metrics endpoint."""
        assert self.listen != "off", "this daemon serves no endpoint"
        return f"http://{self.listen}{path}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "daemon not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit status. HAProxy keeps running."""
        if self.proc is None:
            return None
        rc = stop_process(self.proc, timeout)
        self._forget()
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._forget()

    def _forget(self) -> None:
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self, start: int = 0) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                f.seek(start)
                return f.read()
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run another `reconciler` subcommand against the same prefix."""
        return subprocess.run(self.command(*args), capture_output=True, text=True,
                              timeout=timeout, env=self.env, cwd=REPO, check=False)


def log_during(daemon: DaemonProcess) -> Iterator[None]:
    """Body of an autouse fixture: print what `daemon` logged during the test (pytest
    shows it when the test fails)."""
    start = daemon.log_size()
    yield
    print(f"----- daemon log during this test ({daemon.log_path}):")
    print(daemon.log_text(start)[-20000:])


# --------------------------------------------------------------------------- netns reads


def container_pid(container: Any) -> int:
    container.reload()
    return int(container.attrs["State"]["Pid"])


def netns_ip(pid: int, *args: str) -> subprocess.CompletedProcess[str]:
    """`ip <args>` inside the network namespace of `pid` (the host's iproute2)."""
    return run(["nsenter", "-t", str(pid), "-n", "ip", *args], check=False)


def netns_link(pid: int, ifname: str) -> dict[str, Any] | None:
    """`ip -j link show dev IFNAME` inside the netns of `pid`; None if absent."""
    proc = netns_ip(pid, "-j", "link", "show", "dev", ifname)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    links: list[dict[str, Any]] = json.loads(proc.stdout)
    return links[0] if links else None


def netns_addrs(pid: int, ifname: str) -> list[str] | None:
    """IPv4 addresses (CIDR) of IFNAME in the netns of `pid`; None if IFNAME is absent."""
    proc = netns_ip(pid, "-j", "-4", "addr", "show", "dev", ifname)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    out: list[str] = []
    for link in json.loads(proc.stdout):
        for a in link.get("addr_info", []):
            out.append(f"{a['local']}/{a['prefixlen']}")
    return out


def netns_up_with(pid: int, ifname: str, cidr: str | None = None) -> bool:
    """IFNAME exists, is up, and (if given) carries exactly address `cidr`."""
    link = netns_link(pid, ifname)
    if link is None or "UP" not in link.get("flags", []):
        return False
    if cidr is None:
        return bool(netns_addrs(pid, ifname))
    return netns_addrs(pid, ifname) == [cidr]


def exec_out(container: Any, *cmd: str) -> str:
    """Run `cmd` in the container (docker exec); its output; fails on a non-zero exit."""
    code, out = container.exec_run(list(cmd))
    text = out.decode(errors="replace")
    assert code == 0, f"{cmd} in {container.name} exited {code}: {text}"
    return str(text)


def container_ping(container: Any, address: str, count: int = 1, wait: int = 2) -> bool:
    code, _ = container.exec_run(["ping", "-c", str(count), "-W", str(wait), address])
    return bool(code == 0)


def host_ping(address: str, count: int = 1, wait: int = 2) -> bool:
    """Ping from the host (busybox: the host has no ping of its own)."""
    proc = run(["busybox", "ping", "-c", str(count), "-W", str(wait), address], check=False)
    return proc.returncode == 0


# --------------------------------------------------------------------------- host side


def host_link_exists(name: str) -> bool:
    return run(["ip", "link", "show", "dev", name], check=False).returncode == 0


def host_master(name: str) -> str | None:
    """The master (bridge) of host link `name`; None if it has none or is absent."""
    proc = run(["ip", "-j", "link", "show", "dev", name], check=False)
    if proc.returncode != 0:
        return None
    links = json.loads(proc.stdout)
    return str(links[0]["master"]) if links and links[0].get("master") else None


def ovs_ports_of(container_id: str) -> list[str]:
    """Names of OVS ports whose external_ids name this container."""
    proc = run(["ovs-vsctl", "--timeout=10", "--bare", "--columns=name", "find", "Port",
                f"external_ids:reconciler-container={container_id}"])
    return sorted(line.strip() for line in proc.stdout.splitlines() if line.strip())


def ovs_port_tag(port: str) -> int | None:
    proc = run(["ovs-vsctl", "--timeout=10", "get", "Port", port, "tag"], check=False)
    value = proc.stdout.strip()
    return int(value) if value.isdigit() else None


def free_subnet_octets(count: int, seed: int, used_extra: Iterable[int] = ()) -> list[int]:
    """`count` third octets X such that no host route or address uses 10.77.X.0/24.

    Two bridges on the host with the same subnet and a gateway each would make pings from
    the host ambiguous, so a run avoids what is already there (other tests share the host).
    """
    used = set(used_extra)
    for line in run(["ip", "-4", "route", "show", "table", "all"]).stdout.splitlines():
        parts = line.split()
        for word in parts:
            if word.startswith("10.77."):
                with contextlib.suppress(ValueError, IndexError):
                    used.add(int(word.split(".")[2].split("/")[0]))
    out: list[int] = []
    for i in range(200):
        x = 20 + (seed + i * 7) % 230
        if x not in used and x not in out:
            out.append(x)
            if len(out) == count:
                return out
    raise RuntimeError("no free 10.77.X.0/24 left")
