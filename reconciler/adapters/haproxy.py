"""HAProxy adapter: runs (or attaches to) an HAProxy master and drives it.

Owns the HAProxy state directory layout, the ``haproxy`` binary (``-c`` checks and the
master-worker process) and the master CLI socket; nothing else in reconciler talks to
HAProxy. Takes and returns plain values (bytes, names, small frozen dataclasses).

Process model. HAProxy runs in master-worker mode (``-W``) with a master CLI socket
(``-S``) and a pid file, as a child in its own session (not ``-D``, so tests and the
daemon can reap it; its stdout/stderr go to ``haproxy.log`` in the state dir, where the
re-executed master also writes the ALERTs of a failed reload). After a daemon restart a
running master is re-adopted through the pid file and the master socket. With
``master_socket=`` and ``config_path=`` the adapter instead drives an HAProxy run by
someone else (systemd) and never starts or stops it.

Reloads (`apply_config`) happen only when the config bytes change: temp file in the
same directory → ``haproxy -c`` → fsync → the previous file kept as
``<config>.last-good`` → atomic rename → server states dumped to the server-state file
→ ``reload`` on the master CLI → confirmed through ``show proc`` (the master's reload
counter moved on, its failed-reload counter did not, and a new worker exists). HAProxy
2.6's master CLI gives no reply to ``reload``, hence the polling. A config that passes
``-c`` but cannot load (an address the host lacks, a port in use) shows up as a failed
reload: the last good file is put back and reloaded, and `ReloadFailed` is raised; the
old worker serves throughout.

Runtime changes need no reload: the active pool is a map entry (``set map``, sent to
every live worker and persisted in the map file), weights and admin states are
``set server``; `dump_server_state` writes them to the server-state file so a reload
keeps them (``load-server-state-from-file global`` in the rendered defaults).

Worker commands go through the master socket as ``@1 <cmd>`` (the newest worker) or
``@!<pid> <cmd>``, so an external HAProxy needs only its master socket.

Members come and go without a reload too (HAProxy 2.6 dynamic servers): `add_server`
(``add server`` with the options the caller rendered, then ``enable health`` and
``enable server``), `remove_server` (``set server ... state maint``, then ``del server``
once no session uses it: a server still busy is remembered and `finish_removals`, called
again by the caller, deletes it when its sessions ended, or shuts them down after the
drain timeout, as ``hard-stop-after`` would after a reload), `set_addr`, `set_weight`
and `set_state`. Each goes to every live worker (`live_workers`: the current one first,
which must succeed; an old worker may be exiting and is best effort: its proxies stopped
with the reload, and HAProxy refuses admin changes there — it keeps the servers it had
for the last requests of its remaining connections, a member gone meanwhile being
redispatched like any failed connect), every argument allow-listed, since member names
come from KV.

Progressive cutovers use two more runtime maps (``canary.map``: service -> backend,
``canary-weight.map``: service -> percent), synced like the active map (`extra_maps`).
`backend_counters` reads the current worker's ``show stat`` (requests, 5xx, connection
and response errors, servers up) for the cutover's error rate.

TLS certificates (`stage_certs`): the PEM files of a directory on the host are copied
into ``certs/<digest>/`` of the state directory (0700/0600) after HAProxy itself loaded
them (``haproxy -c`` on a one-line frontend), and the config points there. A broken
or missing file therefore never reaches a reload, a rotation shows as a new digest (a
new config), and the copy HAProxy runs with stays while it is in use (`prune_certs`).
The config file is written 0600: it may hold the stats credentials.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from reconciler.errors import CertificateInvalid, ConfigInvalid, HaproxyError, ReloadFailed

CONFIG_FILE = "haproxy.cfg"
MAP_FILE = "active.map"
ADMIN_SOCKET = "admin.sock"
SERVER_STATE_FILE = "server-state"
MASTER_SOCKET = "master.sock"
PID_FILE = "haproxy.pid"
LOG_FILE = "haproxy.log"
LAST_GOOD_SUFFIX = ".last-good"
CANARY_MAP_FILE = "canary.map"
CANARY_WEIGHT_MAP_FILE = "canary-weight.map"
EXTRA_MAP_FILES = (CANARY_MAP_FILE, CANARY_WEIGHT_MAP_FILE)
CERTS_DIR = "certs"
_DIGEST_RE = re.compile(r"[0-9a-f]{16}\Z")

SERVER_STATES = ("ready", "drain", "maint")
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}\Z")
_BACKEND_RE = re.compile(r"[A-Za-z0-9_.:-]{1,200}\Z")
_ADDRESS_RE = re.compile(r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[0-9.]{7,15}):\d{1,5}\Z")
_IP_RE = re.compile(r"[0-9A-Fa-f:.]{2,45}\Z")
_OPTION_RE = re.compile(r"[A-Za-z0-9_.:/+@,()\[\]%=-]{1,256}\Z")
_LOG_MAX_BYTES = 1 << 20
_CONFIG_MODE = 0o600  # the config may hold the stats credentials
# Issue 10: the state directory is 0700 (root's; HAProxy's workers run as `haproxy` and
# need nothing in it: the master reads the files), every other file in it 0640, sockets
# 0600 (``-S ...,mode,600`` and ``stats socket ... mode 600``).
_STATE_DIR_MODE = 0o700
_FILE_MODE = 0o640


@dataclass(frozen=True)
class WorkerInfo:
    """One worker in ``show proc``."""

    pid: int
    reloads: int
    """Reloads this worker has survived (0 for the newest)."""


@dataclass(frozen=True)
class ProcInfo:
    """The master's ``show proc``."""

    master_pid: int
    reloads: int
    failed_reloads: int
    workers: tuple[WorkerInfo, ...]
    old_workers: tuple[WorkerInfo, ...] = ()

    @property
    def all_workers(self) -> tuple[WorkerInfo, ...]:
        return self.workers + self.old_workers

    @property
    def current_worker(self) -> WorkerInfo | None:
        """The newest worker (fewest reloads survived)."""
        if not self.workers:
            return None
        return min(self.workers, key=lambda w: (w.reloads, -w.pid))


