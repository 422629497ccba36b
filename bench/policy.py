"""Benchmark: compiling and loading 1,000 containers' worth of group-policy rules.

Owns the policy figures of docs/performance.md (issue 12). The input is what a daemon
with N local containers would see (``--n 1000``): three groups (web, db, dns; web and db
isolated, the seed's pairs), N allocations on one network, N local ports with their MACs.
Measured, each the best of ``--rounds``:

1. compile: `policy.compiled.compile_policy` (pure);
2. nftables: building the JSON ruleset and loading it with ONE `nft -j -f -` transaction
   into a table of the benchmark's own (then an unchanged re-apply, which only lists the
   table and compares); baseline in the same run: the same transaction with no rules (an
   empty table pair: the fixed cost of one nft process);
3. OpenFlow: building the flows of the same bridge as an OVS one (loading them needs the
   N ports on a bridge, which the userspace datapath makes slowly: not done here);
4. cut: a policy change that denies web -> db (db -> web denied too): compiling the new
   rules and `compiled.cuts` (which connections to forget, pure), plus one listing of the
   kernel's conntrack table as it is (`conntrack -L`, what the Linux backend reads once
   per IP version before deleting the flows found).

Prints figures and ratios; asserts nothing about time. The nft table is removed at the
end, also on failure. Needs root and nft.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import describe

from reconciler.adapters.conntrack import Conntrack
from reconciler.adapters.nftables import Nftables
from reconciler.ipam import Allocation
from reconciler.model import KVEntry, parse_kv
from reconciler.policy.compiled import BridgeRules, LocalPort, compile_policy, cuts
from reconciler.policy.nft import NftBackend
from reconciler.policy.openflow import OpenFlowBackend


def best(rounds: int, fn: Callable[[], object]) -> float:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    n = args.n
    net = ipaddress.ip_network("10.77.0.0/16")
    groups = ("web", "db", "dns")
    prefix = "bench/"
    entries = [KVEntry(prefix + "networks/n1", json.dumps({
        "subnet": str(net), "bridge": "brbench", "driver": "linux",
        "pool": {"start": "10.77.1.1", "end": "10.77.200.1"}}).encode(), 1)]
    for i, g in enumerate(groups):
        entries.append(KVEntry(prefix + f"containers/{g}", json.dumps({
            "group": g, "interfaces": [{"name": "eth1", "network": "n1"}]}).encode(), 2 + i))
    entries.append(KVEntry(prefix + "policy", json.dumps({
        "isolate": ["web", "db"],
        "allow": [["web", "db"], ["web", "web"], ["web", "external"], ["dns", "web"]]}
    ).encode(), 10))
    state = parse_kv(prefix, entries)
    assert state.problems == (), state.problems
    changed = parse_kv(prefix, [*entries[:-1], KVEntry(prefix + "policy", json.dumps({
        "isolate": ["web", "db"],
        "allow": [["web", "web"], ["web", "external"], ["dns", "web"]]}).encode(), 11)])
    allocs, ports, specs = [], [], {}
    for i in range(n):
        cid = f"{i:064x}"
        addr = net.network_address + 256 + i
        allocs.append(Allocation("n1", addr, "h1", cid, "eth1"))
        ports.append(LocalPort("n1", f"rv{i:013x}", cid, (addr,),
                               f"02:00:{(i >> 24) & 255:02x}:{(i >> 16) & 255:02x}:"
                               f"{(i >> 8) & 255:02x}:{i & 255:02x}"))
        specs[cid] = groups[i % 3]

    print(f"machine: {describe('nft', '--version')}")
    print(f"policy rules for {n} containers (3 groups, 2 isolated, 4 pairs), "
          f"best of {args.rounds}")
    t_compile = best(args.rounds, lambda: compile_policy(state, allocs, ports, specs))
    compiled = compile_policy(state, allocs, ports, specs)
    bridge = compiled.bridges["brbench"]
    print(f"  compile:                     {t_compile * 1000:8.1f} ms")

    table = f"rbench_{secrets.token_hex(3)}"
    nft = Nftables()
    backend = NftBackend(nft, table=table)
    try:
        cmds, _ = backend.ruleset([bridge])
        t_build = best(args.rounds, lambda: backend.ruleset([bridge]))

        def load() -> None:
            nft.apply(cmds)
        t_load = best(args.rounds, load)
        empty, _ = backend.ruleset([BridgeRules("brbench", "linux")])
        t_empty = best(args.rounds, lambda: nft.apply(empty))
        backend.apply([bridge])
        t_same = best(args.rounds, lambda: backend.apply([bridge]))
        print(f"  nft ruleset build:           {t_build * 1000:8.1f} ms  "
              f"({len(cmds)} JSON commands)")
        print(f"  nft load (one transaction):  {t_load * 1000:8.1f} ms  "
              f"(baseline, empty tables: {t_empty * 1000:.1f} ms; ratio "
              f"{t_load / t_empty:.1f}x)")
        print(f"  nft unchanged re-apply:      {t_same * 1000:8.1f} ms  (list + compare)")
        total = t_compile + t_build + t_load
        print(f"  compile + build + load:      {total * 1000:8.1f} ms  "
              f"({'under' if total < 1 else 'OVER'} 1 s)")
    finally:
        for fam in ("inet", "bridge"):
            try:
                nft.apply([{"delete": {"table": {"family": fam, "name": table}}}])
            except Exception as e:  # absent already
                print(f"  (cleanup {fam} {table}: {e})")

    ovs = OpenFlowBackend(None, cookie_tag=1)  # type: ignore[arg-type]
    ovs_bridge = BridgeRules("brbench", "ovs", bridge.ports, bridge.networks)
    t_flows = best(args.rounds, lambda: ovs.flows(ovs_bridge))
    flows, _ = ovs.flows(ovs_bridge)
    print(f"  openflow flows build:        {t_flows * 1000:8.1f} ms  ({len(flows)} flows; "
          "loading needs the ports on a bridge: not measured here)")

    after = compile_policy(changed, allocs, ports, specs)
    t_cuts = best(args.rounds, lambda: cuts(compiled, after))
    blocks = cuts(compiled, after)["brbench"]
    pairs = sum(len(b.sources) * len(b.destinations) for b in blocks)
    ct = Conntrack()
    t_list = best(args.rounds, lambda: ct.flows(4))
    print(f"  cut (web -> db denied): cuts {t_cuts * 1000:8.1f} ms  ({len(blocks)} block(s), "
          f"{pairs} address pairs); conntrack -L {t_list * 1000:.1f} ms "
          f"({len(ct.flows(4))} entries on this host now)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
