"""End-to-end tests of the daemon's container networking (`reconciler run` as a process).

Owns the contract checks of networks/containers keys against real Docker, Open vSwitch,
Linux bridges and Consul: VLAN isolation of overlapping subnets on one OVS bridge, a
Linux-bridge interface with static MAC/MTU/gateway/route, label-matched replicas with
`auto` addresses (IPAM keys), restart, removal, spec deletion, drift repair, the orphan
sweep after a crash, invalid keys isolated in `reconciler status --json`, and the static
address conflict rule.

One daemon (`--resync 2`) runs for the whole module under a unique prefix and node name;
each test adds its own container specs. Its log is printed for a failing test (teardown
output). Networks (one OVS bridge with vlans 101/102/103, two Linux bridges) are written
with `reconciler apply -f` at module start; subnets are /24s of 10.77.0.0/16 that no host
route uses when the module starts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import ContainerFactory, wait_for

from reconciler.adapters.bridgefw import BridgeForwarding
from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings
from reconciler.adapters.netlink import host_veth_name

from .daemon_helpers import (
    DaemonProcess,
    container_pid,
    container_ping,
    exec_out,
    free_subnet_octets,
    host_link_exists,
    host_master,
    host_ping,
    log_during,
    netns_addrs,
    netns_link,
    netns_up_with,
    ovs_port_tag,
    ovs_ports_of,
    run,
)

pytestmark = pytest.mark.integration

ATTACH_TIMEOUT = 20.0  # generous: first attach creates bridges; a resync is 2 s


@dataclass
class Env:
    """What the module's daemon works with."""

    run_id: str
    prefix: str
    node: str
    kv: ConsulKV
    daemon: DaemonProcess
    ovs_bridge: str
    linux_bridges: list[str]
    o: int  # third octets of 10.77.X.0/24 per network
    l1: int
    l2: int
    p: int
    extra_keys: list[str] = field(default_factory=list)

    def put(self, rel: str, value: Any) -> None:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        self.kv.put(self.prefix + rel, raw)

    def delete(self, rel: str) -> None:
        self.kv.delete(self.prefix + rel)

    def ipam(self, network: str) -> dict[str, dict[str, Any]]:
        """{address: allocation value} under ipam/<network>/."""
        base = f"{self.prefix}ipam/{network}/"
        items = self.kv.read_prefix(base, consistent=True).items
        return {k[len(base):]: json.loads(i.value) for k, i in items.items()}

    def status(self) -> dict[str, Any]:
        """This node's document from `reconciler status --json`."""
        proc = self.daemon.cli("status", "--json")
        assert proc.returncode == 0, proc.stderr
        doc: dict[str, Any] = json.loads(proc.stdout).get(self.node) or {}
        return doc


def _state(o: int, l1: int, l2: int, p: int, ovs_bridge: str, lb1: str, lb2: str,
           ) -> dict[str, Any]:
    return {
        "networks": {
            # Same subnet twice, isolated by vlan on one bridge.
            "ova": {"subnet": f"10.77.{o}.0/24", "bridge": ovs_bridge, "driver": "ovs",
                    "vlan": 101},
            "ovb": {"subnet": f"10.77.{o}.0/24", "bridge": ovs_bridge, "driver": "ovs",
                    "vlan": 102},
            "ovp": {"subnet": f"10.77.{p}.0/24", "bridge": ovs_bridge, "driver": "ovs",
                    "vlan": 103, "gateway": f"10.77.{p}.1",
                    "pool": {"start": f"10.77.{p}.50", "end": f"10.77.{p}.69"}},
            "lnk1": {"subnet": f"10.77.{l1}.0/24", "bridge": lb1, "driver": "linux",
                     "gateway": f"10.77.{l1}.1"},
            "lnk2": {"subnet": f"10.77.{l2}.0/24", "bridge": lb2, "driver": "linux",
                     "mtu": 1400, "pool": {"start": f"10.77.{l2}.100",
                                           "end": f"10.77.{l2}.199"}},
        },
    }


