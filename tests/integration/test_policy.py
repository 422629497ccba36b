"""End-to-end group policy (issue 12): a daemon enforces the seed's scenario on an OVS
network and on a Linux-bridge network, with real containers.

Containers (busybox, `--net none`, each an echo server `nc -ll -p 7000 -e cat`): w1 and
w2 in group `web`, d1 in group `db`; the host is `external` (it reaches them through the
network's gateway address). Policy: web and db isolated; web -> db, web -> web,
web -> external and external -> web allowed. So: web <-> web, web -> db pass;
db -> web and external -> db are dropped (and counted); replies always pass.

Then: a container that changes its own address gets nothing past the policy (the source
address is not its allocation: dropped on its port); a policy change cuts a now-denied
established connection and keeps an allowed one; a rule deleted by hand is put back; the
rules go when the policy does. Probes are TCP connects with an echo, from the host's
python in the container's network namespace (nsenter), so no test tool is needed in
the image.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from helpers import ContainerFactory, wait_for

from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings

from .daemon_helpers import (
    DaemonProcess,
    container_pid,
    free_subnet_octets,
    netns_up_with,
    run,
)

pytestmark = pytest.mark.integration

PORT = 7000
ECHO = ["nc", "-ll", "-p", str(PORT), "-e", "cat"]
PROBE = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5)
    s.settimeout(1.5)
    s.sendall(b"hi\\n")
    print("ok" if s.recv(16) == b"hi\\n" else "bad")
except OSError as e:
    print("fail", e)
"""
# A long-lived connection: one line in, the echo (or "TIMEOUT") out.
HOLD = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
s.settimeout(1.5)
print("connected", flush=True)
for line in sys.stdin:
    try:
        s.sendall(line.encode())
        print("echo" if s.recv(64) else "closed", flush=True)
    except OSError:
        print("TIMEOUT", flush=True)
