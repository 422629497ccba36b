"""Benchmark: a host's cost against the size of the cluster (issue 9).

Owns the "Cost against cluster size" figures of docs/performance.md. For each K (number
of allocations in Consul; default 1k, 10k, 100k) it fills a fresh prefix with what a
cluster of that size holds, then runs the real daemon (`reconciler run`, with its
HAProxy) as one host of it:

- K allocations across K/1000 (at least 10) networks, written by H simulated other
  hosts, each network with its generation key (what the daemons write);
- K/10 members across K/100 services (10 each, published by the other hosts under
  `members/` with their generation keys; in maintenance, so HAProxy does not check them;
  on 127.0.1.x, nothing ever connects to them), every service with its config (mode tcp)
  and `active`;
- K/100 container entries (`containers/`);
- H other hosts: registry entry `hosts/<h>` and status document `nodes/<h>/status`.

Then, per K:
1. idle: the daemon's CPU over a window with no write;
2. churn: R writes a second that are other hosts' business (allocations with their
   generation bump, status documents, audit records, members of services this host does
   not serve) and members of services it serves (`--serve`, default 5 of them; a quarter
   of the member writes; a weight changed: it must apply); daemon CPU, and the Consul reads
   its watches made per write (`reconciler_consul_watch_reads_total` by watch) with the
   bytes those reads returned (reads x the size of what each watch reads);
3. latency, while the churn goes on: a `containers/` entry put -> the daemon's applied
   index (`reconciler_applied_index`) at or past it; a flip of `active` -> HAProxy's map
   file on disk names the new pool (the daemon persists it after `set map`); a member
   published by another host to a served service (with its generation bump) ->
   HAProxy's running worker has the server (`show servers state`); p50/p95 of
   `--samples` each;
4. RSS at the end.

Baselines in the same run: K = 1k is the reference for the ratios of CPU at 10k and 100k
(the target: within 2x), and "whole prefix": the cost of ONE read and parse of the whole
prefix as the previous single-watch daemon did it for every write (measured here with
the same client and parser), times R.

Prints figures; asserts nothing about time. Everything it writes is under a prefix with a
run id, deleted at the end. Needs `make services` (Consul, HAProxy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import describe
from _proc import cpu_seconds, free_port, pct, rss_mib

from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings, TxnOp
from reconciler.adapters.haproxy import HaproxyProcess
from reconciler.kvlayout import Layout, kv_entries
from reconciler.model import parse_kv
from reconciler.proxy.view import backend_name

REPO = Path(__file__).resolve().parent.parent


class Cluster:
    """What a cluster of size K holds under one prefix."""

    def __init__(self, kv: ConsulKV, prefix: str, k: int, hosts: int) -> None:
        self.kv = kv
        self.layout = Layout(prefix)
        self.prefix = prefix
        self.k = k
        self.hosts = [f"other{i:03d}" for i in range(hosts)]
        self.networks = [f"net{i:03d}" for i in range(max(10, k // 1000))]
        self.services = [f"svc{i:04d}" for i in range(max(1, k // 100))]
        self.per_net = k // len(self.networks)
        self.n = 0

    def alloc_value(self, host: str, c: str) -> bytes:
        return json.dumps({"node": host, "container": c, "interface": "eth1",
                           "allocated_at": int(time.time())}, sort_keys=True).encode()

    def fill(self) -> None:
        L = self.layout
        ops: list[TxnOp] = []
        for i, net in enumerate(self.networks):
            ops.append(TxnOp.set(L.network(net), json.dumps({
                "subnet": f"10.77.{i % 256}.0/24", "bridge": f"brs{i:03d}",
                "driver": "linux",
                "pool": {"start": f"10.77.{i % 256}.10", "end": f"10.77.{i % 256}.250"},
            }).encode()))
        # Allocation keys: ipam/<net>/<address>, addresses unique per network.
        for i, net in enumerate(self.networks):
            for j in range(self.per_net):
                host = self.hosts[(i + j) % len(self.hosts)]
                addr = f"172.{16 + (j >> 16)}.{(j >> 8) & 255}.{j & 255}"
                ops.append(TxnOp.set(L.allocation(net, addr),
                                     self.alloc_value(host, f"c{i}-{j}")))
            ops.append(TxnOp.set(L.ipam_index(net), b"fill"))
        buckets: set[str] = set()
        for s_i, svc in enumerate(self.services):
            ops.append(TxnOp.set(L.service_config(svc), json.dumps(
                {"bind": f"127.0.0.1:{31000 + s_i}", "mode": "tcp"}).encode()))
            ops.append(TxnOp.set(L.service_active(svc), b"blue"))
            for m in range(10):  # published by the other hosts (members/, issue 9)
                ops.append(TxnOp.set(L.published_member(svc, "blue", f"m{m}"),
                                     self.member(s_i, m)))
            if L.members_index(svc) not in buckets:  # services share MEMBER_BUCKETS keys
                buckets.add(L.members_index(svc))
                ops.append(TxnOp.set(L.members_index(svc), b"fill"))
            if s_i == 0:  # the service the flips switch
                ops.append(TxnOp.set(L.member(svc, "green", "m0"), self.member(s_i, 10)))
        for c_i in range(max(10, self.k // 100)):  # the apps' container entries
            ops.append(TxnOp.set(L.container(f"app{c_i:04d}"), json.dumps({"interfaces": [
                {"name": "eth1", "network": self.networks[c_i % len(self.networks)],
                 "address": "auto"}]}).encode()))
        for h_i, host in enumerate(self.hosts):
            ops.append(TxnOp.set(L.host(host), json.dumps(
                {"node": host, "address": f"198.19.{h_i // 250}.{h_i % 250 + 1}"}).encode()))
            ops.append(TxnOp.set(L.node_status(host), self.status(host)))
        for first in range(0, len(ops), 2048):
            self.kv.txn(ops[first:first + 2048])

    def member(self, s_i: int, m: int, weight: int = 1) -> bytes:
        # In maintenance: HAProxy does not health-check them (10k servers checked every
        # 2 s would load the machine the daemon is measured on); the daemon's work for a
        # member is the same.
        return json.dumps({"address": f"127.0.{1 + s_i // 250}.{s_i % 250 + 1}",
                           "port": 9 + m, "weight": weight, "state": "maint"}).encode()

    def status(self, host: str) -> bytes:
        self.n += 1
        return json.dumps({"node": host, "index": self.n, "updated": time.time(),
                           "counts": {"containers": 12, "interfaces": 12},
                           "errors": {}, "address": "198.19.0.1"}).encode()

    def unrelated_write(self, rnd: random.Random) -> str:
        """One write of another host's business (or a served member); its kind."""
        L = self.layout
        kind = rnd.choices(["allocation", "status", "member", "audit"], [6, 6, 4, 2])[0]
        if kind == "allocation":
            i = rnd.randrange(len(self.networks))
            net = self.networks[i]
            j = rnd.randrange(self.per_net)
            addr = f"172.{16 + (j >> 16)}.{(j >> 8) & 255}.{j & 255}"
            self.kv.put(L.allocation(net, addr), self.alloc_value(
                rnd.choice(self.hosts), f"c{i}-{j}-{time.time_ns()}"))
            self.kv.put(L.ipam_index(net), f"churn {time.time_ns()}".encode())
        elif kind == "status":
            host = rnd.choice(self.hosts)
            self.kv.put(L.node_status(host), self.status(host))
        elif kind == "member":
            # One in four to a service this host serves (the first five), the rest to
            # services of other hosts' HAProxies.
            s_i = rnd.randrange(min(5, len(self.services))) if rnd.random() < 0.25 \
                else rnd.randrange(len(self.services))
            m = rnd.randrange(10)
            svc = self.services[s_i]
            self.kv.put(L.published_member(svc, "blue", f"m{m}"),
                        self.member(s_i, m, weight=rnd.randrange(1, 100)))
            self.kv.put(L.members_index(svc), f"churn {time.time_ns()}".encode())
        else:
            self.kv.put(L.audit_record(rnd.choice(self.services), time.time()), b"{}")
        return kind


