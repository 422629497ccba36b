"""The HTTP transport to the Consul agent: persistent `http.client` connections, one per
thread, over TCP, TLS or a unix socket.

Owns the connections and nothing else: it sends a request and hands back (status,
headers, body bytes); what a request means, and its errors, are `consul_kv`'s. Every
watch and every worker of the daemon talks to the agent all the time, and requests +
urllib3 cost ~0.55 ms of CPU per request on this machine where this costs ~0.1 ms
(issue 9: the per-write floor of a host's watches). Raises only OSError subclasses
(`ConnectTimeout` for a connect that timed out, `TimeoutError` for an answer that did not
come, `ssl.SSLError`) and `http.client.HTTPException`.

A kept-alive connection the agent closed meanwhile is found before it is reused (its
socket reads as ready) and replaced; an idempotent request (GET) whose reused connection
broke before any answer is sent once more on a fresh one, as urllib3 does.
"""

from __future__ import annotations

import http.client
import os
import select
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ConnectTimeout", "HttpTransport", "TransportSettings"]


class ConnectTimeout(TimeoutError):
    """The connection to the agent was not established within the timeout."""


@dataclass(frozen=True)
class TransportSettings:
    """Where the agent listens and how to reach it: `scheme` is http, https or unix."""

    scheme: str
    host: str = "127.0.0.1"
    port: int = 8500
    unix_socket: str | None = None
    verify: bool = True
    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _tls_context(s: TransportSettings) -> ssl.SSLContext:
    """Verification against `ca_cert` (a bundle file, or a directory as CONSUL_CAPATH),
    else the system's CAs; the client certificate (and key, unless in the same file)."""
    ca = s.ca_cert if s.verify else None
    ctx = ssl.create_default_context(
        cafile=ca if ca and not os.path.isdir(ca) else None,
        capath=ca if ca and os.path.isdir(ca) else None)
    if not s.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if s.client_cert:
        ctx.load_cert_chain(s.client_cert, s.client_key)
    return ctx


class HttpTransport:
    """Requests to one agent; thread-safe (each thread has its own connection)."""

    def __init__(self, settings: TransportSettings, timeout: float | None) -> None:
        self._settings = settings
        self._timeout = timeout
        self._tls = _tls_context(settings) if settings.scheme == "https" else None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[http.client.HTTPConnection] = []
        self._closed = False

    def _connect(self) -> http.client.HTTPConnection:
        s = self._settings
        conn: http.client.HTTPConnection
        if s.scheme == "unix":
            assert s.unix_socket is not None
            conn = _UnixConnection(s.unix_socket, self._timeout)
        elif self._tls is not None:
            conn = http.client.HTTPSConnection(s.host, s.port, timeout=self._timeout,
                                               context=self._tls)
        else:
            conn = http.client.HTTPConnection(s.host, s.port, timeout=self._timeout)
        try:
            conn.connect()
        except TimeoutError as exc:
            conn.close()
            raise ConnectTimeout(f"connect to {s.host}:{s.port} timed out") from exc
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._all = [c for c in self._all if c.sock is not None]
            self._all.append(conn)
        return conn

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection and whether it was reused (else: fresh)."""
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.sock is not None and not _dropped(conn.sock):
            return conn, True
        if conn is not None:
            conn.close()
        conn = self._connect()
        self._local.conn = conn
        return conn, False

    def request(self, method: str, path: str, *,
                params: Sequence[tuple[str, Any]] | None = None, body: bytes | None = None,
                headers: Mapping[str, str] | None = None, timeout: float | None = None,
                ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """Send one request; (status, headers, body). `timeout`: for the answer of this
        request (a blocking query's wait and more), else the transport's."""
        if self._closed:
            raise ConnectionError("the Consul client is closed")
        url = urllib.parse.quote(path, safe="/:")
        if params:
            url += "?" + urllib.parse.urlencode(list(params))
        hdrs = dict(headers or {})
        for attempt in (0, 1):
            conn, reused = self._connection()
            try:
                assert conn.sock is not None
                conn.sock.settimeout(timeout if timeout is not None else self._timeout)
                conn.request(method, url, body=body, headers=hdrs)
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError,
                    BrokenPipeError) as exc:
                conn.close()
                if attempt == 0 and reused and method == "GET":
                    continue  # the agent closed the kept-alive connection: a fresh one
                raise exc
            except BaseException:
                conn.close()  # whatever state it is in, it is not reused
                raise
            if resp.will_close:
                conn.close()
            return resp.status, resp.msg, data
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._all = self._all, []
        for c in conns:
            c.close()


def _dropped(sock: socket.socket) -> bool:
    """Whether a kept-alive connection was closed by the other end (or has data that no
    request asked for): its socket is readable while no answer is due."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
