"""Test helpers shared by unit and integration tests.

Owns polling (`wait_for`, used instead of sleeping), a loop run in a thread for a block
(`run_in_thread`), the `ContainerFactory` call signature of the `container_factory`
fixture, detection of the OVS datapath type this machine supports (`system` needs the
kernel module; `netdev` is the userspace fallback), free loopback ports (`free_port`,
`free_ports`), stopping a child process (`stop_process`), tiny threaded HTTP backends
(`HttpBackend`, `HttpBackends`; the `http_backends` fixture), a keep-alive load client
(`KeepAliveLoad`), what an HAProxy worker runs (`haproxy_servers`,
`haproxy_runtime_map`) and running commands in a process's network namespace (`nsexec`,
`pings`). Import as ``from helpers import wait_for`` (``tests/`` is on sys.path through
the root conftest).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

if TYPE_CHECKING:
    from reconciler.adapters.haproxy import HaproxyProcess
    from reconciler.adapters.netlink import ContainerNetns

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """`wait_for` gave up: the predicate never returned a truthy value in time."""


def wait_for(
    predicate: Callable[[], T | Literal[False] | None],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `predicate` until it returns a truthy value, and return that value.

    The return type drops ``None``/``False`` from the predicate's, so
    ``event = wait_for(lambda: find_event())`` is typed as the event itself.

    Exceptions of the types in `ignore` count as "not yet"; any other exception
    propagates at once. On timeout raise `WaitTimeout` naming `message` (or the
    predicate), the last value returned and the last ignored exception.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last_exc = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            detail = f"last value {last!r}"
            if last_exc is not None:
                detail += f", last error {last_exc!r}"
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what} ({detail})")
        time.sleep(interval)


@contextlib.contextmanager
def run_in_thread(run: Callable[[threading.Event], object], what: str,
                  join_timeout: float = 10.0) -> Iterator[threading.Event]:
    """Run `run(stop)` in a daemon thread for the block; after it, set `stop` and assert
    the thread ends within `join_timeout` seconds."""
    stop = threading.Event()
    t = threading.Thread(target=run, args=(stop,), daemon=True)
    t.start()
    try:
        yield stop
    finally:
        stop.set()
        t.join(join_timeout)
        assert not t.is_alive(), f"{what} did not stop within {join_timeout:g} s"


class ContainerFactory(Protocol):
    """Signature of the `container_factory` fixture (see tests/conftest.py)."""

    def __call__(
        self,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        command: Sequence[str] | str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run a detached `--net none` container from the test image and return it.

        `name` defaults to a unique ``rt-<run_id>-<n>``; `command` defaults to
        ``sleep 3600``; `kwargs` go to ``docker.containers.run``. The container is
        running when this returns and is force-removed at the test's teardown.
        """
        ...


def ovs_vsctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ovs-vsctl --timeout=10 <args>`` and return the completed process."""
    return subprocess.run(
        ["ovs-vsctl", "--timeout=10", *args],
        check=check,
        capture_output=True,
        text=True,
        timeout=30,
    )


def link_exists(name: str) -> bool:
    """True if a network interface called `name` exists in the host namespace."""
    proc = subprocess.run(
        ["ip", "link", "show", "dev", name], capture_output=True, text=True, timeout=10
    )
    return proc.returncode == 0


def detect_ovs_datapath() -> str:
    """Return ``"system"`` if a kernel-datapath bridge works here, else ``"netdev"``.

    Probes with a throwaway bridge; raises `RuntimeError` if neither type yields a
    bridge device.
    """
    for dp_type in ("system", "netdev"):
        probe = f"rtdp{secrets.token_hex(4)}"
        try:
            ovs_vsctl("add-br", probe, "--", "set", "bridge", probe, f"datapath_type={dp_type}")
            try:
                wait_for(partial(link_exists, probe), timeout=2.0, interval=0.05)
            except WaitTimeout:
                continue
            return dp_type
        finally:
            ovs_vsctl("--if-exists", "del-br", probe, check=False)
    raise RuntimeError("OVS: neither a 'system' nor a 'netdev' bridge comes up")


# --------------------------------------------------------------------------- ports, processes


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports free on `host` right now (all held open while picking)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """One TCP port free on `host` right now."""
    return free_ports(1, host)[0]


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15.0,
                 kill_timeout: float = 10.0) -> int:
    """SIGTERM `proc` if it still runs, SIGKILL it after `timeout`; its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(kill_timeout)
    return int(proc.returncode)


# --------------------------------------------------------------------------- HTTP backends


