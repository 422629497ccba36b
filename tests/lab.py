"""The multi-host lab (`scripts/lab`) from Python tests.

Owns `Lab` (drives the script: up/down/status, commands inside a host's namespace, the
host's Docker, OVS and Consul, its reconciler daemon), `leftovers` (what of a lab is
still on this machine), and the session fixture `lab` (the lab up for the whole session,
taken down at its end; RECONCILER_LAB_HOSTS hosts, default 3; RECONCILER_LAB_KEEP=1
leaves it up for the next run, which then reuses it in well under a second).

Host K is ``hostK`` (``K`` also works): network namespace ``lab-hostK``, underlay
address 198.18.0.K, Consul at 198.18.0.K:8500 (reachable from the root namespace),
Docker at unix:///run/lab/hostK/docker.sock, OVS_RUNDIR /run/lab/hostK/ovs, logs in
/var/lib/lab/hostK/*.log. Layout: scripts/lab-lib.sh.

Use the fixture from a test module with ``from lab import Lab, lab  # noqa: F401``
(``tests/`` is on sys.path through the root conftest), or for every module with
``pytest_plugins = ["lab"]`` in tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "lab"
LAB_RUN = Path("/run/lab")
LAB_VAR = Path("/var/lib/lab")
UNDERLAY_NET = "198.18.0"
UNDERLAY_BRIDGE = "labund0"
ROOT_ADDR = f"{UNDERLAY_NET}.254"
FW_COMMENT = f"lab:{UNDERLAY_BRIDGE}"

Host = str | int


class LabError(AssertionError):
    """A `scripts/lab` command failed; the message holds its output (log tails included)."""


def host_index(host: Host) -> int:
    """K of ``hostK``, ``"K"`` or ``K``."""
    text = str(host)
    m = re.fullmatch(r"(?:host)?([1-9][0-9]?)", text)
    if m is None:
        raise ValueError(f"not a lab host: {host!r} (hostK or K)")
    return int(m.group(1))


def host_name(host: Host) -> str:
    return f"host{host_index(host)}"


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Lab:
    """`scripts/lab` with `hosts` hosts (what `up` brings up when not told otherwise)."""

    def __init__(self, hosts: int = 3, script: Path = SCRIPT) -> None:
        self.hosts = hosts
        self.script = script

    # ------------------------------------------------------------ the script
    def run(self, *args: str, check: bool = True, timeout: float = 120.0
            ) -> subprocess.CompletedProcess[str]:
        """`scripts/lab ARGS`; with `check`, raise `LabError` (with its output) on failure."""
        proc = subprocess.run([str(self.script), *args], capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise LabError(f"scripts/lab {' '.join(args)} exited {proc.returncode}\n"
                           f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}")
        return proc

    def up(self, hosts: int | None = None, *, daemon: bool = True, timeout: float = 600.0
           ) -> subprocess.CompletedProcess[str]:
        """Bring the lab up (reuses a healthy one at once); `daemon=False`: --no-daemon."""
        if hosts is not None:
            self.hosts = hosts
        args = ["up", "--hosts", str(self.hosts)]
        if not daemon:
            args.append("--no-daemon")
        return self.run(*args, timeout=timeout)

    def down(self, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return self.run("down", timeout=timeout)

    def status(self) -> subprocess.CompletedProcess[str]:
        """`scripts/lab status` (returncode 0 only if everything is up); never raises."""
        return self.run("status", check=False, timeout=60.0)

    @staticmethod
    def recorded_hosts() -> int | None:
        """How many hosts the lab that is up has (None: no lab is up)."""
        try:
            return int((LAB_RUN / "hosts").read_text().strip())
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------ hosts
    @property
    def names(self) -> list[str]:
        return [f"host{k}" for k in range(1, self.hosts + 1)]

    @staticmethod
    def address(host: Host) -> str:
        """The host's underlay address (198.18.0.K)."""
        return f"{UNDERLAY_NET}.{host_index(host)}"

    @staticmethod
    def netns(host: Host) -> str:
        return f"lab-host{host_index(host)}"

    @classmethod
    def consul_addr(cls, host: Host) -> str:
        """``198.18.0.K:8500``: the host's Consul agent, from the root namespace."""
        return f"{cls.address(host)}:8500"

    @staticmethod
    def docker_host(host: Host) -> str:
        return f"unix://{LAB_RUN}/host{host_index(host)}/docker.sock"

    @staticmethod
    def ovs_rundir(host: Host) -> Path:
        return LAB_RUN / host_name(host) / "ovs"

    @staticmethod
    def state_dir(host: Host) -> Path:
        """The reconciler daemon's --state-dir on that host."""
        return LAB_VAR / host_name(host) / "reconciler"

    @staticmethod
    def log_path(host: Host, name: str) -> Path:
        """A log of the host: dockerd, consul, reconciler, ovsdb-server, ovs-vswitchd."""
        return LAB_VAR / host_name(host) / f"{name}.log"

    # ------------------------------------------------------------ inside a host
    def exec(self, host: Host, *cmd: str, check: bool = False, timeout: float = 120.0,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """`scripts/lab exec HOST -- CMD`: in the host's namespace with DOCKER_HOST,
        CONSUL_HTTP_ADDR, OVS_RUNDIR and RECONCILER_* set for it (output as text)."""
        proc = subprocess.run([str(self.script), "exec", host_name(host), "--", *cmd],
                              capture_output=True, text=True, timeout=timeout, input=input,
                              check=False)
        if check and proc.returncode != 0:
            raise LabError(f"{host_name(host)}: {' '.join(cmd)} exited {proc.returncode}\n"
                           f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}")
        return proc

    def docker(self, host: Host, *args: str, check: bool = True, timeout: float = 120.0
               ) -> subprocess.CompletedProcess[str]:
        """The docker CLI against the host's own engine."""
        return self.exec(host, "docker", *args, check=check, timeout=timeout)

    def ovs_vsctl(self, host: Host, *args: str, check: bool = True
                  ) -> subprocess.CompletedProcess[str]:
        """ovs-vsctl against the host's own OVSDB."""
        return self.exec(host, "ovs-vsctl", "--timeout=10", *args, check=check, timeout=30.0)

    def consul_get(self, host: Host, path: str, timeout: float = 5.0) -> Any:
        """GET http://198.18.0.K:8500<path> from the root namespace, decoded from JSON."""
        url = f"http://{self.consul_addr(host)}{path}"
        with _no_proxy_opener().open(url, timeout=timeout) as resp:
            return json.loads(resp.read().decode())

    # ------------------------------------------------------------ the daemon
    @staticmethod
    def daemon_pid(host: Host) -> int | None:
        """The pid of the host's reconciler daemon if it runs."""
        pidfile = LAB_RUN / host_name(host) / "reconciler.pid"
        try:
            pid = int(pidfile.read_text().strip())
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            return None
        state = stat.rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X") or f"{LAB_VAR}/{host_name(host)}/" not in cmdline:
            return None
        return pid

    def start_daemon(self, host: Host, *args: str) -> None:
        """Start the host's daemon (extra `reconciler run` ARGS); returns once it publishes
        its status."""
        self.run("start-daemon", host_name(host), "--", *args, timeout=180.0)

    def stop_daemon(self, host: Host) -> None:
        self.run("stop-daemon", host_name(host), timeout=120.0)

    def restart_daemon(self, host: Host, *args: str) -> None:
        self.run("restart-daemon", host_name(host), "--", *args, timeout=180.0)


# ---------------------------------------------------------------- what is left
def _lab_processes() -> list[str]:
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"{LAB_RUN}/" in cmd or f"{LAB_VAR}/" in cmd:
            found.append(f"process {entry.name}: {cmd.strip()}")
    return found


def _decode_mount(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def leftovers() -> list[str]:
    """Everything of a lab still on this machine (empty once `down` is done): lab
    namespaces, the underlay bridge and lab veths, processes whose command line names
    /run/lab or /var/lib/lab/, mounts under them, /run/lab itself, the FORWARD rule."""
    found: list[str] = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=False).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines()
              if line.startswith("lab-")]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           check=True).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name == UNDERLAY_BRIDGE or name.startswith("lab-host"):
            found.append(f"link {name}")
    found += _lab_processes()
    with open("/proc/mounts") as mounts:
        for line in mounts:
            point = _decode_mount(line.split()[1])
            for top in (LAB_RUN, LAB_VAR):
                if point == str(top) or point.startswith(f"{top}/"):
                    found.append(f"mount {point}")
    if LAB_RUN.exists():
        found.append(f"directory {LAB_RUN}")
    rules = subprocess.run(["iptables", "-w", "-S", "FORWARD"], capture_output=True,
                           text=True, check=False).stdout
    found += [f"iptables {line}" for line in rules.splitlines() if FW_COMMENT in line]
    return found


# ---------------------------------------------------------------- the fixture
@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The lab, up with its daemons for the whole session; down at its end (unless
    RECONCILER_LAB_KEEP=1). A lab that does not come up fails the test (never skips)."""
    the_lab = Lab(hosts=int(os.environ.get("RECONCILER_LAB_HOSTS", "3")))
    try:
        the_lab.up()
    except (LabError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"the lab did not come up: {exc}")
    yield the_lab
    if os.environ.get("RECONCILER_LAB_KEEP") != "1":
        the_lab.down()
