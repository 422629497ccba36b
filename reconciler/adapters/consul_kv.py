"""The Consul adapter: the only module that imports py-consul (and talks HTTP to Consul).

Owns: reading Consul's connection settings from Consul's own environment variables
(`ConsulSettings.from_env`), recursive and blocking KV reads (`ConsulKV.read_prefix`),
single-key writes, chunked KV transactions (`ConsulKV.txn`) and sessions.
It takes and returns plain values (`bytes`, `int`, frozen dataclasses), never model
objects, and translates every py-consul / transport failure into `reconciler.errors`:

    connection refused, timeout, TLS failure  -> ConsulUnavailable ("cannot reach Consul at ...")
    HTTP 401/403, "ACL not found", "Permission denied" -> ConsulAuthError
    a lost check-and-set inside a transaction -> CasConflict
    anything else Consul answers with          -> ConsulError

The ACL token is sent only in the `X-Consul-Token` header; it never appears in a URL, a
repr, a log line or an error message.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import ipaddress
import json
import logging
import os
import re
import ssl
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import consul
import consul.base
import consul.std

from reconciler.adapters.consul_http import ConnectTimeout, HttpTransport, TransportSettings
from reconciler.errors import (
    CasConflict,
    ConfigurationError,
    ConsulAuthError,
    ConsulError,
    ConsulUnavailable,
)

__all__ = [
    "MAX_TXN_BYTES",
    "MAX_TXN_OPS",
    "ConsulKV",
    "ConsulSettings",
    "KVItem",
    "KVSnapshot",
    "TxnOp",
]

log = logging.getLogger(__name__)

MAX_TXN_OPS = 64
"""Consul refuses a transaction with more than 64 operations; `ConsulKV.txn` chunks to this."""

MAX_TXN_BYTES = 480 * 1024
"""Chunks also stay under Consul's default request limit (txn_max_req_len, 512 KiB)."""


@dataclass(frozen=True)
class ConsulSettings:
    """How to reach the Consul HTTP API. Build it with `from_env()` or directly."""

    scheme: Literal["http", "https", "unix"] = "http"
    """`http`, `https`, or `unix` (then `unix_socket` is the socket path)."""
    host: str = "127.0.0.1"
    """Host name or IP address of the agent (unused for unix sockets)."""
    port: int = 8500
    """TCP port of the agent's HTTP API (unused for unix sockets)."""
    unix_socket: str | None = None
    """Path of the agent's HTTP unix socket, when `scheme == "unix"`."""
    token: str | None = field(default=None, repr=False)
    """ACL token sent as `X-Consul-Token`; hidden from repr and never logged."""
    ca_cert: str | None = None
    """CA bundle file or directory used to verify the agent (CONSUL_CACERT / CONSUL_CAPATH)."""
    client_cert: str | None = None
    """Client certificate for mutual TLS (CONSUL_CLIENT_CERT)."""
    client_key: str | None = None
    """Key of the client certificate (CONSUL_CLIENT_KEY)."""
    verify: bool = True
    """Verify the agent's TLS certificate (CONSUL_HTTP_SSL_VERIFY=false disables)."""
    timeout: float = 10.0
    """Seconds to wait for a connection or an answer; blocking queries add their wait."""

    @property
    def address(self) -> str:
        """The agent's address for humans and error messages, e.g. `http://127.0.0.1:8500`."""
        if self.scheme == "unix":
            return f"unix://{self.unix_socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __repr__(self) -> str:
        # Never the token itself: only whether one is set.
        token = "<set>" if self.token else None
        return (
            f"ConsulSettings(address={self.address!r}, token={token}, "
            f"ca_cert={self.ca_cert!r}, client_cert={self.client_cert!r}, "
            f"client_key={self.client_key!r}, verify={self.verify}, timeout={self.timeout:g})"
        )

    __str__ = __repr__

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ConsulSettings:
        """Read Consul's own variables, as the `consul` CLI does.

        CONSUL_HTTP_ADDR (`host:port`, `http(s)://host:port` or `unix:///path`; default
        127.0.0.1:8500; a missing port means 80/443 as in Consul), CONSUL_HTTP_SSL
        (true -> https), CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE (read and stripped;
        takes precedence over CONSUL_HTTP_TOKEN, as in Consul's api package),
        CONSUL_CACERT, CONSUL_CAPATH, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY,
        CONSUL_HTTP_SSL_VERIFY (false/0 disables verification).
        Raises `ConfigurationError` for a malformed value or an unreadable token file.
        """
        use_ssl = _env_bool(environ, "CONSUL_HTTP_SSL")
        scheme, host, port, unix_socket = _parse_addr(
            environ.get("CONSUL_HTTP_ADDR", "").strip() or "127.0.0.1:8500",
            https=bool(use_ssl),
        )
        token: str | None = environ.get("CONSUL_HTTP_TOKEN", "").strip() or None
        token_file = environ.get("CONSUL_HTTP_TOKEN_FILE", "").strip()
        if token_file:
            try:
                with open(token_file, encoding="utf-8") as handle:
                    from_file = handle.read().strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise ConfigurationError(
                    f"CONSUL_HTTP_TOKEN_FILE {token_file}: cannot read the token file: {reason}"
                ) from None
            if from_file:
                token = from_file
        verify = _env_bool(environ, "CONSUL_HTTP_SSL_VERIFY")
        client_cert = environ.get("CONSUL_CLIENT_CERT", "").strip() or None
        client_key = environ.get("CONSUL_CLIENT_KEY", "").strip() or None
        if client_key and not client_cert:
            raise ConfigurationError("CONSUL_CLIENT_KEY is set but CONSUL_CLIENT_CERT is not")
        return cls(
            scheme=scheme,
            host=host,
            port=port,
            unix_socket=unix_socket,
            token=token,
            ca_cert=(
                environ.get("CONSUL_CACERT", "").strip()
                or environ.get("CONSUL_CAPATH", "").strip()
                or None
            ),
            client_cert=client_cert,
            client_key=client_key,
            verify=True if verify is None else verify,
        )


