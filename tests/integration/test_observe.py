"""End-to-end tests of the daemon's health and metrics endpoint and its JSON logs
(`reconciler run --listen HOST:PORT --log-format json` as a process).

Owns: /livez and /readyz answering 200 once the daemon synced; /readyz answering 503
naming the Consul check while Consul is unreachable (the daemon is pointed at a port
where nothing listens: the shared Consul is never stopped); /metrics parsed with
prometheus_client's own text parser, its counters moving after a container is attached
and after a flip of a service's active pool; every log line one JSON object with the
fields of the contract; `--listen off` serving nothing (even with RECONCILER_LISTEN
set), and RECONCILER_LISTEN alone choosing the address.

One synced daemon (OVS network with a pool, one container spec, one HTTP service with two
pools of loopback backends) serves the module; the Consul-less daemons are started per
test and stopped at its end.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import ContainerFactory, HttpBackends, free_port, wait_for
from prometheus_client.parser import text_string_to_metric_families

from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings
from reconciler.adapters.haproxy import HaproxyProcess

from .daemon_helpers import (
    DaemonProcess,
    container_pid,
    free_subnet_octets,
    log_during,
    netns_up_with,
    run,
)

pytestmark = pytest.mark.integration

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def get(url: str) -> tuple[int, str]:
    """(status, body) of a GET; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(daemon: DaemonProcess) -> Samples:
    """Every sample of /metrics, parsed by prometheus_client: name -> labels -> value."""
    status, body = get(daemon.url("/metrics"))
    assert status == 200
    out: Samples = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def scrape_until(daemon: DaemonProcess, what: str, ok: Callable[[Samples], bool],
                 timeout: float = 10) -> Samples:
    """Scrape until `ok` holds; that scrape."""
    def probe() -> Samples | None:
        s = scrape(daemon)
        return s if ok(s) else None
    return wait_for(probe, timeout=timeout, message=what)


@dataclass
class Env:
    rid: str
    prefix: str
    node: str
    kv: ConsulKV
    daemon: DaemonProcess
    network: str
    bridge: str
    octet: int
    spec: str
    port: int
    backends: HttpBackends

    def put(self, rel: str, value: Any) -> None:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        self.kv.put(self.prefix + rel, raw)

    def serves(self, text: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=2) as r:
                return text in r.read().decode()
        except (OSError, urllib.error.URLError):
            return False


@pytest.fixture(scope="module")
def env(consul_addr: str, ovs_datapath: str, tmp_path_factory: pytest.TempPathFactory,
        ) -> Iterator[Env]:
    rid = secrets.token_hex(3)
    prefix, node = f"rto-{rid}/", f"rtonode-{rid}"
    workdir: Path = tmp_path_factory.mktemp(f"observe-{rid}")
    octet = free_subnet_octets(1, int(rid, 16) + 11)[0]
    kv = ConsulKV(ConsulSettings.from_env())
    backends = HttpBackends()
    daemon = DaemonProcess(prefix, node, workdir, resync=2.0, run_args=["--log-format", "json"],
                           extra_env={"RECONCILER_OVS_DATAPATH": ovs_datapath})
    e = Env(rid, prefix, node, kv, daemon, f"rton-{rid}", f"rtob{rid}", octet,
            f"rtoc-{rid}", free_port(), backends)
    blue, green = backends.start("blue b1\n"), backends.start("green g1\n")
    try:
        e.put(f"networks/{e.network}", {
            "subnet": f"10.77.{octet}.0/24", "bridge": e.bridge, "driver": "ovs",
            "vlan": 400 + octet % 500, "pool": {"start": f"10.77.{octet}.10",
                                               "end": f"10.77.{octet}.29"}})
        e.put(f"containers/{e.spec}", {"interfaces": [
            {"name": "eth1", "network": e.network, "address": "auto"}]})
        e.put("services/web/config", {"bind": f"127.0.0.1:{e.port}", "mode": "http",
                                      "health": {"path": "/health", "interval_ms": 500}})
        e.put("services/web/active", b"blue")
        e.put("services/web/pools/blue/b1", {"address": "127.0.0.1", "port": blue.port})
        e.put("services/web/pools/green/g1", {"address": "127.0.0.1", "port": green.port})
        daemon.start()
        wait_for(lambda: e.serves("blue"), timeout=30, message="web serving blue")
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
        run(["ovs-vsctl", "--timeout=10", "--if-exists", "del-br", e.bridge], check=False)
        backends.close()
        kv.close()


