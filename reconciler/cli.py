"""The `reconciler` command line: argument parsing, exit codes and human-readable output.

Exit status (the contract): 0 success, 1 the operation failed (Consul unreachable, token
refused, a write lost a race), 2 bad usage or invalid input. Errors are one line on
stderr, never a traceback, and never contain the Consul token.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from reconciler import model
from reconciler.errors import (
    CasConflict,
    ConfigurationError,
    ConsulError,
    CutoverRefused,
    Problem,
    ReconcilerError,
)
from reconciler.kvlayout import NAME_RE, kv_entries, normalize_prefix
from reconciler.observe import logs
from reconciler.observe.server import DEFAULT_LISTEN, parse_listen
from reconciler.settings import (
    NetworkSettings,
    ObserveSettings,
    ProxySettings,
    Settings,
    default_haproxy_user,
    default_node,
    default_ovs_db,
    default_workers,
    env_prefix,
    parse_log_target,
    parse_serve,
    parse_stats_bind,
    read_env_file,
    read_stats_auth,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("reconciler")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="reconciler",
        description="Keep container networking and HAProxy blue-green backends equal to the "
        "desired state in Consul KV.",
        epilog="Consul is reached as the consul CLI does: CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, "
        "CONSUL_HTTP_TOKEN_FILE, CONSUL_CACERT, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY, "
        "CONSUL_HTTP_SSL_VERIFY.",
    )
    p.add_argument("--prefix", default=None,
                   help="KV prefix (default: $RECONCILER_PREFIX or reconciler/)")
    p.add_argument("--log-level", default=os.environ.get("RECONCILER_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"], help="log verbosity")
    p.add_argument("--log-format", default=os.environ.get("RECONCILER_LOG_FORMAT", "text"),
                   choices=["text", "json"], help="log lines as text, or one JSON object "
                   "per line (default: $RECONCILER_LOG_FORMAT or text)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    v = sub.add_parser("validate", help="check a YAML/JSON state file and print every error",
                       description="Check a state file (networks, containers, services) "
                       "against every rule of the KV contract. Prints every error; exit 0 "
                       "when valid, 2 when not. Talks to nothing.")
    v.add_argument("-f", "--file", required=True, help="state file (.yaml, .yml or .json)")
    v.set_defaults(func=cmd_validate)

    a = sub.add_parser("apply", help="validate a state file, then write it to Consul",
                       description="Validate FILE and, only if every key is valid, write the "
                       "keys that differ to Consul in transactions (check-and-set, so a "
                       "concurrent writer makes it fail instead of being overwritten).")
    a.add_argument("-f", "--file", required=True, help="state file (.yaml, .yml or .json)")
    a.add_argument("--prune", action="store_true",
                   help="also delete user keys absent from the file (never daemon-owned keys "
                   "nor members published by nodes)")
    a.add_argument("--dry-run", action="store_true", help="print the changes, write nothing")
    a.set_defaults(func=cmd_apply)

    pl = sub.add_parser("plan", help="what `run --once` would change, changing nothing",
                        description="Read the whole prefix and print, per key, what is invalid "
                        "and why; exit 2 when anything is invalid.")
    _node_arg(pl)
    pl.add_argument("--keys-only", action="store_true",
                    help="only check the keys; do not look at this host's interfaces and "
                    "HAProxy")
    _daemon_args(pl)
    pl.set_defaults(func=cmd_plan)

    r = sub.add_parser("run", help="the daemon",
                       description="Watch Consul and Docker and keep this node's container "
                       "interfaces and HAProxy equal to the desired state.")
    _node_arg(r)
    r.add_argument("--once", action="store_true",
                   help="reconcile everything once and exit (1 if any key failed)")
    r.add_argument("--dry-run", action="store_true",
                   help="print what would change and exit, changing nothing (implies --once)")
    r.add_argument("--resync", type=_positive_float, default=_env_float("RECONCILER_RESYNC", 30),
                   metavar="SECONDS", help="full resync period (default 30)")
    r.add_argument("--workers", type=_positive_int, default=os.environ.get("RECONCILER_WORKERS"),
                   metavar="N", help="keys reconciled at once (default: $RECONCILER_WORKERS, "
                   "else one per CPU, at least 2 and at most 4)")
    r.add_argument("--listen", default=os.environ.get("RECONCILER_LISTEN", DEFAULT_LISTEN),
                   metavar="HOST:PORT", help="serve /livez, /readyz and /metrics here, or "
                   f"`off` (default: $RECONCILER_LISTEN or {DEFAULT_LISTEN})")
    r.add_argument("--unready-after", type=_positive_float,
                   default=_env_float("RECONCILER_UNREADY_AFTER", 60), metavar="SECONDS",
                   help="/readyz fails while a key has been failing for longer than this "
                   "(default 60)")
    # Also after `run` (`reconciler run --log-format json`), as a unit file would put it.
    r.add_argument("--log-format", default=argparse.SUPPRESS, choices=["text", "json"],
                   help="as before the command")
    _daemon_args(r)
    r.set_defaults(func=cmd_run)

    st = sub.add_parser("status", help="every node: last applied index, errors per key",
                        description="Print every node's status as a table.")
    st.add_argument("--json", action="store_true", help="print the raw status documents")
    st.set_defaults(func=cmd_status)

    c = sub.add_parser("cutover", help="switch a service's live pool",
                       description="Switch SERVICE's live pool to POOL: refuse unless the pool "
                       "exists and is healthy, switch `active` with check-and-set, record an "
                       "audit entry, and wait until every live node has applied it. A node "
                       "still lagging at the timeout is reported (exit 1); the switch stays.")
    c.add_argument("service", metavar="SERVICE")
    grp = c.add_mutually_exclusive_group(required=True)
    grp.add_argument("--to", metavar="POOL", help="the pool to make live")
    grp.add_argument("--rollback", action="store_true",
                     help="return to the pool before the last cutover (from the audit)")
    c.add_argument("--timeout", type=_positive_float, default=30.0, metavar="S",
                   help="seconds to wait for every node to apply it (default 30)")
    c.add_argument("--min-healthy", type=int, default=None, metavar="N",
                   help="members of the pool that must pass the health check "
                   "(default: all of them, and at least one)")
    c.add_argument("--dry-run", action="store_true", help="check and print, change nothing")
    c.add_argument("--steps", default=None, metavar="P1,P2,...,100",
                   help="progressive: move these percentages of new requests to POOL in "
                   "steps (e.g. 10,50,100), judging each by HAProxy's counters, and roll "
                   "back automatically; `active` switches after the last step")
    c.add_argument("--interval", default="30s", metavar="DURATION",
                   help="with --steps: how long each step is watched (default 30s)")
    c.add_argument("--max-error-rate", default="1%", metavar="RATE",
                   help="with --steps: roll back above this share of failed requests "
                   "(5xx, connection and response errors) of POOL (default 1%%)")
    c.set_defaults(func=cmd_cutover)

    rd = sub.add_parser("render", help="print the HAProxy config the daemon would write",
                        description="Render the HAProxy config from the desired state in "
                        "Consul exactly as the daemon would write it (or one service's part).")
    rd.add_argument("service", nargs="?", metavar="SERVICE")
    rd.add_argument("--templates", default=os.environ.get("RECONCILER_TEMPLATES"),
                    help="directory of user HAProxy templates")
    rd.add_argument("--state-dir", default=os.environ.get("RECONCILER_STATE_DIR",
                                                          "/var/lib/reconciler"),
                    help="the daemon's state directory (paths inside the config)")
    rd.set_defaults(func=cmd_render)
    return p


_Number = TypeVar("_Number", int, float)


def _positive(convert: Callable[[str], _Number], what: str) -> Callable[[str], _Number]:
    """An argparse type: `convert` of the text, which must be > 0."""
    def parse(v: str) -> _Number:
        try:
            n = convert(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {v!r}") from None
        if n <= 0:
            raise argparse.ArgumentTypeError("must be > 0")
        return n
    return parse


_positive_float = _positive(float, "a number")
_positive_int = _positive(int, "a whole number")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _node_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node", default=None,
                   help="this node's name (default: $RECONCILER_NODE or the host name)")


def _daemon_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--serve", default=os.environ.get("RECONCILER_SERVE"), metavar="PATTERNS",
                   help="the services this host's HAProxy serves: comma-separated names or "
                   "shell patterns (default: $RECONCILER_SERVE, else every service); the "
                   "members of the others are not read")
    p.add_argument("--advertise-addr", default=os.environ.get("RECONCILER_ADVERTISE_ADDR"),
                   help="this host's address for overlay tunnels (default: "
                   "$RECONCILER_ADVERTISE_ADDR, else the source address towards Consul)")
    p.add_argument("--ovs-db", default=None,
                   help="OVSDB connection (default: $RECONCILER_OVS_DB, else "
                   "unix:$OVS_RUNDIR/db.sock, else unix:/var/run/openvswitch/db.sock)")
    p.add_argument("--ovs-datapath", choices=["auto", "system", "netdev"],
                   default=os.environ.get("RECONCILER_OVS_DATAPATH", "auto"),
                   help="OVS bridge datapath type (auto: kernel if its module works, "
                   "else netdev)")
    p.add_argument("--state-dir", default=os.environ.get("RECONCILER_STATE_DIR",
                                                         "/var/lib/reconciler"),
                   help="where HAProxy's config, map and sockets live")
    p.add_argument("--templates", default=os.environ.get("RECONCILER_TEMPLATES"),
                   help="directory of user HAProxy templates")
    p.add_argument("--haproxy-master-socket", default=None,
                   help="drive an HAProxy run by someone else through this master socket")
    p.add_argument("--haproxy-config", default=None,
                   help="with --haproxy-master-socket: the config file it loads")
    p.add_argument("--haproxy-log", default=os.environ.get("RECONCILER_HAPROXY_LOG"),
                   metavar="TARGET",
                   help="HAProxy access logs (httplog/tcplog) to stdout (of HAProxy: "
                   "haproxy.log in the state dir), stderr, a syslog IP:port or a unix "
                   "socket path (default: $RECONCILER_HAPROXY_LOG, else none)")
    p.add_argument("--haproxy-stats", default=os.environ.get("RECONCILER_HAPROXY_STATS"),
                   metavar="HOST:PORT",
                   help="serve HAProxy's stats page and Prometheus /metrics here "
                   "(needs --haproxy-stats-auth)")
    p.add_argument("--haproxy-user", default=None, metavar="USER",
                   help="HAProxy's workers drop root to USER and its group (default: "
                   "$RECONCILER_HAPROXY_USER, else haproxy when that user exists; root: "
                   "keep root)")
    p.add_argument("--haproxy-stats-auth",
                   default=os.environ.get("RECONCILER_HAPROXY_STATS_AUTH"), metavar="FILE",
                   help="file holding one line user:password for the stats listener")


def settings_from(args: argparse.Namespace) -> Settings:
    node = args.node or default_node()
    if not NAME_RE.match(node):
        raise ConfigurationError(f"--node {node!r}: 1-63 characters of [A-Za-z0-9_.-]")
    if bool(getattr(args, "haproxy_master_socket", None)) != bool(
            getattr(args, "haproxy_config", None)):
        raise ConfigurationError("--haproxy-master-socket and --haproxy-config go together")
    stats = parse_stats_bind(getattr(args, "haproxy_stats", None))
    stats_auth = getattr(args, "haproxy_stats_auth", None) or None
    if stats is not None and stats_auth is None:
        raise ConfigurationError("--haproxy-stats needs --haproxy-stats-auth FILE "
                                 "(credentials are never optional)")
    if stats_auth is not None:
        read_stats_auth(stats_auth)  # refuse a bad file now, not at the first render
    return Settings(
        prefix=args.prefix, node=node, resync=getattr(args, "resync", 30.0),
        workers=getattr(args, "workers", None) or default_workers(),
        network=NetworkSettings(ovs_db=getattr(args, "ovs_db", None) or default_ovs_db(),
                                ovs_datapath=getattr(args, "ovs_datapath", "auto"),
                                advertise=_advertise(getattr(args, "advertise_addr", None))),
        proxy=ProxySettings(state_dir=getattr(args, "state_dir", "/var/lib/reconciler"),
                            templates_dir=getattr(args, "templates", None),
                            master_socket=getattr(args, "haproxy_master_socket", None),
                            config_path=getattr(args, "haproxy_config", None),
                            log_target=parse_log_target(getattr(args, "haproxy_log", None)),
                            stats_bind=stats, stats_auth_file=stats_auth,
                            run_as=_haproxy_user(getattr(args, "haproxy_user", None)),
                            serve=parse_serve(getattr(args, "serve", None))),
        observe=ObserveSettings(
            listen=parse_listen(getattr(args, "listen", "off")),
            unready_after=getattr(args, "unready_after", 60.0)),
    )


def _haproxy_user(value: str | None) -> str | None:
    if value is None:
        return default_haproxy_user()
    return None if value in ("", "root") else value


def _advertise(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ConfigurationError(f"--advertise-addr {value!r}: not an IPv4 address") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # SIGHUP parses it again
    args.from_sys_argv = argv is None  # the program itself, not a caller in-process
    if args.log_format not in ("text", "json"):  # from the environment: not checked yet
        parser.error(f"RECONCILER_LOG_FORMAT {args.log_format!r}: text or json")
    logs.configure(args.log_level, args.log_format)
    args.prefix = normalize_prefix(args.prefix) if args.prefix is not None \
        else env_prefix()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = func(args)
        sys.stdout.flush()  # a broken pipe shows here, not at the interpreter's exit
        return code
    except ConfigurationError as e:
        print(f"reconciler: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ReconcilerError as e:
        print(f"reconciler: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`reconciler plan | head -1`): no traceback,
        # and point stdout at /dev/null so the interpreter's final flush stays quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_FAILED
    except Exception as e:  # a bug of ours: one line for the user, the trace for us
        log.debug("unexpected error", exc_info=True)
        print(f"reconciler: unexpected error: {type(e).__name__}: {e} "
              "(--log-level debug shows where)", file=sys.stderr)
        return EXIT_FAILED


# ------------------------------------------------------------------ validate


def _print_problems(problems: Sequence[Problem]) -> None:
    for p in problems:
        print(f"error: {p}", file=sys.stderr)


def _load_file(path: str) -> tuple[list[model.RawEntry], model.DesiredState]:
    entries, file_problems = model.load_state_file(path)
    return entries, model.validate_entries(entries, file_problems)


def _summary(st: model.DesiredState) -> str:
    members = sum(len(m) for s in st.services.values() for m in s.pools.values())
    return (f"{len(st.networks)} networks, {len(st.containers)} containers, "
            f"{len(st.services)} services, {members} members")


def cmd_validate(args: argparse.Namespace) -> int:
    _, st = _load_file(args.file)
    if st.problems:
        _print_problems(st.problems)
        print(f"{args.file}: {len(st.problems)} error(s)", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.file}: valid ({_summary(st)})")
    return EXIT_OK


# ------------------------------------------------------------------ apply


def cmd_apply(args: argparse.Namespace) -> int:
    from reconciler import kvsync
    from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings, TxnOp

    entries, st = _load_file(args.file)
    if st.problems:
        _print_problems(st.problems)
        print(f"{args.file}: {len(st.problems)} error(s); nothing written", file=sys.stderr)
        return EXIT_USAGE
    kv = ConsulKV(ConsulSettings.from_env())
    snap = kv.read_prefix(args.prefix, consistent=True)
    current = {k: kvsync.CurrentKey(i.value, i.modify_index, i.session)
               for k, i in snap.items.items()}
    changes = kvsync.diff_kv(kvsync.desired_kv(entries, args.prefix), current,
                             args.prefix, args.prune)
    for c in changes:
        print({"create": "+", "update": "~", "delete": "-"}[c.op], c.key)
    if not changes:
        print("no changes")
        return EXIT_OK
    if args.dry_run:
        print(f"{len(changes)} change(s) (dry run: nothing written)")
        return EXIT_OK
    ops = [TxnOp.delete_cas(c.key, c.index) if c.op == "delete"
           else TxnOp.cas(c.key, c.value, c.index) for c in changes]
    try:
        kv.txn(ops)
    except CasConflict as e:
        print(f"reconciler: a key changed in Consul while applying; nothing after it was "
              f"written ({e}); run apply again", file=sys.stderr)
        return EXIT_FAILED
    print(f"applied {len(changes)} change(s) ({_summary(st)})")
    return EXIT_OK


# ------------------------------------------------------------------ plan


def read_state(prefix: str) -> tuple[int, model.DesiredState]:
    """Read the whole prefix with one query and parse it."""
    from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings

    kv = ConsulKV(ConsulSettings.from_env())
    snap = kv.read_prefix(prefix, consistent=True)
    return snap.index, model.parse_kv(prefix, kv_entries(snap.items.values()))


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        index, st = read_state(args.prefix)
    except ConsulError as e:
        print(f"reconciler: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"desired state at index {index}: {_summary(st)}")
    by_key: dict[str, list[Problem]] = {}
    for p in st.problems:
        by_key.setdefault(p.key, []).append(p)
    for key in sorted(by_key):
        print(f"invalid {key}")
        for p in by_key[key]:
            detail = str(p)[len(key):].lstrip(": ")
            print(f"    {detail}")
    if not args.keys_only:
        _plan_host(args)
    return EXIT_USAGE if st.problems else EXIT_OK


def _plan_host(args: argparse.Namespace) -> None:
    """The network and proxy actions `run --once` would take on this node."""
    from reconciler import app

    try:
        parts = app.build(settings_from(args), dry_run=True)
    except ReconcilerError as e:
        print(f"this host's plan is not available here: {e}")
        return
    try:
        parts.daemon.run_once()
    finally:
        parts.close()
    node = parts.daemon.opts.node
    for line in parts.netctl.planned or ["no changes"]:
        print(f"network ({node}): {line}")
    for line in getattr(parts.daemon.proxy, "planned", []):
        print(f"proxy ({node}): {line}")
    for line in getattr(parts.daemon.policy, "planned", []):
        print(f"policy ({node}): {line}")


# ------------------------------------------------------------------ run / status


def cmd_run(args: argparse.Namespace) -> int:
    from reconciler import app

    settings = settings_from(args)
    parts = app.build(settings, dry_run=args.dry_run)
    if args.once or args.dry_run:
        try:
            rc = parts.daemon.run_once()
        finally:
            parts.close()
        if args.dry_run:
            for line in parts.netctl.planned:
                print(f"network: {line}")
            if not parts.netctl.planned:
                print("network: no changes")
            proxy = parts.daemon.proxy
            for line in getattr(proxy, "planned", []):
                print(f"proxy: {line}")
            for line in getattr(parts.daemon.policy, "planned", []):
                print(f"policy: {line}")
        return rc
    log.info("reconciler %s starting on node %s (prefix %s)", _version(), settings.node,
             settings.prefix)
    argv = list(getattr(args, "argv", None) or [])

    def reload() -> Settings:
        # SIGHUP: the environment file again (systemd's EnvironmentFile is read only at
        # start), then the same command line over the new environment.
        env_file = os.environ.get("RECONCILER_ENV_FILE")
        if env_file:
            os.environ.update(read_env_file(env_file))
        new_args = build_parser().parse_args(argv)
        new_args.prefix = normalize_prefix(new_args.prefix) if new_args.prefix is not None \
            else env_prefix()
        new = settings_from(new_args)
        fixed = [name for name, old, now in (
            ("--node", settings.node, new.node), ("--prefix", settings.prefix, new.prefix),
            ("--resync", settings.resync, new.resync),
            ("--workers", settings.workers, new.workers),
            ("--state-dir", settings.proxy.state_dir, new.proxy.state_dir),
            ("--ovs-db", settings.network.ovs_db, new.network.ovs_db),
            ("--listen", settings.observe.listen, new.observe.listen)) if old != now]
        if fixed:
            log.warning("SIGHUP: %s changed: applies at the next start only",
                        ", ".join(fixed))
        logs.configure(new_args.log_level, new_args.log_format)
        return new

    rc = app.run_forever(parts, reload)
    if getattr(args, "from_sys_argv", False):
        # Stopped cleanly: what is left is the interpreter's teardown of every module's
        # objects, 0.4-0.7 s of CPU with nothing to write (measured, issue 10: SIGTERM ->
        # exit within 2 s). Only the logs and stdio need flushing.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reconciler")
    except PackageNotFoundError:
        return "dev"


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings
    from reconciler.progressive import describe
    from reconciler.status import format_table, read_statuses

    kv = ConsulKV(ConsulSettings.from_env())
    statuses = read_statuses(kv, args.prefix)
    if args.json:
        print(json.dumps(statuses, indent=2, sort_keys=True))
    else:
        print(format_table(statuses))
        for line in describe(kv, args.prefix):  # progressive cutovers, their steps
            print(line)
    return EXIT_OK


def cmd_cutover(args: argparse.Namespace) -> int:
    from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings
    from reconciler.cutover import Cutover

    if not NAME_RE.match(args.service) or (args.to and not NAME_RE.match(args.to)):
        print("reconciler cutover: SERVICE and POOL are 1-63 characters of [A-Za-z0-9_.-]",
              file=sys.stderr)
        return EXIT_USAGE
    kv = ConsulKV(ConsulSettings.from_env())
    if args.steps is not None:
        from reconciler.progressive import (
            Progressive,
            parse_duration,
            parse_rate,
            parse_steps,
        )

        if args.rollback or args.dry_run:
            raise ConfigurationError("--steps goes with --to (not --rollback, --dry-run)")
        steps, interval = parse_steps(args.steps), parse_duration(args.interval)
        rate = parse_rate(args.max_error_rate)
        try:
            return Progressive(kv, args.prefix, apply_timeout=args.timeout).run(
                args.service, args.to, steps, interval, rate, args.min_healthy)
        except (CutoverRefused, CasConflict) as e:
            print(f"reconciler cutover: {e}", file=sys.stderr)
            return EXIT_FAILED
    try:
        return Cutover(kv, args.prefix).run(
            args.service, args.to, timeout=args.timeout, min_healthy=args.min_healthy,
            rollback=args.rollback, dry_run=args.dry_run)
    except CutoverRefused as e:
        print(f"reconciler cutover: refused: {e}", file=sys.stderr)
        return EXIT_FAILED
    except CasConflict as e:
        print(f"reconciler cutover: {e}", file=sys.stderr)
        return EXIT_FAILED


def cmd_render(args: argparse.Namespace) -> int:
    from reconciler.proxy.controller import render_for_cli

    _, st = read_state(args.prefix)
    text, problems = render_for_cli(st, args.service, args.templates, args.state_dir)
    _print_problems(problems)
    sys.stdout.write(text)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
