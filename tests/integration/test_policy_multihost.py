"""Group policy across hosts, in the lab (issue 12): web on host1, db on host2, on an
overlay network of each driver (Linux bridge, OVS).

Policy: web and db isolated; web -> db, web -> web, web -> external and external -> web
allowed. So across hosts: web -> db passes (host2 knows web's group from its allocation
record, which names web's entry), db -> web is dropped on host1, and the hosts
(`external`: their overlay addresses) do not reach db, from db's own host or web's,
while they reach web.
Then the pair web -> db is denied: an established connection across hosts is cut and its
conntrack entry on host2 is gone (the daemon flushes it), while host1 -> web goes on.

One lab for the session (tests/lab.py's `lab` fixture). Containers run busybox httpd on
8080 answering their own name.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from helpers import WaitTimeout, wait_for
from lab import Lab, lab  # noqa: F401  (the session fixture)

from .test_multihost import Env, _vni, kv_delete, kv_get, kv_put
from .test_policy import PORT, Held

pytestmark = pytest.mark.integration

# Hosts reach a network's containers through their own gateway: only hosts that have
# the network (here the two with a container on it) are `external` sources.
WEB_HOST, DB_HOST = 1, 2
ALLOW = [["web", "db"], ["web", "web"], ["web", "external"], ["external", "web"]]
POLICY = {"isolate": ["web", "db"], "allow": ALLOW}
KINDS = {"linux": ("l", 216), "ovs": ("o", 217)}
ECHO_PORT = PORT  # test_policy's Held talks to it


class PolicyEnv(Env):
    def names(self, driver: str) -> tuple[str, str]:
        k = KINDS[driver][0]
        return f"pw{k}-{self.rid}", f"pd{k}-{self.rid}"


@pytest.fixture(scope="module")
def penv(lab: Lab) -> Iterator[PolicyEnv]:  # noqa: F811 - the fixture above
    rid = secrets.token_hex(3)
    e = PolicyEnv(lab, rid)
    try:
        for driver, (k, octet) in KINDS.items():
            net = f"pol{k}-{rid}"
            e.nets[net] = {"subnet": f"10.77.{octet}.0/24", "bridge": f"pol{k}{rid}",
                           "driver": driver, "gateway": f"10.77.{octet}.1",
                           "pool": {"start": f"10.77.{octet}.100",
                                    "end": f"10.77.{octet}.199"},
                           "overlay": {"vni": _vni(rid, 7 + len(e.nets))}}
            if driver == "ovs":
                e.nets[net]["vlan"] = octet
            kv_put(f"networks/{net}", e.nets[net])
            web, db = e.names(driver)
            for spec, group in ((web, "web"), (db, "db")):
                kv_put(f"containers/{spec}", {"group": group, "interfaces": [
                    {"name": "eth1", "network": net, "address": "auto", "gateway": True}]})
                e.specs.append(spec)
            # Containers named apart from their entries: matched by the reconciler.name
            # label, the name their allocations record.
            e.run(WEB_HOST, f"{web}-c", web)
            e.run(DB_HOST, f"{db}-c", db)
            # A long-lived echo service beside httpd (which closes after each answer).
            lab.docker(DB_HOST, "exec", "-d", f"{db}-c", "nc", "-ll", "-p", str(ECHO_PORT),
                       "-e", "cat")
        for name in e.containers:
            e.wait_address(name)
        yield e
    finally:
        kv_delete("policy")
        for name, (host, _) in e.containers.items():
            lab.docker(host, "rm", "-f", name, check=False)
        for spec in e.specs:
            kv_delete(f"containers/{spec}")
        for name in e.nets:
            kv_delete(f"networks/{name}")


def fetch(e: Env, name: str, address: str) -> str:
    host, _ = e.containers[name]
    return e.lab.docker(host, "exec", name, "timeout", "3", "wget", "-qO-",
                        f"http://{address}:8080/", check=False).stdout.strip()


def host_fetch(e: Env, host: int, address: str) -> str:
    return e.lab.exec(host, "curl", "-s", "-m", "3", f"http://{address}:8080/").stdout.strip()


def conntrack_to(e: Env, host: int, src: str, dst: str) -> list[str]:
    """Conntrack entries src -> dst:ECHO_PORT in the host's namespace (Linux bridges)."""
    out = e.lab.exec(host, "conntrack", "-L", "-p", "tcp", "-s", src, "-d", dst,
                     "--dport", str(ECHO_PORT)).stdout
    return [line for line in out.splitlines() if line.startswith("tcp")]


