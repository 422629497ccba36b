"""OVS adapter: bridges, VLAN-tagged access ports and internal ports through OVSDB.

Owns everything reconciler does to Open vSwitch and is the only module importing ovsdbapp.
One persistent OVSDB IDL connection (a local replica of the tables we use, kept current by
ovsdbapp's connection thread); writes are OVSDB transactions, never ``ovs-vsctl``
processes. Takes and returns plain values; raises only `reconciler.errors.OvsError`.

- Ownership: bridges and ports we create carry ``external_ids:reconciler-owner=reconciler``
  (Port *and* Interface, written in the same transaction that creates the port). Only owned
  rows are ever deleted, and `list_owned_ports` is what the orphan sweep reads.
- Batching: inside ``with ovs.transaction():`` every ensure/delete call joins one OVSDB
  transaction committed at the end of the block (ovsdbapp merges nested transactions per
  thread); the ensure calls then return what they *will* change, judged from the replica.
  A commit waits until ovs-vswitchd has applied it (``next_cfg``/``cur_cfg``), so ports have
  their ofport / internal ports their netdev when it returns.
- Notifications: `subscribe` registers a callback for Port/Interface row changes. Callbacks
  run on the connection thread: they must only enqueue work, never call this adapter.
- Datapath: ``auto`` picks ``system`` when the openvswitch kernel module is loaded, else
  ``netdev`` (the userspace datapath; internal ports then appear as tap devices).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ovs.json as ovs_json
from ovsdbapp.backend.ovs_idl import command as ovs_command
from ovsdbapp.backend.ovs_idl import connection as ovs_connection
from ovsdbapp.backend.ovs_idl import idlutils
from ovsdbapp.schema.open_vswitch import impl_idl

from reconciler.adapters.netlink import RecentNames
from reconciler.errors import OvsError

__all__ = [
    "DEFAULT_DB",
    "IFINDEX_KEY",
    "NODE_KEY",
    "OWNER",
    "OWNER_KEY",
    "NewPort",
    "OvsAdapter",
    "OwnedPort",
    "PortDatapath",
    "PortEvent",
    "detect_datapath",
]

log = logging.getLogger(__name__)

DEFAULT_DB = "unix:/var/run/openvswitch/db.sock"
OWNER_KEY = "reconciler-owner"
OWNER = "reconciler"
NODE_KEY = "reconciler-node"
IFINDEX_KEY = "reconciler-ifindex"
_MANAGED_PREFIX = "reconciler-"
"""external_ids keys with this prefix are ours: set exactly; other keys are left alone."""

# Only the columns the daemon decides on are replicated: the columns ovs-vswitchd writes
# itself (statistics, and ofport, ifindex, link_state, error for every port it opens or
# whose carrier changes) would otherwise stream in, each update parsed by the replica
# under the lock its readers share. `datapath_state` reads them on demand.
_COLUMNS: dict[str, list[str] | None] = {
    "Open_vSwitch": None,  # all: bridges, next_cfg, cur_cfg, datapath_types
    "Bridge": ["name", "ports", "datapath_type", "external_ids"],
    "Port": ["name", "interfaces", "tag", "external_ids"],
    "Interface": ["name", "type", "external_ids", "mtu_request"],
}
_DATAPATH_COLUMNS = ["name", "ofport", "error", "link_state", "ifindex"]


def detect_datapath() -> str:
    """``system`` if the openvswitch kernel module is loaded, else ``netdev``."""
    return "system" if os.path.isdir("/sys/module/openvswitch") else "netdev"


@dataclass(frozen=True)
class OwnedPort:
    """A port reconciler created, as it is in OVSDB now."""

    name: str
    bridge: str
    tag: int | None
    external_ids: Mapping[str, str] = field(hash=False)
    type: str = ""  # Interface type: "" (system/veth) or "internal"


@dataclass(frozen=True)
class PortDatapath:
    """How ovs-vswitchd has an interface open, as it last wrote it to OVSDB."""

    ofport: int | None = None  # None or -1: vswitchd could not open the netdev
    error: str | None = None  # Interface.error, e.g. "could not open network device"
    link_state: str | None = None  # "up"/"down" as vswitchd sees the netdev
    ifindex: int | None = None  # the netdev vswitchd has open (changes if it is recreated)


@dataclass(frozen=True)
class PortEvent:
    """A change to a Port or Interface row. kind: "create", "update" or "delete"."""

    kind: str
    table: str
    name: str
    external_ids: Mapping[str, str] = field(hash=False)

    @property
    def owned(self) -> bool:
        return self.external_ids.get(OWNER_KEY) == OWNER


# --------------------------------------------------------------------------- internals


def _opt(value: Any) -> Any | None:
    """An optional OVSDB column reads as [] or [x]."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _merge_ids(current: Mapping[str, str], wanted: Mapping[str, str]) -> dict[str, str]:
    """Foreign keys kept, our keys (``reconciler-*``) exactly `wanted`."""
    merged = {k: v for k, v in current.items() if not k.startswith(_MANAGED_PREFIX)}
    merged.update(wanted)
    return merged