@pytest.fixture(autouse=True)
def _daemon_log_on_failure(env: Env) -> Iterator[None]:
    yield from log_during(env.daemon)


def test_livez_and_readyz_answer_200_once_synced(env: Env) -> None:
    wait_for(lambda: get(env.daemon.url("/readyz")) == (200, "ok\n"), timeout=30,
             message="/readyz 200")
    status, body = get(env.daemon.url("/readyz?verbose"))
    assert status == 200
    assert body.splitlines() == ["[+]consul-watch ok", "[+]docker-events ok",
                                 "[+]initial-sync ok", "[+]reconcile-failures ok",
                                 "readyz check passed"]
    assert get(env.daemon.url("/livez")) == (200, "ok\n")
    assert get(env.daemon.url("/livez?verbose"))[1].splitlines() == [
        "[+]loops ok", "[+]reconcile-stuck ok", "livez check passed"]
    assert get(env.daemon.url("/nothing"))[0] == 404


def test_metrics_move_after_a_container_is_attached(env: Env,
                                                     container_factory: ContainerFactory,
                                                     ) -> None:
    before = scrape(env.daemon)
    assert value(before, "reconciler_ipam_pool_size", network=env.network) == 20
    attached = value(before, "reconciler_interfaces_attached_total")
    ok = value(before, "reconciler_reconciles_total", kind="container", result="ok")
    c = container_factory(labels={"reconciler.name": env.spec})
    pid = container_pid(c)
    wait_for(lambda: netns_up_with(pid, "eth1"), timeout=20, message="eth1 attached")

    after = scrape_until(env.daemon, "interfaces_attached_total + 1", lambda s: value(
        s, "reconciler_interfaces_attached_total") >= attached + 1)
    assert value(after, "reconciler_reconciles_total", kind="container", result="ok") > ok
    assert value(after, "reconciler_attached_interfaces") >= 1
    assert value(after, "reconciler_ipam_allocations", network=env.network) >= 1
    assert value(after, "reconciler_reconcile_duration_seconds_count", kind="container") > 0
    assert value(after, "reconciler_consul_last_contact_age_seconds") < 30
    assert value(after, "reconciler_docker_event_stream_connects_total") >= 1
    for name, by_labels in after.items():  # no label per container or address
        assert name.startswith("reconciler_")
        for labels in by_labels:
            assert {k for k, _ in labels} <= {"kind", "result", "reason", "change",
                                              "network", "le", "watch", "bridge",
                                              "source", "destination"}, (name, labels)
    body = get(env.daemon.url("/metrics"))[1]
    assert c.id[:12] not in body and c.name not in body and f"10.77.{env.octet}." not in body


def test_metrics_move_after_a_flip(env: Env) -> None:
    before = scrape(env.daemon)
    runtime_ok = value(before, "reconciler_haproxy_runtime_changes_total", result="ok")
    proxy_ok = value(before, "reconciler_reconciles_total", kind="proxy", result="ok")
    target = "green" if env.serves("blue") else "blue"
    env.put("services/web/active", target.encode())
    wait_for(lambda: env.serves(target), timeout=10, message=f"web serving {target}")
    # Counted during the reconcile; the reconcile itself once it returned.
    after = scrape_until(
        env.daemon, "haproxy_runtime_changes_total{ok} and proxy reconciles moved",
        lambda s: value(s, "reconciler_haproxy_runtime_changes_total", result="ok")
        > runtime_ok and value(s, "reconciler_reconciles_total", kind="proxy", result="ok")
        > proxy_ok)
    assert value(after, "reconciler_haproxy_reloads_total", result="failed") == 0
    # A member added to a pool is a runtime change (a dynamic server); a new pool
    # changes the config: a reload, counted.
    reloads = value(after, "reconciler_haproxy_reloads_total", result="ok")
    runtime_ok = value(after, "reconciler_haproxy_runtime_changes_total", result="ok")
    extra = env.backends.start(f"{target} x2\n")
    env.put(f"services/web/pools/{target}/x2", {"address": "127.0.0.1", "port": extra.port})
    member = scrape_until(env.daemon, "haproxy_runtime_changes_total{ok} moved", lambda s: value(
        s, "reconciler_haproxy_runtime_changes_total", result="ok") > runtime_ok)
    assert value(member, "reconciler_haproxy_reloads_total", result="ok") == reloads
    env.put("services/web/pools/spare/x3", {"address": "127.0.0.1", "port": extra.port})
    scrape_until(env.daemon, "haproxy_reloads_total{ok} + 1", lambda s: value(
        s, "reconciler_haproxy_reloads_total", result="ok") == reloads + 1)


