"""Docker Engine adapter: the only module importing `docker`; containers and their events.

Owns:
- `DockerEngine` — list/inspect containers as `ContainerInfo`, stream container events as
  `ContainerEvent`. docker/requests/urllib3 exceptions are translated into
  `reconciler.errors.DockerError` here; nothing of the docker SDK leaks out.
- `EventWatcher` — the list-and-watch loop the daemon runs: subscribe, list, stream;
  reconnect with exponential backoff when the stream breaks (e.g. dockerd restarted).

Why subscribe before listing, and how nothing falls in between
----------------------------------------------------------------
Listing first and subscribing afterwards loses a container started between the two. So
each (re)connection does, in this order:

1. read the daemon's clock (``GET /info`` → ``SystemTime``) as ``T0`` — on the first
   connection; on a reconnect ``T0`` is the time of the last event seen;
2. open ``GET /events?since=T0&filters={"type":["container"],...}``. dockerd replays its
   buffered events from ``T0`` (it keeps the last ~256) and then streams live ones; the
   HTTP response is read lazily, so events arriving meanwhile wait in the socket;
3. list the containers and hand the list to ``on_list``;
4. read the stream and hand each event to ``on_event``.

Every change after ``T0`` is therefore reported by the stream, and every state before the
list by the list: a container started between steps 1 and 3 is seen at least once,
possibly twice (in the list and as an event). Consumers are level-triggered, so duplicates
are harmless. If the daemon lost its buffer (it restarted), the re-list of step 3 repairs
whatever the replay cannot.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import docker
import docker.errors
import requests.exceptions
import urllib3.exceptions

from reconciler.adapters.procfs import start_time
from reconciler.errors import DockerError

log = logging.getLogger(__name__)

# Label name set by swarm.
LABEL_SWARM_NODE = "com.docker.swarm.node.id"

#: Container event actions streamed by default (those that change what runs where).
DEFAULT_ACTIONS: tuple[str, ...] = (
    "start",
    "die",
    "stop",
    "destroy",
    "restart",
    "rename",
    "pause",
    "unpause",
    "update",
)

# Event attributes that are not container labels (dockerd mixes both into Actor.Attributes).
_NON_LABEL_ATTRIBUTES = frozenset({"name", "image", "exitCode", "signal", "oldName", "execID"})

_LIBRARY_ERRORS: tuple[type[BaseException], ...] = (
    docker.errors.DockerException,
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    OSError,
)

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class ContainerInfo:
    """What the reconciler needs to know about one container, from `docker inspect`.

    `start_time` is the process start time in clock ticks since boot (/proc/<pid>/stat
    field 22) read at inspect time, or None: with `pid` it identifies the process even if
    the PID is reused later. `networks` maps a Docker network name to its (IPv4, IPv6)
    addresses, None where unset.
    """

    id: str
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    running: bool = False
    pid: int = 0
    started_at: str = ""
    start_time: int | None = None
    networks: Mapping[str, tuple[str | None, str | None]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    image: str = ""

    @property
    def node(self) -> str | None:
        """The swarm node id label, if the container is a swarm task."""
        return self.labels.get(LABEL_SWARM_NODE)


@dataclass(frozen=True)
class ContainerEvent:
    """One container event. `labels` are the container's labels (from the event's
    attributes, minus dockerd's own keys such as name, image and exitCode); `attributes`
    holds them all, unfiltered."""

    action: str
    id: str
    name: str
    time_nano: int
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    attributes: Mapping[str, str] = field(default_factory=lambda: _EMPTY)


def format_since(time_nano: int) -> str:
    """Nanoseconds since the epoch → dockerd's ``seconds.nanoseconds`` timestamp form."""
    return f"{time_nano // 1_000_000_000}.{time_nano % 1_000_000_000:09d}"


def _parse_rfc3339_nano(value: str) -> int | None:
    """``2024-01-02T03:04:05.123456789Z`` (or with an offset) → ns since the epoch."""
    value = value.strip()
    if not value:
        return None
    try:
        main, _, rest = value.partition(".")
        frac = ""
        tz = "Z"
        if rest:
            digits = len(rest) - len(rest.lstrip("0123456789"))
            frac, tz = rest[:digits], rest[digits:] or "Z"
        else:
            for sep in ("Z", "+", "-"):
                idx = main.rfind(sep)
                if idx > 10:  # past the date's own dashes
                    main, tz = main[:idx], main[idx:]
                    break
        tz = "+00:00" if tz == "Z" else tz
        base = dt.datetime.fromisoformat(main + tz)
    except ValueError:
        return None
    nanos = int((frac + "000000000")[:9]) if frac else 0
    return int(base.timestamp()) * 1_000_000_000 + nanos