"""


def in_netns(pid: int | None, *argv: str) -> list[str]:
    return ["nsenter", "-t", str(pid), "-n", *argv] if pid else list(argv)


def probe(pid: int | None, dst: str, src_setup: str = "") -> bool:
    """A TCP connect + echo to dst:PORT from the netns of `pid` (None: the host)."""
    cmd = in_netns(pid, sys.executable, "-c", PROBE, dst, str(PORT))
    if src_setup:  # e.g. change the address, then probe at once (before any repair)
        cmd = in_netns(pid, "sh", "-c", f'{src_setup} && exec {sys.executable} -c "$0" '
                       f"{dst} {PORT}", PROBE)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    return out.stdout.strip() == "ok"


class Held:
    """A connection held open from a container's netns; `echo()`: does it still pass?"""

    def __init__(self, pid: int, dst: str) -> None:
        self.proc = subprocess.Popen(in_netns(pid, sys.executable, "-c", HOLD, dst,
                                              str(PORT)),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "connected"

    def echo(self) -> bool:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("x\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip() == "echo"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


def denied_metric(daemon: DaemonProcess, bridge: str, src: str, dst: str) -> float:
    with urllib.request.urlopen(daemon.url("/metrics"), timeout=5) as r:
        text = r.read().decode()
    want = (f'reconciler_policy_denied_packets_total{{bridge="{bridge}",'
            f'destination="{dst}",source="{src}"}}')
    for line in text.splitlines():
        if line.startswith(want):
            return float(line.split()[-1])
    return 0.0


def nft_table(node: str) -> str:
    return "reconciler_" + hashlib.sha256(f"policy/{node}".encode()).hexdigest()[:8]


def our_flows(bridge: str, node: str) -> list[str]:
    tag = int(hashlib.sha256(f"policy/{node}".encode()).hexdigest()[:4], 16)
    cookie = 0x7263_0000_0000_0000 | (tag << 32)
    out = run(["ovs-ofctl", "-O", "OpenFlow14", "dump-flows", bridge,
               f"cookie={cookie:#x}/0xffffffff00000000"], check=False).stdout
    return [line for line in out.splitlines() if "cookie=" in line]


def tracked(driver: str, src: str, dst: str) -> bool:
    """Whether a TCP connection src -> dst:PORT is in the connection tracker (the
    kernel's for Linux bridges, OVS's datapath for OVS)."""
    if driver == "linux":
        out = run(["conntrack", "-L", "-p", "tcp", "-s", src, "-d", dst, "--dport",
                   str(PORT)], check=False).stdout
        return any(line.startswith("tcp") for line in out.splitlines())
    out = run(["ovs-appctl", "dpctl/dump-conntrack"], check=False).stdout
    return any(f"orig=(src={src},dst={dst}," in line and f"dport={PORT})" in line
               for line in out.splitlines())


def nft_has(family: str, table: str) -> bool:
    return run(["nft", "list", "table", family, table], check=False).returncode == 0


@pytest.mark.parametrize("driver", ["ovs", "linux"])
def test_seed_scenario_spoofing_and_cuts(driver: str, consul_addr: str, ovs_datapath: str,
                                         container_factory: ContainerFactory,
                                         tmp_path: Path) -> None:
    rid = secrets.token_hex(3)
    prefix, node, bridge = f"rt-{rid}/", f"rtpol-{rid}", f"rtp{rid}"
    (x,) = free_subnet_octets(1, int(rid, 16))
    net = f"10.77.{x}"
    gw, w1_ip, w2_ip, d1_ip = f"{net}.1", f"{net}.10", f"{net}.11", f"{net}.12"
    kv = ConsulKV(ConsulSettings.from_env())
    daemon = DaemonProcess(prefix, node, tmp_path, resync=2.0,
                           extra_env={"RECONCILER_OVS_DATAPATH": ovs_datapath})
    table = nft_table(node)

    def put(rel: str, value: Any) -> None:
        kv.put(prefix + rel, json.dumps(value).encode())

    def spec(group: str, ip: str) -> dict[str, Any]:
        return {"group": group, "interfaces": [{"name": "eth1", "network": "pol",
                                                "address": f"{ip}/24", "gateway": True}]}

    held: list[Held] = []
    try:
        network: dict[str, Any] = {"subnet": f"{net}.0/24", "bridge": bridge,
                                   "driver": driver, "gateway": gw}
        put("networks/pol", network)
        w1 = container_factory(name=f"rt-{rid}-w1", command=ECHO)
        w2 = container_factory(name=f"rt-{rid}-w2", command=ECHO)
        d1 = container_factory(name=f"rt-{rid}-d1", command=ECHO)
        put(f"containers/{w1.name}", spec("web", w1_ip))
        put(f"containers/{w2.name}", spec("web", w2_ip))
        put(f"containers/{d1.name}", spec("db", d1_ip))
        daemon.start()
        pids: dict[str, int] = {}
        for ctr, ip in ((w1, w1_ip), (w2, w2_ip), (d1, d1_ip)):
            pid = container_pid(ctr)
            pids[ctr.name] = pid
            wait_for(partial(netns_up_with, pid, "eth1", f"{ip}/24"), timeout=30,
                     interval=0.1, message=f"{ctr.name} attached with {ip}")
        pw1, pw2, pd1 = pids[w1.name], pids[w2.name], pids[d1.name]
        # No policy yet: everyone talks (groups alone change nothing).
        wait_for(lambda: probe(pd1, w1_ip), timeout=20, message="d1 -> w1 before policy")
        assert probe(None, d1_ip)

        put("policy", {"isolate": ["web", "db"],
                       "allow": [["web", "db"], ["web", "web"], ["web", "external"],
                                 ["external", "web"]]})
        wait_for(lambda: not probe(pd1, w1_ip), timeout=20, message="db -> web denied")
        assert probe(pw1, d1_ip), "web -> db"
        assert probe(pw1, w2_ip) and probe(pw2, w1_ip), "web <-> web"
        assert probe(None, w1_ip), "external -> web"
        assert not probe(None, d1_ip), "external -> db"
        assert not probe(pd1, w2_ip), "db -> web"
        wait_for(lambda: denied_metric(daemon, bridge, "db", "web") > 0, timeout=10,
                 message="db -> web drops counted")
        assert denied_metric(daemon, bridge, "external", "db") > 0

        # Spoofing: d1 takes an address no allocation names (it would count as
        # `external`, which may reach web) and tries w1: dropped on its own port.
        spoof = f"{net}.50"
        assert not probe(pd1, w1_ip, src_setup=(
            f"ip addr flush dev eth1 && ip addr add {spoof}/24 dev eth1"))
        # The daemon puts d1's address back (drift); d1 is db again, still denied.
        wait_for(lambda: netns_up_with(pd1, "eth1", f"{d1_ip}/24"), timeout=20,
                 message="d1's address repaired")

        # A policy change cuts a now-denied established connection, keeps an allowed one.
        web_db, web_web = Held(pw1, d1_ip), Held(pw2, w1_ip)
        held += [web_db, web_web]
        assert web_db.echo() and web_web.echo()
        assert tracked(driver, w1_ip, d1_ip), "web -> db is tracked before the change"
        put("policy", {"isolate": ["web", "db"],
                       "allow": [["web", "web"], ["external", "web"]]})
        wait_for(lambda: not probe(pw2, d1_ip), timeout=20, message="web -> db denied now")
        assert not web_db.echo(), "the now-denied connection is cut"
        assert web_web.echo(), "the allowed connection keeps working"
        # Denied both ways (db may not reach web either): its conntrack entry is
        # flushed, so not even db's replies pass; the allowed one is still tracked.
        wait_for(lambda: not tracked(driver, w1_ip, d1_ip), timeout=10,
                 message="the cut connection's conntrack entry flushed")
        assert tracked(driver, w2_ip, w1_ip), "the allowed connection is still tracked"

        # Drift: our rules deleted by hand come back with the next reconcile.
        if driver == "linux":
            run(["nft", "delete", "table", "inet", table])
            wait_for(lambda: nft_has("inet", table), timeout=15, message="table repaired")
        else:
            count = len(our_flows(bridge, node))
            run(["ovs-ofctl", "-O", "OpenFlow14", "del-flows", bridge, "table=62"])
            assert len(our_flows(bridge, node)) < count
            wait_for(lambda: len(our_flows(bridge, node)) == count, timeout=15,
                     message="flows repaired")
        assert not probe(pd1, w1_ip)

        # The policy goes: every rule of ours goes, everyone talks again.
        kv.delete(prefix + "policy")
        wait_for(lambda: probe(pd1, w1_ip), timeout=20, message="db -> web after policy")
        if driver == "linux":
            wait_for(lambda: not nft_has("inet", table) and not nft_has("bridge", table),
                     timeout=10, message="our nft tables removed")
        else:
            wait_for(lambda: our_flows(bridge, node) == [], timeout=10,
                     message="our flows removed")
            assert "actions=NORMAL" in run(["ovs-ofctl", "dump-flows", bridge]).stdout
    except BaseException:
        print(f"----- daemon log:\n{daemon.log_text()[-20000:]}")
        raise
    finally:
        for h in held:
            h.close()
        rc = daemon.stop()
        kv.delete(prefix, recurse=True)
        kv.close()
        for fam in ("inet", "bridge"):
            run(["nft", "delete", "table", fam, table], check=False)
        if driver == "ovs":
            run(["ovs-vsctl", "--if-exists", "del-br", bridge], check=False)
        run(["ip", "link", "del", "dev", bridge], check=False)
    assert rc == 0, f"daemon exited {rc}"