@pytest.fixture(scope="module")
def env(consul_addr: str, ovs_datapath: str, tmp_path_factory: pytest.TempPathFactory,
        ) -> Iterator[Env]:
    rid = secrets.token_hex(3)
    prefix = f"rt-{rid}/"
    node = f"rtnode-{rid}"
    workdir: Path = tmp_path_factory.mktemp(f"daemon-net-{rid}")
    o, l1, l2, p = free_subnet_octets(4, int(rid, 16))
    ovs_bridge, lb1, lb2 = f"rto{rid}", f"rtl{rid}", f"rtm{rid}"
    kv = ConsulKV(ConsulSettings.from_env())
    daemon = DaemonProcess(prefix, node, workdir, resync=2.0,
                           extra_env={"RECONCILER_OVS_DATAPATH": ovs_datapath})
    state_file = workdir / "state.json"
    state_file.write_text(json.dumps(_state(o, l1, l2, p, ovs_bridge, lb1, lb2)))
    e = Env(rid, prefix, node, kv, daemon, ovs_bridge, [lb1, lb2], o, l1, l2, p)
    try:
        proc = daemon.cli("apply", "-f", str(state_file))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        daemon.start()
        # The daemon is up once it published its status for this prefix.
        wait_for(lambda: e.status().get("index"), timeout=20,
                 message="the daemon's first status")
        yield e
    finally:
        rc = daemon.stop()
        if rc not in (0, None):
            print(f"daemon exited {rc}:\n{daemon.log_text()[-4000:]}")
        kv.delete(prefix, recurse=True)
        run(["ovs-vsctl", "--timeout=10", "--if-exists", "del-br", ovs_bridge], check=False)
        for br in (lb1, lb2):
            run(["ip", "link", "del", "dev", br], check=False)
            BridgeForwarding(node).remove(br)  # the daemon was stopped before its sweep
        kv.close()


@pytest.fixture(autouse=True)
def _daemon_log_on_failure(env: Env) -> Iterator[None]:
    """Print what the daemon logged during the test: pytest shows it when the test fails."""
    yield from log_during(env.daemon)


@pytest.fixture(scope="module")
def module_containers(docker_client: Any, test_image: str, env: Env,
                      ) -> Iterator[Callable[..., Any]]:
    """Like `container_factory`, but the containers live for the whole module."""
    import docker.errors

    made: list[Any] = []

    def make(name: str, labels: dict[str, str] | None = None) -> Any:
        c = docker_client.containers.run(
            test_image, command=["sleep", "3600"], name=name, detach=True,
            network_mode="none", labels={"reconciler-test.run": env.run_id, **(labels or {})})
        made.append(c)
        return c

    yield make
    for c in made:
        with contextlib.suppress(docker.errors.NotFound):
            c.remove(force=True)


def _attached(container: Any, ifname: str, cidr: str | None = None) -> bool:
    pid = container_pid(container)
    return bool(pid) and netns_up_with(pid, ifname, cidr)


def _wait_attached(container: Any, ifname: str = "eth1", cidr: str | None = None,
                   timeout: float = ATTACH_TIMEOUT) -> str:
    """Wait until IFNAME is up inside (with `cidr` if given); its one IPv4 address."""
    def ok() -> str | None:
        pid = container_pid(container)
        if not pid or not netns_up_with(pid, ifname, cidr):
            return None
        addrs = netns_addrs(pid, ifname) or []
        return addrs[0] if len(addrs) == 1 else None

    return wait_for(ok, timeout=timeout, interval=0.1,
                    message=f"{container.name} {ifname} up with {cidr or 'an address'}")


def _neigh_mac(container: Any, address: str) -> str | None:
    out = netns_ip_out(container_pid(container), "-j", "neigh", "show", address)
    entries = json.loads(out) if out.strip() else []
    for n in entries:
        if n.get("lladdr"):
            return str(n["lladdr"]).lower()
    return None


def _ifindex(name: str) -> int | None:
    proc = run(["ip", "-j", "link", "show", "dev", name], check=False)
    return int(json.loads(proc.stdout)[0]["ifindex"]) if proc.returncode == 0 else None


def netns_ip_out(pid: int, *args: str) -> str:
    proc = run(["nsenter", "-t", str(pid), "-n", "ip", *args], check=False)
    return proc.stdout


# --------------------------------------------------------------------------- 1. VLANs


