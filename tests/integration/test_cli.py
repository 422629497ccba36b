"""Integration tests of the `reconciler` command line (validate, apply, plan), run as a
real subprocess (`python -m reconciler`) against the real Consul dev agent.

Each test writes under its own `rtest-<hex>/` prefix (`--prefix`), deleted afterwards.
The ACL tests start a second, ACL-enforcing Consul agent on free ports (tests/consul_agents.py,
as tests/integration/test_consul_acl.py does), give the CLI a least-privilege token through
the environment only, and check that it never shows up in output or argv.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from consul_agents import AclAgent, start_acl_agent

from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("validate", "apply", "plan", "run", "status", "render", "cutover")

VALID: dict[str, Any] = {
    "networks": {
        "vnet1": {
            "subnet": "10.77.1.0/24",
            "bridge": "br-vnet1",
            "vlan": 101,
            "gateway": "10.77.1.1",
            "pool": {"start": "10.77.1.100", "end": "10.77.1.200"},
        }
    },
    "containers": {"web": {"interfaces": [{"name": "eth1", "network": "vnet1"}]}},
    "services": {
        "web": {
            "config": {"bind": "127.0.0.1:18080", "mode": "http", "health": {"path": "/health"}},
            "active": "blue",
            "pools": {
                "blue": {"b1": {"address": "10.77.1.101", "port": 8080}},
                "green": {"g1": {"address": "10.77.1.102", "port": 8080, "weight": 50}},
            },
        }
    },
}

INVALID_YAML = """\
networks:
  vnet1:
    subnet: 10.77.1.0/33
    bridge: br-this-name-is-too-long
    vlan: 5000
  vnet2:
    bridge: br2
containers:
  web:
    interfaces:
      - {name: eth1, network: nope, address: auto}
      - {name: eth2, network: vnet2, mac: "01:00:00:00:00:01"}
services:
  web:
    config: {bind: "127.0.0.1:99999", mode: udp}
    active: blue
    pools:
      blue:
        b1: {address: not-an-ip, port: 0, weight: 999}
