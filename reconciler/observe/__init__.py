"""Observability: what the daemon tells the outside about itself.

One module per concern: `metrics` (the Prometheus registry and every series name — the
only module importing prometheus_client), `health` (the liveness and readiness checks,
pure and table-tested), `server` (the HTTP endpoint /livez, /readyz, /metrics), `logs`
(text or JSON log lines, and the key/container/network a line is about).

The parts of the daemon report through small hooks given to them at assembly
(reconciler.app): a `Metrics` object, facts the checks read. Nothing here reaches into
another part's internals, and nothing here is global.
"""
