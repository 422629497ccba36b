"""Unit tests of `ConsulSettings.from_env` (Consul's own variables) and the token's secrecy."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings, TxnOp, _txn_payload
from reconciler.errors import ConfigurationError

SECRET = "3f1c9a52-0d7e-4b8e-9a61-5b2f0c7d8e91"


def test_defaults_without_variables() -> None:
    s = ConsulSettings.from_env({})
    assert (s.scheme, s.host, s.port, s.unix_socket) == ("http", "127.0.0.1", 8500, None)
    assert s.token is None
    assert s.verify is True
    assert s.ca_cert is None and s.client_cert is None and s.client_key is None
    assert s.address == "http://127.0.0.1:8500"


@pytest.mark.parametrize(
    ("addr", "ssl", "expected"),
    [
        ("10.0.0.5:8501", None, ("http", "10.0.0.5", 8501, "http://10.0.0.5:8501")),
        ("consul.example:8500", None, ("http", "consul.example", 8500, None)),
        ("http://127.0.0.2:9500", None, ("http", "127.0.0.2", 9500, None)),
        ("https://consul.example:8501", None, ("https", "consul.example", 8501, None)),
        ("HTTPS://consul.example:8501/", None, ("https", "consul.example", 8501, None)),
        ("127.0.0.1:8501", "true", ("https", "127.0.0.1", 8501, "https://127.0.0.1:8501")),
        # As in Consul, an explicit http:// never downgrades CONSUL_HTTP_SSL=true.
        ("http://127.0.0.1:8501", "true", ("https", "127.0.0.1", 8501, None)),
        ("https://127.0.0.1:8501", "false", ("https", "127.0.0.1", 8501, None)),
        ("[::1]:8500", None, ("http", "::1", 8500, "http://[::1]:8500")),
        ("consul.example", None, ("http", "consul.example", 80, None)),
        ("https://consul.example", None, ("https", "consul.example", 443, None)),
    ],
)
def test_http_addr_forms(
    addr: str, ssl: str | None, expected: tuple[str, str, int, str | None]
) -> None:
    env = {"CONSUL_HTTP_ADDR": addr}
    if ssl is not None:
        env["CONSUL_HTTP_SSL"] = ssl
    s = ConsulSettings.from_env(env)
    scheme, host, port, address = expected
    assert (s.scheme, s.host, s.port) == (scheme, host, port)
    if address is not None:
        assert s.address == address


def test_unix_socket_addr() -> None:
    s = ConsulSettings.from_env({"CONSUL_HTTP_ADDR": "unix:///run/consul/http.sock"})
    assert s.scheme == "unix"
    assert s.unix_socket == "/run/consul/http.sock"
    assert s.address == "unix:///run/consul/http.sock"


@pytest.mark.parametrize(
    "addr",
    ["ftp://host:21", "host:notaport", "host:99999", "http://", "unix://", "host:8500/v1", ":8500"],
)
def test_bad_http_addr_is_a_configuration_error(addr: str) -> None:
    with pytest.raises(ConfigurationError, match="CONSUL_HTTP_ADDR"):
        ConsulSettings.from_env({"CONSUL_HTTP_ADDR": addr})


def test_token_from_variable_is_stripped() -> None:
    assert ConsulSettings.from_env({"CONSUL_HTTP_TOKEN": f" {SECRET}\n"}).token == SECRET
    assert ConsulSettings.from_env({"CONSUL_HTTP_TOKEN": ""}).token is None


def test_token_file_is_read_stripped_and_wins(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"\n  {SECRET}  \n")
    s = ConsulSettings.from_env(
        {"CONSUL_HTTP_TOKEN_FILE": str(token_file), "CONSUL_HTTP_TOKEN": "other"}
    )
    assert s.token == SECRET


def test_empty_token_file_falls_back_to_token_variable(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  \n")
    s = ConsulSettings.from_env(
        {"CONSUL_HTTP_TOKEN_FILE": str(token_file), "CONSUL_HTTP_TOKEN": SECRET}
    )
    assert s.token == SECRET


def test_missing_token_file_is_a_configuration_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigurationError, match="CONSUL_HTTP_TOKEN_FILE") as info:
        ConsulSettings.from_env({"CONSUL_HTTP_TOKEN_FILE": str(missing)})
    assert str(missing) in str(info.value)
    assert "\n" not in str(info.value)


def test_tls_variables() -> None:
    s = ConsulSettings.from_env(
        {
            "CONSUL_HTTP_ADDR": "https://consul.example:8501",
            "CONSUL_CACERT": "/etc/consul/ca.pem",
            "CONSUL_CLIENT_CERT": "/etc/consul/cli.pem",
            "CONSUL_CLIENT_KEY": "/etc/consul/cli-key.pem",
        }
    )
    assert s.ca_cert == "/etc/consul/ca.pem"
    assert s.client_cert == "/etc/consul/cli.pem"
    assert s.client_key == "/etc/consul/cli-key.pem"
    assert s.verify is True


def test_capath_used_when_no_cacert() -> None:
    assert ConsulSettings.from_env({"CONSUL_CAPATH": "/etc/ssl/consul"}).ca_cert == (
        "/etc/ssl/consul"
    )


def test_client_key_without_cert_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="CONSUL_CLIENT_CERT"):
        ConsulSettings.from_env({"CONSUL_CLIENT_KEY": "/k.pem"})


@pytest.mark.parametrize(
    ("raw", "verify"),
    [("false", False), ("0", False), ("FALSE", False), ("f", False), ("true", True), ("1", True)],
)
def test_ssl_verify(raw: str, verify: bool) -> None:
    assert ConsulSettings.from_env({"CONSUL_HTTP_SSL_VERIFY": raw}).verify is verify


@pytest.mark.parametrize("name", ["CONSUL_HTTP_SSL_VERIFY", "CONSUL_HTTP_SSL"])
def test_bad_boolean_is_a_configuration_error(name: str) -> None:
    with pytest.raises(ConfigurationError, match=name):
        ConsulSettings.from_env({name: "maybe"})


def test_repr_and_str_hide_the_token() -> None:
    s = ConsulSettings.from_env({"CONSUL_HTTP_TOKEN": SECRET})
    for text in (repr(s), str(s), f"{s}", repr(ConsulKV(s))):
        assert SECRET not in text
        assert "token=<set>" in text
    assert "token=None" in repr(ConsulSettings.from_env({}))


def test_settings_are_hashable() -> None:
    a = ConsulSettings.from_env({"CONSUL_HTTP_TOKEN": SECRET})
    assert hash(a) == hash(ConsulSettings.from_env({"CONSUL_HTTP_TOKEN": SECRET}))


def test_client_does_not_take_the_token_from_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # py-consul reads CONSUL_HTTP_TOKEN itself and would override ours.
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-the-environment")
    kv = ConsulKV(ConsulSettings(token=SECRET))
    assert kv._headers() == {"X-Consul-Token": SECRET}
    assert ConsulKV(ConsulSettings())._headers() == {}


def test_txn_payload_encodes_values_base64() -> None:
    assert _txn_payload(TxnOp.cas("a/b", b"\x00\xff", 7)) == {
        "Verb": "cas",
        "Key": "a/b",
        "Value": "AP8=",
        "Index": 7,
    }
    assert _txn_payload(TxnOp.delete_tree("a/")) == {"Verb": "delete-tree", "Key": "a/"}
    assert _txn_payload(TxnOp.lock("a/l", b"", "sid")) == {
        "Verb": "lock",
        "Key": "a/l",
        "Value": "",
        "Session": "sid",
    }


def test_ovs_db_from_environment_like_ovs_vsctl() -> None:
    from reconciler.settings import default_ovs_db

    assert default_ovs_db({}) == "unix:/var/run/openvswitch/db.sock"
    assert default_ovs_db({"OVS_RUNDIR": "/run/lab/host2/ovs"}) == \
        "unix:/run/lab/host2/ovs/db.sock"
    assert default_ovs_db({"OVS_RUNDIR": "/x", "RECONCILER_OVS_DB": "tcp:127.0.0.1:6640"}) \
        == "tcp:127.0.0.1:6640"