class _Idl(ovs_connection.OvsdbIdl):  # type: ignore[misc]
    """The IDL replica, dispatching Port/Interface row changes to subscribers."""

    listeners: list[_Listener]
    cfg_changed: threading.Condition
    cfg_seq: int
    bridge_seq: int  # moves with every change of a Bridge row (its ports among them)
    own_deletes: RecentNames  # ports this adapter is deleting

    def cooperative_yield(self) -> None:
        """No yield per row update. ovsdbapp's `time.sleep(0)` (for green threads) runs
        while the connection lock is held: each one handed the GIL to a busy thread
        and waited up to a switch interval for it back, so applying the updates of a
        burst of new ports (500 containers: thousands of rows) kept every reader of
        the replica waiting on the lock for seconds (bench/attach.py, py-spy)."""

    def notify(self, event: str, row: Any, updates: Any = None) -> None:
        table = row._table.name
        if table == "Open_vSwitch":
            with self.cfg_changed:  # cur_cfg moved: ovs-vswitchd applied a transaction
                self.cfg_seq += 1
                self.cfg_changed.notify_all()
            return
        if table == "Bridge":
            self.bridge_seq += 1
            return
        if table not in ("Port", "Interface"):
            return
        # Only for someone who asked for this kind of change: reading a row's columns
        # converts them, and an attach of 500 containers brought thousands of row
        # changes nobody here wanted (the daemon wants the deletions of ports).
        wanted = [ls.callback for ls in self.listeners if ls.wants(event, table)]
        if not wanted:
            return
        try:
            name = str(row.name)
            ids = dict(row.external_ids)
        except AttributeError:  # a delete of a row whose columns were never seen
            return
        if event == "delete" and table == "Port" and self.own_deletes.take(name):
            return  # deleted by this adapter: not news to anyone here
        ev = PortEvent(event, table, name, ids)
        for callback in wanted:
            callback(ev)


@dataclass(frozen=True)
class _Listener:
    callback: Callable[[PortEvent], None]
    kinds: frozenset[str] | None
    tables: frozenset[str] | None

    def wants(self, kind: str, table: str) -> bool:
        return (self.kinds is None or kind in self.kinds) \
            and (self.tables is None or table in self.tables)


def _find(api: Any, table: str, name: str) -> Any | None:
    return idlutils.row_by_value(api.idl, table, "name", name, None)


# Port -> bridge, per replica, rebuilt when a Bridge row changed (the scan converts
# every bridge's port list to rows: per attached container that made a burst of N
# attachments O(N^2); keyed on any change of the replica, as before, it was rebuilt at
# almost every read while ovs-vswitchd filled in the new ports' Interface rows).
_PORT_BRIDGES: weakref.WeakKeyDictionary[Any, tuple[int, dict[Any, Any]]] = \
    weakref.WeakKeyDictionary()


def _port_bridges(api: Any) -> dict[Any, Any]:
    return {p.uuid: br for br in api.tables["Bridge"].rows.values() for p in br.ports}


def _bridge_of(api: Any, port: Any, *, replica: bool = False, txn: Any = None,
               ) -> Any | None:
    """The bridge holding `port`. `replica=True` (reads outside a transaction, under the
    connection lock): from the per-replica index. Inside transaction `txn`, whose
    pending changes that index does not know: from an index of that transaction, built
    at its first lookup (for commands that only delete ports: later ones see their
    bridges' port lists as the earlier ones left them); without either, by a scan."""
    if replica:
        idl = api.idl
        seq = getattr(idl, "bridge_seq", None)
        key = idl.change_seqno if seq is None else seq
        hit = _PORT_BRIDGES.get(idl)
        if hit is None or hit[0] != key:
            hit = (key, _port_bridges(api))
            _PORT_BRIDGES[idl] = hit
        return hit[1].get(port.uuid)
    if txn is not None:
        index = getattr(txn, "_reconciler_port_bridges", None)
        if index is None:
            index = _port_bridges(api)
            txn._reconciler_port_bridges = index
        return index.get(port.uuid)
    for br in api.tables["Bridge"].rows.values():
        if any(p.uuid == port.uuid for p in br.ports):
            return br
    return None