def test_overlapping_subnets_isolated_by_vlan(env: Env,
                                              container_factory: ContainerFactory) -> None:
    """Same subnet and same addresses on vlans 101 and 102 of one OVS bridge."""
    net = f"10.77.{env.o}"
    plan = {  # container -> (network, host part, mac)
        "a1": ("ova", 11, "02:77:0a:00:00:11"), "a2": ("ova", 12, "02:77:0a:00:00:12"),
        "b1": ("ovb", 11, "02:77:0b:00:00:11"), "b2": ("ovb", 12, "02:77:0b:00:00:12"),
        "b3": ("ovb", 13, "02:77:0b:00:00:13"),
    }
    c: dict[str, Any] = {}
    for short, (network, host, mac) in plan.items():
        name = f"rt-{env.run_id}-{short}"
        c[short] = container_factory(name=name)
        env.put(f"containers/{name}", {"interfaces": [
            {"name": "eth1", "network": network, "address": f"{net}.{host}/24", "mac": mac}]})
    for short, (_, host, _) in plan.items():
        _wait_attached(c[short], "eth1", f"{net}.{host}/24")

    # The access tags are the networks' vlans.
    for short, (network, _, _) in plan.items():
        ports = ovs_ports_of(c[short].id)
        assert ports == [host_veth_name(c[short].id, "eth1")], ports
        assert ovs_port_tag(ports[0]) == (101 if network == "ova" else 102)

    # Same vlan: works, and the answer comes from the same-vlan twin (by its MAC).
    assert container_ping(c["a1"], f"{net}.12", count=2)
    assert _neigh_mac(c["a1"], f"{net}.12") == plan["a2"][2]
    assert container_ping(c["b1"], f"{net}.12", count=2)
    assert _neigh_mac(c["b1"], f"{net}.12") == plan["b2"][2]
    assert container_ping(c["b3"], f"{net}.11")
    assert _neigh_mac(c["b3"], f"{net}.11") == plan["b1"][2]
    # Across vlans: .13 exists only on vlan 102, so vlan 101 cannot reach it.
    assert not container_ping(c["a1"], f"{net}.13", count=1, wait=1)
    assert _neigh_mac(c["a1"], f"{net}.13") is None


# --------------------------------------------------------------------------- 2. Linux bridge


def test_linux_bridge_two_interfaces_static_mac_mtu_gateway_route(
        env: Env, container_factory: ContainerFactory) -> None:
    gw = f"10.77.{env.l1}.1"
    addr = f"10.77.{env.l1}.10"
    extra = f"198.18.{env.l1}.0/24"
    name = f"rt-{env.run_id}-lb"
    ctr = container_factory(name=name)
    env.put(f"containers/{name}", {"interfaces": [
        {"name": "eth1", "network": "lnk1", "address": f"{addr}/24",
         "mac": "02:77:bb:00:00:10", "mtu": 1300, "gateway": True,
         "routes": [{"dst": extra, "via": gw}]},
        {"name": "eth2", "network": "lnk2", "address": "auto"},
    ]})
    _wait_attached(ctr, "eth1", f"{addr}/24")
    eth2 = _wait_attached(ctr, "eth2")
    eth2_ip = ipaddress.ip_interface(eth2)
    assert eth2_ip.network == ipaddress.ip_network(f"10.77.{env.l2}.0/24")
    assert 100 <= int(eth2_ip.ip.packed[3]) <= 199, eth2

    # Seen from inside, with the container's own busybox `ip`.
    link1 = exec_out(ctr, "ip", "link", "show", "eth1")
    assert "link/ether 02:77:bb:00:00:10" in link1 and "mtu 1300" in link1, link1
    assert "mtu 1400" in exec_out(ctr, "ip", "link", "show", "eth2")  # the network's mtu
    assert f"inet {addr}/24" in exec_out(ctr, "ip", "addr", "show", "eth1")
    assert f"inet {eth2}" in exec_out(ctr, "ip", "addr", "show", "eth2")
    routes = exec_out(ctr, "ip", "route")
    assert f"default via {gw} dev eth1" in routes, routes
    assert f"{extra} via {gw} dev eth1" in routes, routes

    # Host side: the veths are enslaved to the bridges, with the MTUs.
    for ifname, bridge, mtu in (("eth1", env.linux_bridges[0], 1300),
                                ("eth2", env.linux_bridges[1], 1400)):
        veth = host_veth_name(ctr.id, ifname)
        info = json.loads(run(["ip", "-j", "link", "show", "dev", veth]).stdout)[0]
        assert host_master(veth) == bridge and info["mtu"] == mtu, info
    # The host holds the gateway address and reaches the container through it.
    assert f"{gw}/24" in run(["ip", "-o", "-4", "addr", "show", "dev",
                              env.linux_bridges[0]]).stdout
    assert host_ping(addr)
    assert container_ping(ctr, gw)


