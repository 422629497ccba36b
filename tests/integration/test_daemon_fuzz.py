"""Fuzzing a running daemon (issue 11, item 6): a hypothesis state machine of KV
operations against `reconciler run` with a real HAProxy.

One daemon runs for the module under a unique prefix, with a base network and two
HTTP backends. The machine puts valid and invalid values for networks, container specs,
service configs, active pools and members (names from small sets, so keys are often
replaced), deletes keys, flips active pools and churns members. After every step that
changed the desired state it waits until the daemon applied it (the status document's
index reaches the write's index), then checks: the daemon is alive; HAProxy's live config
passes `haproxy -c`; every key holding a valid value has no error in the status, every
key holding an invalid one has one. At the end of each example `reconciler status
--json` agrees. Values are valid or invalid by construction (each invalid one breaks one
rule of docs/kv-layout.md; names are chosen so that valid values never conflict).

Bounded: derandomized, 6 examples of at most 12 steps, no deadline.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import HttpBackend, free_ports, wait_for
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)

from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings

from .daemon_helpers import DaemonProcess, free_subnet_octets, run

pytestmark = pytest.mark.integration


@dataclass
class FuzzEnv:
    prefix: str
    node: str
    kv: ConsulKV
    daemon: DaemonProcess
    puts: list[tuple[str, bytes, bool]]
    """(relative key, value, valid) the machine chooses from."""
    bridges: list[str]

    def status(self) -> dict[str, Any]:
        item = self.kv.get(f"{self.prefix}nodes/{self.node}/status")
        return json.loads(item.value) if item is not None else {}


def _j(value: Any) -> bytes:
    return json.dumps(value).encode()


def _puts(rid: str, octets: list[int], binds: list[int], backends: list[int]
          ) -> list[tuple[str, bytes, bool]]:
    base, *net_octets = octets
    out: list[tuple[str, bytes, bool]] = []
    for i, name in enumerate(("fa", "fb")):
        o = net_octets[i]
        key = f"networks/{name}"
        net: dict[str, Any] = {"subnet": f"10.77.{o}.0/24", "bridge": f"rz{rid}{i}",
                               "driver": "linux"}
        out += [(key, _j(net), True), (key, _j({**net, "mtu": 1400}), True),
                (key, _j({**net, "pool": {"start": f"10.77.{o}.10",
                                          "end": f"10.77.{o}.20"}}), True)]
        out += [(key, v, False) for v in (
            b"", b"{", _j({**net, "subnet": "10.77.300.0/24"}),
            _j({**net, "subnet": f"10.77.{o}.5/24"}), _j({**net, "bridge": "br\nx"}),
            _j({**net, "vlan": 5}), _j({**net, "nope": 1}), _j({**net, "mtu": 70000}))]
    for i, name in enumerate(("ca", "cb")):
        key = f"containers/fz{rid}-{name}"
        iface = {"name": "eth1", "network": "base", "address": "auto"}
        out += [(key, _j({"interfaces": [iface]}), True),
                (key, _j({"interfaces": [{**iface, "address": f"10.77.{base}.{5 + i}/24"}]}),
                 True)]
        out += [(key, v, False) for v in (
            b"nope", _j({"interfaces": "eth1"}),
            _j({"interfaces": [{**iface, "network": "nowhere"}]}),
            _j({"interfaces": [{**iface, "address": "10.99.0.5/24"}]}),
            _j({"interfaces": [{**iface, "name": "eth1; rm -rf /"}]}),
            _j({"interfaces": [iface], "extra": True}))]
    for s, bind in zip(("s0", "s1"), binds, strict=True):
        key = f"services/{s}/config"
        cfg: dict[str, Any] = {"bind": f"127.0.0.1:{bind}"}
        out += [(key, _j(cfg), True),
                (key, _j({**cfg, "mode": "http", "balance": "roundrobin"}), True),
                (key, _j({**cfg, "health": {"path": "/health", "interval_ms": 1000}}), True)]
        out += [(key, v, False) for v in (
            _j({"bind": "127.0.0.1:99999"}), _j({"bind": f"127.0.0.1:{bind}\n  bind :81"}),
            _j({**cfg, "mode": "tcp\n  option x"}),
            _j({**cfg, "health": {"path": "/h\n  server x 1.2.3.4:80"}}),
            _j({**cfg, "nope": 1}), b"[]")]
        akey = f"services/{s}/active"
        out += [(akey, b"blue", True), (akey, b"green", True)]
        out += [(akey, v, False) for v in (b"", b"blue green", b"bad\nx", b"x" * 64)]
        for pool, port in zip(("blue", "green"), backends, strict=True):
            for m in ("m0", "m1"):
                mkey = f"services/{s}/pools/{pool}/{m}"
                mem: dict[str, Any] = {"address": "127.0.0.1", "port": port}
                out += [(mkey, _j(mem), True), (mkey, _j({**mem, "weight": 50}), True)]
                out += [(mkey, v, False) for v in (
                    _j({**mem, "address": "127.0.0.1 check\n"}), _j({**mem, "port": 0}),
                    _j({**mem, "weight": 999}), b"[]", _j({**mem, "backup": True}))]
    return out


@pytest.fixture(scope="module")
def fuzz_env(consul_addr: str, tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[FuzzEnv]:
    rid = secrets.token_hex(3)
    prefix = f"rt-fuzz-{rid}/"
    node = f"rtfuzz-{rid}"
    workdir: Path = tmp_path_factory.mktemp(f"daemon-fuzz-{rid}")
    octets = free_subnet_octets(3, int(rid, 16))
    backends = [HttpBackend("blue\n"), HttpBackend("green\n")]
    kv = ConsulKV(ConsulSettings.from_env())
    kv.put(f"{prefix}networks/base", _j({
        "subnet": f"10.77.{octets[0]}.0/24", "bridge": f"rzb{rid}", "driver": "linux",
        "pool": {"start": f"10.77.{octets[0]}.10", "end": f"10.77.{octets[0]}.20"}}))
    daemon = DaemonProcess(prefix, node, workdir, resync=2.0)
    env = FuzzEnv(prefix, node, kv, daemon,
                  _puts(rid, octets, free_ports(2), [b.port for b in backends]),
                  [f"rzb{rid}", f"rz{rid}0", f"rz{rid}1"])
    try:
        daemon.start()
        wait_for(lambda: env.status().get("index"), timeout=30,
                 message="the daemon's first status")
        yield env
    finally:
        print(daemon.log_text()[-10000:])
        daemon.stop()
        hp = daemon.state_dir / "haproxy.pid"
        if hp.exists():
            subprocess.run(["kill", *hp.read_text().split()], check=False)
        for br in env.bridges:
            run(["ip", "link", "del", br], check=False)
        kv.delete(prefix, recurse=True)
        kv.close()
        for b in backends:
            b.stop()


class DaemonMachine(RuleBasedStateMachine):
    env: FuzzEnv  # set by the test before the run
    checked: dict[str, int] = {"steps": 0, "valid": 0, "invalid": 0, "haproxy -c": 0}

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[str, tuple[bytes, bool]] = {}  # relative key -> (value, valid)
        self.steps = 0

    # ---------------------------------------------------------------- rules

    @initialize()
    def a_serving_service(self) -> None:
        """Each example starts from a valid service with a member (HAProxy runs)."""
        first = {k: (v, ok) for k, v, ok in reversed(self.env.puts) if ok}
        for key in ("services/s0/config", "services/s0/active",
                    "services/s0/pools/blue/m0"):
            value, _ = first[key]
            self.env.kv.put(self.env.prefix + key, value)
            self.held[key] = (value, True)
        self._check()

    @rule(data=st.data())
    def put(self, data: st.DataObject) -> None:
        key, value, valid = data.draw(st.sampled_from(self.env.puts))
        self._put(key, value, valid)

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        if not self.held:
            return
        key = data.draw(st.sampled_from(sorted(self.held)))
        self.env.kv.delete(self.env.prefix + key)
        del self.held[key]
        self._check()

    @rule(service=st.sampled_from(["s0", "s1"]), pool=st.sampled_from(["blue", "green"]))
    def flip(self, service: str, pool: str) -> None:
        self._put(f"services/{service}/active", pool.encode(), True)

    @rule(data=st.data())
    def member_churn(self, data: st.DataObject) -> None:
        members = [p for p in self.env.puts if "/pools/" in p[0] and p[2]]
        key, value, _ = data.draw(st.sampled_from(members))
        if key in self.held:
            self.env.kv.delete(self.env.prefix + key)
            del self.held[key]
            self._check()
        else:
            self._put(key, value, True)

    def teardown(self) -> None:
        for key in list(self.held):
            self.env.kv.delete(self.env.prefix + key)
        self.held.clear()
        self._check()
        ours = tuple(self.env.prefix + area for area in ("services/", "containers/",
                                                          "networks/"))

        def clean() -> bool:
            return not [k for k in self.env.status().get("errors") or {}
                        if k.startswith(ours)]

        # A reconcile error of a key just deleted (e.g. the proxy's) leaves the status a
        # moment after the parse that dropped the key: wait for it (bounded), then the
        # CLI must show none (once failed under load, reading the status at once).
        with contextlib.suppress(AssertionError):  # the assertion below names them
            wait_for(clean, timeout=10, interval=0.1)
        proc = self.env.daemon.cli("status", "--json")
        assert proc.returncode == 0, proc.stderr
        errors = json.loads(proc.stdout)[self.env.node].get("errors") or {}
        assert not [k for k in errors if k.startswith(ours)], errors

    # ---------------------------------------------------------------- checks

    def _put(self, key: str, value: bytes, valid: bool) -> None:
        self.env.kv.put(self.env.prefix + key, value)
        self.held[key] = (value, valid)
        self._check()

    def _check(self) -> None:
        env = self.env
        index = env.kv.read_prefix(env.prefix, consistent=True).index

        def applied() -> dict[str, Any] | None:
            assert env.daemon.alive(), env.daemon.log_text()[-3000:]
            st_ = env.status()
            return st_ if int(st_.get("index") or 0) >= index else None

        # The status index moves only when user keys changed: a put of the value a key
        # already held (or a delete of a key that was not there) changes nothing, and
        # a status written after that index is just as good.
        wait_for(lambda: applied() or self._same_as_applied(index), timeout=30,
                 interval=0.05, message="the daemon applied the change")
        assert env.daemon.alive()
        errors = self._errors_when_settled()
        self.checked["steps"] += 1
        for key, (_, valid) in self.held.items():
            full = env.prefix + key
            self.checked["valid" if valid else "invalid"] += 1
            if valid:
                assert full not in errors, (key, errors.get(full))
            else:
                assert full in errors, f"invalid {key} not reported: {errors}"
        cfg = env.daemon.state_dir / "haproxy.cfg"
        if cfg.exists():
            proc = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True,
                                  text=True, timeout=30, check=False)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            self.checked["haproxy -c"] += 1

    def _same_as_applied(self, index: int) -> bool:
        """Nothing of ours changed since the status was written (its `updated` is later
        than the write of `index`, and its index is the latest user change)."""
        st_ = self.env.status()
        user = self.env.kv.read_prefix(self.env.prefix, consistent=True).items
        latest = max((i.modify_index for k, i in user.items()
                      if not k.startswith((self.env.prefix + "nodes/",
                                           self.env.prefix + "ipam/"))), default=0)
        return int(st_.get("index") or 0) >= latest > 0 or not self.held

    def _errors_when_settled(self) -> dict[str, list[str]]:
        """The status errors once they name exactly what the held keys imply (reconcile
        errors follow the parse by a moment); the last read if that never happens."""
        last: dict[str, list[str]] = {}

        def settled() -> bool:
            last.clear()
            last.update(self.env.status().get("errors") or {})
            return all((self.env.prefix + k in last) != valid
                       for k, (_, valid) in self.held.items())

        with contextlib.suppress(AssertionError):  # the assertions then name the key
            wait_for(settled, timeout=10, interval=0.1)
        return last


def test_fuzz_kv_operations_against_a_running_daemon(fuzz_env: FuzzEnv) -> None:
    DaemonMachine.env = fuzz_env
    run_state_machine_as_test(DaemonMachine, settings=settings(
        max_examples=6, stateful_step_count=12, deadline=None, derandomize=True,
        suppress_health_check=list(HealthCheck)))
    assert fuzz_env.daemon.alive()
    checked = DaemonMachine.checked
    print(f"checked after each step: {checked}")
    assert checked["steps"] >= 30 and checked["invalid"] >= 10 and checked["valid"] >= 10
    assert checked["haproxy -c"] >= 10, checked
