"""The proxy controller: desired services -> rendered HAProxy config -> running HAProxy.

Owns the conversion of the model (`reconciler.model.Service`) into the renderer's view,
the choice of the active pool to apply (the key's value; while that is missing or
invalid, the last applied pool, so a bad `active` never takes traffic away), the
quiescence window that coalesces bursts of changes into one reload, and the proxy part
of the node status (config hash, last reload result, active pool per service).

Switching `active` changes only the map: the adapter applies it with `set map` through
the runtime API (no reload) and persists the map file. A member added to or removed from
an existing pool, or its new address, weight or state, goes through the runtime API too
(HAProxy's dynamic servers, planned by reconciler.proxy.dynamic): the config file is then
staged to match without a reload. Services, pools, binds or settings change the config
otherwise: then it goes through check -> atomic swap -> reload -> confirm, and a config
that fails is never loaded (the adapter keeps the last good one); so does a member change
whose runtime commands failed (logged, counted as a failed runtime change). Every reload
and runtime change is counted in the `Metrics` given at assembly (`_apply_counted`, and
in `_apply_at_runtime`).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from reconciler.adapters.haproxy import ApplyResult, HaproxyProcess, parse_map
from reconciler.errors import (
    ConfigInvalid,
    ConfigurationError,
    HaproxyError,
    Problem,
    ValidationError,
)
from reconciler.kvlayout import Layout
from reconciler.model import DesiredState, Service
from reconciler.observe.metrics import Metrics
from reconciler.proxy.canary import canary_maps, cutover_status
from reconciler.proxy.canary import running as canary_running
from reconciler.proxy.certs import stage_all
from reconciler.proxy.dynamic import (
    AddServer,
    DelServer,
    RuntimeOp,
    SetAddr,
    SetState,
    describe,
    plan_runtime,
    split_config,
)
from reconciler.proxy.render import Renderer, render_map
from reconciler.proxy.view import (
    GlobalView,
    MemberView,
    PoolView,
    ProxyView,
    ServiceView,
    frontends,
    parse_backend_name,
    sorted_view,
)
from reconciler.settings import ProxySettings, read_stats_auth

log = logging.getLogger(__name__)


# "Binding [...haproxy.cfg:24] for frontend fe_far: cannot bind socket (...) for [ip:port]"
_UNLOADABLE_RE = re.compile(r"frontend (fe_[A-Za-z0-9_.:-]+): cannot bind socket")
_VIEW_KEYS = Layout("")  # the renderer's problems name keys relative to the prefix
_REMOVAL_POLL = 0.05  # seconds between looks at removed members still serving...
_REMOVAL_POLL_SLOW = 0.5  # ...after the first second


def service_view(svc: Service, active: str) -> ServiceView:
    cfg = svc.config
    pools = tuple(
        PoolView(pname, tuple(MemberView(m.name, str(m.address), m.port, m.weight, m.state)
                              for m in members.values()))
        for pname, members in svc.pools.items())
    canary = svc.canary if svc.canary is not None and svc.canary.share > 0 \
        and svc.canary.to in svc.pools and svc.canary.to != active else None
    return ServiceView(
        name=svc.name, bind_host=cfg.bind_host, bind_port=cfg.bind_port, active=active,
        pools=pools, mode=cfg.mode, balance=cfg.balance,
        health_path=cfg.health.path if cfg.health else None,
        health_interval_ms=cfg.health.interval_ms if cfg.health else 2000,
        hosts=cfg.hosts, path_prefix=cfg.path_prefix,
        tls_certs=cfg.tls.certs if cfg.tls else None,
        redirect_http_port=cfg.tls.redirect_http if cfg.tls else None,
        forwardfor=cfg.forwardfor,
        canary=canary.to if canary else None, canary_weight=canary.share if canary else 0)


def _without_active(services: Mapping[str, Service]) -> dict[str, Service]:
    # A cutover's share is a runtime map too (no reload): not a config change either.
    # Nor are the members of existing pools (dynamic servers): only their pool names.
    return {name: replace(svc, active=None, canary=None,
                          pools={pool: {} for pool in svc.pools})
            for name, svc in services.items()}


def global_view(settings: ProxySettings) -> GlobalView:
    """The process-wide part of the config from the daemon's settings (the stats
    credentials are read from their file here, never from KV)."""
    extra: dict[str, object] = {"log_target": settings.log_target,
                                "run_as": settings.run_as}
    if settings.stats_bind is not None and settings.stats_auth_file is not None:
        user, password = read_stats_auth(settings.stats_auth_file)
        extra.update(stats_host=settings.stats_bind[0], stats_port=settings.stats_bind[1],
                     stats_user=user, stats_password=password)
    return GlobalView.for_state_dir(settings.state_dir, **extra)


def choose_active(svc: Service, last: str | None) -> str:
    """The pool to serve: the key's value, else the last applied, else the first pool."""
    if svc.active is not None:
        return svc.active
    if last is not None:
        return last
    return sorted(svc.pools)[0] if svc.pools else "default"


