"""Members from labels: local containers publish themselves as pool members.

Owns the mapping from a running container's labels (`reconciler.service`,
`reconciler.pool`, `reconciler.port`, optional `reconciler.network` and
`reconciler.weight`) to a member key `members/<s>/<p>/<node>_<container>` (daemon-owned,
apart from the user's `services/` so that the churn of every node's containers wakes no
host's desired state; a node writes the generation key of the service's bucket,
`index/member-buckets/<b>`, after changing a service's members, and hosts read the
services they serve whose bucket moved: issue 9), and their publication held by
this node's Consul session: a member disappears when its
container stops (the daemon deletes it) or when the node dies (the session is
invalidated, behavior=delete). A daemon restart that reuses its session (see
`status.StatusPublisher`) re-puts identical values, so members do not flap.

Address: the container's reconciled interface on `reconciler.network` (else its first
reconciled interface), else its Docker network address.

A container that runs but has not been reconciled yet by this run of the daemon (right
after a restart) has no known address: its key is passed to `MemberPublisher.sync` in
`keep` (see `member_key`), so what the previous run published stays as it is instead of
being withdrawn and re-published moments later (members flapped on every restart; found
by tests/integration/test_daemon_proxy.py).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from reconciler.errors import ConsulError
from reconciler.kvlayout import NAME_RE, Layout
from reconciler.model import WEIGHT_MAX, WEIGHT_MIN

log = logging.getLogger(__name__)

L_SERVICE, L_POOL, L_PORT = "reconciler.service", "reconciler.pool", "reconciler.port"
L_NETWORK, L_WEIGHT = "reconciler.network", "reconciler.weight"


@dataclass(frozen=True)
class Wanted:
    key: str
    value: bytes


def member_name(node: str, container: str) -> str:
    name = f"{node}_{container}"
    if NAME_RE.match(name):
        return name
    clean = "".join(c if c.isalnum() or c in "_.-" else "-" for c in name)
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{clean[:54]}-{digest}"


def member_key(prefix: str, node: str, container: Any) -> str | None:
    """The member key `container` publishes (valid service and pool labels), else None."""
    svc, pool = container.labels.get(L_SERVICE, ""), container.labels.get(L_POOL, "")
    if not (NAME_RE.match(svc) and NAME_RE.match(pool)):
        return None
    return Layout(prefix).published_member(svc, pool, member_name(node, container.name))


def wanted_members(prefix: str, node: str, containers: Iterable[Any],
                   addresses: Mapping[str, Mapping[str, str]]) -> tuple[dict[str, Wanted],
                                                                         dict[str, str]]:
    """(key -> Wanted, container name -> error) for running containers with labels.

    `addresses`: container id -> {network name -> "ip/prefix"} of reconciled interfaces,
    in interface order."""
    layout = Layout(prefix)
    out: dict[str, Wanted] = {}
    errors: dict[str, str] = {}
    for c in containers:
        labels = c.labels
        if not labels.get(L_SERVICE):
            continue
        svc, pool, port_s = labels.get(L_SERVICE, ""), labels.get(L_POOL, ""), \
            labels.get(L_PORT, "")
        bad = [f"{n}={v!r}" for n, v in ((L_SERVICE, svc), (L_POOL, pool))
               if not NAME_RE.match(v)]
        try:
            port = int(port_s)
            if not 1 <= port <= 65535:
                raise ValueError
        except ValueError:
            bad.append(f"{L_PORT}={port_s!r} (1-65535)")
            port = 0
        weight = 100
        if labels.get(L_WEIGHT):
            try:
                weight = int(labels[L_WEIGHT])
                if not WEIGHT_MIN <= weight <= WEIGHT_MAX:
                    raise ValueError
            except ValueError:
                bad.append(f"{L_WEIGHT}={labels[L_WEIGHT]!r} (0-256)")
        if bad:
            errors[c.name] = "invalid labels: " + ", ".join(bad)
            continue
        addr = _address(c, addresses.get(c.id), labels.get(L_NETWORK))
        if addr is None:
            errors[c.name] = ("no address to publish yet (no reconciled interface"
                              + (f" on {labels[L_NETWORK]!r}" if labels.get(L_NETWORK) else "")
                              + " and no Docker network address)")
            continue
        key = layout.published_member(svc, pool, member_name(node, c.name))
        value = json.dumps({"address": addr, "port": port, "weight": weight},
                           sort_keys=True, separators=(",", ":")).encode()
        out[key] = Wanted(key, value)
    return out, errors


def _address(c: Any, reconciled: Mapping[str, str] | None, network: str | None) -> str | None:
    """`reconciled` None: the container has no interfaces of ours (Docker's address is
    its address); a mapping, even empty: only interfaces of ours that are up count."""
    if reconciled is not None:
        for net, cidr in reconciled.items():
            if not network or net == network:
                return str(ipaddress.ip_interface(cidr).ip)
        if not network or not (c.networks and network in c.networks):
            return None  # the label names one of ours (not up), or none is named
    if network:
        ipv4, ipv6 = c.networks.get(network, (None, None)) if c.networks else (None, None)
        return ipv4 or ipv6
    for ipv4, ipv6 in (c.networks or {}).values():
        if ipv4 or ipv6:
            return str(ipv4 or ipv6)
    return None


class _Attached(Protocol):
    @property
    def addresses(self) -> Mapping[str, str]: ...


class _Itf(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def network(self) -> str: ...


def member_addresses(running: Iterable[Any], results: Mapping[str, _Attached],
                     wanted: Callable[[Any], Sequence[_Itf]]) -> dict[str, dict[str, str]]:
    """container id -> {network -> address/prefix} of its interfaces of ours that are up
    and right, in interface order. A container whose spec asks for interfaces is listed
    even with none: it is then not published (not with its Docker address either)."""
    out: dict[str, dict[str, str]] = {}
    for info in running:
        itfs = wanted(info)
        if not itfs:
            continue
        res = results.get(info.id)
        by_net: dict[str, str] = {}
        for itf in itfs:
            if res is not None and itf.name in res.addresses:
                by_net.setdefault(itf.network, res.addresses[itf.name])
        out[info.id] = by_net
    return out


class MemberSync:
    """This node's members: computed from its running containers and what is attached,
    published under the node's session."""

    def __init__(self, kv: Any, prefix: str, node: str) -> None:
        self.prefix = prefix
        self.node = node
        self.publisher = MemberPublisher(kv, prefix, node)
        self.session: str | None = None  # the session members were last published under

    def sync(self, session: str, running: Sequence[Any], results: Mapping[str, _Attached],
             wanted: Callable[[Any], Sequence[_Itf]]) -> tuple[list[str], dict[str, list[str]]]:
        """Publish what is wanted, withdraw the rest: (changes, problems by key)."""
        wanted_m, errs = wanted_members(self.prefix, self.node, running,
                                        member_addresses(running, results, wanted))
        # Running containers not reconciled yet by this run have no address yet: keep
        # what was published for them rather than withdraw it and publish it again.
        pending = {k for c in running if c.id not in results
                   and (k := member_key(self.prefix, self.node, c)) is not None}
        self.session = session
        changes = self.publisher.sync(session, wanted_m, keep=pending)
        problems = {f"container {name}": [msg] for name, msg in errs.items()}
        problems.update({k: [v] for k, v in self.publisher.errors.items()})
        return changes, problems


