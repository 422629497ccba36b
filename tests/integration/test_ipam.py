"""Integration tests of `reconciler.ipam` against the real Consul dev agent.

Each test works under its own `rtest-<hex>/` prefix, deleted afterwards. The race tests
start several separate Python processes (each an `Ipam` with its own node name and its
own Consul connection), hold them at a file barrier, release them at once and check that
Consul's create-only check-and-set hands every address out exactly once.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for

from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings
from reconciler.errors import PoolExhausted
from reconciler.ipam import Ipam
from reconciler.model import AddressPool, Network

pytestmark = pytest.mark.integration

ip = ipaddress.ip_address
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def kv(consul_addr: str) -> Iterator[ConsulKV]:
    with ConsulKV(ConsulSettings.from_env({"CONSUL_HTTP_ADDR": consul_addr})) as client:
        yield client


@pytest.fixture
def prefix(kv: ConsulKV) -> Iterator[str]:
    p = f"rtest-{secrets.token_hex(4)}/"
    yield p
    kv.delete(p, recurse=True)


def network(name: str, third: int, start: int, end: int, gateway: int | None = 1) -> Network:
    return Network(
        name,
        ipaddress.ip_network(f"10.77.{third}.0/24"),
        f"br-rt{third}",
        gateway=ip(f"10.77.{third}.{gateway}") if gateway is not None else None,
        pool=AddressPool(ip(f"10.77.{third}.{start}"), ip(f"10.77.{third}.{end}")),
    )


def test_allocation_is_stable_for_container_and_interface(kv: ConsulKV, prefix: str) -> None:
    net = network("vnet1", 40, 10, 200)
    ipam = Ipam(kv, prefix, "node-a")
    a1 = ipam.allocate(net, "c1", "eth1")
    assert ipam.allocate(net, "c1", "eth1") == a1
    # A new instance (daemon restart) finds the same key again.
    assert Ipam(kv, prefix, "node-a").allocate(net, "c1", "eth1") == a1
    a2 = ipam.allocate(net, "c1", "eth2")
    assert a2 != a1
    item = kv.get(f"{prefix}ipam/vnet1/{a1}")
    assert item is not None
    doc = json.loads(item.value)
    assert (doc["node"], doc["container"], doc["interface"]) == ("node-a", "c1", "eth1")
    assert abs(doc["allocated_at"] - time.time()) < 60
    assert len(kv.read_prefix(f"{prefix}ipam/").items) == 2


def test_reassert_recreates_a_lost_key_unless_someone_holds_it(
        kv: ConsulKV, prefix: str) -> None:
    net = network("vnet1", 41, 10, 20)
    a = Ipam(kv, prefix, "node-a")
    ip = a.allocate(net, "c1", "eth1")
    key = f"{prefix}ipam/vnet1/{ip}"
    kv.delete(key)  # reclaimed while node-a was away
    assert a.reassert("vnet1", ip, "c1", "eth1")
    item = kv.get(key)
    assert item is not None and json.loads(item.value)["container"] == "c1"
    kv.delete(key)
    b = Ipam(kv, prefix, "node-b")
    assert b.claim(net, ip, "c9", "eth1") is None  # taken by another container meanwhile
    assert not a.reassert("vnet1", ip, "c1", "eth1")
    item = kv.get(key)
    assert item is not None and json.loads(item.value)["container"] == "c9"


def test_distinct_in_pool_never_gateway_or_reserved_then_exhausted(
    kv: ConsulKV, prefix: str
) -> None:
    net = network("vnet2", 41, 1, 10, gateway=1)  # .1 is the gateway and in the pool
    reserved = [ip("10.77.41.2"), ip("10.77.41.3")]
    ipam = Ipam(kv, prefix, "node-a")
    got = [ipam.allocate(net, f"c{i}", "eth1", reserved) for i in range(7)]
    assert len(set(got)) == 7
    assert set(got) == {ip(f"10.77.41.{i}") for i in range(4, 11)}
    with pytest.raises(PoolExhausted, match="is full"):
        ipam.allocate(net, "c7", "eth1", reserved)
    keys = set(kv.read_prefix(f"{prefix}ipam/vnet2/").items)
    assert keys == {f"{prefix}ipam/vnet2/{a}" for a in got}


def test_small_pool_full_and_release_returns_the_address(kv: ConsulKV, prefix: str) -> None:
    net = network("vnet3", 42, 100, 103, gateway=1)  # 4 addresses
    ipam = Ipam(kv, prefix, "node-a")
    got = {ipam.allocate(net, f"c{i}", "eth1"): f"c{i}" for i in range(4)}
    assert set(got) == {ip(f"10.77.42.{i}") for i in range(100, 104)}
    with pytest.raises(PoolExhausted):
        Ipam(kv, prefix, "node-b").allocate(net, "other", "eth1")
    (victim,) = [a for a in ipam.allocations("vnet3") if a.container == "c2"]
    assert ipam.release(victim) is True
    assert kv.get(f"{prefix}ipam/vnet3/{victim.address}") is None
    # The freed address is the only one left: the next container gets it.
    assert Ipam(kv, prefix, "node-b").allocate(net, "other", "eth1") == victim.address
    assert ipam.release_container("c0") == 1
    assert {a.container for a in ipam.allocations("vnet3")} == {"c1", "c3", "other"}


def test_reclaim_after_the_nodes_session_is_gone(kv: ConsulKV, prefix: str) -> None:
    net = network("vnet4", 43, 10, 50)
    sessions: dict[str, str] = {}
    for node in ("ghost", "live"):
        sid = kv.session_create(f"rtest-{node}", ttl="30s", behavior="delete")
        sessions[node] = sid
        assert kv.put(f"{prefix}nodes/{node}/status", b'{"node": "%s"}' % node.encode(),
                      acquire=sid)
    ghost, live = Ipam(kv, prefix, "ghost"), Ipam(kv, prefix, "live")
    ghost_addrs = {ghost.allocate(net, f"g{i}", "eth1") for i in range(3)}
    live_addr = live.allocate(net, "l0", "eth1")
    reaper = Ipam(kv, prefix, "reaper")
    try:
        assert reaper.alive_nodes() == {"ghost", "live"}
        assert reaper.reclaim_dead_nodes(grace=0.3) == []
        kv.session_destroy(sessions.pop("ghost"))  # the node goes away: its status with it
        wait_for(lambda: kv.get(f"{prefix}nodes/ghost/status") is None, timeout=10)
        first_seen = time.monotonic()
        assert reaper.reclaim_dead_nodes(grace=0.3, now=first_seen) == []  # clock starts
        released = wait_for(lambda: reaper.reclaim_dead_nodes(grace=0.3), timeout=10)
        assert time.monotonic() - first_seen > 0.3
        assert {a.address for a in released} == ghost_addrs
        assert {a.node for a in released} == {"ghost"}
        left = reaper.allocations("vnet4")
        assert [(a.node, a.address) for a in left] == [("live", live_addr)]
        assert reaper.reclaim_dead_nodes(grace=0.3) == []
    finally:
        for sid in sessions.values():
            kv.session_destroy(sid)


# ------------------------------------------------------------------ the race

WORKER = textwrap.dedent(
    """
    import ipaddress, json, os, sys, time
    from pathlib import Path
    from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings
    from reconciler.ipam import Ipam, PoolExhausted
    from reconciler.model import AddressPool, Network

    prefix, node, count, subnet, start, end, barrier = sys.argv[1:8]
    net = Network("race", ipaddress.ip_network(subnet), "br-race",
                  pool=AddressPool(ipaddress.ip_address(start), ipaddress.ip_address(end)))
    kv = ConsulKV(ConsulSettings.from_env())
    kv.get(prefix + "warm-up")  # connect before the barrier, so every worker starts hot
    puts = 0
    real_put = kv.put
    def counting_put(*a, **k):
        global puts
        puts += 1
        return real_put(*a, **k)
    kv.put = counting_put
    ipam = Ipam(kv, prefix, node)
    Path(barrier, node + ".ready").touch()
    go = Path(barrier, "go")
    deadline = time.monotonic() + 60
    while not go.exists():
        if time.monotonic() > deadline:
            sys.exit("no go signal")
        time.sleep(0.001)
    got, exhausted = {}, 0
    for i in range(int(count)):
        container = f"{node}-c{i}"
        try:
            got[container] = str(ipam.allocate(net, container, "eth1"))
        except PoolExhausted:
            exhausted += 1
    print(json.dumps({"node": node, "got": got, "exhausted": exhausted, "puts": puts}))
    """
)


def run_race(
    consul_addr: str, prefix: str, tmp_path: Path, workers: int, per_worker: int,
    subnet: str, start: str, end: str,
) -> list[dict[str, Any]]:
    script = tmp_path / "ipam_worker.py"
    script.write_text(WORKER)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {"CONSUL_HTTP_ADDR": consul_addr, "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), prefix, f"node{n}", str(per_worker), subnet, start,
             end, str(barrier)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for n in range(workers)
    ]  # fmt: skip
    try:

        def all_ready() -> bool:
            for p in procs:
                assert p.poll() is None, p.communicate()[1]
            return len(list(barrier.glob("*.ready"))) == workers

        wait_for(all_ready, timeout=60, message="workers at the barrier")
        (barrier / "go").touch()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            results.append(json.loads(out))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _check_kv_agrees(kv: ConsulKV, prefix: str, results: list[dict[str, Any]]) -> list[str]:
    handed = [(r["node"], c, a) for r in results for c, a in r["got"].items()]
    items = kv.read_prefix(f"{prefix}ipam/race/", consistent=True).items
    in_kv = {}
    for key, item in items.items():
        doc = json.loads(item.value)
        in_kv[key.rsplit("/", 1)[1]] = (doc["node"], doc["container"])
    assert in_kv == {a: (node, c) for node, c, a in handed}
    return [a for _, _, a in handed]


def test_race_four_processes_share_one_pool(
    kv: ConsulKV, prefix: str, consul_addr: str, tmp_path: Path
) -> None:
    results = run_race(consul_addr, prefix, tmp_path, 4, 20, "10.77.60.0/24", "10.77.60.1",
                       "10.77.60.100")
    addrs = _check_kv_agrees(kv, prefix, results)
    assert len(addrs) == 80
    assert len(set(addrs)) == 80
    pool = AddressPool(ip("10.77.60.1"), ip("10.77.60.100"))
    assert all(ip(a) in pool for a in addrs)
    assert all(r["exhausted"] == 0 for r in results)
    puts = sum(r["puts"] for r in results)
    print(f"race 4x20 from 100: {puts} create attempts for 80 addresses "
          f"({puts - 80} lost check-and-sets)")


def test_race_pool_smaller_than_demand(
    kv: ConsulKV, prefix: str, consul_addr: str, tmp_path: Path
) -> None:
    results = run_race(consul_addr, prefix, tmp_path, 4, 12, "10.77.61.0/24", "10.77.61.10",
                       "10.77.61.39")  # 30 addresses for 48 requests
    addrs = _check_kv_agrees(kv, prefix, results)
    assert len(addrs) == 30
    assert sorted(addrs, key=lambda a: int(ip(a))) == [f"10.77.61.{i}" for i in range(10, 40)]
    assert sum(r["exhausted"] for r in results) == 48 - 30
    puts = sum(r["puts"] for r in results)
    print(f"race 4x12 from 30: per node {[len(r['got']) for r in results]}, "
          f"{puts} create attempts")