_TRUE = frozenset({"1", "t", "true", "yes", "on"})
_FALSE = frozenset({"0", "f", "false", "no", "off"})


def _env_bool(environ: Mapping[str, str], name: str) -> bool | None:
    """A boolean variable as Go's strconv.ParseBool reads it (plus yes/no); None if unset."""
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ConfigurationError(f"{name}={raw!r}: expected true or false")


def _parse_addr(
    raw: str, *, https: bool
) -> tuple[Literal["http", "https", "unix"], str, int, str | None]:
    """Split CONSUL_HTTP_ADDR into (scheme, host, port, unix socket path)."""
    scheme: Literal["http", "https", "unix"] = "https" if https else "http"
    rest = raw
    if "://" in raw:
        given, rest = raw.split("://", 1)
        given = given.lower()
        if given == "unix":
            if not rest:
                raise ConfigurationError(f"CONSUL_HTTP_ADDR={raw!r}: no socket path after unix://")
            return "unix", "", 0, rest
        if given == "https":
            scheme = "https"
        elif given != "http":
            raise ConfigurationError(
                f"CONSUL_HTTP_ADDR={raw!r}: unknown scheme {given!r} (expected http, https or unix)"
            )
        # "http://" never downgrades CONSUL_HTTP_SSL=true, as in Consul.
    rest = rest.rstrip("/")
    try:
        parsed = urllib.parse.urlsplit("//" + rest)
        host = parsed.hostname or ""
        port = parsed.port
    except ValueError:
        host, port = "", None
    if not host or parsed.path or parsed.query or parsed.username or parsed.password:
        raise ConfigurationError(
            f"CONSUL_HTTP_ADDR={raw!r}: expected host:port, http(s)://host:port or unix:///path"
        )
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigurationError(f"CONSUL_HTTP_ADDR={raw!r}: bad IPv6 address") from None
    if port is None:
        port = 443 if scheme == "https" else 80
    return scheme, host, port, None