def container_info_from_inspect(data: Mapping[str, Any]) -> ContainerInfo:
    """Build a `ContainerInfo` from the JSON of ``GET /containers/<id>/json``."""
    state = data.get("State") or {}
    config = data.get("Config") or {}
    settings = data.get("NetworkSettings") or {}
    networks: dict[str, tuple[str | None, str | None]] = {}
    for net_name, net in (settings.get("Networks") or {}).items():
        net = net or {}
        networks[str(net_name)] = (
            net.get("IPAddress") or None,
            net.get("GlobalIPv6Address") or None,
        )
    running = bool(state.get("Running"))
    pid = int(state.get("Pid") or 0)
    labels = {str(k): str(v) for k, v in (config.get("Labels") or {}).items()}
    return ContainerInfo(
        id=str(data.get("Id", "")),
        name=str(data.get("Name", "")).lstrip("/"),
        labels=MappingProxyType(labels),
        running=running,
        pid=pid,
        started_at=str(state.get("StartedAt") or ""),
        start_time=start_time(pid) if running else None,
        networks=MappingProxyType(networks),
        image=str(config.get("Image") or ""),
    )


def container_event_from_json(raw: Mapping[str, Any]) -> ContainerEvent | None:
    """Build a `ContainerEvent` from one decoded ``/events`` message (None if not one)."""
    if raw.get("Type", "container") != "container":
        return None
    actor = raw.get("Actor") or {}
    attributes = {str(k): str(v) for k, v in (actor.get("Attributes") or {}).items()}
    action = str(raw.get("Action") or raw.get("status") or "")
    container_id = str(actor.get("ID") or raw.get("id") or "")
    if not action or not container_id:
        return None
    time_nano = raw.get("timeNano")
    if time_nano is None:
        time_nano = int(raw.get("time") or 0) * 1_000_000_000
    return ContainerEvent(
        action=action,
        id=container_id,
        name=attributes.get("name", ""),
        time_nano=int(time_nano),
        labels=MappingProxyType(
            {k: v for k, v in attributes.items() if k not in _NON_LABEL_ATTRIBUTES}
        ),
        attributes=MappingProxyType(attributes),
    )


