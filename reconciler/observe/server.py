"""The daemon's HTTP endpoint: owns the listening socket and the three routes.

- `GET /livez`, `GET /readyz`: 200 "ok", or 503 with one line per failing check;
  `?verbose` lists every check (the format of Kubernetes' health endpoints);
- `GET /metrics`: the Prometheus text format (reconciler.observe.metrics).

stdlib `http.server` in threads: a scrape never waits for a reconcile, and a slow client
holds only its own thread (each connection has a timeout). It binds exactly the address
it is given (`--listen`, 127.0.0.1:9901 by default; `off`: no server). When the address
cannot be bound (the port is taken, the address is not on the host yet) it logs the error
and tries again every `retry` seconds, like kubelet's healthz: a monitoring port never
stops a host's networking. Nothing it answers carries a token, an address or a
traceback: checks give reasons of their own, and an internal error answers 500 with a
fixed text (the detail goes to the daemon's log).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from reconciler.errors import ConfigurationError
from reconciler.observe.health import Probe, report
from reconciler.observe.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9901"


def parse_listen(value: str) -> tuple[str, int] | None:
    """`HOST:PORT` (`[v6]:PORT` too) -> (host, port); `off` -> None."""
    text = value.strip()
    if text.lower() == "off":
        return None
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigurationError(
            f"--listen {value!r}: expected HOST:PORT (e.g. {DEFAULT_LISTEN}) or off")
    return host, int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], routes: _Routes) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.routes = routes
        super().__init__(address, _Handler)


class _Routes:
    def __init__(self, live: Probe, ready: Probe, metrics: Metrics) -> None:
        self.live = live
        self.ready = ready
        self.metrics = metrics

    def answer(self, path: str, query: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of `path`."""
        verbose = "verbose" in parse_qs(query, keep_blank_values=True)
        if path in ("/livez", "/readyz"):
            probe = self.live if path == "/livez" else self.ready
            status, text = report(probe.name, probe.run(), verbose)
            return status, "text/plain; charset=utf-8", text.encode()
        if path == "/metrics":
            body, ctype = self.metrics.exposition()
            return 200, ctype, body
        return 404, "text/plain; charset=utf-8", b"not found: /livez, /readyz, /metrics\n"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # seconds a connection may stay silent
    server_version = "reconciler"
    sys_version = ""

    def do_GET(self) -> None:
        self._respond(head=False)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def _respond(self, head: bool) -> None:
        url = urlsplit(self.path)
        try:
            status, ctype, body = self.server.routes.answer(url.path, url.query)
        except Exception:
            log.exception("http: %s failed", url.path)
            status, ctype, body = 500, "text/plain; charset=utf-8", b"internal error\n"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            with contextlib.suppress(OSError):  # the client went away
                self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: %s", format % args)


class HealthServer:
    """/livez, /readyz and /metrics on one address, served from threads."""

    def __init__(self, address: tuple[str, int], *, live: Probe, ready: Probe,
                 metrics: Metrics, retry: float = 5.0) -> None:
        self.address = address
        self.retry = retry
        self._routes = _Routes(live, ready, metrics)
        self._server: _Server | None = None
        self._lock = threading.Lock()
        self.bound = threading.Event()

    @property
    def port(self) -> int | None:
        """The port bound (useful with port 0), None before binding."""
        server = self._server
        return None if server is None else int(server.server_address[1])

    def bind(self) -> None:
        """Bind now; raises OSError when the address cannot be bound."""
        server = _Server(self.address, self._routes)
        with self._lock:
            self._server = server
        self.bound.set()
        log.info("serving /livez, /readyz, /metrics on %s:%d", self.address[0],
                 self.port or 0)

    def close(self) -> None:
        """Release the socket of a server bound but never run (`run` closes its own)."""
        server = self._server
        if server is not None:
            server.server_close()

    def run(self, stop: threading.Event) -> None:
        """Bind (retrying every `retry` seconds) and serve until `stop` is set."""
        failures = 0
        while not stop.is_set() and self._server is None:
            try:
                self.bind()
            except OSError as e:
                failures += 1
                if failures == 1 or failures % 12 == 0:  # once a minute after the first
                    log.error("cannot listen on %s:%d: %s; retrying every %gs",
                              self.address[0], self.address[1], e.strerror or e, self.retry)
                stop.wait(self.retry)
        server = self._server
        if server is None:
            return
        closer = threading.Thread(target=self._close_on, args=(stop,),
                                  name="http-close", daemon=True)
        closer.start()
        try:
            server.serve_forever(poll_interval=0.5)
        finally:
            server.server_close()

    def _close_on(self, stop: threading.Event) -> None:
        stop.wait()
        server = self._server
        if server is not None:
            server.shutdown()