@dataclass(frozen=True)
class KVItem:
    """One key as Consul stores it. `value` is b"" when Consul holds no value."""

    key: str
    value: bytes
    modify_index: int
    create_index: int
    lock_index: int = 0
    session: str | None = None
    flags: int = 0


@dataclass(frozen=True)
class KVSnapshot:
    """Every key under a prefix at one Consul index (`X-Consul-Index`)."""

    index: int
    items: Mapping[str, KVItem]
    """Read-only mapping key -> item (empty when nothing exists under the prefix)."""


TxnVerb = Literal[
    "set",
    "delete",
    "delete-tree",
    "cas",
    "delete-cas",
    "check-index",
    "check-not-exists",
    "check-session",
    "lock",
    "unlock",
]


@dataclass(frozen=True)
class TxnOp:
    """One KV operation of a transaction. Build it with the constructors below."""

    verb: TxnVerb
    key: str
    value: bytes | None = None
    index: int | None = None
    session: str | None = None
    flags: int | None = None

    @classmethod
    def set(cls, key: str, value: bytes) -> TxnOp:
        """Write `value` to `key` unconditionally."""
        return cls("set", key, value=value)

    @classmethod
    def delete(cls, key: str) -> TxnOp:
        """Delete `key` (no error when it is absent)."""
        return cls("delete", key)

    @classmethod
    def delete_tree(cls, prefix: str) -> TxnOp:
        """Delete every key starting with `prefix`."""
        return cls("delete-tree", prefix)

    @classmethod
    def cas(cls, key: str, value: bytes, index: int) -> TxnOp:
        """Write only if `key`'s ModifyIndex is `index` (0: only if the key does not exist)."""
        return cls("cas", key, value=value, index=index)

    @classmethod
    def delete_cas(cls, key: str, index: int) -> TxnOp:
        """Delete only if `key`'s ModifyIndex is `index`."""
        return cls("delete-cas", key, index=index)

    @classmethod
    def check_index(cls, key: str, index: int) -> TxnOp:
        """Fail the transaction unless `key`'s ModifyIndex is `index`."""
        return cls("check-index", key, index=index)

    @classmethod
    def check_not_exists(cls, key: str) -> TxnOp:
        """Fail the transaction if `key` exists."""
        return cls("check-not-exists", key)

    @classmethod
    def check_session(cls, key: str, session: str) -> TxnOp:
        """Fail the transaction unless `key` is locked by `session`."""
        return cls("check-session", key, session=session)

    @classmethod
    def lock(cls, key: str, value: bytes, session: str) -> TxnOp:
        """Write `key` and acquire it with `session` (fails if another session holds it)."""
        return cls("lock", key, value=value, session=session)

    @classmethod
    def unlock(cls, key: str, value: bytes, session: str) -> TxnOp:
        """Write `key` and release `session`'s lock on it."""
        return cls("unlock", key, value=value, session=session)


class _LeanHTTPClient(consul.base.HTTPClient):  # type: ignore[misc]
    """py-consul's HTTP client interface over `consul_http.HttpTransport` (not requests:
    ~0.1 instead of ~0.55 ms of CPU per request). Bodies are handed back as text, as
    py-consul's own client does (bytes for `raw`)."""

    def __init__(self, transport: HttpTransport, timeout: float | None) -> None:
        super().__init__()
        self._transport = transport
        self._timeout = timeout

    def _answer_timeout(self, params: Any) -> float | None:
        if self._timeout is None:
            return None
        params = dict(params or ())
        if "index" not in params:
            return self._timeout
        # A blocking query answers after its wait plus up to wait/16 of jitter.
        wait = consul.std.parse_duration(params["wait"]) if "wait" in params \
            else consul.std.DEFAULT_WAIT
        return float(self._timeout + wait + wait / 16)

    def _send(self, method: str, callback: Any, path: str, params: Any,
              data: str | bytes | None, headers: Any, raw: bool = False) -> Any:
        body = data.encode() if isinstance(data, str) else data
        status, hdrs, payload = self._transport.request(
            method, path, params=params, body=body if body or method != "GET" else None,
            headers=headers, timeout=self._answer_timeout(params))
        return callback(consul.base.Response(
            status, hdrs, payload if raw else payload.decode("utf-8", errors="replace")))

    def get(self, callback: Any, path: str, params: Any = None, headers: Any = None,
            raw: bool = False) -> Any:
        return self._send("GET", callback, path, params, None, headers, raw)

    def put(self, callback: Any, path: str, params: Any = None, data: str | bytes = "",
            headers: Any = None) -> Any:
        return self._send("PUT", callback, path, params, data, headers)

    def delete(self, callback: Any, path: str, params: Any = None, data: str | bytes = "",
               headers: Any = None) -> Any:
        return self._send("DELETE", callback, path, params, data, headers)

    def post(self, callback: Any, path: str, params: Any = None, data: str | bytes = "",
             headers: Any = None) -> Any:
        return self._send("POST", callback, path, params, data, headers)

    def close(self) -> None:
        self._transport.close()