class EventStream:
    """An open ``/events`` stream of container events; iterate it, `close()` it.

    Opened eagerly (the HTTP request is made in the constructor), so the daemon is
    subscribed when this object exists. `close()` may be called from another thread and
    ends a blocked iteration. Iteration ends when the stream ends: after `until`, when
    closed, or when the connection broke (check `closed` to tell which).
    """

    def __init__(self, raw_stream: Any) -> None:
        self._raw = raw_stream
        self._lock = threading.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once `close()` was called."""
        with self._lock:
            return self._closed

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # Shuts the socket down: wakes a reader blocked in recv() on another thread.
        with contextlib.suppress(*_LIBRARY_ERRORS, AttributeError):
            self._raw.close()

    def __iter__(self) -> Iterator[ContainerEvent]:
        while True:
            try:
                raw = next(self._raw)
            except StopIteration:
                return
            except _LIBRARY_ERRORS as exc:
                if self.closed:
                    return
                raise DockerError(f"docker event stream failed: {exc}") from exc
            except ValueError as exc:  # torn JSON when the connection drops mid-message
                if self.closed:
                    return
                raise DockerError(f"docker event stream broke: {exc}") from exc
            if not isinstance(raw, Mapping):
                continue
            event = container_event_from_json(raw)
            if event is not None:
                yield event

    def close_when(self, stop: threading.Event, poll: float = 1.0) -> Callable[[], None]:
        """Close this stream once `stop` is set; returns a function that cancels that.

        A small thread waits on `stop` (an Event cannot wake two waiters' conditions): it
        closes the stream as soon as `stop` is set; `poll` only bounds how long it lingers
        after a cancel (at 0.1 s, its wake-ups were a tenth of the idle CPU).
        """
        cancelled = threading.Event()

        def watch() -> None:
            while not cancelled.is_set():
                if stop.wait(poll):
                    self.close()
                    return

        threading.Thread(target=watch, name="docker-events-closer", daemon=True).start()
        return cancelled.set


class DockerEngine:
    """The Docker Engine API, as plain values; every failure is a `DockerError`.

    `base_url` defaults to the environment (``DOCKER_HOST``, ``DOCKER_TLS_VERIFY``,
    ``DOCKER_CERT_PATH``, else the default socket). The client is created on first use
    and again after a failure to create it, so the daemon can start before dockerd.
    """

    def __init__(self, base_url: str | None = None, *, timeout: float = 60.0) -> None:
        # None: docker.from_env(), which also honours DOCKER_TLS_VERIFY / DOCKER_CERT_PATH.
        self.base_url = base_url or None
        self.timeout = timeout
        self._client: Any = None
        self._lock = threading.Lock()

    def _api(self) -> Any:
        """The low-level `docker.APIClient`, created (and version-negotiated) lazily."""
        with self._lock:
            if self._client is None:
                try:
                    if self.base_url is None:
                        self._client = docker.from_env(timeout=int(self.timeout))
                    else:
                        self._client = docker.DockerClient(
                            base_url=self.base_url, timeout=int(self.timeout)
                        )
                except _LIBRARY_ERRORS as exc:
                    raise DockerError(f"cannot connect to docker ({self._where()}): {exc}") from exc
            return self._client.api

    def _where(self) -> str:
        return self.base_url or os.environ.get("DOCKER_HOST") or "the default socket"

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(*_LIBRARY_ERRORS):
                client.close()

    def system_time_nano(self) -> int:
        """The daemon's clock (``/info`` SystemTime) in ns; the local clock if unparsable."""
        try:
            info = self._api().info()
        except _LIBRARY_ERRORS as exc:
            raise DockerError(f"docker info failed: {exc}") from exc
        parsed = _parse_rfc3339_nano(str(info.get("SystemTime") or ""))
        return parsed if parsed is not None else time.time_ns()

    def inspect(self, id_or_name: str) -> ContainerInfo | None:
        """Inspect one container; None if it does not exist."""
        try:
            data = self._api().inspect_container(id_or_name)
        except docker.errors.NotFound:
            return None
        except _LIBRARY_ERRORS as exc:
            raise DockerError(f"docker inspect {id_or_name} failed: {exc}") from exc
        return container_info_from_inspect(data)

    def list_containers(self, all: bool = False) -> list[ContainerInfo]:
        """Inspect every (running, or with `all` every) container, sorted by name.

        A container removed between the list and its inspect is left out.
        """
        try:
            summaries = self._api().containers(all=all, trunc=False)
        except _LIBRARY_ERRORS as exc:
            raise DockerError(f"docker list containers failed: {exc}") from exc
        infos = []
        for summary in summaries:
            info = self.inspect(str(summary["Id"]))
            if info is not None and (all or info.running):
                infos.append(info)
        return sorted(infos, key=lambda i: (i.name, i.id))

    def open_events(
        self,
        since: str | int | None = None,
        until: str | int | None = None,
        actions: Iterable[str] | None = DEFAULT_ACTIONS,
    ) -> EventStream:
        """Subscribe to container events now; `since`/`until` are Unix seconds or
        ``seconds.nanoseconds`` strings (see `format_since`). `actions=None`: all of them."""
        filters: dict[str, Any] = {"type": ["container"]}
        if actions is not None:
            filters["event"] = list(actions)
        try:
            raw = self._api().events(since=since, until=until, filters=filters, decode=True)
        except _LIBRARY_ERRORS as exc:
            raise DockerError(f"docker events failed: {exc}") from exc
        return EventStream(raw)


class EventWatcher:
    """Subscribe, list, stream — and again after every break, with exponential backoff.

    `on_list(containers)` gets the running containers after each (re)subscription;
    `on_event(event)` gets each event after that list. Exceptions raised by the callbacks
    are logged and do not stop the watcher.
    """

    def __init__(
        self,
        engine: DockerEngine,
        on_event: Callable[[ContainerEvent], None],
        on_list: Callable[[list[ContainerInfo]], None],
        *,
        backoff_base: float = 0.25,
        backoff_cap: float = 1.0,
        actions: Iterable[str] | None = DEFAULT_ACTIONS,
    ) -> None:
        self._engine = engine
        self._on_event = on_event
        self._on_list = on_list
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._actions = tuple(actions) if actions is not None else None
        self.last_event_nano: int | None = None
        self.connections = 0  # successful (re)subscriptions, for status and tests
        self.connected = False  # subscribed and listed, the stream not broken (readiness)

    def run(self, stop: threading.Event) -> None:
        """Block until `stop` is set; never raises for Docker failures (it retries)."""
        failures = 0
        while not stop.is_set():
            try:
                self._session(stop)
                failures = 0
                if not stop.is_set():
                    log.warning("docker event stream ended; reconnecting")
            except DockerError as exc:
                # The engine is local: trying its socket every second costs nothing, and
                # a longer cap made containers started right after dockerd came back wait
                # for the next attempt (~20 s with a 30 s cap).
                delay = min(self._backoff_cap, self._backoff_base * 2**min(failures, 30))
                failures += 1
                level = logging.WARNING if failures == 1 or failures % 60 == 0 \
                    else logging.DEBUG
                log.log(level, "docker watch: %s; retrying every %.1fs (attempt %d)", exc,
                        delay, failures)
                stop.wait(delay)

    def _session(self, stop: threading.Event) -> None:
        """One subscription: open the stream, list, then process events until it ends."""
        if self.last_event_nano is None:
            self.last_event_nano = self._engine.system_time_nano()
        since = format_since(self.last_event_nano)
        stream = self._engine.open_events(since=since, actions=self._actions)
        cancel = stream.close_when(stop)
        try:
            containers = self._engine.list_containers()
            self.connections += 1
            self.connected = True
            self._deliver(self._on_list, containers)
            for event in stream:
                # Remember where we are: a reconnect resumes from here (inclusive, so the
                # last event may come twice; consumers are level-triggered).
                self.last_event_nano = max(self.last_event_nano or 0, event.time_nano)
                self._deliver(self._on_event, event)
                if stop.is_set():
                    break
        finally:
            self.connected = False
            cancel()
            stream.close()

    @staticmethod
    def _deliver(callback: Callable[[Any], None], value: Any) -> None:
        try:
            callback(value)
        except Exception:
            log.exception("docker watch: callback failed")
