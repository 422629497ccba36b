#!/usr/bin/env bash
# Stop what scripts/services.sh started (and only that), as recorded in its state
# directory: the Consul agent and dockerd by pid file, OVS by its marker file.
# Services that were already running before `make services` are left alone.
# The blackhole routes services.sh installs stay: they are harmless (any more specific
# route wins), `ip route replace` re-installs them idempotently, and a test run that is
# still using the ranges must not start leaking them through the default route.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/services-lib.sh
. scripts/services-lib.sh

[ -d "$STATE_DIR" ] || { log services "nothing recorded in $STATE_DIR"; exit 0; }
exec 9>"$STATE_DIR/lock"
flock -w 300 9 || die services "another 'make services' holds $STATE_DIR/lock"

pid_gone() { ! pid_is "$1" "$2"; }

# stop_tracked SERVICE PROGRAM TIMEOUT
stop_tracked() {
  local pid
  if ! pid=$(tracked_pid "$1" "$2"); then
    log "$1" "not started by make services (or already gone)"
    return 0
  fi
  log "$1" "stopping pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_until "$3" pid_gone "$pid" "$2"; then
    log "$1" "pid $pid ignored SIGTERM for $3 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$STATE_DIR/$1.pid"
}

stop_tracked consul consul 20
stop_tracked dockerd dockerd 40

if [ -f "$STATE_DIR/ovs.started" ]; then
  log ovs "stopping ovs-vswitchd + ovsdb-server"
  /usr/share/openvswitch/scripts/ovs-ctl stop >>"$STATE_DIR/ovs-ctl.log" 2>&1 \
    || log ovs "ovs-ctl stop failed (see $STATE_DIR/ovs-ctl.log)"
  rm -f "$STATE_DIR/ovs.started"
else
  log ovs "not started by make services"
fi
log services "down"