class Churn:
    """R writes a second from a thread, until stopped."""

    def __init__(self, cluster: Cluster, rate: float) -> None:
        self.cluster = cluster
        self.rate = rate
        self.stop = threading.Event()
        self.count = 0
        self.kinds: dict[str, int] = {}
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        rnd = random.Random(9)
        t = time.monotonic()
        while not self.stop.is_set():
            kind = self.cluster.unrelated_write(rnd)
            self.count += 1
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            t += 1.0 / self.rate
            self.stop.wait(max(0.0, t - time.monotonic()))

    def __enter__(self) -> Churn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def metric_reads(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r'^reconciler_consul_watch_reads_total\{watch="(\w+)"\} (\S+)$',
                         text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def applied_index(url: str) -> int:
    """`reconciler_applied_index`: the Consul index of the desired state the daemon took
    in (the status document says it too, but is published at most 5 times a second)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    m = re.search(r"^reconciler_applied_index (\S+)$", text, re.M)
    return int(float(m.group(1))) if m else 0


def response_bytes(addr: str, prefix: str) -> int:
    url = f"http://{addr}/v1/kv/{prefix}?recurse"
    try:
        return len(urllib.request.urlopen(url, timeout=30).read())
    except OSError:
        return 0


def node_status(kv: ConsulKV, layout: Layout, node: str) -> dict[str, object]:
    item = kv.get(layout.node_status(node))
    return json.loads(item.value) if item is not None else {}


def run_k(args: argparse.Namespace, kv: ConsulKV, k: int, work: Path) -> dict[str, object]:
    prefix = f"scale-{secrets.token_hex(3)}/"
    layout = Layout(prefix)
    cluster = Cluster(kv, prefix, k, args.hosts)
    t0 = time.monotonic()
    cluster.fill()
    fill_s = time.monotonic() - t0
    node = f"scale-{secrets.token_hex(2)}"
    listen = f"127.0.0.1:{free_port()}"
    state = work / f"state-{k}"
    state.mkdir(parents=True)
    log = open(work / f"daemon-{k}.log", "w", encoding="utf-8")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "--prefix", prefix, "run", "--node", node,
         "--state-dir", str(state), "--listen", listen, "--resync", "30",
         "--serve", args.serve],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out: dict[str, object] = {"K": k, "fill_s": fill_s, "services": len(cluster.services),
                              "networks": len(cluster.networks)}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = node_status(kv, layout, node)
            proxy = st.get("proxy")
            if isinstance(proxy, dict) and proxy.get("last_reload"):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"daemon for K={k} did not publish its proxy status")
        time.sleep(args.settle)
        # 1. idle
        c0, w0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(args.window)
        out["cpu_idle"] = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - w0)
        # 2. churn (and 3. latency while it goes on)
        sizes = {"desired": sum(response_bytes(args.consul, a) for a in
                                layout.desired_areas()),
                 "hosts": response_bytes(args.consul, layout.hosts_prefix()),
                 "allocation_index": response_bytes(args.consul, layout.ipam_index_prefix()),
                 "allocations": 0,
                 "members_index": response_bytes(args.consul, layout.members_index_prefix()),
                 "members": response_bytes(args.consul, layout.members_prefix("svc0000"))}
        whole = response_bytes(args.consul, prefix)
        out["prefix_bytes"] = whole
        r0 = metric_reads(f"http://{listen}/metrics")
        with Churn(cluster, args.rate) as churn:
            c0, w0 = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(args.window)
            cpu = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - w0)
            writes = churn.count
            r1 = metric_reads(f"http://{listen}/metrics")
            out["cpu_churn"] = cpu
            out["writes"] = writes
            out["kinds"] = dict(churn.kinds)
            reads = {w: r1.get(w, 0) - r0.get(w, 0) for w in r1}
            out["reads_per_write"] = sum(reads.values()) / max(writes, 1)
            out["bytes_per_write"] = sum(reads[w] * sizes.get(w, 0) for w in reads
                                         if w in sizes) / max(writes, 1)
            out["reads"] = reads
            # 3. latencies
            spec_lat: list[float] = []
            flip_lat: list[float] = []
            member_lat: list[float] = []
            haproxy = HaproxyProcess(state)
            map_file = state / "active.map"
            svc = cluster.services[0]
            pools = ["green", "blue"]
            for i in range(args.samples):
                key = layout.container(f"probe{i}")
                t = time.monotonic()
                kv.put(key, json.dumps({"interfaces": [{"name": "eth1",
                                                        "network": cluster.networks[0],
                                                        "address": "auto"}]}).encode())
                idx = kv.get(key)
                target = idx.modify_index if idx is not None else 0
                while time.monotonic() - t < 10:
                    if applied_index(f"http://{listen}/metrics") >= target:
                        spec_lat.append(time.monotonic() - t)
                        break
                    time.sleep(0.002)
                to = pools[i % 2]
                t = time.monotonic()
                kv.put(layout.service_active(svc), to.encode())
                while time.monotonic() - t < 10:
                    with contextlib.suppress(OSError):
                        if f"{svc} {backend_name(svc, to)}" in map_file.read_text():
                            flip_lat.append(time.monotonic() - t)
                            break
                    time.sleep(0.002)
                # A member published (by another host) to a served service -> HAProxy's
                # running worker has the server.
                name = f"new{i}"
                t = time.monotonic()
                kv.put(layout.published_member(svc, "blue", name), cluster.member(0, 20 + i))
                kv.put(layout.members_index(svc), f"probe {time.time_ns()}".encode())
                while time.monotonic() - t < 10:
                    with contextlib.suppress(Exception):
                        if name in haproxy.worker_command(
                                f"show servers state {backend_name(svc, 'blue')}"):
                            member_lat.append(time.monotonic() - t)
                            break
                    time.sleep(0.002)
                time.sleep(0.05)
            out["spec_p50"], out["spec_p95"] = pct(spec_lat, 0.5), pct(spec_lat, 0.95)
            out["flip_p50"], out["flip_p95"] = pct(flip_lat, 0.5), pct(flip_lat, 0.95)
            out["member_p50"] = pct(member_lat, 0.5)
            out["member_p95"] = pct(member_lat, 0.95)
            out["samples"] = (len(spec_lat), len(flip_lat), len(member_lat))
        out["rss_mib"] = rss_mib(proc.pid)
        # Baseline: one read + parse of the whole prefix, as the single watch did per write.
        times = []
        for _ in range(3):
            t = time.process_time()
            snap = kv.read_prefix(prefix)
            parse_kv(prefix, kv_entries(snap.items.values()))
            times.append(time.process_time() - t)
        out["whole_read_parse_s"] = statistics.median(times)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        kv.delete(prefix, recurse=True)
        pidfile = state / "haproxy.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text().split()[0]), 15)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", default="1000,10000,100000",
                    help="allocations in Consul, comma-separated (default 1000,10000,100000)")
    ap.add_argument("--hosts", type=int, default=200, help="simulated other hosts (200)")
    ap.add_argument("--rate", type=float, default=20.0, help="churn writes a second (20)")
    ap.add_argument("--window", type=float, default=20.0, help="seconds per CPU window")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds after start-up")
    ap.add_argument("--samples", type=int, default=20, help="latency samples per kind")
    ap.add_argument("--serve", default="svc000[0-4]",
                    help="the daemon's --serve (default: 5 of the services; '*': all)")
    ap.add_argument("--quick", action="store_true", help="K=1000,10000; 10 s windows")
    ap.add_argument("--consul", default=os.environ.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500"))
    args = ap.parse_args()
    if args.quick:
        args.k, args.window, args.samples = "1000,10000", 10.0, 10
    print(f"machine: {describe('consul', 'version')}")
    print(f"H={args.hosts} other hosts, R={args.rate:g} writes/s "
          f"(allocations 6 : status 6 : members 4 : audit 2; a quarter of the member writes "
          f"to the services served), --serve {args.serve!r}, {args.window:g} s windows")
    kv = ConsulKV(ConsulSettings.from_env())
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for k in (int(x) for x in args.k.split(",")):
            row = run_k(args, kv, k, Path(tmp))
            rows.append(row)
            print(f"K={k}: filled in {row['fill_s']:.1f}s; prefix {row['prefix_bytes']} B; "
                  f"reads by watch during churn {row['reads']}; kinds {row['kinds']}",
                  flush=True)
    base = rows[0]
    print()
    print("| K | services | prefix | CPU idle | CPU at R/s | vs K=1k | reads/write | "
          "bytes/write | whole-prefix baseline (CPU at R/s) | spec p50/p95 | "
          "flip p50/p95 | member p50/p95 | RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = float(r["cpu_churn"]) / max(float(base["cpu_churn"]), 1e-9)  # type: ignore[arg-type]
        whole = float(r["whole_read_parse_s"]) * args.rate  # type: ignore[arg-type]
        print(f"| {r['K']:,} | {r['services']} | {float(r['prefix_bytes']) / 1e6:.1f} MB | "  # type: ignore[arg-type]
              f"{100 * float(r['cpu_idle']):.1f} % | {100 * float(r['cpu_churn']):.1f} % | "  # type: ignore[arg-type]
              f"{ratio:.2f}x | {float(r['reads_per_write']):.2f} | "  # type: ignore[arg-type]
              f"{float(r['bytes_per_write']) / 1e3:.1f} kB | {100 * whole:.0f} % | "  # type: ignore[arg-type]
              f"{1e3 * float(r['spec_p50']):.0f}/{1e3 * float(r['spec_p95']):.0f} ms | "  # type: ignore[arg-type]
              f"{1e3 * float(r['flip_p50']):.0f}/{1e3 * float(r['flip_p95']):.0f} ms | "  # type: ignore[arg-type]
              f"{1e3 * float(r['member_p50']):.0f}/{1e3 * float(r['member_p95']):.0f} ms | "  # type: ignore[arg-type]
              f"{float(r['rss_mib']):.0f} MiB |")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