def ovs_conntrack_to(e: Env, host: int, src: str, dst: str) -> list[str]:
    """The same in the host's OVS datapath (OVS bridges)."""
    out = e.lab.exec(host, "ovs-appctl", "dpctl/dump-conntrack").stdout
    return [line for line in out.splitlines()
            if f"src={src},dst={dst}," in line and f"dport={ECHO_PORT})" in line]


@pytest.mark.parametrize("driver", list(KINDS))
def test_web_on_host1_reaches_db_on_host2_and_nothing_else_does(penv: PolicyEnv,
                                                                driver: str) -> None:
    e = penv
    web, db = (f"{n}-c" for n in e.names(driver))
    web_ip, db_ip = e.wait_address(web), e.wait_address(db)
    net = next(n for n in e.nets if n.startswith(f"pol{KINDS[driver][0]}-"))
    record = kv_get(f"ipam/{net}/{web_ip}")
    assert (record["node"], record["spec"]) == (f"host{WEB_HOST}", e.names(driver)[0])
    kv_put("policy", POLICY)
    try:
        # Each host enforces for its own containers: wait until both have the rules.
        wait_for(lambda: fetch(e, db, web_ip) == "", timeout=30, interval=0.5,
                 message="db -> web denied on host1")
        wait_for(lambda: host_fetch(e, DB_HOST, db_ip) == "", timeout=30, interval=0.5,
                 message="external (db's host) -> db denied on host2")
        assert fetch(e, web, db_ip) == db, "web -> db across hosts"
        assert host_fetch(e, WEB_HOST, db_ip) == "", "external (web's host) -> db"
        assert host_fetch(e, DB_HOST, web_ip) == web, "external (db's host) -> web"
        assert fetch(e, db, web_ip) == "", "db -> web"
        assert fetch(e, web, db_ip) == db, "web -> db, again"

        # Deny web -> db: the established connection is cut, and its conntrack entry
        # on db's host is flushed; an allowed path keeps working.
        web_pid = int(e.lab.docker(WEB_HOST, "inspect", "-f", "{{.State.Pid}}", web).stdout)
        held = Held(web_pid, db_ip)  # from web's namespace (lab containers: host pids)
        try:
            assert held.echo()
            track = conntrack_to if driver == "linux" else ovs_conntrack_to
            assert track(e, DB_HOST, web_ip, db_ip), "the connection is tracked on host2"
            kv_put("policy", {**POLICY, "allow": [p for p in ALLOW if p != ["web", "db"]]})
            wait_for(lambda: fetch(e, web, db_ip) == "", timeout=30, interval=0.5,
                     message="web -> db denied now")
            try:
                wait_for(lambda: not track(e, DB_HOST, web_ip, db_ip), timeout=15,
                         interval=0.5, message="its conntrack entry flushed on host2")
            except WaitTimeout:
                pytest.fail(f"still tracked on host2: {track(e, DB_HOST, web_ip, db_ip)}")
            assert not held.echo(), "the now-denied connection is cut"
            assert host_fetch(e, DB_HOST, web_ip) == web, "external -> web still"
        finally:
            held.close()
    finally:
        kv_delete("policy")
    wait_for(lambda: fetch(e, db, web_ip) == web, timeout=30, interval=0.5,
             message="db -> web once the policy is gone")