# --------------------------------------------------------------------------- 3-5. replicas


@pytest.fixture(scope="module")
def replicas(env: Env, module_containers: Callable[..., Any]) -> list[Any]:
    """Three containers sharing label reconciler.name=rep-<run>, one `auto` interface."""
    spec = f"rep-{env.run_id}"
    env.put(f"containers/{spec}", {"interfaces": [
        {"name": "eth1", "network": "ovp", "address": "auto"}]})
    made = [module_containers(f"rt-{env.run_id}-rep{i}", {"reconciler.name": spec})
            for i in range(3)]
    for ctr in made:
        _wait_attached(ctr)
    return made


def test_replicas_get_distinct_pool_addresses_recorded_in_ipam(env: Env,
                                                               replicas: list[Any]) -> None:
    addrs = [_wait_attached(c) for c in replicas]
    ips = [ipaddress.IPv4Interface(a) for a in addrs]
    assert len(set(ips)) == 3, addrs
    lo, hi = (ipaddress.IPv4Address(f"10.77.{env.p}.{h}") for h in (50, 69))
    for ip in ips:
        assert ip.network == ipaddress.ip_network(f"10.77.{env.p}.0/24")
        assert lo <= ip.ip <= hi, ip
    alloc = env.ipam("ovp")
    for ctr, ip in zip(replicas, ips, strict=True):
        held = alloc.get(str(ip.ip))
        assert held is not None, (ip, alloc)
        assert held["container"] == ctr.id and held["interface"] == "eth1", held
        assert held["node"] == env.node
    # The OVS gateway port (tag 103) lets the host reach a replica.
    assert host_ping(str(ips[0].ip))


def test_restart_keeps_address(env: Env, replicas: list[Any]) -> None:
    ctr = replicas[0]
    before = _wait_attached(ctr)
    old_pid = container_pid(ctr)
    ctr.restart(timeout=0)
    wait_for(lambda: container_pid(ctr) not in (0, old_pid), timeout=30,
             message="a new container process")
    t0 = time.monotonic()
    after = _wait_attached(ctr, cidr=before)
    print(f"re-attached after restart in {time.monotonic() - t0:.2f}s")
    assert after == before
    held = env.ipam("ovp")[str(ipaddress.ip_interface(before).ip)]
    assert held["container"] == ctr.id
    assert ovs_ports_of(ctr.id) == [host_veth_name(ctr.id, "eth1")]


def test_removal_cleans_port_veth_and_allocation(env: Env, replicas: list[Any]) -> None:
    ctr = replicas[2]
    ip = str(ipaddress.ip_interface(_wait_attached(ctr)).ip)
    veth = host_veth_name(ctr.id, "eth1")
    assert ovs_ports_of(ctr.id) == [veth] and host_link_exists(veth)
    assert ip in env.ipam("ovp")
    ctr.remove(force=True)

    def clean() -> bool:
        return not ovs_ports_of(ctr.id) and not host_link_exists(veth) \
            and ip not in env.ipam("ovp")

    wait_for(clean, timeout=15, interval=0.1, message="port, veth and allocation removed")
    # The other replicas are untouched.
    for other in replicas[:2]:
        assert _attached(other, "eth1")


# --------------------------------------------------------------------------- 6. spec deleted


def test_deleting_spec_detaches_but_container_keeps_running(
        env: Env, container_factory: ContainerFactory) -> None:
    name = f"rt-{env.run_id}-del"
    ctr = container_factory(name=name)
    env.put(f"containers/{name}", {"interfaces": [
        {"name": "eth1", "network": "lnk2", "address": "auto"}]})
    _wait_attached(ctr)
    veth = host_veth_name(ctr.id, "eth1")
    assert host_link_exists(veth)
    env.delete(f"containers/{name}")
    pid = container_pid(ctr)
    wait_for(lambda: netns_link(pid, "eth1") is None and not host_link_exists(veth),
             timeout=15, interval=0.1, message="eth1 detached")
    ctr.reload()
    assert ctr.status == "running" and container_pid(ctr) == pid
    assert netns_link(pid, "lo") is not None


