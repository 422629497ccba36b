"""Adapters: one module per external system, the only place that imports its client library.

consul_kv (py-consul), docker_engine (docker), netlink (pyroute2), ovs (ovsdbapp),
haproxy (master socket + haproxy binary). Each translates its library's exceptions into
`reconciler.errors` and takes/returns plain values, never model objects.
"""