def build_view(state: DesiredState, settings: GlobalView, last_active: dict[str, str],
               only: str | None = None) -> ProxyView:
    services = tuple(
        service_view(svc, choose_active(svc, last_active.get(name)))
        for name, svc in sorted(state.services.items()) if only is None or name == only)
    return ProxyView(settings, services)


def config_view(view: ProxyView) -> ProxyView:
    """The view the config is rendered from: every pool `active` names exists as a
    backend, and the frontend's fallback is the first pool by name — NOT the active one.
    So switching `active` changes only the map (applied with `set map`, no reload), and
    the config bytes change only when services, pools, members or settings do. (The
    fallback is used only if the map lacked the service, which the adapter prevents.)"""
    services = []
    for svc in sorted_view(view).services:
        pools = svc.pools
        if not any(p.name == svc.active for p in pools):
            pools = (*pools, PoolView(svc.active))
        stable = min(p.name for p in pools)
        services.append(replace(svc, pools=pools, active=stable, canary=None,
                                canary_weight=0))
    return replace(view, services=tuple(services))


def render_for_cli(state: DesiredState, service: str | None, templates: str | None,
                   state_dir: str) -> tuple[str, list[Problem]]:
    """`reconciler render`: what the daemon would write (or one service's part)."""
    if service is not None and service not in state.services:
        raise ConfigurationError(f"no valid service {service!r} in the desired state")
    view = build_view(state, GlobalView.for_state_dir(state_dir), {}, only=service)
    problems = [p for p in state.problems if "/services/" in p.key]
    return Renderer(templates).render(config_view(view)).decode(), problems