# --------------------------------------------------------------------------- 7. drift


def test_drift_deleted_veth_and_changed_address_are_repaired(
        env: Env, container_factory: ContainerFactory) -> None:
    name = f"rt-{env.run_id}-drift"
    addr = f"10.77.{env.l1}.20/24"
    ctr = container_factory(name=name)
    env.put(f"containers/{name}", {"interfaces": [
        {"name": "eth1", "network": "lnk1", "address": addr}]})
    _wait_attached(ctr, cidr=addr)
    veth = host_veth_name(ctr.id, "eth1")

    # 1) the host veth is deleted (its peer inside goes with it).
    run(["ip", "link", "del", "dev", veth])
    t0 = time.monotonic()
    pid = container_pid(ctr)
    wait_for(lambda: netns_up_with(pid, "eth1", addr)
             and host_master(veth) == env.linux_bridges[0],
             timeout=10, interval=0.05, message="veth re-created and enslaved")
    veth_s = time.monotonic() - t0
    assert host_ping(addr.split("/")[0])

    # 2) the address is changed inside the container.
    other = f"10.77.{env.l1}.21/24"
    # (from the host: `docker exec --privileged` cannot apply caps in this VM)
    run(["nsenter", "-t", str(pid), "-n", "ip", "addr", "del", addr, "dev", "eth1"])
    run(["nsenter", "-t", str(pid), "-n", "ip", "addr", "add", other, "dev", "eth1"])
    t1 = time.monotonic()
    wait_for(lambda: netns_addrs(pid, "eth1") == [addr], timeout=10, interval=0.05,
             message="address restored")
    addr_s = time.monotonic() - t1

    # 3) the interface is set down inside (reported by the kernel itself, port id 0).
    run(["nsenter", "-t", str(pid), "-n", "ip", "link", "set", "eth1", "down"])
    t2 = time.monotonic()
    wait_for(lambda: netns_up_with(pid, "eth1", addr), timeout=10, interval=0.05,
             message="eth1 up again")
    down_s = time.monotonic() - t2
    print(f"drift repaired: deleted veth in {veth_s:.2f}s, changed address in {addr_s:.2f}s, "
          f"link down in {down_s:.2f}s")
    # All are watched (host link deletions, and netlink inside the container's netns):
    # repaired within the 2 s, not at the (deep) resync.
    assert veth_s < 2.0, veth_s
    assert addr_s < 2.0, addr_s
    assert down_s < 2.0, down_s


def _br_exists(name: str) -> bool:
    return run(["ovs-vsctl", "--timeout=10", "br-exists", name], check=False).returncode == 0


def test_bridges_of_removed_networks_go_only_when_ours(
        env: Env, container_factory: ContainerFactory, ovs_datapath: str) -> None:
    rid = secrets.token_hex(3)
    obr, lbr, foreign = f"rtx{rid}", f"rty{rid}", f"rtz{rid}"
    x, y = free_subnet_octets(2, int(rid, 16), (env.o, env.l1, env.l2, env.p))
    # Made by "another node's" daemon: not ours to delete, even when no network uses it.
    run(["ovs-vsctl", "--timeout=10", "add-br", foreign, "--", "set", "bridge", foreign,
         f"datapath_type={ovs_datapath}", "external_ids:reconciler-owner=reconciler",
         "external_ids:reconciler-node=some-other-node"])
    name = f"rt-{env.run_id}-brs"
    try:
        env.put(f"networks/go-{rid}", {"subnet": f"10.77.{x}.0/24", "bridge": obr,
                                       "driver": "ovs", "vlan": 77,
                                       "gateway": f"10.77.{x}.1",
                                       "pool": {"start": f"10.77.{x}.10",
                                                "end": f"10.77.{x}.20"}})
        env.put(f"networks/gl-{rid}", {"subnet": f"10.77.{y}.0/24", "bridge": lbr,
                                       "driver": "linux", "gateway": f"10.77.{y}.1",
                                       "pool": {"start": f"10.77.{y}.10",
                                                "end": f"10.77.{y}.20"}})
        ctr = container_factory(name=name)
        env.put(f"containers/{name}", {"interfaces": [
            {"name": "eth1", "network": f"go-{rid}", "address": "auto"},
            {"name": "eth2", "network": f"gl-{rid}", "address": "auto"}]})
        _wait_attached(ctr, "eth1")
        _wait_attached(ctr, "eth2")
        assert _br_exists(obr) and host_link_exists(lbr)

        # Spec and Linux network removed: that bridge goes once its veth is gone; the OVS
        # network still exists, so its bridge stays.
        env.delete(f"containers/{name}")
        env.delete(f"networks/gl-{rid}")
        wait_for(lambda: not host_link_exists(lbr), timeout=15, interval=0.1,
                 message="the Linux bridge of the removed network deleted")
        assert _br_exists(obr)  # its network is still there
        env.delete(f"networks/go-{rid}")
        wait_for(lambda: not _br_exists(obr), timeout=15, interval=0.1,
                 message="the OVS bridge of the removed network deleted")
        assert _br_exists(foreign)
    finally:
        for br in (obr, foreign):
            run(["ovs-vsctl", "--timeout=10", "--if-exists", "del-br", br], check=False)
        run(["ip", "link", "del", "dev", lbr], check=False)


