"""TLS certificates of the proxy: each service's `tls.certs` directory, validated.

Owns the substitution of a service's certificate directory (a path on the host, named in
its config) by the validated copy the adapter staged (`HaproxyProcess.stage_certs`), and
the verdict for services whose certificates HAProxy cannot load: they are named with the
reason, and the controller keeps them at their last loaded definition (the running
config stays as it was for them; nothing else is held up). Certificates are read from
the host only, never from KV.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from reconciler.errors import CertificateInvalid
from reconciler.proxy.view import ProxyView


def stage_all(view: ProxyView, stage: Callable[[str], str]
              ) -> tuple[ProxyView, dict[str, str]]:
    """`view` with every `tls_certs` replaced by `stage(dir)`, and {service: reason} for
    the services whose directory failed (left as they were in the returned view). One
    directory is staged once, even when several services share its bind."""
    staged: dict[str, str] = {}
    failed: dict[str, str] = {}
    for svc in view.services:
        src = svc.tls_certs
        if src is None or src in staged or src in failed:
            continue
        try:
            staged[src] = stage(src)
        except CertificateInvalid as e:
            failed[src] = str(e)
    services = tuple(replace(s, tls_certs=staged[s.tls_certs])
                     if s.tls_certs in staged else s for s in view.services)
    bad = {s.name: failed[s.tls_certs] for s in view.services if s.tls_certs in failed}
    return replace(view, services=services), bad