class _EnsureBridge(ovs_command.BaseCommand):  # type: ignore[misc]
    def __init__(self, api: Any, name: str, datapath_type: str, ids: dict[str, str]) -> None:
        super().__init__(api)
        self.name, self.datapath_type, self.ids = name, datapath_type, ids

    def run_idl(self, txn: Any) -> None:
        self.result = _ensure_bridge(self.api, txn, self.name, self.datapath_type, self.ids)


def _ensure_bridge(
    api: Any, txn: Any | None, name: str, datapath_type: str, ids: dict[str, str]
) -> bool:
    br = _find(api, "Bridge", name)
    if br is None:
        if txn is not None:
            iface = txn.insert(api.tables["Interface"])
            iface.name = name
            iface.type = "internal"
            port = txn.insert(api.tables["Port"])
            port.name = name
            port.interfaces = [iface]
            br = txn.insert(api.tables["Bridge"])
            br.name = name
            br.datapath_type = datapath_type
            br.external_ids = ids
            br.ports = [port]
            api._ovs.addvalue("bridges", br)
        return True
    if dict(br.external_ids).get(OWNER_KEY) != OWNER:
        return False  # someone else's bridge: use it as it is
    changed = False
    if br.datapath_type != datapath_type:
        changed = True
        if txn is not None:
            br.datapath_type = datapath_type
    merged = _merge_ids(dict(br.external_ids), ids)
    if merged != dict(br.external_ids):
        changed = True
        if txn is not None:
            br.external_ids = merged
    return changed


class _DeleteBridge(ovs_command.BaseCommand):  # type: ignore[misc]
    def __init__(self, api: Any, name: str) -> None:
        super().__init__(api)
        self.name = name

    def run_idl(self, txn: Any) -> None:
        br = _find(self.api, "Bridge", self.name)
        if br is None or dict(br.external_ids).get(OWNER_KEY) != OWNER:
            self.result = False
            return
        for port in br.ports:
            for iface in port.interfaces:
                iface.delete()
            port.delete()
        self.api._ovs.delvalue("bridges", br)
        br.delete()
        self.result = True


@dataclass(frozen=True)
class NewPort:
    """A port `OvsAdapter.add_ports` creates: host netdev `name` on `bridge`."""

    bridge: str
    name: str
    vlan: int | None
    external_ids: Mapping[str, str] = field(hash=False)
    ifindex: int | None = None


def _transact(db: str, ops: list[Any], timeout: float) -> list[Any]:
    """One OVSDB ``transact`` over a fresh connection to the server (``unix:PATH`` or
    ``tcp:HOST:PORT``)."""
    request = json.dumps({"method": "transact", "params": ["Open_vSwitch", *ops],
                          "id": 1}).encode()
    decoder = json.JSONDecoder()
    kind, _, where = db.partition(":")
    address: str | tuple[str, int]
    if kind == "unix":
        family, address = socket.AF_UNIX, where
    elif kind == "tcp" and ":" in where:
        host, _, port = where.rpartition(":")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        address = (host.strip("[]"), int(port))
    else:
        raise OvsError(f"OVSDB at {db!r}: only unix: and tcp: addresses are read directly")
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(request)
        buf = ""
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise OvsError("ovsdb-server closed the connection before answering")
            buf += chunk.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break  # not complete yet
                buf = buf.lstrip()[end:]
                if isinstance(msg, dict) and msg.get("id") == 1:
                    if msg.get("error"):
                        raise OvsError(f"ovsdb-server: {msg['error']}")
                    result = msg.get("result")
                    return list(result) if isinstance(result, list) else []
                # anything else (a notification) is not ours


@dataclass(frozen=True)
class _PortWanted:
    bridge: str
    name: str
    iface_type: str
    tag: int | None
    ids: dict[str, str] = field(hash=False)
    mtu: int | None = None