class MemberPublisher:
    """Puts wanted members under the node's session; deletes those no longer wanted."""

    def __init__(self, kv: Any, prefix: str, node: str) -> None:
        self.kv = kv
        self.prefix = prefix
        self.layout = Layout(prefix)
        self.node = node
        self.errors: dict[str, str] = {}
        self.published = 0  # members held under the session after the last sync (metrics)
        self._services: set[str] | None = None  # services published to (None: not known)

    def _current(self, session: str, wanted: Mapping[str, Wanted]) -> dict[str, Any]:
        """What Consul holds of the members this node may hold: under `members/<s>/` of
        the services it publishes to or did (all of `members/` the first time, and the
        members a daemon of an older version published under `services/`)."""
        if self._services is None:
            items = dict(self.kv.read_prefix(self.layout.members_prefix()).items)
            old = self.kv.read_prefix(self.layout.services_prefix()).items
            items.update({k: i for k, i in old.items()
                          if i.session == session and "/pools/" in k})
            return items
        items = {}
        for svc in sorted(self._services | {self._service_of(k) for k in wanted}):
            items.update(self.kv.read_prefix(self.layout.members_prefix(svc)).items)
        return items

    def _service_of(self, key: str) -> str:
        return key[len(self.layout.members_prefix()):].split("/", 1)[0]

    def _bump(self, services: set[str]) -> None:
        stamp = f"{self.node} {time.time_ns()}".encode()
        for key in sorted({self.layout.members_index(svc) for svc in services}):
            try:
                self.kv.put(key, stamp)
            except ConsulError as e:
                log.debug("cannot bump the members index %s: %s", key, e)

    def sync(self, session: str, wanted: Mapping[str, Wanted],
             keep: Collection[str] = ()) -> list[str]:
        """Make the published set equal `wanted`; return what changed.

        Keys in `keep` (containers not reconciled yet) are left as they are: neither
        published nor withdrawn."""
        current = self._current(session, wanted)
        mine = {k: i for k, i in current.items() if i.session == session}
        changes: list[str] = []
        touched: set[str] = set()
        held = 0
        for key, w in wanted.items():
            cur = current.get(key)
            if cur is not None and cur.value == w.value and cur.session == session:
                held += 1
                continue
            try:
                if self.kv.put(key, w.value, acquire=session):
                    changes.append(f"published {key[len(self.prefix):]}")
                    touched.add(self._service_of(key))
                    self.errors.pop(key, None)
                    held += 1
                else:
                    self.errors[key] = "held by another node's session"
            except ConsulError as e:
                self.errors[key] = str(e)
        # Errors are about members still wanted. A member refused once and then gone
        # with its container stayed here (a new name per container: one entry each for
        # as long as the daemon ran, and reported in the node's status; found by
        # tests/unit/test_churn.py).
        for key in [k for k in self.errors if k not in wanted]:
            del self.errors[key]
        for key in mine:
            if key not in wanted and key not in keep:
                self.kv.delete(key)
                changes.append(f"withdrew {key[len(self.prefix):]}")
                if key.startswith(self.layout.members_prefix()):
                    touched.add(self._service_of(key))
            elif key not in wanted:
                held += 1  # kept as it is for a container not reconciled yet
        self.published = held
        self._bump(touched)
        self._services = {self._service_of(k) for k in (*wanted, *mine)
                          if k.startswith(self.layout.members_prefix())}
        return changes
