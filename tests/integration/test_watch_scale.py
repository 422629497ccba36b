"""Issue 9 against the real Consul: what another host writes does not make this daemon read
its desired state again, counted in Consul reads (`reconciler_consul_watch_reads_total`),
not in time.

A daemon (`reconciler run` with its HAProxy) on a fresh prefix holding a network, a
container spec, a service and a policy (every desired area non-empty: Consul answers a
missing prefix with the global index). Then other hosts' business is written: status
documents, allocations of a network this host does not have (with their generation
bumps), audit records. The desired-state watch must not read at all for them, the
allocation index is read, and no network's allocations are; a user change afterwards is
read and applied.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_for
from prometheus_client.parser import text_string_to_metric_families

from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings
from reconciler.adapters.haproxy import HaproxyProcess
from reconciler.kvlayout import Layout

from .daemon_helpers import DaemonProcess


def reads(daemon: DaemonProcess) -> dict[str, float]:
    text = urllib.request.urlopen(daemon.url("/metrics"), timeout=5).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "reconciler_consul_watch_reads":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[s.labels["watch"]] = s.value
    return out


@pytest.fixture()
def env(consul_addr: str, tmp_path: Path) -> Iterator[tuple[DaemonProcess, ConsulKV, Layout]]:
    prefix = f"t-scale-{secrets.token_hex(3)}/"
    L = Layout(prefix)
    kv = ConsulKV(ConsulSettings.from_env())
    kv.put(L.network("n"), json.dumps({"subnet": "10.77.231.0/24", "bridge": "brw231",
                                       "driver": "linux"}).encode())
    kv.put(L.container("spec"), json.dumps({"interfaces": [
        {"name": "eth1", "network": "n", "address": "10.77.231.5/24"}]}).encode())
    kv.put(L.service_config("web"), json.dumps({"bind": "127.0.0.1:0"}).encode()
           .replace(b":0", f":{_port()}".encode()))
    kv.put(L.service_active("web"), b"blue")
    kv.put(L.policy(), json.dumps({"isolate": [], "allow": []}).encode())
    daemon = DaemonProcess(prefix, f"w-{secrets.token_hex(2)}", tmp_path, resync=300)
    daemon.start()
    try:
        wait_for(lambda: kv.get(L.node_status(daemon.node)) is not None, timeout=30,
                 message="the daemon publishes its status")
        yield daemon, kv, L
    finally:
        daemon.stop()
        kv.delete(prefix, recurse=True)


def _port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_other_hosts_writes_do_not_reread_the_desired_state(
        env: tuple[DaemonProcess, ConsulKV, Layout]) -> None:
    daemon, kv, L = env
    wait_for(lambda: reads(daemon).get("desired", 0) >= 4, timeout=10)
    wait_for(lambda: kv.get(L.host(daemon.node)) is not None, timeout=10,
             message="the daemon registers in hosts/")
    # Its own registration wakes its hosts watch: let that read happen first.
    wait_for(lambda: reads(daemon).get("hosts", 0) >= 2, timeout=10)
    before = reads(daemon)
    for i in range(30):
        kv.put(L.node_status(f"other{i}"), json.dumps({"node": f"other{i}", "i": i}).encode())
        kv.put(L.allocation("elsewhere", f"10.77.232.{i + 10}"), json.dumps(
            {"node": f"other{i}", "container": f"c{i}", "interface": "eth1"}).encode())
        kv.put(L.ipam_index("elsewhere"), f"other{i} {i}".encode())
        kv.put(L.audit_record("web", 1.0 + i), b"{}")
    # The writes are seen by the allocation index watch (it reads once per wake) ...
    wait_for(lambda: reads(daemon).get("allocation_index", 0)
             > before.get("allocation_index", 0), timeout=10,
             message="the allocation index watch reads the bumps")
    after = reads(daemon)
    # ... but the desired state is not read again, nor a network's allocations: this host
    # has no container on "elsewhere".
    assert after["desired"] == before["desired"], (before, after)
    assert after["allocations"] == before["allocations"], (before, after)
    # (The registry's watch saw a wake-up or two during the 120 writes, not one each.)
    assert after["hosts"] - before["hosts"] <= 2, (before, after)
    # A user change is read and applied (status index past it).
    kv.put(L.service_active("web"), b"green")
    item = kv.get(L.service_active("web"))
    assert item is not None
    wait_for(lambda: json.loads(kv.get(L.node_status(daemon.node)).value)  # type: ignore[union-attr]
             .get("index", 0) >= item.modify_index, timeout=10,
             message="the flip is applied")
    assert reads(daemon)["desired"] > after["desired"]


def test_serve_renders_only_its_services_and_reads_only_their_members(
        consul_addr: str, tmp_path: Path) -> None:
    prefix = f"t-serve-{secrets.token_hex(3)}/"
    L = Layout(prefix)
    kv = ConsulKV(ConsulSettings.from_env())
    for svc in ("web", "api"):
        kv.put(L.service_config(svc), json.dumps({"bind": f"127.0.0.1:{_port()}",
                                                  "mode": "tcp"}).encode())
        kv.put(L.service_active(svc), b"blue")
    daemon = DaemonProcess(prefix, f"s-{secrets.token_hex(2)}", tmp_path, resync=300,
                           run_args=["--serve", "web"])
    daemon.start()
    cfg = daemon.state_dir / "haproxy.cfg"
    try:
        wait_for(lambda: cfg.exists() and "web" in cfg.read_text(), timeout=30,
                 message="HAProxy serves web")
        assert "api" not in cfg.read_text()
        # Its status says which services it serves (`reconciler cutover` waits for it
        # only for those).
        wait_for(lambda: json.loads(kv.get(L.node_status(daemon.node)).value)  # type: ignore[union-attr]
                 .get("proxy", {}).get("serves") == ["web"], timeout=10,
                 message="the status names the services served")
        before = reads(daemon)
        # Other nodes publish members of both services (with their generation bumps).
        for svc, port in (("api", 9001), ("web", 9002)):
            kv.put(L.published_member(svc, "blue", f"other_{svc}"), json.dumps(
                {"address": "127.0.0.1", "port": port}).encode())
            kv.put(L.members_index(svc), f"other {svc}".encode())
        wait_for(lambda: "other_web" in cfg.read_text(), timeout=10,
                 message="web's published member rendered")
        after = reads(daemon)
        assert after["members"] - before["members"] == 1  # web's piece only, not api's
        assert "other_api" not in cfg.read_text() and "api" not in cfg.read_text()
    finally:
        daemon.stop()
        with contextlib.suppress(Exception):
            HaproxyProcess(daemon.state_dir).stop()
        kv.delete(prefix, recurse=True)


def test_read_versions_agrees_with_read_prefix(consul_addr: str) -> None:
    kv = ConsulKV(ConsulSettings.from_env())
    prefix = f"t-ver-{secrets.token_hex(3)}/"
    sid = kv.session_create("rtest-versions", ttl="30s", behavior="delete")
    try:
        assert kv.read_versions(prefix)[1] == {}  # nothing there: no error
        for i in range(5):
            kv.put(f"{prefix}k{i}", f"v{i}".encode())
        kv.put(f"{prefix}held", b"x", acquire=sid)
        kv.put(f"{prefix}k2", b"v2 again")
        full = kv.read_prefix(prefix)
        index, versions = kv.read_versions(prefix)
        assert index == full.index
        assert versions == {k: (i.modify_index, i.session) for k, i in full.items.items()}
        assert versions[f"{prefix}held"][1] == sid
        # The names with keys under them, without their values: what a bucketed index
        # (several services per generation key) lists when every piece is wanted.
        kv.put(f"{prefix}svc-a/blue/m1", b"{}")
        kv.put(f"{prefix}svc-a/green/m2", b"{}")
        kv.put(f"{prefix}svc-b/blue/m1", b"{}")
        assert sorted(kv.list_children(prefix)) == ["svc-a", "svc-b"]
        assert kv.list_children(f"{prefix}nothing/") == []
    finally:
        kv.session_destroy(sid)
        kv.delete(prefix, recurse=True)