@dataclass(frozen=True)
class BackendCounters:
    """One backend in the current worker's ``show stat``."""

    requests: int
    """HTTP requests (``req_tot``), or sessions (``stot``) in tcp mode."""
    errors: int
    """5xx responses + connection errors + response errors."""
    up: int
    """Servers whose check status is UP (or that are not checked)."""
    servers: int


def parse_show_stat(text: str) -> dict[str, BackendCounters]:
    """Backends of ``show stat`` (CSV with a ``# `` header), by name."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        raise HaproxyError(f"unexpected `show stat` output: {text[:200]!r}")
    col = {name: i for i, name in enumerate(lines[0][2:].split(","))}

    def num(row: list[str], name: str) -> int:
        i = col.get(name)
        v = row[i] if i is not None and i < len(row) else ""
        return int(v) if v.isdigit() else 0

    up: dict[str, int] = {}
    total: dict[str, int] = {}
    out: dict[str, BackendCounters] = {}
    for line in lines[1:]:
        row = line.split(",")
        if len(row) < 3:
            continue
        px, sv = row[col["pxname"]], row[col["svname"]]
        if sv == "FRONTEND":
            continue
        if sv == "BACKEND":
            req = num(row, "req_tot") or num(row, "stot")
            err = num(row, "hrsp_5xx") + num(row, "econ") + num(row, "eresp")
            out[px] = BackendCounters(req, err, 0, 0)
            continue
        total[px] = total.get(px, 0) + 1
        status = row[col["status"]] if "status" in col else ""
        if status.startswith("UP") or status == "no check":
            up[px] = up.get(px, 0) + 1
    return {px: BackendCounters(c.requests, c.errors, up.get(px, 0), total.get(px, 0))
            for px, c in out.items()}


@dataclass(frozen=True)
class ApplyResult:
    """What `apply_config` did."""

    config_changed: bool
    """The config bytes differed from the file, so the file was replaced and reloaded."""
    map_changed: bool
    """Some active-pool entry changed (at runtime and/or in the map file)."""
    reloaded: bool
    worker_pid: int | None
    """The current worker after the call."""
    reloads: int
    """The master's reload counter after the call."""


def parse_show_proc(text: str) -> ProcInfo:
    """Parse the master CLI's ``show proc`` (HAProxy 2.6 layout)."""
    master_pid = reloads = failed = -1
    workers: list[WorkerInfo] = []
    old: list[WorkerInfo] = []
    section = "master"
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            if title == "workers":
                section = "workers"
            elif title == "old workers":
                section = "old"
            elif title == "programs":
                section = "programs"
            continue
        parts = line.split()
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        if parts[1] == "master":
            master_pid = int(parts[0])
            reloads = int(parts[2])
            m = re.search(r"\[failed:\s*(\d+)\]", line)
            failed = int(m.group(1)) if m else 0
        elif parts[1] == "worker" and parts[2].isdigit():
            info = WorkerInfo(int(parts[0]), int(parts[2]))
            (old if section == "old" else workers).append(info)
    if master_pid < 0:
        raise HaproxyError(f"unexpected `show proc` output: {text[:300]!r}")
    return ProcInfo(master_pid, reloads, failed, tuple(workers), tuple(old))