"""

# (location, message) pairs every run of `validate` on INVALID_YAML must print.
INVALID_EXPECTED = [
    ("networks.vnet1: subnet", "not a valid IPv4 or IPv6 CIDR (got \"10.77.1.0/33\")"),
    ("networks.vnet1: bridge", "must be 1-15 characters"),
    ("networks.vnet1: vlan", "must be between 1 and 4094 (got 5000)"),
    ("networks.vnet2: subnet", "required"),
    ("containers.web: interfaces[0].network", "unknown network (got \"nope\")"),
    ("containers.web: interfaces[1].mac", "must be a unicast MAC"),
    ("containers.web: interfaces[1].network", "network 'vnet2' is invalid"),
    ("services.web.config: bind", "port must be between 1 and 65535"),
    ("services.web.config: mode", "must be one of http, tcp (got \"udp\")"),
    ("services.web.pools.blue.b1: address", "not a valid IPv4 or IPv6 address"),
    ("services.web.pools.blue.b1: port", "must be between 1 and 65535 (got 0)"),
    ("services.web.pools.blue.b1: weight", "must be between 0 and 256 (got 999)"),
]


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def expected_kv(state: Mapping[str, Any], prefix: str) -> dict[str, bytes]:
    out = {f"{prefix}networks/{n}": canonical(v) for n, v in state.get("networks", {}).items()}
    out |= {f"{prefix}containers/{n}": canonical(v) for n, v in state.get("containers", {}).items()}
    for s, svc in state.get("services", {}).items():
        out[f"{prefix}services/{s}/config"] = canonical(svc["config"])
        if "active" in svc:
            out[f"{prefix}services/{s}/active"] = svc["active"].encode()
        for p, members in svc.get("pools", {}).items():
            for m, v in members.items():
                out[f"{prefix}services/{s}/pools/{p}/{m}"] = canonical(v)
    return out


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any Consul or reconciler variable, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CONSUL_", "RECONCILER_")) and k != "PYTHONPATH"
    }
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


@dataclass
class Cli:
    """Runs `python -m reconciler` with a fixed prefix and Consul address."""

    prefix: str
    addr: str

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "reconciler", "--prefix", self.prefix, *args]

    def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        full_env = clean_env(**{"CONSUL_HTTP_ADDR": self.addr, **env})
        return subprocess.run(
            self.argv(*args), capture_output=True, text=True, env=full_env, timeout=60,
            cwd=REPO,
        )  # fmt: skip


@pytest.fixture
def kv(consul_addr: str) -> Iterator[ConsulKV]:
    with ConsulKV(ConsulSettings.from_env({"CONSUL_HTTP_ADDR": consul_addr})) as client:
        yield client


@pytest.fixture
def cli(kv: ConsulKV, consul_addr: str) -> Iterator[Cli]:
    prefix = f"rtest-{secrets.token_hex(4)}/"
    yield Cli(prefix, consul_addr)
    kv.delete(prefix, recurse=True)


def write_state(tmp_path: Path, state: Mapping[str, Any], name: str = "state.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(dict(state)))
    return str(path)


def under(kv: ConsulKV, prefix: str) -> dict[str, bytes]:
    return {k: i.value for k, i in kv.read_prefix(prefix, consistent=True).items.items()}


def assert_one_clean_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# ------------------------------------------------------------------ help, validate


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "reconciler", command, "--help"],
        capture_output=True, text=True, env=clean_env(), timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: reconciler {command}")
    assert proc.stderr == ""


def test_top_level_help_and_missing_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "reconciler", "--help"], capture_output=True,
                          text=True, env=clean_env(), timeout=60)
    assert proc.returncode == 0
    for command in COMMANDS:
        assert command in proc.stdout
    assert "CONSUL_HTTP_TOKEN" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "reconciler"], capture_output=True,
                          text=True, env=clean_env(), timeout=60)
    assert proc.returncode == 2
    assert "required: COMMAND" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_validate_valid_file(cli: Cli, tmp_path: Path, kv: ConsulKV) -> None:
    path = write_state(tmp_path, VALID)
    proc = cli("validate", "-f", path, CONSUL_HTTP_ADDR="127.0.0.1:1")  # talks to nothing
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"{path}: valid (1 networks, 1 containers, 1 services, 2 members)"
    )
    assert proc.stderr == ""
    json_path = tmp_path / "state.json"
    json_path.write_text(json.dumps(VALID))
    assert cli("validate", "-f", str(json_path)).returncode == 0


def test_validate_invalid_file_prints_every_error(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(INVALID_YAML)
    proc = cli("validate", "-f", str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    for where, message in INVALID_EXPECTED:
        wanted = f"error: {path}: {where}: {message}"
        assert any(line.startswith(wanted) for line in errors), (wanted, proc.stderr)
    assert proc.stderr.splitlines()[-1] == f"{path}: {len(errors)} error(s)"
    assert "Traceback" not in proc.stderr


def test_validate_invalid_service_config_has_no_spurious_missing_error(
    cli: Cli, tmp_path: Path
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(INVALID_YAML)
    proc = cli("validate", "-f", str(path))
    assert "missing: the service has pools" not in proc.stderr


def test_validate_unreadable_and_unparsable_files(cli: Cli, tmp_path: Path) -> None:
    missing = cli("validate", "-f", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert f"error: {tmp_path / 'nope.yaml'}: cannot read file" in missing.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("networks: [unclosed\n")
    proc = cli("validate", "-f", str(broken))
    assert proc.returncode == 2
    assert f"error: {broken}: cannot parse" in proc.stderr
    assert "Traceback" not in proc.stderr + missing.stderr


# ------------------------------------------------------------------ apply


def test_apply_writes_canonical_values_then_no_changes(
    cli: Cli, tmp_path: Path, kv: ConsulKV
) -> None:
    path = write_state(tmp_path, VALID)
    proc = cli("apply", "-f", path)
    assert proc.returncode == 0, proc.stderr
    want = expected_kv(VALID, cli.prefix)
    assert under(kv, cli.prefix) == want
    assert under(kv, cli.prefix)[f"{cli.prefix}services/web/active"] == b"blue"
    lines = proc.stdout.splitlines()
    # Networks first, `active` last: a watcher between transactions never sees a dangling
    # reference.
    assert lines[0] == f"+ {cli.prefix}networks/vnet1"
    assert lines[-2] == f"+ {cli.prefix}services/web/active"
    assert lines[-1] == "applied 6 change(s) (1 networks, 1 containers, 1 services, 2 members)"
    indexes = {k: i.modify_index for k, i in kv.read_prefix(cli.prefix).items.items()}

    again = cli("apply", "-f", path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "no changes"
    assert {k: i.modify_index for k, i in kv.read_prefix(cli.prefix).items.items()} == indexes

    # One changed value: exactly one update.
    changed = json.loads(json.dumps(VALID))
    changed["services"]["web"]["pools"]["green"]["g1"]["weight"] = 7
    proc = cli("apply", "-f", write_state(tmp_path, changed, "changed.yaml"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"~ {cli.prefix}services/web/pools/green/g1"
    assert "applied 1 change(s)" in proc.stdout
    assert json.loads(kv.get(f"{cli.prefix}services/web/pools/green/g1").value)["weight"] == 7  # type: ignore[union-attr]


def test_invalid_file_writes_nothing(cli: Cli, tmp_path: Path, kv: ConsulKV) -> None:
    bad = json.loads(json.dumps(VALID))
    bad["networks"]["vnet1"]["vlan"] = 0  # one bad field among good keys
    proc = cli("apply", "-f", write_state(tmp_path, bad))
    assert proc.returncode == 2
    assert "networks.vnet1: vlan: must be between 1 and 4094 (got 0)" in proc.stderr
    assert "nothing written" in proc.stderr
    assert proc.stdout == ""
    assert under(kv, cli.prefix) == {}


def test_dry_run_writes_nothing(cli: Cli, tmp_path: Path, kv: ConsulKV) -> None:
    path = write_state(tmp_path, VALID)
    proc = cli("apply", "-f", path, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert f"+ {cli.prefix}networks/vnet1" in proc.stdout.splitlines()
    assert "6 change(s) (dry run: nothing written)" in proc.stdout
    assert under(kv, cli.prefix) == {}
    # ... nor deletes anything with --prune.
    assert cli("apply", "-f", path).returncode == 0
    stale = f"{cli.prefix}networks/stale"
    kv.put(stale, canonical({"subnet": "10.77.9.0/24", "bridge": "br-stale"}))
    proc = cli("apply", "-f", path, "--prune", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert f"- {stale}" in proc.stdout.splitlines()
    assert kv.get(stale) is not None


def test_prune_removes_only_user_keys_absent_from_the_file(
    cli: Cli, tmp_path: Path, kv: ConsulKV
) -> None:
    path = write_state(tmp_path, VALID)
    assert cli("apply", "-f", path).returncode == 0
    p = cli.prefix
    stale_user = {
        f"{p}networks/stale": canonical({"subnet": "10.77.9.0/24", "bridge": "br-stale"}),
        f"{p}containers/stale": canonical({"interfaces": []}),
        f"{p}services/web/pools/blue/old": canonical({"address": "10.77.1.9", "port": 80}),
        f"{p}services/gone/config": canonical({"bind": "127.0.0.1:18099"}),
        f"{p}services/gone/active": b"x",
    }
    daemon = {
        f"{p}nodes/x/status": b'{"node": "x"}',
        f"{p}ipam/vnet1/10.77.1.150": b'{"node":"x","container":"c","interface":"eth1"}',
        f"{p}audit/web/1": b"{}",
        f"{p}locks/cutover/web": b"",
    }
    for key, value in {**stale_user, **daemon}.items():
        assert kv.put(key, value)
    published = f"{p}services/web/pools/blue/published-c1"
    sid = kv.session_create("rtest-cli-prune", ttl="30s", behavior="delete")
    try:
        assert kv.put(published, canonical({"address": "10.77.1.120", "port": 8080}),
                      acquire=sid)
        without = cli("apply", "-f", path)
        assert without.returncode == 0, without.stderr
        assert without.stdout.strip() == "no changes"  # no --prune: nothing deleted

        proc = cli("apply", "-f", path, "--prune")
        assert proc.returncode == 0, proc.stderr
        deleted = {line[2:] for line in proc.stdout.splitlines() if line.startswith("- ")}
        assert deleted == set(stale_user)
        assert f"applied {len(stale_user)} change(s)" in proc.stdout
        left = under(kv, p)
        assert left == {**expected_kv(VALID, p), **daemon, published: left[published]}
        held = kv.get(published)
        assert held is not None and held.session == sid

        assert cli("apply", "-f", path, "--prune").stdout.strip() == "no changes"
    finally:
        kv.session_destroy(sid)


def test_more_than_64_operations_apply_fully_then_prune(
    cli: Cli, tmp_path: Path, kv: ConsulKV
) -> None:
    big = json.loads(json.dumps(VALID))
    big["services"]["web"]["pools"]["blue"] = {
        f"m{i:03d}": {"address": f"10.77.1.{i + 1}", "port": 8000 + i} for i in range(100)
    }
    path = write_state(tmp_path, big)
    proc = cli("apply", "-f", path)
    assert proc.returncode == 0, proc.stderr
    assert "applied 105 change(s)" in proc.stdout  # 105 ops: two transactions
    got = under(kv, cli.prefix)
    assert got == expected_kv(big, cli.prefix)
    assert len(got) == 105
    assert cli("apply", "-f", path).stdout.strip() == "no changes"
    # Shrinking back to one blue member prunes 99 keys, again more than one transaction.
    proc = cli("apply", "-f", write_state(tmp_path, VALID, "small.yaml"), "--prune")
    assert proc.returncode == 0, proc.stderr
    assert sum(line.startswith("- ") for line in proc.stdout.splitlines()) == 100
    assert under(kv, cli.prefix) == expected_kv(VALID, cli.prefix)


# ------------------------------------------------------------------ plan


def test_plan_valid_then_per_key_reasons(cli: Cli, tmp_path: Path, kv: ConsulKV) -> None:
    assert cli("apply", "-f", write_state(tmp_path, VALID)).returncode == 0
    proc = cli("plan")
    assert proc.returncode == 0, proc.stderr
    assert "1 networks, 1 containers, 1 services, 2 members" in proc.stdout
    assert "invalid" not in proc.stdout

    bad_json = f"{cli.prefix}networks/broken"
    bad_field = f"{cli.prefix}networks/badvlan"
    kv.put(bad_json, b"{nope")
    kv.put(bad_field, canonical({"subnet": "10.77.8.0/24", "bridge": "br8", "vlan": 9999}))
    before = under(kv, cli.prefix)
    proc = cli("plan")
    assert proc.returncode == 2
    lines = proc.stdout.splitlines()
    # still reports the valid rest
    assert "1 networks, 1 containers, 1 services, 2 members" in lines[0]
    at = lines.index(f"invalid {bad_json}")
    assert lines[at + 1].strip().startswith("invalid JSON: Expecting property name")
    at = lines.index(f"invalid {bad_field}")
    assert lines[at + 1].strip() == "vlan: must be between 1 and 4094 (got 9999)"
    assert under(kv, cli.prefix) == before  # plan changes nothing


# ------------------------------------------------------------------ failures


@pytest.mark.parametrize("args", [("plan",), ("apply", "-f", "{file}")])
def test_unreachable_consul_is_one_line_exit_1(
    cli: Cli, tmp_path: Path, args: tuple[str, ...]
) -> None:
    path = write_state(tmp_path, VALID)
    proc = cli(*(a.replace("{file}", path) for a in args), CONSUL_HTTP_ADDR="127.0.0.1:1")
    assert proc.returncode == 1
    line = assert_one_clean_line(proc.stderr)
    assert line == "reconciler: cannot reach Consul at http://127.0.0.1:1: Connection refused"


def test_bad_consul_settings_are_usage_errors(cli: Cli, tmp_path: Path) -> None:
    path = write_state(tmp_path, VALID)
    proc = cli("apply", "-f", path, CONSUL_HTTP_TOKEN_FILE=str(tmp_path / "no-such-token"))
    assert proc.returncode == 2
    line = assert_one_clean_line(proc.stderr)
    assert "CONSUL_HTTP_TOKEN_FILE" in line and "cannot read the token file" in line
    proc = cli("plan", CONSUL_HTTP_ADDR="ftp://127.0.0.1:8500")
    assert proc.returncode == 2
    assert "unknown scheme" in assert_one_clean_line(proc.stderr)


def test_concurrent_writer_makes_apply_fail_not_overwrite(
    kv: ConsulKV, consul_addr: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In-process (to step in between apply's read and its transaction): someone writes
    a key after apply read the prefix; the check-and-set makes apply fail with exit 1 and
    keeps the other writer's value."""
    from reconciler import cli as cli_module

    prefix = f"rtest-{secrets.token_hex(4)}/"
    for name in [k for k in os.environ if k.startswith(("CONSUL_", "RECONCILER_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CONSUL_HTTP_ADDR", consul_addr)
    theirs = canonical({"subnet": "10.77.7.0/24", "bridge": "br-theirs"})
    real_txn = ConsulKV.txn

    def racing_txn(self: ConsulKV, ops: Any) -> None:
        kv.put(f"{prefix}networks/vnet1", theirs)
        real_txn(self, ops)

    monkeypatch.setattr(ConsulKV, "txn", racing_txn)
    try:
        code = cli_module.main(["--prefix", prefix, "apply", "-f", write_state(tmp_path, VALID)])
        err = capsys.readouterr().err
        assert code == 1
        line = assert_one_clean_line(err)
        assert line.startswith("reconciler: a key changed in Consul while applying")
        assert f"(cas '{prefix}networks/vnet1')" in line
        # The first (only) transaction was rolled back whole; their value stays.
        assert under(kv, prefix) == {f"{prefix}networks/vnet1": theirs}
    finally:
        kv.delete(prefix, recurse=True)


def test_closed_stdout_is_exit_1_without_traceback(cli: Cli, tmp_path: Path) -> None:
    path = write_state(tmp_path, VALID)
    read_end, write_end = os.pipe()
    os.close(read_end)  # whoever reads our output is gone before we write
    try:
        for buffering, args in itertools.product(
            ("0", "1"), (("validate", "-f", path), ("apply", "-f", path), ("plan",))
        ):
            env = clean_env(CONSUL_HTTP_ADDR=cli.addr)
            env.pop("PYTHONUNBUFFERED", None)
            if buffering == "1":
                env["PYTHONUNBUFFERED"] = "1"
            proc = subprocess.run(
                cli.argv(*args), stdout=write_end, stderr=subprocess.PIPE, text=True,
                env=env, timeout=60,
            )  # fmt: skip
            assert proc.returncode == 1, (buffering, args, proc.stderr)
            assert proc.stderr == "", (args, proc.stderr)
    finally:
        os.close(write_end)


# ------------------------------------------------------------------ ACL agent


@pytest.fixture(scope="module")
def acl_agent(run_id: str) -> Iterator[AclAgent]:
    """A `consul agent -dev` with default-deny ACLs on free ports, and a token that may
    only write `rt-cli-acl-<run>/`; killed at teardown."""
    prefix = f"rt-cli-acl-{run_id}/"
    rules = f'key_prefix "{prefix}" {{ policy = "write" }}\n'
    with start_acl_agent(f"rt-cli-acl-{run_id}", prefix, rules, policy=f"rt-cli-{run_id}",
                         description="reconciler cli test") as agent:
        yield agent


@pytest.fixture
def acl_cli(acl_agent: AclAgent) -> Iterator[Cli]:
    c = Cli(f"{acl_agent.prefix}{secrets.token_hex(4)}/", acl_agent.addr)
    yield c
    with ConsulKV(ConsulSettings.from_env(
        {"CONSUL_HTTP_ADDR": acl_agent.addr, "CONSUL_HTTP_TOKEN": acl_agent.master}
    )) as admin:  # fmt: skip
        admin.delete(c.prefix, recurse=True)


def _admin_view(agent: AclAgent, prefix: str) -> dict[str, bytes]:
    with ConsulKV(ConsulSettings.from_env(
        {"CONSUL_HTTP_ADDR": agent.addr, "CONSUL_HTTP_TOKEN": agent.master}
    )) as admin:  # fmt: skip
        return under(admin, prefix)


def _assert_token_hidden(agent: AclAgent, cli: Cli, *procs: subprocess.CompletedProcess[str]
                         ) -> None:
    for proc in procs:
        assert agent.token not in proc.stdout
        assert agent.token not in proc.stderr
        assert agent.token not in " ".join(proc.args)
        assert agent.master not in proc.stdout + proc.stderr
    assert agent.token not in " ".join(cli.argv("apply", "-f", "x"))


def test_acl_least_privilege_token_by_env(
    acl_agent: AclAgent, acl_cli: Cli, tmp_path: Path
) -> None:
    big = json.loads(json.dumps(VALID))
    big["services"]["web"]["pools"]["blue"] = {
        f"m{i:02d}": {"address": f"10.77.1.{i + 1}", "port": 8080} for i in range(70)
    }
    path = write_state(tmp_path, big)
    proc = acl_cli("apply", "-f", path, CONSUL_HTTP_TOKEN=acl_agent.token)
    assert proc.returncode == 0, proc.stderr
    assert "applied 75 change(s)" in proc.stdout  # two transactions, both carry the token
    assert _admin_view(acl_agent, acl_cli.prefix) == expected_kv(big, acl_cli.prefix)
    again = acl_cli("apply", "-f", path, CONSUL_HTTP_TOKEN=acl_agent.token)
    assert again.stdout.strip() == "no changes"
    plan = acl_cli("plan", CONSUL_HTTP_TOKEN=acl_agent.token)
    assert plan.returncode == 0, plan.stderr
    assert "1 networks, 1 containers, 1 services, 71 members" in plan.stdout
    _assert_token_hidden(acl_agent, acl_cli, proc, again, plan)


def test_acl_least_privilege_token_by_file(
    acl_agent: AclAgent, acl_cli: Cli, tmp_path: Path
) -> None:
    token_file = tmp_path / "consul-token"
    token_file.touch(mode=0o600)
    token_file.write_text(acl_agent.token + "\n")
    proc = acl_cli("apply", "-f", write_state(tmp_path, VALID),
                   CONSUL_HTTP_TOKEN_FILE=str(token_file))
    assert proc.returncode == 0, proc.stderr
    assert _admin_view(acl_agent, acl_cli.prefix) == expected_kv(VALID, acl_cli.prefix)
    _assert_token_hidden(acl_agent, acl_cli, proc)


def test_acl_without_token_fails_clearly(
    acl_agent: AclAgent, acl_cli: Cli, tmp_path: Path
) -> None:
    proc = acl_cli("apply", "-f", write_state(tmp_path, VALID))
    assert proc.returncode == 1
    line = assert_one_clean_line(proc.stderr)
    assert line.startswith(f"reconciler: Consul transaction at http://{acl_agent.addr} failed")
    assert "no ACL token was given: set CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE" in line
    assert _admin_view(acl_agent, acl_cli.prefix) == {}
    _assert_token_hidden(acl_agent, acl_cli, proc)


def test_acl_token_outside_its_prefix_is_denied(
    acl_agent: AclAgent, tmp_path: Path
) -> None:
    outside = Cli(f"rt-cli-outside-{secrets.token_hex(4)}/", acl_agent.addr)
    proc = outside("apply", "-f", write_state(tmp_path, VALID),
                   CONSUL_HTTP_TOKEN=acl_agent.token)
    assert proc.returncode == 1
    line = assert_one_clean_line(proc.stderr)
    assert "Permission denied" in line
    assert "the ACL token's policies do not allow it" in line
    assert _admin_view(acl_agent, outside.prefix) == {}
    _assert_token_hidden(acl_agent, outside, proc)
