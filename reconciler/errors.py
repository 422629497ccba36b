"""The exception hierarchy of reconciler; errors of underlying libraries are translated here.

    ReconcilerError
    ├── ValidationError            desired state that can never apply (terminal; not retried)
    │                              carries a list of `Problem` (key, field, value, reason)
    ├── AdapterError               an external system failed (temporary; retried with backoff)
    │   ├── ConsulError
    │   │   ├── ConsulUnavailable  agent cannot be reached
    │   │   ├── ConsulAuthError    token missing/refused (403)
    │   │   └── CasConflict        a check-and-set lost the race
    │   ├── DockerError
    │   ├── NetlinkError
    │   ├── OvsError
    │   ├── FirewallError          iptables/ip6tables failed (bridge forwarding rules)
    │   └── HaproxyError
    │       ├── ConfigInvalid      `haproxy -c` refused a rendered config
    │       │   └── CertificateInvalid  a TLS certificate directory HAProxy cannot load
    │       └── ReloadFailed       the master reported a failed reload
    ├── PoolExhausted              every address of a network's pool is taken (retried)
    ├── CutoverRefused             `reconciler cutover` refused before changing anything
    └── ConfigurationError         bad command-line / environment settings

Adapters (the only modules importing a client library) raise these and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Problem:
    """One validation finding: where it is (KV key or file location), which field, why."""

    key: str
    field: str
    reason: str
    value: str = ""

    def __str__(self) -> str:
        where = f"{self.key}: {self.field}" if self.field else self.key
        text = f"{where}: {self.reason} (got {self.value})" if self.value \
            else f"{where}: {self.reason}"
        return _printable(text)


def _printable(text: str) -> str:
    """Escape control characters: keys and fields come from untrusted input, and a
    message must never forge a second log line."""
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


class ReconcilerError(Exception):
    """Base of every error reconciler raises on purpose."""


class ValidationError(ReconcilerError):
    """Input that can never be applied as it is. Terminal: reported, not retried."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("; ".join(str(p) for p in self.problems) or "invalid input")


class ConfigurationError(ReconcilerError):
    """Bad command-line options, environment variables or settings."""


class PoolExhausted(ReconcilerError):
    """Every address of a network's pool is taken. Reported for the container, retried
    later (an address may be released)."""


class AddressConflict(ReconcilerError):
    """A static address is held by another container (on this or another node)."""


class ContainerError(ReconcilerError):
    """Some interfaces of a container could not be made right (temporary: retried)."""


class CutoverRefused(ReconcilerError):
    """The cutover was refused before anything changed."""


class AdapterError(ReconcilerError):
    """An external system failed; usually temporary and retried with backoff."""


class ConsulError(AdapterError):
    """Consul answered with an error."""


class ConsulUnavailable(ConsulError):
    """The Consul agent could not be reached."""


class ConsulAuthError(ConsulError):
    """Consul refused the request's token (HTTP 403), or no token was given under ACLs."""


class CasConflict(ConsulError):
    """A check-and-set write lost to a concurrent writer."""


class DockerError(AdapterError):
    """The Docker engine failed or could not be reached."""


class NetlinkError(AdapterError):
    """A netlink operation failed."""


class OvsError(AdapterError):
    """An OVSDB operation failed."""


class FirewallError(AdapterError):
    """An iptables/ip6tables command failed, or the tool is missing."""


class HaproxyError(AdapterError):
    """HAProxy could not be driven as asked."""


class ConfigInvalid(HaproxyError):
    """`haproxy -c` refused a rendered configuration."""


class CertificateInvalid(ConfigInvalid):
    """A `tls.certs` directory is missing, empty, or holds a PEM file HAProxy refuses."""


class ReloadFailed(HaproxyError):
    """The HAProxy master reported that a reload did not produce a new worker."""