class _BackendHandler(BaseHTTPRequestHandler):
    """``/health*`` answers the server's health code; any other path its body (with the
    server's `status`, 200 unless set); ``/slow*`` after the server's `slow` seconds."""

    server: HttpBackend

    def do_GET(self) -> None:
        srv = self.server
        if self.path.startswith("/slow"):
            time.sleep(srv.slow)
        code, body = (srv.health, b"ok\n") if self.path.startswith("/health") \
            else (srv.status, srv.body)
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class HttpBackend(ThreadingHTTPServer):
    """An HTTP server in a daemon thread on `host` (IPv4 or IPv6), on a free port.

    Answers `body` on every path but ``/health``, which answers `health` (settable at any
    time). Serving when the constructor returns; `stop` shuts it down.
    """

    daemon_threads = True

    def __init__(self, body: str | bytes, host: str = "127.0.0.1", health: int = 200,
                 status: int = 200) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, 0), _BackendHandler)
        self.body = body.encode() if isinstance(body, str) else body
        self.health = health
        self.status = status  # of every other path (settable: a pool that fails)
        self.slow = 1.0  # seconds /slow takes (a request under way)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # health checks hang up early: not a test failure

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class HttpBackends:
    """A set of `HttpBackend`s: `start` one, `stop` one, `close` all (the fixture does)."""

    def __init__(self) -> None:
        self.servers: list[HttpBackend] = []

    def start(self, body: str | bytes, host: str = "127.0.0.1", health: int = 200,
              status: int = 200) -> HttpBackend:
        srv = HttpBackend(body, host, health, status)
        self.servers.append(srv)
        return srv

    def stop(self, srv: HttpBackend) -> None:
        self.servers.remove(srv)
        srv.stop()

    def close(self) -> None:
        for srv in list(self.servers):
            self.stop(srv)


class KeepAliveLoad:
    """A keep-alive HTTP client in a thread: GET / on 127.0.0.1:`port` in a loop with a
    short think time, one connection reused until it fails, never a retry.

    Every exception or non-200 answer is a failure (`failures`); `ok` counts the 200
    answers by their body's first word. Runs from `start` (or entering a ``with``) to
    `stop` (or leaving it), `max_seconds` at the most.
    """

    def __init__(self, port: int, think: float = 0.005, max_seconds: float = 90.0,
                 host: str | None = None) -> None:
        self.port, self.think, self.max_seconds = port, think, max_seconds
        self.headers = {"Host": host} if host else {}  # routing by Host on a shared bind
        self.ok: dict[str, int] = {}
        self.failures: list[str] = []
        self.requests = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def served(self) -> int:
        """How many 200 answers so far."""
        with self._lock:
            return sum(self.ok.values())

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        deadline = time.monotonic() + self.max_seconds
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                self.requests += 1
                try:
                    conn.request("GET", "/", headers=self.headers)
                    resp = conn.getresponse()
                    body = resp.read().decode()
                    if resp.status != 200:
                        self.failures.append(f"HTTP {resp.status}: {body[:80]!r}")
                    else:
                        word = body.split()[0] if body.split() else ""
                        with self._lock:
                            self.ok[word] = self.ok.get(word, 0) + 1
                except (OSError, http.client.HTTPException) as exc:
                    self.failures.append(repr(exc))
                    conn.close()  # a new connection for the next request (not a retry)
                self._stop.wait(self.think)
        finally:
            conn.close()

    def start(self) -> KeepAliveLoad:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def __enter__(self) -> KeepAliveLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- HAProxy runtime


@dataclass(frozen=True)
class HaproxyServer:
    """One server as an HAProxy worker's ``show stat`` has it."""

    status: str  # UP, DOWN, MAINT, DRAIN, ``no check``, ``UP 1/3``...
    admin: str  # ready, drain or maint
    weight: int


def haproxy_servers(hap: HaproxyProcess) -> dict[tuple[str, str], HaproxyServer]:
    """Every server of every backend in `hap`'s current worker, by (backend, server)."""
    text = hap.worker_command("show stat")
    lines = text.splitlines()
    assert lines and lines[0].startswith("# "), f"unexpected `show stat`: {text[:200]!r}"
    header = lines[0][2:].split(",")
    col = {name: i for i, name in enumerate(header)}
    out: dict[tuple[str, str], HaproxyServer] = {}
    for line in lines[1:]:
        row = line.split(",")
        if len(row) < len(header) - 1 or row[col["svname"]] in ("FRONTEND", "BACKEND"):
            continue
        status, weight = row[col["status"]], row[col["weight"]]
        admin = "maint" if status.startswith("MAINT") else (
            "drain" if status.startswith("DRAIN") else "ready")
        out[(row[col["pxname"]], row[col["svname"]])] = HaproxyServer(
            status, admin, int(weight) if weight.isdigit() else 0)
    return out


def haproxy_runtime_map(hap: HaproxyProcess) -> dict[str, str]:
    """The active-pool map as `hap`'s newest worker has it (not the map file)."""
    from reconciler.adapters.haproxy import parse_map

    return parse_map(hap.worker_command(f"show map {hap.map_path}"))


# --------------------------------------------------------------------------- network namespaces


NetnsFactory = Callable[[], "ContainerNetns"]
"""The `netns_factory` fixture: a fresh network namespace (a process in it), open."""


def ip_if(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    return ipaddress.ip_interface(text)


def nsexec(pid: int, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `cmd` in the network namespace of `pid` (``nsenter -t PID -n``)."""
    return subprocess.run(
        ["nsenter", "-t", str(pid), "-n", *cmd],
        capture_output=True,
        text=True,
        check=check,
        timeout=30,
    )


def pings(pid: int | None, addr: str, count: int = 1) -> bool:
    """`addr` answers `count` busybox pings from the netns of `pid` (None: the host)."""
    cmd = ["busybox", "ping", "-c", str(count), "-W", "1", addr]
    if pid is None:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    return nsexec(pid, *cmd, check=False).returncode == 0
