"""Integration tests of the Consul adapter against a second, ACL-enforcing Consul agent.

The module starts its own `consul agent -dev` with `acl { default_policy = "deny" }` on
free ports (plus an HTTP unix socket), creates a least-privilege policy and token with the
master token, and kills the agent at teardown. This proves that transactions carry the
token (py-consul's own `Txn.put` does not send it) and that refusals become a clear
`ConsulAuthError` that never contains the token.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from consul_agents import AclAgent, start_acl_agent

from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings, TxnOp
from reconciler.errors import ConsulAuthError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def acl_agent(run_id: str) -> Iterator[AclAgent]:
    prefix = f"rt-acl-{run_id}/"
    rules = (
        f'key_prefix "{prefix}" {{ policy = "write" }}\n'
        'session_prefix "" { policy = "write" }\n'
    )
    with start_acl_agent(f"rt-acl-{run_id}", prefix, rules, policy=f"rt-{run_id}",
                         description="reconciler test", unix_socket=True) as agent:
        yield agent


def _client(agent: AclAgent, **env: str) -> ConsulKV:
    return ConsulKV(ConsulSettings.from_env({"CONSUL_HTTP_ADDR": agent.addr, **env}))


@pytest.fixture
def prefix(acl_agent: AclAgent) -> Iterator[str]:
    p = f"{acl_agent.prefix}{secrets.token_hex(4)}/"
    yield p
    with _client(acl_agent, CONSUL_HTTP_TOKEN=acl_agent.master) as admin:
        admin.delete(p, recurse=True)


def _assert_clean(exc: BaseException, *secrets_: str) -> str:
    message = str(exc)
    assert "\n" not in message
    for secret in secrets_:
        assert secret not in message
        assert secret not in repr(exc)
    assert exc.__cause__ is None or not any(s in str(exc.__cause__) for s in secrets_)
    return message


def test_least_privilege_token_reads_puts_and_txns(acl_agent: AclAgent, prefix: str) -> None:
    with _client(acl_agent, CONSUL_HTTP_TOKEN=acl_agent.token) as kv:
        assert kv.put(prefix + "one", b"1") is True
        ops = [TxnOp.set(f"{prefix}many/{i:03d}", str(i).encode()) for i in range(150)]
        kv.txn(ops)  # three chunks, each must carry the token
        snap = kv.read_prefix(prefix)
        assert len(snap.items) == 151
        assert snap.items[prefix + "many/149"].value == b"149"
        again = kv.read_prefix(prefix, index=snap.index, wait="1s")
        assert again.index == snap.index
        sid = kv.session_create("rt-acl", ttl="10s", behavior="delete")
        try:
            assert kv.put(prefix + "member", b"m", acquire=sid) is True
            kv.txn([TxnOp.check_session(prefix + "member", sid)])
        finally:
            kv.session_destroy(sid)
        assert kv.get(prefix + "member") is None


def test_no_token_is_a_clear_auth_error(acl_agent: AclAgent, prefix: str) -> None:
    with _client(acl_agent, CONSUL_HTTP_TOKEN=acl_agent.token) as kv:
        kv.put(prefix + "visible-with-token", b"1")
    with _client(acl_agent) as anon:
        with pytest.raises(ConsulAuthError) as put_err:
            anon.put(prefix + "x", b"1")
        message = _assert_clean(put_err.value)
        assert f"Consul at http://{acl_agent.addr} refused the write of '{prefix}x'" in message
        assert "no ACL token was given" in message
        assert "CONSUL_HTTP_TOKEN" in message
        with pytest.raises(ConsulAuthError, match="no ACL token was given") as txn_err:
            anon.txn([TxnOp.set(f"{prefix}t/{i}", b"") for i in range(70)])
        assert f"(set '{prefix}t/0'): Permission denied" in _assert_clean(txn_err.value)
        with pytest.raises(ConsulAuthError):
            anon.session_create("rt-anon")
        # Consul filters what a token may not read instead of refusing: an empty result.
        assert anon.read_prefix(prefix).items == {}


def test_unknown_token_is_an_auth_error_without_the_token(acl_agent: AclAgent, prefix: str) -> None:
    bogus = str(uuid.uuid4())
    with _client(acl_agent, CONSUL_HTTP_TOKEN=bogus) as kv:
        for call in (
            lambda: kv.read_prefix(prefix),
            lambda: kv.put(prefix + "x", b"1"),
            lambda: kv.txn([TxnOp.set(prefix + "x", b"1")]),
        ):
            with pytest.raises(ConsulAuthError) as info:
                call()
            message = _assert_clean(info.value, bogus)
            assert "the ACL token is unknown to Consul (ACL not found)" in message


def test_token_outside_its_policy_is_denied(acl_agent: AclAgent, prefix: str) -> None:
    outside = f"rt-outside-{secrets.token_hex(4)}/k"
    with _client(acl_agent, CONSUL_HTTP_TOKEN=acl_agent.token) as kv:
        with pytest.raises(ConsulAuthError) as put_err:
            kv.put(outside, b"1")
        assert "permission denied" in _assert_clean(put_err.value, acl_agent.token)
        with pytest.raises(ConsulAuthError) as txn_err:
            kv.txn([TxnOp.set(prefix + "in", b"1"), TxnOp.set(outside, b"1")])
        message = _assert_clean(txn_err.value, acl_agent.token)
        assert f"op 1 (set '{outside}'): Permission denied" in message
        assert kv.get(prefix + "in") is None  # the chunk was atomic


def test_token_file(acl_agent: AclAgent, prefix: str, tmp_path: Path) -> None:
    token_file = tmp_path / "consul-token"
    token_file.write_text(acl_agent.token + "\n")
    os.chmod(token_file, 0o600)
    with _client(acl_agent, CONSUL_HTTP_TOKEN_FILE=str(token_file)) as kv:
        assert kv.put(prefix + "from-file", b"ok") is True
        kv.txn([TxnOp.set(f"{prefix}f/{i}", b"") for i in range(65)])
        assert len(kv.read_prefix(prefix).items) == 66
        assert acl_agent.token not in repr(kv)


def test_unix_socket_with_token(acl_agent: AclAgent, prefix: str) -> None:
    env = {"CONSUL_HTTP_ADDR": f"unix://{acl_agent.unix_socket}"}
    with ConsulKV(ConsulSettings.from_env({**env, "CONSUL_HTTP_TOKEN": acl_agent.token})) as kv:
        assert kv.put(prefix + "via-socket", b"s") is True
        kv.txn([TxnOp.set(prefix + "via-socket-txn", b"t")])
        assert set(kv.read_prefix(prefix).items) == {
            prefix + "via-socket",
            prefix + "via-socket-txn",
        }
    with ConsulKV(ConsulSettings.from_env(env)) as anon, pytest.raises(ConsulAuthError):
        anon.put(prefix + "x", b"1")