# --------------------------------------------------------------------------- 8. orphan sweep


def test_orphans_swept_after_crash(env: Env, replicas: list[Any],
                                   container_factory: ContainerFactory) -> None:
    name = f"rt-{env.run_id}-orph"
    ctr = container_factory(name=name)
    env.put(f"containers/{name}", {"interfaces": [
        {"name": "eth1", "network": "ovp", "address": "auto"}]})
    ip = str(ipaddress.ip_interface(_wait_attached(ctr)).ip)
    veth = host_veth_name(ctr.id, "eth1")
    assert ovs_ports_of(ctr.id) == [veth]
    assert env.ipam("ovp")[ip]["container"] == ctr.id
    survivor = replicas[0]
    survivor_addr = _wait_attached(survivor)
    survivor_veth = host_veth_name(survivor.id, "eth1")
    survivor_index = _ifindex(survivor_veth)

    env.daemon.kill9()
    ctr.remove(force=True)
    # Nobody cleaned up: the OVS port row and the allocation are still there.
    assert ovs_ports_of(ctr.id) == [veth]
    assert ip in env.ipam("ovp")
    env.daemon.start()
    t0 = time.monotonic()
    wait_for(lambda: not ovs_ports_of(ctr.id) and not host_link_exists(veth)
             and ip not in env.ipam("ovp"),
             timeout=20, interval=0.1, message="orphaned port, veth and allocation swept")
    print(f"orphans swept {time.monotonic() - t0:.2f}s after the daemon started")
    # What is still wanted survived the restart untouched: the same veth (not torn down
    # and re-created), its port and address.
    assert _attached(survivor, "eth1", survivor_addr)
    assert ovs_ports_of(survivor.id) == [survivor_veth]
    assert _ifindex(survivor_veth) == survivor_index


# --------------------------------------------------------------------------- 9. bad keys


def test_bad_keys_reported_and_isolated(env: Env, container_factory: ContainerFactory,
                                        ) -> None:
    bad_net = f"{env.prefix}networks/bad-{env.run_id}"
    ghost = f"{env.prefix}containers/ghost-{env.run_id}"
    junk = f"{env.prefix}containers/junk-{env.run_id}"
    env.kv.put(bad_net, json.dumps({"subnet": "10.77.300.0/24", "bridge": "x"}).encode())
    env.kv.put(ghost, json.dumps({"interfaces": [
        {"name": "eth1", "network": f"nowhere-{env.run_id}"}]}).encode())
    env.kv.put(junk, b'{"interfaces": [')
    name = f"rt-{env.run_id}-good"
    ctr = container_factory(name=name)
    env.put(f"containers/{name}", {"interfaces": [
        {"name": "eth1", "network": "lnk2", "address": "auto"}]})
    _wait_attached(ctr)

    def reported() -> dict[str, list[str]] | None:
        errors: dict[str, list[str]] = env.status().get("errors") or {}
        return errors if {bad_net, ghost, junk} <= set(errors) else None

    errors = wait_for(reported, timeout=15, interval=0.3, message="errors in status")
    assert any("subnet" in m for m in errors[bad_net]), errors[bad_net]
    assert any("unknown network" in m for m in errors[ghost]), errors[ghost]
    assert errors[junk], errors[junk]
    assert f"{env.prefix}containers/{name}" not in errors
    # The table form names the keys too.
    table = env.daemon.cli("status")
    assert table.returncode == 0 and ghost in table.stdout, table.stdout
    for key in (bad_net, ghost, junk):
        env.kv.delete(key)
    wait_for(lambda: not ({bad_net, ghost, junk} & set(env.status().get("errors") or {})),
             timeout=15, interval=0.3, message="errors cleared once the keys are gone")