class _EnsurePort(ovs_command.BaseCommand):  # type: ignore[misc]
    def __init__(self, api: Any, wanted: _PortWanted) -> None:
        super().__init__(api)
        self.wanted = wanted

    def run_idl(self, txn: Any) -> None:
        self.result = _ensure_port(self.api, txn, self.wanted)


def _ensure_port(api: Any, txn: Any | None, w: _PortWanted) -> bool:
    """Compare (and with a `txn`, fix) one port. Returns whether anything differs."""
    br = _find(api, "Bridge", w.bridge)
    if br is None:
        raise OvsError(f"bridge {w.bridge} does not exist (port {w.name})")
    tag = [w.tag] if w.tag is not None else []
    port = _find(api, "Port", w.name)
    if port is None:
        if txn is not None:
            # Port and Interface rows complete with tag and ownership in one transaction,
            # so no observer ever sees an untagged or unowned port of ours.
            iface = txn.insert(api.tables["Interface"])
            iface.name = w.name
            iface.type = w.iface_type
            iface.external_ids = w.ids
            if w.mtu is not None:
                iface.mtu_request = [w.mtu]
            port = txn.insert(api.tables["Port"])
            port.name = w.name
            port.interfaces = [iface]
            port.tag = tag
            port.external_ids = w.ids
            br.addvalue("ports", port)
        return True
    changed = False
    owner = _bridge_of(api, port, replica=txn is None)
    if owner is None or owner.uuid != br.uuid:
        changed = True
        if txn is not None:
            if owner is not None:
                owner.delvalue("ports", port)
            br.addvalue("ports", port)
    if list(port.tag) != tag:
        changed = True
        if txn is not None:
            port.tag = tag
    merged = _merge_ids(dict(port.external_ids), w.ids)
    if merged != dict(port.external_ids):
        changed = True
        if txn is not None:
            port.external_ids = merged
    for iface in port.interfaces:
        if iface.type != w.iface_type:
            changed = True
            if txn is not None:
                iface.type = w.iface_type
        merged = _merge_ids(dict(iface.external_ids), w.ids)
        if merged != dict(iface.external_ids):
            changed = True
            if txn is not None:
                iface.external_ids = merged
        if w.mtu is not None and _opt(iface.mtu_request) != w.mtu:
            changed = True
            if txn is not None:
                iface.mtu_request = [w.mtu]
    return changed


class _DeletePort(ovs_command.BaseCommand):  # type: ignore[misc]
    def __init__(self, api: Any, name: str) -> None:
        super().__init__(api)
        self.name = name

    def run_idl(self, txn: Any) -> None:
        port = _find(self.api, "Port", self.name)
        if port is None or dict(port.external_ids).get(OWNER_KEY) != OWNER:
            self.result = False
            return
        # Many deletions share one transaction (the port batch, the sweep): one scan of
        # the bridges for all of them, not one each (O(N^2) for N ports).
        br = _bridge_of(self.api, port, txn=txn)
        if br is not None:
            br.delvalue("ports", port)
        for iface in port.interfaces:
            iface.delete()
        port.delete()
        self.result = True


@contextlib.contextmanager
def _translate(what: str) -> Iterator[None]:
    try:
        yield
    except OvsError:
        raise
    except Exception as exc:  # ovsdbapp raises RuntimeError, its own and ovs.* errors
        raise OvsError(f"{what}: {exc}") from exc


# --------------------------------------------------------------------------- adapter