def test_log_lines_are_json_with_the_contract_fields(env: Env,
                                                      container_factory: ContainerFactory,
                                                      ) -> None:
    start = env.daemon.log_size()
    c = container_factory(labels={"reconciler.name": env.spec})
    pid = container_pid(c)
    wait_for(lambda: netns_up_with(pid, "eth1"), timeout=20, message="eth1 attached")

    def lines() -> list[dict[str, Any]]:
        text = env.daemon.log_text(start)
        return [json.loads(line) for line in text.splitlines()
                if line and not line.startswith("===== start")]

    about = wait_for(lambda: [ln for ln in lines() if ln.get("container") == c.name],
                     timeout=10, message="a log line about the container")
    for line in lines():
        assert {"time", "level", "component", "message"} <= set(line), line
        assert line["level"] in ("debug", "info", "warning", "error", "critical")
        assert line["time"].endswith("Z")
    first = about[0]
    assert first["key"] == f"container:{c.id[:12]}"
    assert first["component"] == "daemon"
    assert c.name in first["message"]


def _refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


def _consul_less(tmp_path: Path, ovs_datapath: str, **kwargs: Any) -> DaemonProcess:
    """A daemon pointed at a Consul port where nothing listens."""
    rid = secrets.token_hex(3)
    dead = free_port()
    env = {"RECONCILER_OVS_DATAPATH": ovs_datapath, "CONSUL_HTTP_ADDR": f"127.0.0.1:{dead}",
           **kwargs.pop("extra_env", {})}
    return DaemonProcess(f"rto-dead-{rid}/", f"rtodead-{rid}", tmp_path, extra_env=env,
                         **kwargs)


def test_readyz_503_names_consul_while_it_is_unreachable(tmp_path: Path,
                                                         ovs_datapath: str) -> None:
    port = free_port()
    # RECONCILER_LISTEN chooses the address when --listen is not given.
    daemon = _consul_less(tmp_path, ovs_datapath, listen="",
                          extra_env={"RECONCILER_LISTEN": f"127.0.0.1:{port}"})
    daemon.start()
    daemon.listen = f"127.0.0.1:{port}"  # for url(): the daemon was given no --listen
    try:
        body = wait_for(lambda: (r := get(daemon.url("/readyz")))[0] == 503 and r[1],
                        timeout=15, ignore=(OSError,), message="/readyz 503")
        assert body.splitlines()[0] == "[-]consul-watch failed: Consul not reached yet"
        assert "readyz check failed" in body
        assert "[+]" not in body  # only the failing checks, without ?verbose
        assert get(daemon.url("/livez")) == (200, "ok\n")  # waiting is alive
        s = scrape_until(daemon, "consul_errors_total{unavailable} >= 2", lambda x: value(
            x, "reconciler_consul_errors_total", reason="unavailable") >= 2, timeout=15)
        assert value(s, "reconciler_consul_last_contact_age_seconds") == float("inf")
        assert str(port) in daemon.log_text()  # "serving ... on 127.0.0.1:PORT"
        assert daemon.alive()
    finally:
        assert daemon.stop() == 0


def test_listen_off_serves_nothing(tmp_path: Path, ovs_datapath: str) -> None:
    port = free_port()
    daemon = _consul_less(tmp_path, ovs_datapath, listen="off",
                          extra_env={"RECONCILER_LISTEN": f"127.0.0.1:{port}"})
    daemon.start()
    try:
        # Two attempts (0.5 s apart) at Consul: a server would have bound long before.
        wait_for(lambda: daemon.log_text().count("waiting for Consul") >= 2, timeout=15,
                 message="the daemon waiting for Consul")
        assert _refused(port)
        assert "serving /livez" not in daemon.log_text()
        assert daemon.alive()
    finally:
        assert daemon.stop() == 0