class _Consul(consul.Consul):  # type: ignore[misc]
    """py-consul's client with the lean transport."""

    def __init__(self, transport: HttpTransport, timeout: float | None) -> None:
        self._lean = _LeanHTTPClient(transport, timeout)
        super().__init__(host="127.0.0.1", port=8500, scheme="http", verify=True)

    def http_connect(self, host: str, port: int, scheme: str, verify: bool | str = True,
                     cert: Any = None) -> _LeanHTTPClient:
        return self._lean


_CAS_VERBS = frozenset(
    {"cas", "delete-cas", "check-index", "check-not-exists", "check-session", "lock", "unlock"}
)
_AUTH_MARKERS = ("permission denied", "acl not found", "acl support disabled")


class ConsulKV:
    """A client of one Consul agent's HTTP API (KV, transactions, sessions, status).

    Holds one pooled HTTP session; share one instance rather than opening one per watch.
    Every method raises only `reconciler.errors.ConsulError` and its subclasses (plus
    `ValueError` for a key starting with "/", a programming error).
    """

    def __init__(self, settings: ConsulSettings, *,
                 observe: Callable[[ConsulError | None], None] | None = None) -> None:
        """`observe` is told how every request ended: None when Consul answered, else the
        ConsulError raised (the daemon counts them, and when Consul last answered)."""
        self._settings = settings
        self._observe = observe
        if settings.scheme == "https" and not settings.verify:
            log.warning("TLS certificate of Consul at %s is not verified "
                        "(CONSUL_HTTP_SSL_VERIFY=false)", settings.address)
        transport = HttpTransport(TransportSettings(
            scheme=settings.scheme, host=settings.host, port=settings.port,
            unix_socket=settings.unix_socket, verify=settings.verify,
            ca_cert=settings.ca_cert, client_cert=settings.client_cert,
            client_key=settings.client_key), settings.timeout)
        # Host, port, scheme and TLS are the transport's, so py-consul reads none of them
        # from the environment; it does read CONSUL_HTTP_TOKEN, hence the assignment below.
        self._client: Any = _Consul(transport, settings.timeout)
        self._client.token = settings.token

    @property
    def settings(self) -> ConsulSettings:
        """The settings this client was built with."""
        return self._settings

    def close(self) -> None:
        """Close the connections. The client must not be used afterwards."""
        self._client.http.close()

    def __enter__(self) -> ConsulKV:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ConsulKV({self._settings!r})"

    # -- reads ---------------------------------------------------------------------------

    def read_prefix(
        self,
        prefix: str,
        *,
        index: int | None = None,
        wait: str | None = None,
        consistent: bool = False,
    ) -> KVSnapshot:
        """Every key under `prefix` in ONE recursive query, with the query's Consul index.

        With `index` (> 0), this is a blocking query: it returns when something under the
        prefix changes past `index`, or after `wait` (a Consul duration such as "30s";
        Consul's default is 5 minutes) with the same index. Consul may return early or
        with an index that went backwards (e.g. after a snapshot restore): callers compare
        the returned index and restart from 0 when it is smaller than the one they sent.
        `consistent=True` asks the leader to confirm it is still leader (slower).

        Beware: under ACLs Consul silently leaves out keys the token may not read (no
        error, no marker in Consul 1.8), so an empty snapshot may mean "not allowed".
        """
        _check_key(prefix)
        with self._translate(f"read of {prefix!r}"):
            raw_index, rows = self._client.kv.get(
                prefix,
                recurse=True,
                index=index if index else None,
                wait=wait,
                consistency="consistent" if consistent else None,
            )
        items = {item.key: item for item in (_kv_item(row) for row in rows or [])}
        return KVSnapshot(index=_to_int(raw_index), items=MappingProxyType(items))

    def read_versions(
        self,
        prefix: str,
        *,
        index: int | None = None,
        wait: str | None = None,
        consistent: bool = False,
    ) -> tuple[int, dict[str, tuple[int, str | None]]]:
        """`read_prefix` without the values: (Consul index, {key: (ModifyIndex, session)}).

        For indexes of generation keys, where only a key's ModifyIndex matters: the
        response is decoded in one `json.loads`, with no value decoded and no object per
        key (a quarter of `read_prefix`'s CPU for 1,000 keys; issue 9)."""
        _check_key(prefix)
        params: list[tuple[str, Any]] = [("recurse", "1")]
        if index:
            params.append(("index", index))
            if wait:
                params.append(("wait", wait))
        if consistent:
            params.append(("consistent", "1"))
        what = f"read of {prefix!r}"
        with self._translate(what):
            response = self._client.http.get(_raw, f"/v1/kv/{prefix}", params=params,
                                             headers=self._headers())
        raw_index = _to_int(response.headers.get("X-Consul-Index", 0))
        if int(response.code) == 404:
            return raw_index, {}
        self._raise_for_status(response, what)
        try:
            rows = json.loads(response.body)
            return raw_index, {str(r["Key"]): (_to_int(r.get("ModifyIndex", 0)),
                                               r.get("Session") or None) for r in rows or ()}
        except (ValueError, TypeError, KeyError) as e:
            raise ConsulError(self._scrub(f"{what}: unexpected answer ({e})")) from e

    def list_children(self, prefix: str) -> list[str]:
        """The names right under `prefix` that have keys below them (`a` for
        `<prefix>a/...`), in one request that returns no value (`?keys&separator=/`)."""
        _check_key(prefix)
        with self._translate(f"list of {prefix!r}"):
            _, keys = self._client.kv.get(prefix, keys=True, separator="/")
        out = []
        for k in keys or ():
            rest = str(k)[len(prefix):]
            if rest.endswith("/") and len(rest) > 1:
                out.append(rest[:-1])
        return out

    def get(self, key: str, *, consistent: bool = False) -> KVItem | None:
        """One key, or None when it does not exist."""
        _check_key(key)
        with self._translate(f"read of {key!r}"):
            _, row = self._client.kv.get(key, consistency="consistent" if consistent else None)
        return None if row is None else _kv_item(row)

    # -- writes --------------------------------------------------------------------------

    def put(
        self,
        key: str,
        value: bytes,
        *,
        cas: int | None = None,
        acquire: str | None = None,
        release: str | None = None,
    ) -> bool:
        """Write one key. Returns False (and writes nothing) when the check-and-set
        (`cas`: expected ModifyIndex, 0 = only if absent) or the lock `acquire`/`release`
        with that session id did not succeed; True otherwise."""
        _check_key(key)
        with self._translate(f"write of {key!r}"):
            ok = self._client.kv.put(key, value, cas=cas, acquire=acquire, release=release)
        return ok is True

    def delete(self, key: str, *, cas: int | None = None, recurse: bool = False) -> bool:
        """Delete one key, or every key under it with `recurse`. Returns False only when
        `cas` (the expected ModifyIndex) did not match; deleting a missing key is True."""
        _check_key(key)
        with self._translate(f"delete of {key!r}"):
            ok = self._client.kv.delete(key, recurse=recurse or None, cas=cas)
        return ok is True

    def create_many(self, entries: Sequence[tuple[str, bytes]]) -> bool:
        """Create every key of `entries` ((key, value), at most `MAX_TXN_OPS`) in one
        transaction, each only if absent: all of them, or — when any exists — none
        (False). Other failures raise as `txn` does."""
        if len(entries) > MAX_TXN_OPS:
            raise ValueError(f"create_many takes at most {MAX_TXN_OPS} keys")
        try:
            self.txn([TxnOp.cas(key, value, 0) for key, value in entries])
        except CasConflict:
            return False
        return True

    def txn(self, ops: Sequence[TxnOp]) -> None:
        """Apply `ops` with Consul transactions, in order, chunked to `MAX_TXN_OPS` (64)
        operations and `MAX_TXN_BYTES` of request body.

        Each chunk is atomic; the whole is NOT: when chunk k fails, chunks before it stay
        applied and later ones are not sent. Put checks (cas/check-index) in the same
        chunk as the writes they guard when that matters (e.g. keep batches <= 64 ops).
        A failed chunk raises, naming the failing op, its key and which chunks applied:
        `CasConflict` (a cas, delete-cas, check-* or lock op failed), `ConsulAuthError`
        (permission denied), or `ConsulError`. An empty `ops` sends nothing.
        """
        for op in ops:
            _check_key(op.key)
        chunks = _chunk([{"KV": _txn_payload(op)} for op in ops])
        for number, (first, bodies) in enumerate(chunks):
            chunk = ops[first : first + len(bodies)]
            payload = json.dumps(bodies)
            # py-consul's Txn.put sends no X-Consul-Token, so under ACLs every transaction
            # would be refused: send it through the library's HTTP client with our headers.
            with self._translate(f"transaction (ops {first}-{first + len(chunk) - 1})"):
                response = self._client.http.put(
                    _raw, "/v1/txn", data=payload, headers=self._headers()
                )
            if response.code == 200:
                continue
            progress = ""
            if len(chunks) > 1:
                progress = (
                    f" [chunk {number + 1} of {len(chunks)} rolled back; "
                    f"{first} earlier op(s) in {number} chunk(s) stayed applied]"
                )
            raise self._txn_error(response, chunk, first, progress)

    # -- sessions ------------------------------------------------------------------------

    def session_create(
        self,
        name: str,
        ttl: str = "15s",
        behavior: Literal["delete", "release"] = "delete",
        node: str | None = None,
        lock_delay: str = "0s",
        checks: Sequence[str] | None = None,
    ) -> str:
        """Create a session and return its id. `ttl` is a Consul duration (10s-24h);
        with `behavior="delete"` the keys it holds are deleted when it is invalidated
        (TTL expiry, destroy, node failure). `node` defaults to the agent's node;
        `checks` defaults to Consul's (the node's serfHealth)."""
        body: dict[str, Any] = {
            "Name": name,
            "Behavior": behavior,
            "TTL": ttl,
            "LockDelay": lock_delay,
        }
        if node is not None:
            body["Node"] = node
        if checks is not None:
            body["Checks"] = list(checks)
        with self._translate(f"creation of session {name!r}"):
            response = self._client.http.put(
                _raw, "/v1/session/create", data=json.dumps(body), headers=self._headers()
            )
        self._raise_for_status(response, f"creation of session {name!r}")
        try:
            return str(json.loads(response.body)["ID"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConsulError(
                f"Consul at {self._settings.address} answered session creation with "
                f"an unexpected body: {_one_line(str(response.body))[:200]}"
            ) from exc

    def session_renew(self, session_id: str) -> bool:
        """Renew a TTL session. Returns False when the session no longer exists (expired
        or destroyed): the caller must create a new one and re-acquire its keys."""
        with self._translate(f"renewal of session {session_id}"):
            response = self._client.http.put(
                _raw, f"/v1/session/renew/{session_id}", headers=self._headers()
            )
        if response.code == 404:
            return False
        self._raise_for_status(response, f"renewal of session {session_id}")
        return True

    def session_destroy(self, session_id: str) -> None:
        """Destroy a session (idempotent); with behavior=delete its keys go with it."""
        with self._translate(f"destruction of session {session_id}"):
            self._client.session.destroy(session_id)

    # -- internals -----------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        token = self._settings.token
        return {"X-Consul-Token": token} if token else {}

    @contextlib.contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        """Turn whatever py-consul or the transport raise during `what` into a ConsulError,
        and tell `observe` how the request ended."""
        if self._observe is None:
            with self._translate_errors(what):
                yield
            return
        try:
            with self._translate_errors(what):
                yield
        except ConsulError as exc:
            self._observe(exc)
            raise
        self._observe(None)

    @contextlib.contextmanager
    def _translate_errors(self, what: str) -> Iterator[None]:
        addr = self._settings.address
        try:
            yield
        except TimeoutError as exc:
            kind = "connect" if isinstance(exc, ConnectTimeout) else "answer"
            raise ConsulUnavailable(
                self._scrub(
                    f"cannot reach Consul at {addr}: no {kind} within the timeout "
                    f"({self._settings.timeout:g}s) during {what}"
                )
            ) from None
        except ssl.SSLError as exc:
            raise ConsulUnavailable(
                self._scrub(f"cannot reach Consul at {addr}: TLS error: {_reason(exc)}")
            ) from None
        except (OSError, http.client.RemoteDisconnected) as exc:
            raise ConsulUnavailable(
                self._scrub(f"cannot reach Consul at {addr}: {_reason(exc)}")
            ) from None
        except http.client.HTTPException as exc:
            raise ConsulError(
                self._scrub(f"Consul {what} at {addr} failed: {_reason(exc)}")
            ) from None
        except (consul.ACLPermissionDenied, consul.ACLDisabled) as exc:
            raise ConsulAuthError(self._auth_message(what, str(exc))) from None
        except consul.ConsulException as exc:
            raise self._error_from_text(what, str(exc)) from None

    def _raise_for_status(self, response: Any, what: str) -> None:
        code = int(response.code)
        if 200 <= code < 300:
            return
        body = str(response.body)
        if code in (401, 403):
            raise ConsulAuthError(self._auth_message(what, body))
        raise self._error_from_text(what, f"{code} {body}")

    def _error_from_text(self, what: str, text: str) -> ConsulError:
        addr = self._settings.address
        lowered = text.lower()
        if any(marker in lowered for marker in _AUTH_MARKERS):
            return ConsulAuthError(self._auth_message(what, text))
        if "no cluster leader" in lowered:
            return ConsulUnavailable(
                f"cannot reach Consul at {addr}: the cluster has no leader ({what})"
            )
        return ConsulError(self._scrub(f"Consul {what} at {addr} failed: {_one_line(text)[:300]}"))

    def _auth_message(self, what: str, detail: str) -> str:
        return self._scrub(
            f"Consul at {self._settings.address} refused the {what}: {self._auth_hint(detail)}"
        )

    def _auth_hint(self, detail: str) -> str:
        if not self._settings.token:
            return "no ACL token was given: set CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE"
        if "acl not found" in detail.lower():
            return "the ACL token is unknown to Consul (ACL not found)"
        return "permission denied: the ACL token's policies do not allow it"

    def _txn_error(
        self, response: Any, chunk: Sequence[TxnOp], first: int, progress: str
    ) -> ConsulError:
        code = int(response.code)
        body = str(response.body)
        errors: list[Any] = []
        if code == 409:
            try:
                errors = list(json.loads(body).get("Errors") or [])
            except (ValueError, AttributeError, TypeError):
                errors = []
        if not errors:
            what = f"transaction (ops {first}-{first + len(chunk) - 1})"
            if code in (401, 403):
                return ConsulAuthError(self._auth_message(what, body) + progress)
            error = self._error_from_text(what, f"{code} {body}")
            return type(error)(self._scrub(str(error) + progress))
        failures: list[str] = []
        kinds: set[str] = set()
        for entry in errors:
            op_index = _to_int(entry.get("OpIndex", 0)) if isinstance(entry, dict) else 0
            reason = _one_line(str(entry.get("What", "")) if isinstance(entry, dict) else "")
            op = chunk[op_index] if 0 <= op_index < len(chunk) else None
            if op is None:
                failures.append(f"op {first + op_index}: {reason}")
                kinds.add("other")
                continue
            failures.append(f"op {first + op_index} ({op.verb} {op.key!r}): {reason}")
            if any(marker in reason.lower() for marker in _AUTH_MARKERS):
                kinds.add("auth")
            elif op.verb in _CAS_VERBS and "invalid session" not in reason.lower():
                kinds.add("cas")
            else:
                kinds.add("other")
        message = self._scrub(
            f"Consul transaction at {self._settings.address} failed at "
            + "; ".join(failures)
            + progress
        )
        if "auth" in kinds:
            hint = self._auth_hint(" ".join(failures))
            return ConsulAuthError(self._scrub(f"{message} -- {hint}"))
        if kinds == {"cas"}:
            return CasConflict(message)
        return ConsulError(message)

    def _scrub(self, text: str) -> str:
        token = self._settings.token
        text = _one_line(text)
        return text.replace(token, "<token>") if token else text


def _raw(response: Any) -> Any:
    """A py-consul callback that hands the raw (code, headers, body) response back."""
    return response


def _check_key(key: str) -> None:
    if key.startswith("/"):
        raise ValueError(f"Consul keys do not start with '/': {key!r}")


def _to_int(value: Any) -> int:
    """py-consul hands indexes back as strings (the X-Consul-Index header)."""
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ConsulError(f"Consul returned a malformed index: {value!r}") from exc


def _kv_item(row: Mapping[str, Any]) -> KVItem:
    value = row.get("Value")
    if isinstance(value, str):
        value = value.encode()
    return KVItem(
        key=str(row["Key"]),
        value=value or b"",
        modify_index=_to_int(row.get("ModifyIndex", 0)),
        create_index=_to_int(row.get("CreateIndex", 0)),
        lock_index=_to_int(row.get("LockIndex", 0)),
        session=row.get("Session") or None,
        flags=_to_int(row.get("Flags", 0)),
    )


def _txn_payload(op: TxnOp) -> dict[str, Any]:
    body: dict[str, Any] = {"Verb": op.verb, "Key": op.key}
    if op.value is not None:
        body["Value"] = base64.b64encode(op.value).decode("ascii")
    if op.index is not None:
        body["Index"] = op.index
    if op.session is not None:
        body["Session"] = op.session
    if op.flags is not None:
        body["Flags"] = op.flags
    return body


def _chunk(bodies: list[dict[str, Any]]) -> list[tuple[int, list[dict[str, Any]]]]:
    """Split transaction ops into (first op number, ops) chunks Consul accepts: at most
    MAX_TXN_OPS ops and about MAX_TXN_BYTES of JSON each (a bigger single op goes alone,
    and Consul refuses it with 413)."""
    chunks: list[tuple[int, list[dict[str, Any]]]] = []
    current: list[dict[str, Any]] = []
    size = 2
    start = 0
    for number, body in enumerate(bodies):
        op_size = len(json.dumps(body)) + 2
        if current and (len(current) >= MAX_TXN_OPS or size + op_size > MAX_TXN_BYTES):
            chunks.append((start, current))
            current, size, start = [], 2, number
        current.append(body)
        size += op_size
    if current:
        chunks.append((start, current))
    return chunks


def _one_line(text: str) -> str:
    return " ".join(text.split())


_ERRNO_RE = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def _reason(exc: BaseException) -> str:
    """The short cause of a connection failure ("Connection refused"), not urllib3's essay."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return _one_line(
                getattr(current, "verify_message", None) or current.reason or str(current)
            )
        if isinstance(current, OSError) and current.strerror:
            return _one_line(current.strerror)
        todo.extend(a for a in current.args if isinstance(a, BaseException))
        inner = getattr(current, "reason", None)
        if isinstance(inner, BaseException):
            todo.append(inner)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                todo.append(linked)
    match = _ERRNO_RE.search(str(exc))
    if match:
        return match.group(1).strip()
    return type(exc).__name__
