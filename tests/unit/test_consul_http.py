"""The lean HTTP transport to Consul against a small local HTTP server: kept-alive
connections per thread, a connection the server closed, timeouts, the unix socket."""

from __future__ import annotations

import http.server
import os
import socket
import socketserver
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from reconciler.adapters.consul_http import ConnectTimeout, HttpTransport, TransportSettings


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def do_GET(self) -> None:
        server: Any = self.server
        server.requests.append((self.client_address, self.path))
        if self.path.startswith("/slow"):
            server.release.wait(5)
        body = f"{self.path} {self.headers.get('X-Consul-Token', '')}".encode()
        self.send_response(200)
        self.send_header("X-Consul-Index", "42")
        self.send_header("Content-Length", str(len(body)))
        if self.path.startswith("/close"):
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        if self.path.startswith("/drop"):
            self.close_connection = True  # closes without saying so

    def do_PUT(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(n)
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        return


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[object, str]] = []
        self.release = threading.Event()


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def transport(srv: _Server, timeout: float = 5.0) -> HttpTransport:
    return HttpTransport(TransportSettings("http", "127.0.0.1", srv.server_address[1]),
                         timeout)


def test_one_kept_alive_connection_per_thread(server: _Server) -> None:
    t = transport(server)
    for _ in range(3):
        status, headers, body = t.request("GET", "/v1/kv/a b", params=[("recurse", "1")],
                                          headers={"X-Consul-Token": "tok"})
        assert (status, headers.get("x-consul-index"), body) == (
            200, "42", b"/v1/kv/a%20b?recurse=1 tok")
    other: list[object] = []
    th = threading.Thread(target=lambda: other.append(t.request("GET", "/x")[0]))
    th.start()
    th.join()
    peers = [peer for peer, _ in server.requests]
    assert other == [200] and len(peers) == 4
    assert len(set(peers[:3])) == 1 and peers[3] != peers[0]  # reused; the other thread's
    assert t.request("PUT", "/v1/kv/k", body=b"value")[2] == b"value"
    t.close()
    with pytest.raises(ConnectionError):
        t.request("GET", "/x")


def test_a_connection_the_server_closed_is_replaced(server: _Server) -> None:
    t = transport(server)
    assert t.request("GET", "/close")[0] == 200  # "Connection: close": not kept
    assert t.request("GET", "/drop")[0] == 200  # closed without saying so: seen at reuse
    assert t.request("GET", "/after")[0] == 200
    peers = [peer for peer, _ in server.requests]
    assert len(set(peers)) == 3


def test_a_blocking_query_gets_its_own_answer_timeout(server: _Server) -> None:
    t = transport(server, timeout=0.2)
    with pytest.raises(TimeoutError) as exc:
        t.request("GET", "/slow")
    assert not isinstance(exc.value, ConnectTimeout)
    server.release.set()
    assert t.request("GET", "/slow", timeout=5)[0] == 200  # a fresh connection works
    server.release.clear()
    threading.Timer(0.4, server.release.set).start()
    assert t.request("GET", "/slow", timeout=5)[0] == 200  # waits longer than 0.2 s


def test_refused_and_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens on it once closed
    t = HttpTransport(TransportSettings("http", "127.0.0.1", port), 1.0)
    with pytest.raises(ConnectionRefusedError):
        t.request("GET", "/x")


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str) -> None:
        super().__init__(path, _UnixHandler)
        self.requests: list[tuple[object, str]] = []
        self.release = threading.Event()


class _UnixHandler(_Handler):
    def setup(self) -> None:
        super().setup()
        self.client_address = ("unix", 0)  # http.server wants a (host, port)


def test_unix_socket() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "consul.sock")
        srv = _UnixServer(path)
        th = threading.Thread(target=srv.serve_forever, daemon=True)
        th.start()
        try:
            t = HttpTransport(TransportSettings("unix", unix_socket=path), 5.0)
            assert t.request("GET", "/v1/status/leader")[2] == b"/v1/status/leader "
            assert t.request("GET", "/again")[0] == 200
            assert len(srv.requests) == 2
            t.close()
        finally:
            srv.shutdown()
            srv.server_close()