class ProxyController:
    """Runs in the daemon under the `proxy` work key."""

    def __init__(self, settings: ProxySettings, *, dry_run: bool = False,
                 haproxy: HaproxyProcess | None = None, prefix: str = "",
                 metrics: Metrics | None = None) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self.prefix = prefix  # error keys name the KV key, like every other status key
        self.layout = Layout(prefix)
        self.settings = settings
        self.dry_run = dry_run
        self.hap = haproxy or HaproxyProcess(
            settings.state_dir, settings.haproxy_bin, master_socket=settings.master_socket,
            config_path=settings.config_path)
        self.globals = global_view(settings)
        self.renderer = Renderer(settings.templates_dir)
        self.state = DesiredState()
        # What was applied before a daemon restart is in the persisted map: while an
        # `active` key is missing or invalid, that pool keeps serving (not the first one).
        self.last_active: dict[str, str] = self._persisted_active()
        self._errors: dict[str, list[str]] = {}
        self._status: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._first_change: float | None = None
        self._applied: ProxyView | None = None  # config view last applied
        self._unloadable: dict[str, tuple[ServiceView, str]] = {}  # left out, and why
        self._last_change = 0.0
        self._cutovers: list[str] = []  # services with a canary share applied
        self._removed_at = 0.0  # monotonic time of the last member removal
        self._runtime_failed = False  # the last runtime change failed: reload without a dump
        self.planned: list[str] = []

    def reconfigure(self, settings: ProxySettings) -> None:
        """SIGHUP (issue 10): templates read again (a new renderer) and the settings the
        config is rendered from (access log, stats listener and credentials, workers'
        user) taken from `settings`; where HAProxy runs (state dir, binary, master socket)
        stays as started. Raises ConfigurationError, changing nothing, when the templates
        directory or the credentials file cannot be used. The next reconcile renders,
        and reloads only if the bytes changed."""
        settings = replace(settings, state_dir=self.settings.state_dir,
                           haproxy_bin=self.settings.haproxy_bin,
                           master_socket=self.settings.master_socket,
                           config_path=self.settings.config_path)
        globals_, renderer = global_view(settings), Renderer(settings.templates_dir)
        with self._lock:
            self.settings, self.globals, self.renderer = settings, globals_, renderer

    def _persisted_active(self) -> dict[str, str]:
        try:
            text = self.hap.map_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return {}
        out = {}
        for service, backend in parse_map(text).items():
            sp = parse_backend_name(backend)
            if sp is not None and sp[0] == service:
                out[service] = sp[1]
        return out

    # -- inputs -----------------------------------------------------------------------

    def set_state(self, state: DesiredState) -> None:
        with self._lock:
            if _without_active(state.services) != _without_active(self.state.services):
                # Only changes that reload open the quiescence window. A flip of `active`
                # alone is one `set map`, a member change a few `add/del/set server`:
                # applied at once, they took quiet_min (50 ms) longer for nothing (found
                # by bench/proxy.py).
                now = time.monotonic()
                self._last_change = now
                if self._first_change is None:
                    self._first_change = now
            self.state = state

    def quiet_delay(self) -> float:
        """Seconds to wait before applying, to coalesce a burst (0: apply now).

        Waits until no change came for `quiet_min`, but never more than `quiet_max`
        after the first change of the burst (consul-template's {min, max} wait)."""
        with self._lock:
            if self._first_change is None:
                return 0.0
            now = time.monotonic()
            wait = min(self._last_change + self.settings.quiet_min,
                       self._first_change + self.settings.quiet_max) - now
            return max(0.0, wait)

    # -- reconcile --------------------------------------------------------------------

    def reconcile(self) -> dict[str, Any]:
        with self._lock:
            state = self.state
            self._first_change = None
        if self.hap.pending_removals and not self.dry_run:
            self.hap.finish_removals()
        errors: dict[str, list[str]] = {}
        view = build_view(state, self.globals, self.last_active)
        # Still unloadable (same definition as when it failed): keep it out; changed:
        # try it again.
        self._unloadable = {n: (sv, why) for n, (sv, why) in self._unloadable.items()
                            if any(v == sv for v in view.services)}
        if self._unloadable and len(self._unloadable) < len(view.services):
            view = self._hold_back(view, set(self._unloadable))
        if not self.dry_run and view.services:
            # TLS: the validated copy of each certificate directory; a service whose
            # certificates HAProxy cannot load keeps its last loaded definition.
            view, bad_certs = stage_all(view, self.hap.stage_certs)
            for name, why in bad_certs.items():
                errors.setdefault(self.layout.service_config(name), []).append(
                    f"tls.certs: {why}; keeping the last good config")
            if bad_certs:
                log.error("haproxy: certificates of %s cannot load; kept at their last "
                          "good config", ", ".join(sorted(bad_certs)))
                view = self._hold_back(view, set(bad_certs))
                if not view.services:  # nothing else to apply: the running config stays
                    self._errors = errors
                    return self._status
        if not view.services:
            self._status = {"services": 0, "active": {}, "last_reload": "no services"}
            self._errors = {}
            if not self.dry_run and not self.hap.external and self.hap.is_running():
                log.info("no services left: stopping HAProxy")
                self.hap.stop(graceful=True)
            return self._status
        try:
            try:
                cfg = self.renderer.render(config_view(view))
                map_bytes = render_map(view)
            except ValidationError as e:
                # Leave out only the services the renderer refused (named in the
                # problems); the others keep being served and updated.
                for p in e.problems:
                    errors.setdefault(self.prefix + p.key, []).append(
                        str(p)[len(p.key):].lstrip(": "))
                bad = {s for p in e.problems if (s := _VIEW_KEYS.service_of(p.key))}
                kept = tuple(sv for sv in view.services if sv.name not in bad)
                if not bad or not kept:
                    raise
                log.error("haproxy: leaving out service(s) %s: %s", ", ".join(sorted(bad)), e)
                view = replace(view, services=kept)
                cfg = self.renderer.render(config_view(view))
                map_bytes = render_map(view)
        except ValidationError as e:
            for p in e.problems:
                errors.setdefault(self.prefix + p.key, []).append(
                    str(p)[len(p.key):].lstrip(": "))
            self._errors = errors
            self._status = dict(self._status, last_reload=f"render refused: {e}")
            return self._status
        except ConfigurationError as e:
            self._errors = {"templates": [str(e)]}
            self._status = dict(self._status, last_reload=f"render failed: {e}")
            return self._status
        digest = hashlib.sha256(cfg).hexdigest()[:16]
        active = {s.name: s.active for s in view.services}
        if self.dry_run:
            self._plan(cfg, map_bytes, digest, active)
            return {"config_hash": digest, "active": active}
        try:
            try:
                runtime = self._apply_at_runtime(config_view(view), cfg)
                result = self._apply_counted(cfg, map_bytes, canary_maps(view),
                                             dump_state=not self._runtime_failed)
            except HaproxyError as e:
                # A service HAProxy could not load (its bind: an address the host lacks,
                # a port someone else holds) is named in the alert: leave it out,
                # remembered until its definition changes, and apply everything else.
                failed = set(_UNLOADABLE_RE.findall(str(e)))
                bad = {sv.name for fe in frontends(config_view(view)) if fe.name in failed
                       for sv in fe.services}
                kept = tuple(sv for sv in view.services if sv.name not in bad)
                if not bad or not kept or len(kept) == len(view.services):
                    raise
                for sv in view.services:
                    if sv.name in bad:
                        self._unloadable[sv.name] = (sv, str(e))
                log.error("haproxy: service(s) %s cannot load; keeping their last loaded "
                          "definition (or leaving them out): %s", ", ".join(sorted(bad)), e)
                view = self._hold_back(view, bad)
                cfg = self.renderer.render(config_view(view))
                map_bytes = render_map(view)
                digest = hashlib.sha256(cfg).hexdigest()[:16]
                active = {sv.name: sv.active for sv in view.services}
                runtime = []
                result = self._apply_counted(cfg, map_bytes, canary_maps(view))
            for name, (_, why) in self._unloadable.items():
                errors.setdefault(self.layout.service_config(name), []).append(
                    f"cannot load; kept at its last loaded definition, if any: {why}")
        except HaproxyError as e:
            # Never left without a valid config: the adapter kept (or restored) the last
            # good one and the old worker keeps serving. Pool switches still apply on
            # top of it (one service that cannot load must not freeze every cutover).
            log.error("haproxy: %s", e)
            self._apply_map_only(map_bytes)
            self._errors = {"haproxy": [str(e)]}
            self._status = dict(self._status, last_reload=f"failed: {e}",
                                config_hash_wanted=digest)
            raise
        for svc in view.services:
            if svc.active != self.last_active.get(svc.name):
                log.info("service %s: active pool %s", svc.name, svc.active)
        self.last_active = dict(active)
        self._applied = config_view(view)
        if runtime:
            log.info("changed at runtime, no reload: %s", ", ".join(runtime))
        self._errors = errors
        self._status = {
            "config_hash": digest, "active": active, "services": len(view.services),
            "reloads": result.reloads, "worker": result.worker_pid,
            "last_reload": "ok" if result.reloaded else self._status.get("last_reload", "ok"),
        }
        if result.reloaded:
            log.info("haproxy reloaded (config %s, worker %s)", digest, result.worker_pid)
        self._cutovers = canary_running(view)
        if self._cutovers:
            # Read by `reconciler cutover --steps` (the error rate of each step).
            try:
                worker, counters = self.hap.backend_counters()
                self._status["cutover"] = cutover_status(view, worker, counters)
            except HaproxyError as e:
                log.warning("haproxy: cannot read the counters: %s", e)
        if not self.hap.external:
            self.hap.prune_certs({sv.tls_certs for sv in view.services if sv.tls_certs})
        return self._status

    def poll_after(self) -> float | None:
        """Seconds until the proxy wants to be reconciled again on its own: while a
        progressive cutover runs, HAProxy's counters are read and published this often;
        while removed members still serve requests, they are deleted once done."""
        polls = [self.settings.cutover_poll] if self._cutovers else []
        if self.hap.pending_removals:
            # Removed members waiting for their sessions: often within a second; a
            # long-lived session (up to hard-stop-after) is looked at less often.
            recent = time.monotonic() - self._removed_at < 1.0
            polls.append(_REMOVAL_POLL if recent else _REMOVAL_POLL_SLOW)
        return min(polls) if polls else None

    def _hold_back(self, view: ProxyView, names: set[str]) -> ProxyView:
        """`view` with the services `names` at their last loaded definition (with their
        last applied pool), or without them if they were never loaded."""
        applied = {sv.name: sv for sv in self._applied.services} if self._applied else {}
        out = []
        for sv in view.services:
            if sv.name not in names:
                out.append(sv)
            elif sv.name in applied:
                old = applied[sv.name]
                out.append(replace(old, active=self.last_active.get(sv.name, old.active)))
        return replace(view, services=tuple(out))

    def _apply_map_only(self, map_bytes: bytes) -> None:
        try:
            running = self.hap.config_path.read_bytes()
            self._apply_counted(running, map_bytes)  # same bytes: `set map` only
        except (OSError, HaproxyError) as e:
            log.warning("haproxy: could not apply the pool switches either: %s", e)

    def _apply_at_runtime(self, new: ProxyView, cfg: bytes) -> list[str]:
        """If the only differences from the applied config are members of existing
        pools (added, removed, or a new address, weight or state), apply them through
        the runtime API (`reconciler.proxy.dynamic` plans it), then stage the config file
        without a reload and persist the server states, so the file, the server-state
        file and the running workers agree for the next reload. Returns what was done;
        [] means the caller goes on with a reload: nothing to do at runtime, a change
        that needs one (logged), or a runtime command that failed (logged and counted:
        the reload brings the worker to the file)."""
        self._runtime_failed = False
        old = self._applied
        if old is None:
            return []
        try:
            current = self.hap.config_path.read_bytes()
        except OSError:
            return []
        plan = plan_runtime(old, new, current.decode("utf-8", "replace"), cfg.decode())
        if plan.reload is not None:
            log.info("haproxy: reload needed: %s", plan.reload)
            return []
        if not plan.ops:
            return []
        try:
            workers = self.hap.live_workers()
        except HaproxyError:
            return []  # not running: started (or reloaded) with the new file
        done: list[str] = []
        try:
            for op in plan.ops:
                self._run_op(op, workers)
                done.append(describe(op))
        except HaproxyError as e:
            self.metrics.haproxy_runtime_change("failed")
            log.warning("haproxy: runtime change failed (%s; done: %s); reloading instead",
                        e, ", ".join(done) or "nothing")
            # The worker's servers are not what was meant (half done, or changed by
            # hand): the reload keeps the server-state file saved after the last good
            # change rather than dumping them into the new worker.
            self._runtime_failed = True
            return []
        finally:
            self.metrics.haproxy_runtime_change("ok", len(done))
        try:
            self.hap.stage_config(cfg)
        except HaproxyError:
            # The workers have the change, the file not: the next apply reloads.
            self._applied = None
            raise
        try:
            self.hap.dump_server_state()
        except (HaproxyError, OSError) as e:
            log.warning("haproxy: could not save the server states: %s", e)
        return done

    def _run_op(self, op: RuntimeOp, workers: tuple[int, ...]) -> None:
        hap = self.hap
        if isinstance(op, AddServer):
            hap.add_server(op.backend, op.server, op.address, op.options, health=op.health,
                           enable=op.enable, workers=workers)
        elif isinstance(op, DelServer):
            hap.remove_server(op.backend, op.server, float(self.globals.hard_stop_after_s),
                              workers=workers)
            self._removed_at = time.monotonic()
        elif isinstance(op, SetAddr):
            hap.set_addr(op.backend, op.server, op.address, op.port, workers=workers)
        elif isinstance(op, SetState):
            hap.set_state(op.backend, op.server, op.state, workers=workers)
        else:
            hap.set_weight(op.backend, op.server, op.weight, workers=workers)

    def _apply_counted(self, cfg: bytes, map_bytes: bytes,
                       extra_maps: Mapping[str, bytes] | None = None, *,
                       dump_state: bool = True) -> ApplyResult:
        """`apply_config`, counted: a reload when the config bytes differ from the file
        (ok, failed and reverted, or invalid: refused by the check), else the active-pool
        switches it made at runtime."""
        try:
            reload = self.hap.config_path.read_bytes() != cfg
        except OSError:
            reload = False  # no config yet: HAProxy is started, not reloaded
        try:
            result = self.hap.apply_config(cfg, map_bytes, extra_maps, dump_state=dump_state)
        except ConfigInvalid:
            self.metrics.haproxy_reload("invalid")
            raise
        except HaproxyError:
            if reload:
                self.metrics.haproxy_reload("failed")
            else:
                self.metrics.haproxy_runtime_change("failed")
            raise
        if result.reloaded:
            self.metrics.haproxy_reload("ok")
        elif result.map_changed and not result.config_changed:
            self.metrics.haproxy_runtime_change("ok")
        return result

    def _plan(self, cfg: bytes, map_bytes: bytes, digest: str, active: dict[str, str]
              ) -> None:
        try:
            current = self.hap.config_path.read_bytes()
        except OSError:
            current = None
        if current is None:
            self.planned.append(f"start HAProxy with config {digest} "
                                f"({len(active)} service(s))")
        elif current != cfg:
            old, new = current.decode(errors="replace").splitlines(), cfg.decode().splitlines()
            diff = [f"    {line}" for line in difflib.unified_diff(old, new, "current",
                                                                     "desired", lineterm="")]
            # Only the backends' server lines differ: members, applied at runtime (when
            # HAProxy's runtime API takes them; `plan_runtime` decides when applying).
            members_only = split_config(current.decode("utf-8", "replace")).skeleton == \
                split_config(cfg.decode()).skeleton
            what = ("change members at runtime (no reload), stage the config"
                    if members_only else "reload HAProxy")
            self.planned.append(f"{what}: config changes\n" + "\n".join(diff[2:]))
        else:
            self.planned.append("HAProxy config unchanged")
        try:
            was = dict(line.split(" ", 1) for line in
                       self.hap.map_path.read_text().splitlines() if " " in line)
        except OSError:
            was = {}
        for svc, pool in sorted(active.items()):
            before = was.get(svc, "").rpartition(":")[2]
            if before and before != pool:
                self.planned.append(f"switch {svc}: {before} -> {pool} (runtime, no reload)")

    def errors(self) -> dict[str, list[str]]:
        return dict(self._errors)

    def status(self) -> dict[str, Any]:
        """The proxy part of the node status, also after a failed apply."""
        return dict(self._status)

    def view(self) -> ProxyView:
        return build_view(self.state, self.globals, self.last_active)