class OvsAdapter:
    """A persistent OVSDB connection with reconciler's bridge and port operations."""

    def __init__(self, db: str = DEFAULT_DB, datapath: str = "auto", timeout: float = 10.0) -> None:
        if datapath not in ("auto", "system", "netdev"):
            raise OvsError(f"datapath must be auto, system or netdev (got {datapath!r})")
        self.db = db
        self.timeout = timeout
        if ovs_json.PARSER != ovs_json.PARSER_C:
            # Every OVSDB update is then lexed in Python: ~10x the CPU (scripts/deps.sh
            # links Debian's C parser in).
            log.warning("OVSDB JSON parser is pure Python (ovs._json missing): slow")
        self.datapath = detect_datapath() if datapath == "auto" else datapath
        with _translate(f"connect to OVSDB at {db}"):
            helper = idlutils.get_schema_helper(db, "Open_vSwitch")
            for table, columns in _COLUMNS.items():
                if columns is None:
                    helper.register_table(table)
                else:
                    helper.register_columns(table, columns)
            self._idl = _Idl(db, helper)
            self._idl.listeners = []
            self._idl.cfg_changed = threading.Condition()
            self._idl.cfg_seq = 0
            self._idl.bridge_seq = 0
            self._idl.own_deletes = RecentNames()
            self._conn = ovs_connection.Connection(self._idl, timeout=int(timeout))
            # ovsdbapp keeps the connection as a *class* attribute of the API class:
            # a fresh subclass per adapter keeps adapters (and test instances) apart.
            api_cls = type("_ReconcilerOvsApi", (impl_idl.OvsdbIdl,), {})
            self._api: Any = api_cls(self._conn)
        self._local = threading.local()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.stop(timeout=5)

    def __enter__(self) -> OvsAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- plumbing

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Batch every ensure/delete call in the block into one OVSDB transaction."""
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        try:
            with (
                _translate("OVSDB transaction"),
                self._api.transaction(check_error=True, log_errors=False) as txn,
            ):
                self._local.txn = txn
                yield
        finally:
            self._local.depth = depth
            if depth == 0:
                self._local.txn = None

    def _in_batch(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    def _run(self, cmd: Any, what: str) -> Any:
        with _translate(what):
            return cmd.execute(check_error=True, log_errors=False)

    def _preview(self, fn: Callable[[], bool]) -> bool:
        """What a batched command will change, judged from the replica before the commit.

        A row created earlier in the same batch (e.g. the bridge) is not in the replica
        yet: the command itself checks again inside the transaction.
        """
        with self._conn.lock:
            try:
                return fn()
            except OvsError:
                return True

    @contextlib.contextmanager
    def _read(self, what: str) -> Iterator[Any]:
        with _translate(what), self._conn.lock:
            yield self._api

    def subscribe(self, callback: Callable[[PortEvent], None], *,
                  kinds: Collection[str] | None = None,
                  tables: Collection[str] | None = None) -> Callable[[], None]:
        """Call `callback` on every Port/Interface row change (of `kinds`: "create",
        "update", "delete"; in `tables`: "Port", "Interface"; None: all); returns an
        unsubscribe."""
        listener = _Listener(callback, None if kinds is None else frozenset(kinds),
                             None if tables is None else frozenset(tables))
        self._idl.listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._idl.listeners.remove(listener)

        return unsubscribe

    # ---------------------------------------------------------------- bridges

    def ensure_bridge(
        self,
        name: str,
        datapath_type: str | None = None,
        external_ids: Mapping[str, str] | None = None,
    ) -> bool:
        """Create bridge `name` (owned) if missing; fix datapath/ids if ours. Changed?"""
        ids = {**(external_ids or {}), OWNER_KEY: OWNER}
        dp = datapath_type or self.datapath
        cmd = _EnsureBridge(self._api, name, dp, ids)
        if self._in_batch():
            with _translate(f"ensure bridge {name}"):
                self._local.txn.add(cmd)
                return self._preview(lambda: _ensure_bridge(self._api, None, name, dp, ids))
        return bool(self._run(cmd, f"ensure bridge {name}"))

    def delete_bridge(self, name: str) -> bool:
        """Delete bridge `name` with its ports, only if reconciler owns it."""
        cmd = _DeleteBridge(self._api, name)
        if self._in_batch():
            self._local.txn.add(cmd)
            return self.bridge_owned(name)
        return bool(self._run(cmd, f"delete bridge {name}"))

    def bridge_exists(self, name: str) -> bool:
        with self._read(f"read bridge {name}") as api:
            return _find(api, "Bridge", name) is not None

    def port_exists(self, name: str) -> bool:
        with self._read(f"read port {name}") as api:
            return _find(api, "Port", name) is not None

    def bridge_owned(self, name: str) -> bool:
        with self._read(f"read bridge {name}") as api:
            br = _find(api, "Bridge", name)
            return br is not None and dict(br.external_ids).get(OWNER_KEY) == OWNER

    def list_owned_bridges(self, node: str | None = None) -> list[str]:
        """Bridges reconciler created (with `node`: that node's daemon created)."""
        with self._read("list bridges") as api:
            return sorted(
                str(br.name)
                for br in api.tables["Bridge"].rows.values()
                if dict(br.external_ids).get(OWNER_KEY) == OWNER
                and (node is None or dict(br.external_ids).get(NODE_KEY) == node)
            )

    def bridge_port_names(self, name: str) -> list[str]:
        """The ports of bridge `name`, but its own local port; [] if it does not exist."""
        with self._read(f"list ports of {name}") as api:
            br = _find(api, "Bridge", name)
            return [] if br is None else sorted(
                str(p.name) for p in br.ports if str(p.name) != name)

    # ---------------------------------------------------------------- ports

    def ensure_port(
        self,
        bridge: str,
        port_name: str,
        vlan: int | None,
        external_ids: Mapping[str, str],
        ifindex: int | None = None,
    ) -> bool:
        """Attach existing netdev `port_name` to `bridge` as an access port of `vlan`.

        `ifindex` is the netdev's current host ifindex. It is recorded in external_ids
        (``reconciler-ifindex``); when it differs from the recorded one the netdev was
        recreated under the same name, and the port is deleted (in a transaction of its
        own) and added again, because the userspace datapath keeps reading the dead
        device otherwise. After a True result, announce the container (gratuitous ARP):
        neighbours still hold the old MAC.
        """
        ids = self._ids(external_ids)
        if ifindex is not None:
            ids[IFINDEX_KEY] = str(ifindex)
            if self._recorded_ifindex(port_name) not in (None, str(ifindex)):
                with _translate(f"re-create port {port_name}"):
                    txn: Any
                    with self._api.transaction(
                        check_error=True, log_errors=False, nested=False
                    ) as txn:
                        txn.add(_DeletePort(self._api, port_name))
        return self._ensure_port(_PortWanted(bridge, port_name, "", vlan, ids))

    def add_ports(self, ports: Sequence[NewPort]) -> bool:
        """Create many ports at once: ONE transaction sent straight to ovsdb-server, then
        wait until ovs-vswitchd applied it (its ``cur_cfg`` reaches our ``next_cfg``).

        Only for ports that do not exist yet, on bridges that do (per the replica); the
        rows are those `ensure_port` would write (Port and Interface with tag and
        external_ids, one transaction). Building a transaction through the Python IDL
        cost ~4 ms of CPU per port (bench/attach.py: 200 replicas scaled out), this ~20 µs.
        Returns False, having changed nothing, when it cannot apply (a port exists by
        now, a bridge is gone, the database is not a local socket): use `ensure_port`.
        """
        if not ports:
            return True
        if not self.db.startswith("unix:"):
            return False
        with self._read("check new ports") as api:
            bridges = {p.bridge for p in ports}
            if any(_find(api, "Bridge", b) is None for b in bridges) \
                    or any(_find(api, "Port", p.name) is not None for p in ports):
                return False
        ops: list[Any] = []
        members: dict[str, list[Any]] = {}
        for i, p in enumerate(ports):
            if p.vlan is not None and not 0 <= p.vlan <= 4095:
                raise OvsError(f"port {p.name}: vlan {p.vlan} out of range")
            ids = self._ids(p.external_ids)
            if p.ifindex is not None:
                ids[IFINDEX_KEY] = str(p.ifindex)
            idmap = ["map", sorted(ids.items())]
            ops.append({"op": "insert", "table": "Interface", "uuid-name": f"i{i}",
                        "row": {"name": p.name, "type": "", "external_ids": idmap}})
            ops.append({"op": "insert", "table": "Port", "uuid-name": f"p{i}",
                        "row": {"name": p.name, "interfaces": ["named-uuid", f"i{i}"],
                                "tag": p.vlan if p.vlan is not None else ["set", []],
                                "external_ids": idmap}})
            members.setdefault(p.bridge, []).append(["named-uuid", f"p{i}"])
        for bridge, uuids in members.items():
            ops.append({"op": "mutate", "table": "Bridge", "where": [["name", "==", bridge]],
                        "mutations": [["ports", "insert", ["set", uuids]]]})
        ops.append({"op": "mutate", "table": "Open_vSwitch", "where": [],
                    "mutations": [["next_cfg", "+=", 1]]})
        ops.append({"op": "select", "table": "Open_vSwitch", "where": [],
                    "columns": ["next_cfg"]})
        with _translate(f"add {len(ports)} port(s)"):
            results = _transact(self.db, ops, self.timeout)
        bad = [r for r in results if not isinstance(r, dict) or "error" in r]
        if bad or len(results) < len(ops):
            # e.g. a port of that name created meanwhile: nothing was applied.
            return False
        mutated = [r.get("count") for r in results[2 * len(ports):-2]]
        if any(c != 1 for c in mutated):
            return False  # cannot be: the bridge was there; the transaction stands
        rows = results[-1].get("rows") or [{}]
        target = int(rows[0].get("next_cfg", 0))
        self._wait_cfg(target)
        return True

    def _wait_cfg(self, target: int) -> None:
        """Wait until ovs-vswitchd reports ``cur_cfg >= target`` (as the replica sees it)."""
        deadline = time.monotonic() + self.timeout
        idl = self._idl
        while True:
            seen = idl.cfg_seq  # before reading: a change after the read is not missed
            with self._conn.lock:  # never while holding cfg_changed (notify takes both)
                rows = list(self._api.tables["Open_vSwitch"].rows.values())
                cur = int(rows[0].cur_cfg) if rows else 0
            if cur >= target:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise OvsError(f"ovs-vswitchd did not apply the port transaction within "
                               f"{self.timeout:g}s (cur_cfg {cur} < {target})")
            with idl.cfg_changed:
                if idl.cfg_seq == seen:
                    idl.cfg_changed.wait(left)

    def port_differs(self, bridge: str, port_name: str, vlan: int | None,
                     external_ids: Mapping[str, str], ifindex: int | None = None) -> bool:
        """Whether `ensure_port` with these arguments would change anything (read-only,
        from the local replica: no round trip)."""
        ids = self._ids(external_ids)
        if ifindex is not None:
            ids[IFINDEX_KEY] = str(ifindex)
            if self._recorded_ifindex(port_name) not in (None, str(ifindex)):
                return True
        wanted = _PortWanted(bridge, port_name, "", vlan, ids)
        return self._preview(lambda: _ensure_port(self._api, None, wanted))

    def _recorded_ifindex(self, name: str) -> str | None:
        with self._read(f"read port {name}") as api:
            port = _find(api, "Port", name)
            if port is None:
                return None
            value = dict(port.external_ids).get(IFINDEX_KEY)
            return None if value is None else str(value)

    def ensure_internal_port(
        self,
        bridge: str,
        name: str,
        vlan: int | None,
        external_ids: Mapping[str, str],
        mtu: int | None = None,
    ) -> bool:
        """An internal port (a host netdev on the bridge), e.g. for a network's gateway."""
        return self._ensure_port(
            _PortWanted(bridge, name, "internal", vlan, self._ids(external_ids), mtu)
        )

    @staticmethod
    def _ids(external_ids: Mapping[str, str]) -> dict[str, str]:
        return {**external_ids, OWNER_KEY: OWNER}

    def _ensure_port(self, wanted: _PortWanted) -> bool:
        if wanted.tag is not None and not 0 <= wanted.tag <= 4095:
            raise OvsError(f"port {wanted.name}: vlan {wanted.tag} out of range")
        cmd = _EnsurePort(self._api, wanted)
        what = f"ensure port {wanted.name} on {wanted.bridge}"
        if self._in_batch():
            with _translate(what):
                self._local.txn.add(cmd)
                return self._preview(lambda: _ensure_port(self._api, None, wanted))
        return bool(self._run(cmd, what))

    def delete_port(self, name: str) -> bool:
        """Delete port `name` if reconciler owns it; False if absent or not ours."""
        cmd = _DeletePort(self._api, name)
        self._idl.own_deletes.add(name)
        if self._in_batch():
            self._local.txn.add(cmd)
            return self.get_port(name) is not None
        return bool(self._run(cmd, f"delete port {name}"))

    def delete_ports(self, names: Iterable[str]) -> list[str]:
        """Delete the ports of `names` that reconciler owns, in ONE transaction sent
        straight to ovsdb-server; the names deleted.

        Unlike every other commit it does not wait for ovs-vswitchd: the rows are gone
        when it returns, and vswitchd closes each port's packet socket afterwards, one
        RCU grace period each (~13 ms here, one after the other: 6.5 s for 500 ports).
        Nothing waits on that but the next commit that does wait. Ports absent or not
        ours are skipped; without a local socket it falls back to a batched
        `delete_port` transaction (which waits)."""
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return []
        if not self.db.startswith("unix:"):
            with self.transaction():
                return [n for n in wanted if self.delete_port(n)]
        by_bridge: dict[str, list[str]] = {}
        done: list[str] = []
        with self._read("find ports to delete") as api:
            for name in wanted:
                port = _find(api, "Port", name)
                if port is None or dict(port.external_ids).get(OWNER_KEY) != OWNER:
                    continue
                br = _bridge_of(api, port, replica=True)
                if br is None:
                    continue
                by_bridge.setdefault(str(br.uuid), []).append(str(port.uuid))
                done.append(name)
        if not done:
            return []
        # Port and Interface rows are not roots: unreferenced, ovsdb-server drops them.
        ops: list[Any] = [
            {"op": "mutate", "table": "Bridge", "where": [["_uuid", "==", ["uuid", br]]],
             "mutations": [["ports", "delete", ["set", [["uuid", u] for u in ports]]]]}
            for br, ports in by_bridge.items()]
        for name in done:
            self._idl.own_deletes.add(name)
        with _translate(f"delete {len(done)} port(s)"):
            results = _transact(self.db, ops, self.timeout)
        bad = [r for r in results if not isinstance(r, dict) or "error" in r]
        if bad:
            raise OvsError(f"delete {len(done)} port(s): {bad[0]}")
        self._wait_replica_without(done)
        return done

    def _wait_replica_without(self, names: list[str]) -> None:
        """Wait (`timeout` at most) until the replica no longer holds ports `names`: the
        transaction above bypassed it, and a reader right after (the sweep asking
        whether a bridge is empty) would otherwise see the rows and keep the bridge
        (test_demo: a one-pass `run --once` left the demo's bridge)."""
        deadline = time.monotonic() + self.timeout
        pause = threading.Event()
        while True:
            with self._read("check deleted ports") as api:
                left = [n for n in names if _find(api, "Port", n) is not None]
            if not left or time.monotonic() > deadline:
                return
            pause.wait(0.002)  # the IDL thread applies ovsdb-server's update in ms

    def get_port(self, name: str) -> OwnedPort | None:
        """Port `name` if it exists and reconciler owns it."""
        with self._read(f"read port {name}") as api:
            port = _find(api, "Port", name)
            if port is None or dict(port.external_ids).get(OWNER_KEY) != OWNER:
                return None
            br = _bridge_of(api, port, replica=True)
            return _owned_port(port, "" if br is None else str(br.name))

    def list_owned_ports(self, owner: str = OWNER, node: str | None = None) -> list[OwnedPort]:
        """Ports whose external_ids say `owner` (and `node`, when given), on any bridge."""
        out: list[OwnedPort] = []
        with self._read("list ports") as api:
            for br in api.tables["Bridge"].rows.values():
                for port in br.ports:
                    ids = dict(port.external_ids)
                    if ids.get(OWNER_KEY) != owner:
                        continue
                    if node is not None and ids.get(NODE_KEY) != node:
                        continue
                    out.append(_owned_port(port, str(br.name)))
        return sorted(out, key=lambda p: p.name)

    def datapath_state(self, names: Collection[str]) -> dict[str, PortDatapath]:
        """How ovs-vswitchd has the interfaces `names` open (ofport, error, link state,
        ifindex), read from ovsdb-server now: the replica leaves these columns out. An
        interface without a row is absent from the result."""
        wanted = set(names)
        if not wanted:
            return {}
        with _translate(f"read the datapath state of {len(wanted)} interface(s)"):
            results = _transact(self.db, [{"op": "select", "table": "Interface", "where": [],
                                           "columns": _DATAPATH_COLUMNS}], self.timeout)
        rows = results[0].get("rows", []) if results and isinstance(results[0], dict) else []
        out: dict[str, PortDatapath] = {}
        for row in rows:
            name = row.get("name")
            if name in wanted:
                out[name] = PortDatapath(
                    ofport=_json_opt(row.get("ofport")), error=_json_opt(row.get("error")),
                    link_state=_json_opt(row.get("link_state")),
                    ifindex=_json_opt(row.get("ifindex")))
        return out


def _json_opt(value: Any) -> Any | None:
    """An optional column as OVSDB's JSON gives it: ``["set", []]`` or the value."""
    if isinstance(value, list) and value[:1] == ["set"]:
        items = value[1] if len(value) > 1 else []
        return items[0] if items else None
    return value


def _owned_port(port: Any, bridge: str) -> OwnedPort:
    iface = port.interfaces[0] if port.interfaces else None
    return OwnedPort(
        name=str(port.name),
        bridge=bridge,
        tag=_opt(port.tag),
        external_ids=dict(port.external_ids),
        type="" if iface is None else str(iface.type),
    )
