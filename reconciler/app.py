"""Assembly: builds the adapters and the daemon from settings (the one place that does).

Also runs the daemon in the foreground with signal handling, for `reconciler run`, with
its health and metrics endpoint (reconciler.observe.server). The one `Metrics` of the
process is made here and handed to the parts that report to it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from reconciler.adapters import netlink
from reconciler.adapters.bridgefw import BridgeForwarding
from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings
from reconciler.adapters.docker_engine import DockerEngine
from reconciler.adapters.ovs import OvsAdapter
from reconciler.adapters.vxlan import VxlanAdapter
from reconciler.daemon import Daemon, DaemonOptions, ProxyPart
from reconciler.errors import ReconcilerError
from reconciler.ipam import Ipam
from reconciler.model import Network
from reconciler.network.addresses import AddressBook
from reconciler.network.controller import NetworkController
from reconciler.network.drivers import build_drivers
from reconciler.network.portbatch import PendingPort, PortBatcher
from reconciler.network.segments import Segments
from reconciler.observe import memtrace
from reconciler.observe.health import liveness, readiness
from reconciler.observe.metrics import Metrics
from reconciler.observe.server import HealthServer
from reconciler.policy.controller import PolicyController, default_backends
from reconciler.proxy.controller import ProxyController
from reconciler.runtime import alloc
from reconciler.settings import ObserveSettings, Settings

log = logging.getLogger(__name__)


@dataclass
class Parts:
    kv: ConsulKV
    docker: DockerEngine
    nl: netlink.NetlinkAdapter
    ovs: OvsAdapter
    netctl: NetworkController
    daemon: Daemon
    metrics: Metrics = field(default_factory=Metrics)
    observe: ObserveSettings = field(default_factory=ObserveSettings)

    def close(self) -> None:
        if self.netctl.netns_watcher is not None:
            self.netctl.netns_watcher.close()
        for c in (self.ovs, self.nl, self.docker, self.kv):
            try:
                c.close()
            except Exception:  # noqa: S112 - closing best-effort at exit
                continue


def build(settings: Settings, *, dry_run: bool = False, with_proxy: bool = True) -> Parts:
    metrics = Metrics()
    kv = ConsulKV(ConsulSettings.from_env(), observe=metrics.consul_request)
    docker = DockerEngine()
    nl = netlink.NetlinkAdapter()
    ovs = OvsAdapter(settings.network.ovs_db, settings.network.ovs_datapath)
    ipam = Ipam(kv, settings.prefix, settings.node)
    daemon: Daemon | None = None
    netctl: NetworkController | None = None

    # The batcher is wired to parts built after it: queued ports are committed by the
    # daemon's work key, and announced by the controller once on the switch.
    def ports_pending() -> None:
        assert daemon is not None
        daemon.on_ports_pending()

    def committed(ports: Sequence[PendingPort]) -> None:
        assert netctl is not None
        netctl.announce_committed(ports)

    def host_address(net: Network) -> netlink.IpInterface:
        assert netctl is not None
        return netctl.host_address(net)

    def release_host_address(net: Network) -> None:
        assert netctl is not None
        netctl.release_host_address(net)

    def on_tunnel() -> None:
        if daemon is not None:
            daemon.on_tunnel()

    batcher = PortBatcher(ovs, notify=ports_pending, after_commit=committed,
                          reap=nl.reap_retired)
    vx = VxlanAdapter()
    advertise = settings.network.advertise or advertise_towards_consul()
    drivers = build_drivers(node=settings.node, nl=nl, ovs=ovs,
                            fw=BridgeForwarding(settings.node), batcher=batcher, vx=vx,
                            advertise=advertise, host_address=host_address,
                            release_host_address=release_host_address, on_tunnel=on_tunnel)
    netctl = NetworkController(
        node=settings.node, nl=nl, segments=Segments(drivers),
        addresses=AddressBook(ipam, settings.node),
        batcher=batcher, inspect=docker.inspect, dry_run=dry_run,
        netns_watcher=None if dry_run else _netns_watcher(), tunnels=vx)
    proxy = _build_proxy(settings, kv, dry_run, metrics) if with_proxy else None
    session_file = os.path.join(settings.proxy.state_dir, f"session-{settings.node}")
    daemon = Daemon(DaemonOptions(settings.node, settings.prefix, settings.resync,
                                  workers=settings.workers, dry_run=dry_run,
                                  session_file=session_file, advertise=advertise,
                                  serve=settings.proxy.serve, freeze_heap=not dry_run),
                    kv=kv, docker=docker, netctl=netctl, proxy=proxy, metrics=metrics,
                    policy=PolicyController(default_backends(settings.node), dry_run=dry_run))
    return Parts(kv, docker, nl, ovs, netctl, daemon, metrics, settings.observe)


def advertise_towards_consul() -> str | None:
    """The source address of this host's route towards Consul (no packet is sent), when
    it is not a loopback address (an agent on 127.0.0.1 says nothing about the host)."""
    addr = os.environ.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500")
    hostport = addr.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or host.startswith("unix"):
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host.strip("[]"), int(port or 8500)))
            src = str(s.getsockname()[0])
    except (OSError, ValueError):
        return None
    return None if ipaddress.ip_address(src).is_loopback else src


def _build_proxy(settings: Settings, kv: Any, dry_run: bool, metrics: Metrics) -> ProxyPart:
    return ProxyController(settings.proxy, dry_run=dry_run, prefix=settings.prefix,
                           metrics=metrics)


def health_server(parts: Parts) -> HealthServer | None:
    """/livez, /readyz, /metrics for the daemon of `parts` (None: `--listen off`)."""
    o = parts.observe
    if o.listen is None:
        return None
    d = parts.daemon
    return HealthServer(o.listen, metrics=parts.metrics,
                        live=liveness(d, stuck_after=o.stuck_after),
                        ready=readiness(d, failing_after=o.unready_after,
                                        consul_age=parts.metrics.consul_contact_age))


def _apply_reload(parts: Parts, reload: Callable[[], Settings]) -> None:
    """SIGHUP: settings read again (command line, environment file) and the templates;
    a failure keeps everything as it was and says why."""
    try:
        new = reload()
        parts.daemon.reconfigure(new.proxy)
    except ReconcilerError as e:
        log.error("SIGHUP: keeping the previous settings and templates: %s", e)
        return
    log.info("SIGHUP: settings and templates reloaded")


def _netns_watcher() -> netlink.NetnsWatcher | None:
    """The watch of container namespaces, or None where the daemon may not have it (no
    CAP_NET_BROADCAST): then every reconcile looks inside the container again, and a
    change made there is found at the next resync instead of at once."""
    try:
        return netlink.NetnsWatcher()
    except OSError as exc:
        log.warning("no watch of container namespaces (%s; it needs CAP_NET_BROADCAST): "
                    "changes inside containers are found at resyncs only", exc)
        return None


def run_forever(parts: Parts, reload: Callable[[], Settings] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT. Stopping leaves interfaces and HAProxy as
    they are (HAProxy runs in its own session). SIGHUP calls `reload` for the settings
    read again and applies what can change without a restart (`_apply_reload`)."""
    stop = threading.Event()
    hup = threading.Event()

    def _stop(signum: int, frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()
        hup.set()

    def _hup(signum: int, frame: Any) -> None:
        hup.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    d = parts.daemon
    if reload is not None:
        signal.signal(signal.SIGHUP, _hup)

        def reloader() -> None:
            assert reload is not None
            while hup.wait() and not stop.is_set():
                hup.clear()
                _apply_reload(parts, reload)

        threading.Thread(target=reloader, name="sighup", daemon=True).start()
    memtrace.install(stop)  # RECONCILER_TRACEMALLOC: snapshots on SIGUSR2 (off by default)
    # Bound what glibc malloc keeps of freed memory (RSS crept under container churn
    # while the Python heap stayed flat; bench/soak.py).
    alloc.limit_arenas()
    threading.Thread(target=alloc.trim_loop, args=(stop,), name="malloc-trim",
                     daemon=True).start()
    server = health_server(parts)
    if server is not None:
        # Up before the first read of Consul: /readyz says what the daemon waits for.
        threading.Thread(target=server.run, args=(stop,), name="http", daemon=True).start()

    # Named: a loop's name is what /livez reports when it stops.
    def link_watch(s: threading.Event) -> None:
        netlink.watch_links(d.on_link_event, s, deletions_only=True)  # all it acts on

    extra: list[Callable[[threading.Event], None]] = [link_watch]
    watcher = parts.netctl.netns_watcher
    if watcher is not None:
        def netns_watch(s: threading.Event) -> None:
            assert watcher is not None
            watcher.run(d.on_netns_event, s)

        extra.append(netns_watch)
    # The daemon looks again only when a port of its own is deleted (Daemon.on_port_event).
    unsubscribe = parts.ovs.subscribe(d.on_port_event, kinds={"delete"}, tables={"Port"})
    try:
        d.run(stop, extra)
    finally:
        unsubscribe()
        parts.close()
    return 0