# --------------------------------------------------------------------------- conflict


def test_static_address_matched_by_two_containers_is_a_conflict(
        env: Env, container_factory: ContainerFactory) -> None:
    """Contract: one keeps the address, the other reports an error naming the key."""
    spec = f"conf-{env.run_id}"
    key = f"{env.prefix}containers/{spec}"
    addr = f"10.77.{env.l2}.30/24"
    env.put(f"containers/{spec}", {"interfaces": [
        {"name": "eth1", "network": "lnk2", "address": addr}]})
    ctrs = [container_factory(name=f"rt-{env.run_id}-conf{i}",
                              labels={"reconciler.name": spec}) for i in range(2)]

    def holders() -> list[str]:
        return [c.name for c in ctrs if addr in (netns_addrs(container_pid(c), "eth1") or [])]

    def settled() -> bool:
        return len(holders()) == 1 and key in (env.status().get("errors") or {})

    wait_for(settled, timeout=15, interval=0.3,
             message="exactly one holder of the static address and an error for the key")
    # And it stays that way across a resync.
    t_end = time.monotonic() + 2.5
    while time.monotonic() < t_end:
        assert len(holders()) == 1, holders()
        time.sleep(0.25)


def test_member_published_only_while_its_interface_is_attached(
        env: Env, container_factory: ContainerFactory) -> None:
    """An interface that cannot be attached (its name is taken inside the container, as
    Docker's own eth1 on docker_gwbridge is in a swarm task) publishes no member; once the
    obstacle is gone it is attached and published, with the address it really has."""
    spec = f"blk-{env.run_id}"
    key = f"{env.prefix}containers/{spec}"
    ctr = container_factory(name=f"rt-{env.run_id}-blk", labels={
        "reconciler.name": spec, "reconciler.service": f"svc{env.run_id}",
        "reconciler.pool": "blue", "reconciler.port": "8080"})
    member = f"{env.prefix}members/svc{env.run_id}/blue/{env.node}_{ctr.name}"
    pid = container_pid(ctr)
    # The obstacle exists before the spec: nothing races the daemon for the name.
    run(["nsenter", "-t", str(pid), "-n", "ip", "link", "add", "eth1", "type", "veth",
         "peer", "name", "blk0"])
    env.put(f"containers/{spec}", {"interfaces": [
        {"name": "eth1", "network": "ovp", "address": "auto"}]})
    try:
        def refused() -> bool:
            errs = (env.status().get("errors") or {}).get(key) or []
            return any("is not reconciler's veth" in e for e in errs)

        wait_for(refused, timeout=ATTACH_TIMEOUT, interval=0.3,
                 message=f"{key}: eth1 refused (taken by a foreign veth)")
        # Members are synced after every reconcile of the container; a resync (2 s) and
        # its retries have passed by the time the error is reported twice over.
        t_end = time.monotonic() + 4.5
        while time.monotonic() < t_end:
            assert env.kv.get(member) is None, "published without an attached interface"
            time.sleep(0.25)
        assert not netns_addrs(pid, "eth1"), "the daemon touched an interface not its own"

        run(["nsenter", "-t", str(pid), "-n", "ip", "link", "del", "eth1"])
        addr = _wait_attached(ctr, "eth1")
        item = wait_for(lambda: env.kv.get(member), timeout=ATTACH_TIMEOUT,
                        message="member published once attached")
        assert json.loads(item.value)["address"] == addr.split("/")[0]
        wait_for(lambda: not refused(), timeout=ATTACH_TIMEOUT, message="error cleared")
    finally:
        env.delete(f"containers/{spec}")
