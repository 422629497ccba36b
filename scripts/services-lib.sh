# Shared helpers for scripts/services.sh, scripts/services-down.sh and scripts/image.sh:
# the state directory (what `make services` started, logs, pid files), logging,
# failure reports that name the service and show the tail of its log, polling.
# Sourced, not run.

STATE_DIR=${RECONCILER_SERVICES_DIR:-/var/lib/reconciler-services}
CONSUL_HTTP=${CONSUL_HTTP_ADDR:-127.0.0.1:8500}
CONSUL_HTTP=${CONSUL_HTTP#http://}
TEST_IMAGE=${RECONCILER_TEST_IMAGE:-reconciler-test/busybox:latest}
# Address ranges tests and benchmarks use: 10.77.0.0/16, and 198.18.0.0/15 (RFC 2544,
# benchmarking). services.sh blackholes them so that such an address that is not on a
# bridge a test made never leaves through the default route; the connected route of a
# bridge a test addresses (a /24) is more specific and still wins.
BLACKHOLE_NETS=(10.77.0.0/16 198.18.0.0/15)

log() { printf '%-8s %s\n' "$1:" "${*:2}"; }

die() {
  printf 'services: %s FAILED: %s\n' "$1" "${*:2}" >&2
  exit 1
}

# fail_with_log SERVICE REASON LOGFILE PID [EXTRA_LOGS...]
fail_with_log() {
  local svc=$1 reason=$2 logf=$3 pid=$4 f
  shift 4
  {
    printf 'services: %s FAILED: %s\n' "$svc" "$reason"
    if [ -n "$pid" ]; then
      if kill -0 "$pid" 2>/dev/null; then
        printf '  (process %s is still running)\n' "$pid"
      else
        printf '  (process %s has exited)\n' "$pid"
      fi
    fi
    for f in "$logf" "$@"; do
      [ -n "$f" ] && [ -f "$f" ] || continue
      printf -- '--- last lines of %s ---\n' "$f"
      tail -n 25 "$f"
    done
  } >&2
  exit 1
}

# wait_until SECONDS COMMAND...: poll COMMAND every 0.5 s until it succeeds.
wait_until() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}

# pid_is PID NAME: PID is alive (not a zombie) and its program is NAME.
pid_is() {
  local comm state
  comm=$(cat "/proc/$1/comm" 2>/dev/null) || return 1
  [ "$comm" = "$2" ] || return 1
  state=$(awk '{sub(/.*\) /, ""); print $1}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# live_pids NAME: pids of live (non-zombie) processes whose program is NAME.
live_pids() {
  local p out=()
  for p in $(pgrep -x "$1" || true); do
    pid_is "$p" "$1" && out+=("$p")
  done
  echo "${out[*]}"
}

# tracked_pid SERVICE PROGRAM: print the pid `make services` recorded for SERVICE if
# that process still runs PROGRAM; otherwise drop the stale pid file and fail.
tracked_pid() {
  local f=$STATE_DIR/$1.pid pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null || true)
  if [ -n "$pid" ] && pid_is "$pid" "$2"; then
    echo "$pid"
    return 0
  fi
  log "$1" "dropping stale pid file $f (pid ${pid:-?} is gone)" >&2
  rm -f "$f"
  return 1
}
