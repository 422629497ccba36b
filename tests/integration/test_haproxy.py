"""Integration tests of reconciler.adapters.haproxy against the real HAProxy 2.6 binary.

Backends are tiny HTTP servers in threads on loopback answering with their pool name;
HAProxy binds only 127.0.0.1 on free ports; every HAProxy a test starts is stopped by
the `proxy` fixture, and every state dir lives under tmp_path.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    HttpBackends,
    KeepAliveLoad,
    free_port,
    haproxy_runtime_map,
    haproxy_servers,
    wait_for,
)

from reconciler.adapters.haproxy import HaproxyProcess, parse_map
from reconciler.errors import ConfigInvalid, HaproxyError, ReloadFailed
from reconciler.proxy import (
    GlobalView,
    MemberView,
    PoolView,
    ProxyView,
    ServiceView,
    render,
    render_map,
)

pytestmark = pytest.mark.integration

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def member(backends: HttpBackends, name: str, body: str, host: str = "127.0.0.1"
           ) -> MemberView:
    """Member `name`: a new backend on `host` answering `body`."""
    return MemberView(name, host, backends.start(body, host).port)


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[Callable[..., HaproxyProcess]]:
    made: list[HaproxyProcess] = []

    def make(name: str = "hx", **kwargs: object) -> HaproxyProcess:
        proc = HaproxyProcess(tmp_path / name, HAPROXY, **kwargs)  # type: ignore[arg-type]
        made.append(proc)
        return proc

    yield make
    for proc in reversed(made):
        proc.stop()


@dataclass
class Site:
    """One service `web` on a free port with pools blue and green."""

    proc: HaproxyProcess
    port: int
    pools: dict[str, list[MemberView]]
    active: str = "blue"
    extra: tuple[ServiceView, ...] = ()

    def view(self) -> ProxyView:
        svc = ServiceView(
            name="web", bind_host="127.0.0.1", bind_port=self.port, active=self.active,
            pools=tuple(PoolView(p, tuple(ms)) for p, ms in self.pools.items()),
            health_path="/health", health_interval_ms=500,
        )
        return ProxyView(GlobalView.for_state_dir(self.proc.state_dir), (svc, *self.extra))

    def cfg(self) -> bytes:
        return render(self.view())

    def map(self) -> bytes:
        return render_map(self.view())

    def flip(self, pool: str, proc: HaproxyProcess | None = None) -> None:
        """Make `pool` active the way the controller does: same config, new map only."""
        self.active = pool
        hap = proc or self.proc
        assert not hap.apply_config(hap.config_path.read_bytes(), self.map()).reloaded


def get(port: int, path: str = "/") -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, (resp.status, body)
        return body
    finally:
        conn.close()


@pytest.fixture
def site(proxies: Callable[..., HaproxyProcess], http_backends: HttpBackends) -> Site:
    proc = proxies()
    s = Site(
        proc,
        free_port(),
        {
            "blue": [member(http_backends, "b1", "blue")],
            "green": [member(http_backends, "g1", "green")],
        },
    )
    result = proc.apply_config(s.cfg(), s.map())  # not running: starts it
    assert result.worker_pid is not None
    assert get(s.port) == "blue"
    return s


def test_start_writes_files_and_serves_active_pool(site: Site) -> None:
    proc = site.proc
    assert proc.config_path.read_bytes() == site.cfg()
    assert proc.map_path.read_bytes() == b"web be_web:blue\n"
    assert proc.master_pid() == proc.show_proc().master_pid
    assert proc.admin_socket.exists()
    assert {get(site.port) for _ in range(4)} == {"blue"}


def test_map_only_change_switches_without_reload(site: Site) -> None:
    proc = site.proc
    before = proc.show_proc()
    site.flip("green")
    assert {get(site.port) for _ in range(4)} == {"green"}
    after = proc.show_proc()
    assert after.reloads == before.reloads
    assert after.current_worker == before.current_worker
    assert parse_map(proc.map_path.read_text()) == {"web": "be_web:green"}
    assert haproxy_runtime_map(proc) == {"web": "be_web:green"}
    site.flip("blue")
    assert get(site.port) == "blue"
    with pytest.raises(HaproxyError, match="invalid"):
        proc.apply_config(proc.config_path.read_bytes(), b"web be_web:blue;shutdown\n")
    assert haproxy_runtime_map(proc) == {"web": "be_web:blue"}
    assert proc.map_path.read_bytes() == b"web be_web:blue\n"


def test_apply_same_config_is_a_no_op_and_map_changes_need_no_reload(site: Site) -> None:
    proc = site.proc
    before = proc.show_proc()
    same = proc.apply_config(site.cfg(), site.map())
    assert (same.config_changed, same.map_changed, same.reloaded) == (False, False, False)
    site.active = "green"
    # The frontend's default changes with `active`, so the config bytes change too:
    # apply only the map against the unchanged config to exercise the runtime path.
    flipped = proc.apply_config(proc.config_path.read_bytes(), site.map())
    assert (flipped.config_changed, flipped.map_changed, flipped.reloaded) == (
        False, True, False)
    assert get(site.port) == "green"
    assert proc.map_path.read_bytes() == b"web be_web:green\n"
    assert proc.show_proc().reloads == before.reloads


def test_reload_with_added_member(site: Site, http_backends: HttpBackends) -> None:
    proc = site.proc
    before = proc.show_proc()
    site.pools["blue"].append(member(http_backends, "b2", "blue-2"))
    result = proc.apply_config(site.cfg(), site.map())
    assert result.config_changed and result.reloaded
    after = proc.show_proc()
    assert after.reloads == before.reloads + 1
    assert after.failed_reloads == before.failed_reloads
    assert result.worker_pid not in {w.pid for w in before.workers}
    assert proc.last_good_path.exists()
    assert {get(site.port) for _ in range(6)} == {"blue", "blue-2"}
    assert ("be_web:blue", "b2") in haproxy_servers(proc)


def test_invalid_config_is_refused_and_last_good_keeps_serving(site: Site) -> None:
    proc = site.proc
    good = proc.config_path.read_bytes()
    before = proc.show_proc()
    bad = good + b"\nbackend broken\n    server s1 127.0.0.1:1 frobnicate\n"
    with pytest.raises(ConfigInvalid, match="frobnicate"):
        proc.apply_config(bad, site.map())
    assert proc.config_path.read_bytes() == good
    assert proc.show_proc().reloads == before.reloads
    assert not list(proc.config_path.parent.glob(".*.tmp.*"))
    assert get(site.port) == "blue"


def _listen(host: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((host, port))
    s.listen()
    return s


@pytest.mark.parametrize("reason", ["address-not-on-host", "port-in-use"])
def test_config_that_fails_to_load_is_reverted(site: Site, reason: str) -> None:
    proc = site.proc
    good = proc.config_path.read_bytes()
    before = proc.show_proc()
    blocker: socket.socket | None = None
    if reason == "address-not-on-host":
        host, port = "198.18.255.1", 80
    else:
        host, port = "127.0.0.1", free_port()
        blocker = _listen(host, port)
    try:
        site.extra = (ServiceView("other", host, port, "blue"),)
        bad = site.cfg()
        # Passes `haproxy -c` (not ConfigInvalid) but cannot load.
        with pytest.raises(ReloadFailed, match="restored and reloaded the last good") as info:
            proc.apply_config(bad, site.map())
    finally:
        if blocker is not None:
            blocker.close()
    # HAProxy's own ALERT is in the message.
    assert "cannot bind socket" in str(info.value) and f":{port}]" in str(info.value)
    after = proc.show_proc()
    # The failed reload, then the reload of the restored file (2.6 resets the failed
    # counter on the next good reload).
    assert after.reloads == before.reloads + 2
    assert after.current_worker != before.current_worker
    assert proc.config_path.read_bytes() == good
    assert {get(site.port) for _ in range(4)} == {"blue"}
    # A later good change still goes through.
    site.extra = ()
    site.pools["green"][0] = MemberView("g1", "127.0.0.1", site.pools["green"][0].port, 7)
    assert proc.apply_config(site.cfg(), site.map()).reloaded
    assert haproxy_servers(proc)[("be_web:green", "g1")].weight == 7


def test_weights_and_maint_survive_a_reload(site: Site, http_backends: HttpBackends) -> None:
    proc = site.proc
    site.pools["blue"].append(member(http_backends, "b2", "blue-2"))
    proc.apply_config(site.cfg(), site.map())
    proc.set_weight("be_web:blue", "b1", 7)
    proc.set_state("be_web:blue", "b2", "maint")
    states = haproxy_servers(proc)
    assert states[("be_web:blue", "b1")].weight == 7
    assert states[("be_web:blue", "b2")].admin == "maint"
    assert {get(site.port) for _ in range(4)} == {"blue"}  # b2 in maint takes nothing
    site.pools["green"].append(member(http_backends, "g2", "green-2"))
    before = proc.show_proc()
    assert proc.apply_config(site.cfg(), site.map()).reloaded
    assert proc.show_proc().current_worker != before.current_worker
    states = haproxy_servers(proc)
    assert states[("be_web:blue", "b1")].weight == 7
    assert states[("be_web:blue", "b2")].admin == "maint"
    assert {get(site.port) for _ in range(4)} == {"blue"}
    proc.set_state("be_web:blue", "b2", "ready")
    wait_for(lambda: {get(site.port) for _ in range(8)} == {"blue", "blue-2"},
             timeout=10, message="b2 back in rotation")
    with pytest.raises(HaproxyError, match="weight"):
        proc.set_weight("be_web:blue", "b1", 300)
    with pytest.raises(HaproxyError, match="No such server"):
        proc.set_weight("be_web:blue", "nope", 3)
    with pytest.raises(HaproxyError, match="invalid"):
        proc.set_state("be_web:blue", "b1;shutdown sessions", "maint")


def test_ipv6_member(proxies: Callable[..., HaproxyProcess], http_backends: HttpBackends) -> None:
    proc = proxies()
    s = Site(proc, free_port(), {"blue": [member(http_backends, "v6", "six", "::1")]})
    proc.apply_config(s.cfg(), s.map())
    assert "server v6 [::1]:" in s.cfg().decode()
    assert get(s.port) == "six"


def test_readopt_running_master_after_restart(
    site: Site, proxies: Callable[..., HaproxyProcess]
) -> None:
    first = site.proc
    pid = first.show_proc().master_pid
    again = HaproxyProcess(first.state_dir, HAPROXY)  # a restarted daemon
    assert again.master_pid() == pid  # from the pid file, confirmed alive and haproxy
    result = again.apply_config(site.cfg(), site.map())
    assert not result.reloaded
    assert again.show_proc().master_pid == pid
    site.flip("green", again)
    assert get(site.port) == "green"


def test_stale_pid_file_is_not_trusted(proxies: Callable[..., HaproxyProcess],
                                       http_backends: HttpBackends) -> None:
    proc = proxies()
    proc.state_dir.mkdir(parents=True)
    proc.pid_path.write_text(f"{os.getpid()}\n")  # alive, but not an haproxy
    assert proc.master_pid() is None
    s = Site(proc, free_port(), {"blue": [member(http_backends, "b1", "b")]})
    proc.apply_config(s.cfg(), s.map())
    assert proc.master_pid() == proc.show_proc().master_pid != os.getpid()
    assert get(s.port) == "b"


def test_external_master(site: Site) -> None:
    ext = HaproxyProcess(site.proc.state_dir, HAPROXY, master_socket=site.proc.master_socket,
                         config_path=site.proc.config_path)
    assert ext.external and ext.is_running()
    site.flip("green", ext)
    assert get(site.port) == "green"
    site.pools["blue"][0] = MemberView("b1", "127.0.0.1", site.pools["blue"][0].port, 9)
    assert ext.apply_config(site.cfg(), site.map()).reloaded
    ext.stop()  # never stops an HAProxy it does not own
    assert ext.is_running()
    assert get(site.port) == "green"


def test_no_failed_requests_during_flips_and_reloads(site: Site,
                                                     http_backends: HttpBackends) -> None:
    proc = site.proc
    loads = [KeepAliveLoad(site.port, think=0.003) for _ in range(2)]

    def served() -> int:
        return sum(load.served for load in loads)

    def more_served(than: int) -> Callable[[], bool]:
        return lambda: served() > than + 50

    for load in loads:
        load.start()
    try:
        wait_for(lambda: all(load.served > 20 for load in loads), timeout=10,
                 message="load started")
        reloads = 0
        for i in range(10):
            site.flip("green" if i % 2 == 0 else "blue")
            wait_for(more_served(served()), timeout=10, message="traffic after a flip")
            if i % 2 == 1:
                site.pools["blue"].append(member(http_backends, f"extra{i}", "blue"))
                assert proc.apply_config(site.cfg(), site.map()).reloaded
                reloads += 1
                wait_for(more_served(served()), timeout=10, message="traffic after a reload")
        assert reloads == 5
    finally:
        for load in loads:
            load.stop()
    failures = [f for load in loads for f in load.failures]
    assert failures == []
    assert set().union(*(load.ok for load in loads)) == {"blue", "green"}
    assert served() > 15 * 50


def test_stop_ends_master_and_workers(proxies: Callable[..., HaproxyProcess],
                                      http_backends: HttpBackends) -> None:
    proc = proxies()
    s = Site(proc, free_port(), {"blue": [member(http_backends, "b1", "b")]})
    proc.apply_config(s.cfg(), s.map())
    info = proc.show_proc()
    proc.stop()
    assert not proc.is_running()
    assert proc.master_pid() is None
    for pid in [info.master_pid, *(w.pid for w in info.all_workers)]:
        assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid)
    with pytest.raises(OSError):
        get(s.port)
    # The daemon's next apply brings a stopped (or crashed) HAProxy of its own back.
    result = proc.apply_config(s.cfg(), s.map())
    assert result.worker_pid is not None
    assert proc.show_proc().master_pid != info.master_pid
    assert get(s.port) == "b"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "gone"


# --------------------------------------------------------------------------- dynamic servers


def _servers_of(proc: HaproxyProcess, worker: int) -> set[str]:
    """Server names of be_web:blue in worker `worker`."""
    text = proc.worker_command("show servers state be_web:blue", worker)
    return {f[3] for f in (ln.split() for ln in text.splitlines())
            if len(f) > 3 and f[0].isdigit()}


def test_dynamic_servers_go_to_every_live_worker(site: Site,
                                                  http_backends: HttpBackends) -> None:
    proc = site.proc
    site.pools["blue"].append(member(http_backends, "b2", "blue-2", "127.0.96.2"))
    assert proc.apply_config(site.cfg(), site.map()).reloaded
    # An idle keep-alive connection keeps this worker alive after the next reload.
    conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=5)
    try:
        conn.request("GET", "/")
        assert conn.getresponse().read() in (b"blue", b"blue-2")
        old = proc.show_proc().current_worker
        assert old is not None
        new = proc.reload().current_worker
        assert new is not None and new.pid != old.pid
        workers = proc.live_workers()
        assert workers[0] == new.pid and old.pid in workers
        assert "b2" in _servers_of(proc, new.pid) and "b2" in _servers_of(proc, old.pid)
        # Removed: HAProxy refuses admin changes in the old worker, whose proxies
        # stopped with the reload (it only finishes its connections); the current
        # worker must succeed.
        assert proc.remove_server("be_web:blue", "b2", drain_timeout=5.0) == 0
        assert "b2" not in _servers_of(proc, new.pid)
        assert {get(site.port) for _ in range(6)} == {"blue"}
        # Added: the current worker serves it; the old one's proxies stopped with the
        # reload (no new request goes there), so it is not left there in maintenance.
        b3 = http_backends.start("blue-3", "127.0.96.3")
        proc.add_server("be_web:blue", "b3", f"127.0.96.3:{b3.port}",
                        ("inter", "500ms", "weight", "100", "check"), health=True,
                        enable=True)
        assert "b3" in _servers_of(proc, new.pid) and "b3" not in _servers_of(proc, old.pid)
        wait_for(lambda: {get(site.port) for _ in range(6)} == {"blue", "blue-3"},
                 timeout=5, message="b3 serving")
        # The old worker still answers its connection (one more request, then it closes
        # it), with the servers it had: b2 too, still up here. A member gone for good
        # would fail to connect, and the request be redispatched (`option redispatch`).
        conn.request("GET", "/")
        assert conn.getresponse().read() in (b"blue", b"blue-2")
    finally:
        conn.close()


def test_a_busy_removed_server_is_shut_down_after_its_drain_timeout(
        site: Site, http_backends: HttpBackends) -> None:
    proc = site.proc
    slow = http_backends.start("slow", "127.0.96.3")
    slow.slow = 5.0
    proc.add_server("be_web:blue", "s1", f"127.0.96.3:{slow.port}", ("weight", "100"),
                    health=False, enable=True)
    proc.set_state("be_web:blue", "b1", "maint")  # s1 takes the slow request
    result: list[object] = []

    def slow_request() -> None:
        try:
            result.append(get(site.port, "/slow"))
        except (OSError, AssertionError, http.client.HTTPException) as exc:
            result.append(exc)

    t = threading.Thread(target=slow_request)
    t.start()
    wait_for(lambda: "used_cur" in (text := proc.worker_command(
        "show servers conn be_web:blue")) and any(
            ln.startswith("be_web:blue/s1 ") and ln.split()[6] != "0"
            for ln in text.splitlines()), timeout=5, interval=0.01,
        message="the slow request under way")
    proc.set_state("be_web:blue", "b1", "ready")
    t0 = time.monotonic()
    assert proc.remove_server("be_web:blue", "s1", drain_timeout=0.3) == 1
    assert proc.pending_removals == 1
    assert proc.finish_removals() == 1  # still busy, not yet timed out
    wait_for(lambda: proc.finish_removals() == 0, timeout=5, interval=0.05,
             message="s1 deleted after its drain timeout")
    assert time.monotonic() - t0 < 4.0, "the sessions were shut down, not waited for"
    assert ("be_web:blue", "s1") not in haproxy_servers(proc)
    t.join(10)
    assert len(result) == 1 and not isinstance(result[0], str)  # cut: it ran too long
    assert {get(site.port) for _ in range(4)} == {"blue"}


@pytest.mark.parametrize(("args", "what"), [
    (("be_web:blue", "b2;shutdown sessions", "127.0.0.1:80", ()), "server"),
    (("be_web:blue\nx", "b2", "127.0.0.1:80", ()), "backend"),
    (("be_web:blue", "b2", "127.0.0.1:80 ;", ()), "address"),
    (("be_web:blue", "b2", "localhost:80", ()), "address"),
    (("be_web:blue", "b2", "127.0.0.1:80", ("check;", )), "server option"),
    (("be_web:blue", "b2", "127.0.0.1:80", ("inter 1s",)), "server option"),
    (("be_web:blue", "b2", "127.0.0.1:80", ("weight", "1\nshow env")), "server option"),
])
def test_dynamic_server_arguments_are_allow_listed(site: Site, args: tuple[object, ...],
                                                   what: str) -> None:
    proc = site.proc
    before = proc.worker_command("show servers state")
    with pytest.raises(HaproxyError, match=f"invalid {what}"):
        proc.add_server(*args, health=False, enable=True)  # type: ignore[arg-type]
    with pytest.raises(HaproxyError, match="invalid"):
        proc.remove_server("be_web:blue", "b1;quit", 1.0)
    with pytest.raises(HaproxyError, match="invalid address"):
        proc.set_addr("be_web:blue", "b1", "127.0.0.1 port 1;", 80)
    assert _servers_of(proc, proc.live_workers()[0]) == {"b1"}
    assert proc.worker_command("show servers state").count("\n") == before.count("\n")