def parse_map(text: str) -> dict[str, str]:
    """Entries of a map file, or of ``show map <file>`` (lines ``0x... key value``)."""
    entries: dict[str, str] = {}
    for raw in text.splitlines():
        parts = raw.split()
        if not parts or parts[0].startswith("#"):
            continue
        if parts[0].startswith("0x") and len(parts) == 3:
            parts = parts[1:]
        if len(parts) == 2:
            entries[parts[0]] = parts[1]
    return entries


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(target: Path, data: bytes, mode: int = _FILE_MODE) -> Path:
    """Write `data` to a fsynced temp file beside `target` and return its path."""
    tmp = target.with_name(f".{target.name}.tmp.{os.getpid()}.{threading.get_ident()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # O_CREAT keeps the mode of a leftover file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def _child_env() -> dict[str, str]:
    """HAProxy's environment: ours without Consul's settings — the ACL token must not
    live on in a long-running process (HAProxy's `show env` would print it)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}


def atomic_write(target: Path, data: bytes, mode: int = _FILE_MODE) -> None:
    """Replace `target` with `data`: temp file in the same dir, fsync, rename, fsync dir."""
    tmp = _write_temp(target, data, mode)
    try:
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _is_haproxy(pid: int) -> bool:
    """`pid` runs an haproxy binary (guards against a recycled pid in a stale pid file)."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    except OSError:
        return False
    return b"haproxy" in os.path.basename(argv0)


def _pid_alive(pid: int) -> bool:
    """True when `pid` exists and is not a zombie (PID 1 here may never reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rpartition(")")[2].split()[:1]
    return bool(state) and state[0] not in ("Z", "X")


class HaproxyProcess:
    """An HAProxy master (run by us, or attached to) and its runtime API."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        haproxy_bin: str = "haproxy",
        *,
        master_socket: str | os.PathLike[str] | None = None,
        config_path: str | os.PathLike[str] | None = None,
        timeout: float = 15.0,
    ) -> None:
        """Own `state_dir`; with `master_socket` and `config_path`, drive that HAProxy."""
        if (master_socket is None) != (config_path is None):
            raise HaproxyError("master_socket and config_path go together")
        self.state_dir = Path(state_dir).absolute()
        self.haproxy_bin = haproxy_bin
        self.external = master_socket is not None
        self.master_socket = (
            Path(master_socket).absolute()
            if master_socket is not None
            else self.state_dir / MASTER_SOCKET
        )
        self.config_path = (
            Path(config_path).absolute()
            if config_path is not None
            else self.state_dir / CONFIG_FILE
        )
        self.last_good_path = self.config_path.with_name(self.config_path.name + LAST_GOOD_SUFFIX)
        self.map_path = self.state_dir / MAP_FILE
        self.admin_socket = self.state_dir / ADMIN_SOCKET
        self.server_state_path = self.state_dir / SERVER_STATE_FILE
        self.pid_path = self.state_dir / PID_FILE
        self.log_path = self.state_dir / LOG_FILE
        self.timeout = timeout
        self._child: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        # (worker pid, backend, server) -> drain deadline (monotonic): in maintenance,
        # deleted once no session uses it (`finish_removals`).
        self._removing: dict[tuple[int, str, str], float] = {}

    # --- the master CLI ----------------------------------------------------------------

    def master_command(self, command: str, timeout: float | None = None) -> str:
        """Send one command to the master CLI and return its whole answer."""
        if "\n" in command or "\r" in command:
            raise HaproxyError(f"refusing a multi-line CLI command: {command!r}")
        limit = self.timeout if timeout is None else timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(limit)
        try:
            sock.connect(str(self.master_socket))
            sock.sendall(command.encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            chunks: list[bytes] = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except OSError as exc:
            raise HaproxyError(f"master socket {self.master_socket}: {command!r}: {exc}") from exc
        finally:
            sock.close()
        return b"".join(chunks).decode("utf-8", "replace")

    def worker_command(self, command: str, worker: int | None = None) -> str:
        """Send `command` to the newest worker (or to the worker with pid `worker`)."""
        prefix = "@1" if worker is None else f"@!{worker}"
        out = self.master_command(f"{prefix} {command}")
        if out.startswith("Can't find the target PID"):
            raise HaproxyError(f"no worker to run {command!r}: {out.strip()}")
        return out

    def _worker_ok(self, command: str, worker: int | None = None) -> None:
        out = self.worker_command(command, worker).strip()
        if out:
            raise HaproxyError(f"HAProxy refused {command!r}: {out.splitlines()[0]}")

    def show_proc(self) -> ProcInfo:
        return parse_show_proc(self.master_command("show proc"))

    def is_running(self) -> bool:
        """The master answers on its socket."""
        try:
            self.show_proc()
        except HaproxyError:
            return False
        return True

    # --- process lifecycle -------------------------------------------------------------

    def master_pid(self) -> int | None:
        """The master's pid: our child's, or the pid file's if that process is alive."""
        if self._child is not None and self._child.poll() is None:
            return self._child.pid
        raw = _read(self.pid_path)
        if raw is None:
            return None
        try:
            pid = int(raw.split()[0])
        except (ValueError, IndexError):
            return None
        return pid if _pid_alive(pid) and _is_haproxy(pid) else None

    def _launch(self, cfg: bytes, map_bytes: bytes,
                extra_maps: Mapping[str, bytes] | None = None) -> ApplyResult:
        if self.master_pid() is not None:
            # A master from the pid file that no longer answers on its socket: a second
            # one would share its ports (SO_REUSEPORT), so end it first.
            self.stop()
        self._ensure_runtime_files()
        tmp = _write_temp(self.config_path, cfg, _CONFIG_MODE)
        try:
            self._check_file(tmp)
            current = _read(self.config_path)
            if current is not None and current != cfg:
                atomic_write(self.last_good_path, current, _CONFIG_MODE)
            os.replace(tmp, self.config_path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(self.state_dir)
        atomic_write(self.map_path, map_bytes)
        for name, data in (extra_maps or {}).items():
            atomic_write(self._extra_map_path(name), data)
        for stale in (self.master_socket, self.pid_path):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        if (self.log_path.exists() and self.log_path.stat().st_size > _LOG_MAX_BYTES):
            self.log_path.unlink()
        log = open(  # noqa: SIM115 - the child keeps it open
            os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, _FILE_MODE), "ab")
        try:
            self._child = subprocess.Popen(
                [
                    self.haproxy_bin,
                    "-W",
                    "-S", f"{self.master_socket},mode,600",
                    "-f", str(self.config_path),
                    "-p", str(self.pid_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=_child_env(),
                umask=0o027,  # its pid file 0640, like every other file here
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise HaproxyError(f"cannot run {self.haproxy_bin}: {exc}") from exc
        finally:
            log.close()
        child = self._child
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if child.poll() is not None:
                self._child = None
                raise HaproxyError(
                    f"HAProxy exited at start (status {child.returncode}): {self._log_alerts(0)}"
                )
            with contextlib.suppress(HaproxyError):
                info = self.show_proc()
                worker = info.current_worker
                if worker is not None:
                    with contextlib.suppress(HaproxyError):
                        self.worker_command("show info")
                        return ApplyResult(True, True, False, worker.pid, info.reloads)
            time.sleep(0.05)
        self.stop()
        raise HaproxyError(f"HAProxy did not come up within {self.timeout:g}s")

    def stop(self, graceful: bool = False, timeout: float = 10.0) -> None:
        """Stop the master we run (and its workers). A no-op for an external HAProxy.

        `graceful` lets workers finish their connections (SIGUSR1) instead of SIGTERM.
        """
        if self.external:
            return
        with self._lock:
            pid = self.master_pid()
            if pid is not None:
                workers: tuple[WorkerInfo, ...] = ()
                with contextlib.suppress(HaproxyError):
                    workers = self.show_proc().all_workers
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1 if graceful else signal.SIGTERM)
                if not self._wait_gone(pid, timeout):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    self._wait_gone(pid, 5.0)
                for w in workers:  # they exit when the master goes; make sure
                    if not self._wait_gone(w.pid, 5.0):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(w.pid, signal.SIGKILL)
            if self._child is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._child.wait(timeout=5.0)
                self._child = None
            for path in (self.pid_path, self.master_socket):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._child is not None and self._child.pid == pid:
                if self._child.poll() is not None:
                    return True
            elif not _pid_alive(pid):
                return True
            time.sleep(0.02)
        return False

    # --- config ------------------------------------------------------------------------

    def stage_config(self, cfg: bytes) -> bool:
        """Check `cfg` and make it the config file WITHOUT reloading (the caller already
        applied the difference through the runtime API, e.g. server weights), so that
        the file, the running worker and any later reload agree. False if unchanged."""
        with self._lock:
            current = _read(self.config_path)
            if current == cfg:
                return False
            self._swap_in(cfg, current)
            return True

    def reload(self) -> ProcInfo:
        """Reload with the config file as it is (server states dumped first), confirmed;
        `show proc` after it. Raises ReloadFailed if the new worker did not come up."""
        with self._lock:
            return self._reload_confirmed()

    def _swap_in(self, cfg: bytes, current: bytes | None) -> None:
        """Write `cfg` beside the config, `haproxy -c` it, keep `current` as the last good
        one and rename `cfg` into place (fsynced). A refused config changes nothing."""
        self._ensure_runtime_files()
        tmp = _write_temp(self.config_path, cfg, _CONFIG_MODE)
        try:
            self._check_file(tmp)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if current is not None:
            atomic_write(self.last_good_path, current, _CONFIG_MODE)
        os.replace(tmp, self.config_path)
        _fsync_dir(self.config_path.parent)

    def _check_file(self, path: Path, label: str | None = None) -> None:
        try:
            proc = subprocess.run(
                [self.haproxy_bin, "-c", "-f", str(path)],
                stdin=subprocess.DEVNULL,
                env=_child_env(),
                capture_output=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HaproxyError(f"cannot run {self.haproxy_bin} -c: {exc}") from exc
        if proc.returncode != 0:
            text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
            text = text.replace(str(path), label or str(self.config_path))
            lines = [ln for ln in text.splitlines() if "[ALERT]" in ln] or text.splitlines()
            raise ConfigInvalid("haproxy -c refused the config: " + "\n".join(lines).strip())

    def _ensure_runtime_files(self) -> None:
        """The map and server-state files must exist for ``-c`` and for a clean start;
        the state directory is made (or brought back to) 0700."""
        self.state_dir.mkdir(mode=_STATE_DIR_MODE, parents=True, exist_ok=True)
        if self.state_dir.stat().st_mode & 0o777 != _STATE_DIR_MODE:
            os.chmod(self.state_dir, _STATE_DIR_MODE)
        # Files of an older version (or of another writer's umask): at most 0640.
        with os.scandir(self.state_dir) as entries:
            for e in entries:
                with contextlib.suppress(OSError):
                    mode = e.stat(follow_symlinks=False).st_mode
                    if e.is_file(follow_symlinks=False) and mode & 0o137:
                        os.chmod(e.path, mode & _FILE_MODE)
        for path in (self.map_path, *(self._extra_map_path(n) for n in EXTRA_MAP_FILES)):
            if not path.exists():
                atomic_write(path, b"")
        if not self.server_state_path.exists():
            atomic_write(self.server_state_path, b"1\n")

    def _extra_map_path(self, name: str) -> Path:
        if name not in EXTRA_MAP_FILES:
            raise HaproxyError(f"unknown map file {name!r}")
        return self.state_dir / name

    def apply_config(self, cfg: bytes, map_bytes: bytes,
                     extra_maps: Mapping[str, bytes] | None = None, *,
                     dump_state: bool = True) -> ApplyResult:
        """Make the running HAProxy use `cfg` and the active pools in `map_bytes`
        (and the maps of `extra_maps`, by file name: the canary maps). Without
        `dump_state`, a reload keeps the server-state file as it is instead of dumping
        the current worker's (whose servers may not be what the caller meant).

        Same config bytes as on disk: only the maps are synced at runtime (no reload).
        An HAProxy of ours that is not running (never started, or died) is started.
        Otherwise check, swap atomically, reload and confirm; on a failed reload the last
        good config is restored and reloaded, and ReloadFailed is raised.
        """
        with self._lock:
            if not self.external and self.master_pid() is None and not self.is_running():
                # Never started, or it died: (re)start it with this config.
                return self._launch(cfg, map_bytes, extra_maps)
            current = _read(self.config_path)
            if current == cfg:
                map_changed = self._sync_map(map_bytes)
                for name, data in (extra_maps or {}).items():
                    map_changed = self._sync_map(data, self._extra_map_path(name)) \
                        or map_changed
                info = self.show_proc()
                w = info.current_worker
                return ApplyResult(False, map_changed, False, w.pid if w else None, info.reloads)
            old_map = _read(self.map_path) or b""
            self._swap_in(cfg, current)
            if old_map != map_bytes:
                atomic_write(self.map_path, map_bytes)
            for name, data in (extra_maps or {}).items():
                # The new worker loads these files; the old one keeps its runtime maps.
                atomic_write(self._extra_map_path(name), data)
            try:
                info = self._reload_confirmed(dump_state=dump_state)
            except ReloadFailed as exc:
                self._revert(current, old_map, map_bytes, exc)
            except HaproxyError as exc:
                # The master did not even answer (`show proc`): the new file must not
                # stay on disk looking applied, or the retry would see "same bytes" and
                # never reload. Put the last good one back; the retry starts over.
                if current is not None:
                    atomic_write(self.config_path, current, _CONFIG_MODE)
                if old_map != map_bytes:
                    atomic_write(self.map_path, old_map)
                raise HaproxyError(f"reload not confirmed ({exc}); config put back") \
                    from exc
            w = info.current_worker
            return ApplyResult(True, old_map != map_bytes, True, w.pid if w else None,
                               info.reloads)

    def _revert(
        self, previous: bytes | None, old_map: bytes, new_map: bytes, cause: ReloadFailed
    ) -> NoReturn:
        if previous is None:
            raise ReloadFailed(f"{cause}; no previous config to go back to")
        atomic_write(self.config_path, previous, _CONFIG_MODE)
        if old_map != new_map:
            atomic_write(self.map_path, old_map)
        try:
            self._reload_confirmed(dump_state=False)
        except ReloadFailed as again:
            raise ReloadFailed(
                f"{cause}; restored the last good config, but reloading it failed too: {again}"
            ) from cause
        raise ReloadFailed(f"{cause}; restored and reloaded the last good config") from cause

    def _reload_confirmed(self, dump_state: bool = True) -> ProcInfo:
        before = self.show_proc()
        if dump_state:
            with contextlib.suppress(HaproxyError):
                self.dump_server_state()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        old_pids = {w.pid for w in before.all_workers}
        # The master re-executes itself and drops the connection; 2.6 sends no reply.
        with contextlib.suppress(HaproxyError):
            self.master_command("reload", timeout=self.timeout)
        deadline = time.monotonic() + self.timeout
        last: ProcInfo | str = "no answer"
        while time.monotonic() < deadline:
            try:
                info = self.show_proc()
            except HaproxyError as exc:
                last = str(exc)
                time.sleep(0.02)
                continue
            last = info
            if info.reloads > before.reloads:
                if info.failed_reloads > before.failed_reloads:
                    raise ReloadFailed(
                        "HAProxy failed to load the new config (failed reloads "
                        f"{before.failed_reloads} -> {info.failed_reloads}): "
                        f"{self._log_alerts(log_offset)}"
                    )
                fresh = [w for w in info.workers if w.pid not in old_pids and w.reloads == 0]
                if fresh:
                    try:
                        self.worker_command("show info")
                    except HaproxyError as exc:
                        last = str(exc)
                    else:
                        return info
            time.sleep(0.02)
        raise ReloadFailed(f"no new HAProxy worker within {self.timeout:g}s (last: {last})")

    def _log_alerts(self, offset: int) -> str:
        if self.external:
            return "see HAProxy's own log"
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                text = f.read(64 * 1024).decode("utf-8", "replace")
        except OSError:
            return "no log"
        alerts = [ln.strip() for ln in text.splitlines() if "[ALERT]" in ln]
        return "\n".join(alerts[-10:]) or "no ALERT in haproxy.log"

    # --- runtime API -------------------------------------------------------------------

    def _set_map_entry(self, key: str, value: str, present: bool, worker: int,
                       path: Path) -> None:
        verb = "set" if present else "add"
        self._worker_ok(f"{verb} map {path} {key} {value}", worker)

    def _sync_map(self, map_bytes: bytes, path: Path | None = None) -> bool:
        """Bring every worker's runtime map and the map file (`path`, default the
        active map) to `map_bytes`."""
        path = self.map_path if path is None else path
        desired = parse_map(map_bytes.decode("utf-8"))
        for key, value in desired.items():
            self._check_arg("map key", key, _NAME_RE)
            self._check_arg("backend", value, _BACKEND_RE)
        changed = False
        info = self.show_proc()
        current = info.current_worker
        for w in info.all_workers:
            try:
                runtime = parse_map(self.worker_command(f"show map {path}", w.pid))
                for key, value in desired.items():
                    if runtime.get(key) != value:
                        self._set_map_entry(key, value, key in runtime, w.pid, path)
                        changed = changed or (current is not None and w.pid == current.pid)
                for key in runtime.keys() - desired.keys():
                    self._worker_ok(f"del map {path} {key}", w.pid)
                    changed = changed or (current is not None and w.pid == current.pid)
            except HaproxyError:
                # An old worker may exit at any moment; the current one must succeed.
                if current is not None and w.pid == current.pid:
                    raise
        if _read(path) != map_bytes:
            atomic_write(path, map_bytes)
            changed = True
        return changed

    @staticmethod
    def _check_arg(what: str, value: str, pattern: re.Pattern[str]) -> None:
        # CLI arguments are space-separated and `;` chains commands: allow-list them.
        if not pattern.match(value):
            raise HaproxyError(f"invalid {what} for the HAProxy CLI: {value!r}")

    def live_workers(self) -> tuple[int, ...]:
        """Pids of every live worker, the current (newest) one first."""
        info = self.show_proc()
        cur = info.current_worker
        if cur is None:
            raise HaproxyError("HAProxy has no worker")
        return (cur.pid, *(w.pid for w in info.all_workers if w.pid != cur.pid))

    def _on_workers(self, workers: Sequence[int] | None,
                    fn: Callable[[int], None]) -> None:
        """`fn(pid)` on every worker of `workers` (default: `live_workers`). The first
        (the current worker) must succeed; an old one may be exiting: best effort."""
        for i, pid in enumerate(self.live_workers() if workers is None else workers):
            try:
                fn(pid)
            except HaproxyError:
                if i == 0:
                    raise

    def _server_arg(self, backend: str, server: str) -> str:
        self._check_arg("backend", backend, _BACKEND_RE)
        self._check_arg("server", server, _NAME_RE)
        return f"{backend}/{server}"

    def set_weight(self, backend: str, server: str, weight: int,
                   workers: Sequence[int] | None = None) -> None:
        """Set a server's weight (0-256) in every live worker."""
        target = self._server_arg(backend, server)
        if isinstance(weight, bool) or not 0 <= weight <= 256:
            raise HaproxyError(f"weight must be 0-256, got {weight!r}")
        with self._lock:
            self._on_workers(workers, lambda pid: self._worker_ok(
                f"set server {target} weight {int(weight)}", pid))

    def set_state(self, backend: str, server: str, state: str,
                  workers: Sequence[int] | None = None) -> None:
        """Set a server's admin state (ready, drain or maint) in every live worker."""
        target = self._server_arg(backend, server)
        if state not in SERVER_STATES:
            raise HaproxyError(f"state must be one of {', '.join(SERVER_STATES)}: {state!r}")
        with self._lock:
            self._on_workers(workers, lambda pid: self._worker_ok(
                f"set server {target} state {state}", pid))

    def set_addr(self, backend: str, server: str, address: str, port: int,
                 workers: Sequence[int] | None = None) -> None:
        """Point a server at another IP literal and port, in every live worker."""
        target = self._server_arg(backend, server)
        self._check_arg("address", address, _IP_RE)
        if isinstance(port, bool) or not 1 <= port <= 65535:
            raise HaproxyError(f"port must be 1-65535, got {port!r}")
        cmd = f"set server {target} addr {address} port {int(port)}"

        def one(pid: int) -> None:
            out = self.worker_command(cmd, pid).strip()
            if "changed from" not in out and "no need to change" not in out:
                raise HaproxyError(f"HAProxy refused {cmd!r}: {out[:200]}")

        with self._lock:
            self._on_workers(workers, one)

    def add_server(self, backend: str, server: str, address: str, options: Sequence[str],
                   *, health: bool, enable: bool,
                   workers: Sequence[int] | None = None) -> None:
        """``add server <backend>/<server> <address> <options...>`` in every live worker,
        then ``enable health`` (`health`) and ``enable server`` (`enable`; else it stays
        in maintenance). `address` is ``IP:port`` (IPv6 in brackets); every option word
        is allow-listed (no space, ``;``, ``#``, quote or control character). A server
        of that name still being removed (`remove_server`) is deleted first."""
        target = self._server_arg(backend, server)
        self._check_arg("address", address, _ADDRESS_RE)
        for word in options:
            self._check_arg("server option", word, _OPTION_RE)
        cmd = " ".join(("add server", target, address, *options))

        def one(pid: int) -> None:
            if (pid, backend, server) in self._removing:
                self._delete_now(pid, backend, server)
            out = self.worker_command(cmd, pid).strip()
            if not out.startswith("New server registered"):
                raise HaproxyError(f"HAProxy refused {cmd!r}: "
                                   f"{out.splitlines()[0] if out else 'no answer'}")
            try:
                for verb, wanted in (("enable health", health), ("enable server", enable)):
                    if not wanted:
                        continue
                    out = self.worker_command(f"{verb} {target}", pid).strip()
                    if out.startswith("Proxy is disabled"):
                        # An old worker: its proxies stopped with the reload and take
                        # no new request; a server there could never be enabled.
                        self._try_delete(pid, target)
                        return
                    if out:
                        raise HaproxyError(f"HAProxy refused '{verb} {target}': "
                                           f"{out.splitlines()[0]}")
            except HaproxyError:
                # Not left half-made (in maintenance): a later dump of the server
                # states would pass that on to the next worker.
                with contextlib.suppress(HaproxyError):
                    self.worker_command(f"set server {target} state maint", pid)
                    self._try_delete(pid, target)
                raise

        with self._lock:
            self._on_workers(workers, one)

    def remove_server(self, backend: str, server: str, drain_timeout: float,
                      workers: Sequence[int] | None = None) -> int:
        """Take a server out of every live worker: maintenance at once (no new request
        goes to it; requests under way finish), deleted when no session uses it. Those
        still busy are deleted by `finish_removals` (after `drain_timeout` s, their
        sessions are shut down first). Returns the removals still pending."""
        target = self._server_arg(backend, server)

        def one(pid: int) -> None:
            out = self.worker_command(f"set server {target} state maint", pid).strip()
            # An old worker's proxies are stopped ("Proxy is disabled."): it takes no
            # new request anyway, and deletes the server all the same.
            if out and not out.startswith(("Proxy is disabled", "No such server")):
                raise HaproxyError(f"HAProxy refused 'set server {target} state maint': "
                                   f"{out.splitlines()[0]}")
            if not self._try_delete(pid, target):
                self._removing[(pid, backend, server)] = time.monotonic() + drain_timeout

        with self._lock:
            self._on_workers(workers, one)
            return len(self._removing)

    def _try_delete(self, pid: int, target: str) -> bool:
        """``del server``: True when it is gone, False while sessions still use it."""
        out = self.worker_command(f"del server {target}", pid).strip()
        if out.startswith(("Server deleted", "No such server")):
            return True
        if "still has" in out:  # connections attached, or streams queued
            return False
        raise HaproxyError(f"HAProxy refused 'del server {target}': {out[:200]}")

    def _delete_now(self, pid: int, backend: str, server: str) -> None:
        """A server being removed gets added again: end its sessions and delete it."""
        target = f"{backend}/{server}"
        self._worker_ok(f"shutdown sessions server {target}", pid)
        deadline = time.monotonic() + 2.0
        while not self._try_delete(pid, target):
            if time.monotonic() > deadline:
                raise HaproxyError(f"{target} is still busy in worker {pid}")
            time.sleep(0.005)
        self._removing.pop((pid, backend, server), None)

    @property
    def pending_removals(self) -> int:
        """Servers in maintenance waiting for their sessions to end before deletion."""
        return len(self._removing)

    def finish_removals(self) -> int:
        """Delete the servers `remove_server` left busy whose sessions ended; shut down
        the sessions of those past their drain timeout (deleted at the next call). A
        worker that exited is forgotten. Returns the removals still pending."""
        with self._lock:
            now = time.monotonic()
            for key, deadline in list(self._removing.items()):
                pid, backend, server = key
                target = f"{backend}/{server}"
                try:
                    if self._try_delete(pid, target):
                        del self._removing[key]
                    elif now >= deadline:
                        self._worker_ok(f"shutdown sessions server {target}", pid)
                except HaproxyError:
                    del self._removing[key]  # the worker is gone (or the server)
            return len(self._removing)

    def backend_counters(self) -> tuple[int | None, dict[str, BackendCounters]]:
        """(current worker pid, counters per backend) of the newest worker. The counters
        start at zero in a new worker (after a reload): compare pids between reads."""
        info = self.show_proc()
        w = info.current_worker
        text = self.worker_command("show stat -1 6 -1")
        return (w.pid if w else None), parse_show_stat(text)

    # --- TLS certificates --------------------------------------------------------------

    @property
    def certs_root(self) -> Path:
        return self.state_dir / CERTS_DIR

    def stage_certs(self, source: str) -> str:
        """The validated copy of the PEM files (``*.pem``) of directory `source`, as a
        path for ``crt``. Raises CertificateInvalid (naming the file and HAProxy's
        reason) when the directory is missing or empty, or HAProxy refuses a file."""
        src = Path(source)
        try:
            names = sorted(p.name for p in src.iterdir() if p.name.endswith(".pem")
                           and p.is_file())
        except OSError as exc:
            raise CertificateInvalid(f"cannot read {source}: {exc.strerror or exc}") \
                from exc
        if not names:
            raise CertificateInvalid(f"{source} holds no .pem file")
        files: list[tuple[str, bytes]] = []
        h = hashlib.sha256()
        for name in names:
            try:
                data = (src / name).read_bytes()
            except OSError as exc:
                raise CertificateInvalid(f"cannot read {src / name}: "
                                         f"{exc.strerror or exc}") from exc
            files.append((name, data))
            h.update(name.encode() + b"\0" + data + b"\0")
        target = self.certs_root / h.hexdigest()[:16]
        if target.is_dir():
            return str(target)
        self.certs_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.certs_root / f".tmp-{target.name}-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        try:
            for name, data in files:
                fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            probe = tmp.with_name(tmp.name + ".cfg")
            probe.write_text("defaults\n    mode http\n    timeout client 1s\n"
                             "    timeout server 1s\n    timeout connect 1s\n"
                             f"frontend certcheck\n    bind 127.0.0.1:1 ssl crt {tmp}\n")
            try:
                self._check_file(probe, label=str(probe))
            except ConfigInvalid as exc:
                text = str(exc).replace(str(tmp), source).replace(
                    "haproxy -c refused the config: ", "")
                raise CertificateInvalid(f"HAProxy cannot load the certificates of "
                                         f"{source}: {text}") from None
            finally:
                with contextlib.suppress(OSError):
                    probe.unlink()
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return str(target)

    def prune_certs(self, keep: set[str]) -> None:
        """Remove staged certificate copies that are not in `keep` and not named by the
        config file or its last good copy (HAProxy may reload either)."""
        if not self.certs_root.is_dir():
            return
        used = b"".join(_read(p) or b"" for p in (self.config_path, self.last_good_path))
        for d in self.certs_root.iterdir():
            if not _DIGEST_RE.match(d.name) or str(d) in keep or str(d).encode() in used:
                continue
            shutil.rmtree(d, ignore_errors=True)

    def dump_server_state(self) -> None:
        """Write the current worker's server states (weights, maint/drain) to the
        server-state file, which the next worker loads at start."""
        with self._lock:
            text = self.worker_command("show servers state")
            if not text.startswith("1\n"):
                raise HaproxyError(f"unexpected `show servers state` output: {text[:200]!r}")
            body = "\n".join(ln for ln in text.splitlines() if ln.strip()) + "\n"
            atomic_write(self.server_state_path, body.encode())


__all__ = [
    "ADMIN_SOCKET",
    "CANARY_MAP_FILE",
    "CANARY_WEIGHT_MAP_FILE",
    "MAP_FILE",
    "SERVER_STATES",
    "SERVER_STATE_FILE",
    "ApplyResult",
    "BackendCounters",
    "HaproxyProcess",
    "ProcInfo",
    "WorkerInfo",
    "atomic_write",
    "parse_map",
    "parse_show_proc",
    "parse_show_stat",
]
