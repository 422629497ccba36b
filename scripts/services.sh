#!/usr/bin/env bash
# Bring up the local services reconciler's integration tests need. Idempotent.
#  - Consul dev agent, HTTP on 127.0.0.1:8500
#  - dockerd on the default socket (overlay2, or vfs where overlay mounts fail)
#  - Open vSwitch (ovsdb-server + ovs-vswitchd via ovs-ctl; no kernel module here,
#    so bridges need datapath_type=netdev)
#  - the local image reconciler-test/busybox:latest (scripts/image.sh)
#  - blackhole routes for the test/benchmark ranges 10.77.0.0/16 and 198.18.0.0/15
# Reuses whatever already answers; starts only what does not, and records what it
# started in $STATE_DIR so scripts/services-down.sh stops only that. Tolerates
# leftovers of an earlier boot (stale pid files, sockets).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/services-lib.sh
. scripts/services-lib.sh

mkdir -p "$STATE_DIR"
exec 9>"$STATE_DIR/lock"
flock -w 300 9 || die services "another 'make services' holds $STATE_DIR/lock"

# ---------------------------------------------------------------- consul
consul_up() {
  local leader
  leader=$(curl -fsS --max-time 2 "http://$CONSUL_HTTP/v1/status/leader" 2>/dev/null) || return 1
  [ -n "$leader" ] && [ "$leader" != '""' ]
}

start_consul() {
  if consul_up; then log consul "reusing agent at $CONSUL_HTTP"; return 0; fi
  local pidf=$STATE_DIR/consul.pid logf=$STATE_DIR/consul.log pid
  if pid=$(tracked_pid consul consul); then
    log consul "our agent (pid $pid) runs but has no leader yet"
  else
    command -v consul >/dev/null || die consul "consul binary not found (run make deps)"
    if curl -s --max-time 2 -o /dev/null "http://$CONSUL_HTTP/" 2>/dev/null; then
      # Not ours, but maybe an agent that is still electing itself: give it time.
      wait_until 30 consul_up && { log consul "reusing agent at $CONSUL_HTTP"; return 0; }
      die consul "something answers on $CONSUL_HTTP but has no leader after 30 s (not ours)"
    fi
    log consul "starting dev agent (log $logf)"
    setsid consul agent -dev -client 127.0.0.1 -bind 127.0.0.1 -log-level=info 9>&- \
      </dev/null >"$logf" 2>&1 &
    pid=$!
    echo "$pid" >"$pidf"
  fi
  wait_until 60 consul_up \
    || fail_with_log consul "no leader at $CONSUL_HTTP after 60 s" "$logf" "$pid"
  log consul "up (leader $(curl -fsS "http://$CONSUL_HTTP/v1/status/leader"))"
}

# ---------------------------------------------------------------- docker
# (A wedged dockerd accepts the connection and never answers: give it 20 s.)
# (libnetwork's store deadlock shows first in the network list: check that too.)
docker_up() { timeout 20 docker info >/dev/null 2>&1 && timeout 20 docker network ls >/dev/null 2>&1; }

# overlay2 needs a working overlay mount on the docker root's filesystem; probe it.
detect_storage_driver() {
  local root=/var/lib/docker probe ok=1
  mkdir -p "$root"
  probe=$(mktemp -d "$root/.overlay-probe.XXXXXX")
  mkdir -p "$probe"/{l,u,w,m}
  if mount -t overlay overlay -o "lowerdir=$probe/l,upperdir=$probe/u,workdir=$probe/w" \
      "$probe/m" 2>/dev/null; then
    umount "$probe/m"; ok=0
  fi
  rm -rf "$probe"
  if [ $ok -eq 0 ]; then echo overlay2; else echo vfs; fi
}

# A pid file whose process is gone (or is not the named program) blocks a daemon's start.
clear_stale_pidfile() {
  local f=$1 name=$2 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f" 2>/dev/null || true)
  if [ -n "$pid" ] && pid_is "$pid" "$name"; then return 0; fi
  log docker "removing stale pid file $f (pid ${pid:-?} is gone)"
  rm -f "$f"
}

start_docker() {
  if docker_up; then log docker "reusing daemon ($(docker_summary))"; return 0; fi
  local pidf=$STATE_DIR/dockerd.pid logf=$STATE_DIR/dockerd.log pid drv
  if pid=$(tracked_pid dockerd dockerd) && ! wait_until 30 docker_up; then
    # Ours, and wedged (seen: libnetwork's store deadlocked under a 500-container
    # benchmark): restart it; its containers stop with it.
    log docker "our dockerd (pid $pid) does not answer: restarting it"
    kill "$pid" 2>/dev/null || true
    wait_until 30 bash -c "! kill -0 $pid 2>/dev/null" || kill -9 "$pid" 2>/dev/null || true
    rm -f "$STATE_DIR/dockerd.pid"
    pid=""
  fi
  if [ -n "${pid:-}" ]; then
    log docker "our dockerd (pid $pid) answers"
  else
    command -v dockerd >/dev/null || die docker "dockerd not found (run make deps)"
    local others="" p
    # Other dockerds on the default socket (the lab's, or a private one with --host of
    # its own, are none of ours to wait for).
    for p in $(live_pids dockerd); do
      tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q -- '--host' || others+="$p "
    done
    others=${others% }
    if [ -n "$others" ]; then
      # Not ours, maybe still starting: give it time before giving up.
      wait_until 60 docker_up && { log docker "reusing daemon ($(docker_summary))"; return 0; }
      die docker "a dockerd runs (pid $others, not ours) but 'docker info' fails after 60 s"
    fi
    clear_stale_pidfile /var/run/docker.pid dockerd
    clear_stale_pidfile /var/run/docker/containerd/containerd.pid containerd
    drv=$(detect_storage_driver)
    echo "$drv" >"$STATE_DIR/docker-storage-driver"
    log docker "starting dockerd, storage driver $drv (log $logf)"
    setsid dockerd --storage-driver="$drv" 9>&- </dev/null >"$logf" 2>&1 &
    pid=$!
    echo "$pid" >"$pidf"
  fi
  wait_until 90 docker_up \
    || fail_with_log docker "'docker info' does not answer after 90 s" "$logf" "$pid"
  log docker "up ($(docker_summary))"
}

docker_summary() {
  docker version --format \
    'client {{.Client.Version}}, server {{.Server.Version}}, API {{.Client.APIVersion}}' \
    2>/dev/null | tr -d '\n'
  printf ', driver %s' "$(docker info --format '{{.Driver}}' 2>/dev/null)"
}

# ---------------------------------------------------------------- ovs
OVS_CTL=/usr/share/openvswitch/scripts/ovs-ctl
ovs_up() {
  ovs-vsctl --timeout=2 show >/dev/null 2>&1 || return 1
  ovs-appctl --timeout=2 -t ovs-vswitchd version >/dev/null 2>&1
}

start_ovs() {
  if ovs_up; then log ovs "reusing running ovsdb-server + ovs-vswitchd"; return 0; fi
  [ -x "$OVS_CTL" ] || die ovs "$OVS_CTL not found (run make deps)"
  local logf=$STATE_DIR/ovs-ctl.log
  log ovs "starting ovsdb-server + ovs-vswitchd (log $logf, daemons log in /var/log/openvswitch)"
  # ovs-ctl skips daemons already running and handles stale pid files itself.
  if ! "$OVS_CTL" start --system-id=random 9>&- >"$logf" 2>&1; then
    fail_with_log ovs "ovs-ctl start failed" "$logf" "" /var/log/openvswitch/ovs-vswitchd.log
  fi
  touch "$STATE_DIR/ovs.started"
  wait_until 30 ovs_up || fail_with_log ovs "ovs-vsctl/ovs-appctl do not answer after 30 s" \
    "$logf" "" /var/log/openvswitch/ovsdb-server.log /var/log/openvswitch/ovs-vswitchd.log
  log ovs "up ($(ovs-vsctl --timeout=2 get Open_vSwitch . ovs_version | tr -d '"'), datapaths" \
    "$(ovs-vsctl --timeout=2 get Open_vSwitch . datapath_types))"
}

# ---------------------------------------------------------------- routes
# `replace`, not `add`: a blackhole left by an earlier run (or boot) is fine. These are
# not removed by services-down.sh: they only catch what no more specific route does,
# and another user of the test ranges may still rely on them.
ensure_blackhole_routes() {
  local net
  for net in "${BLACKHOLE_NETS[@]}"; do
    ip route replace blackhole "$net" || die routes "ip route replace blackhole $net failed"
  done
  log routes "blackhole ${BLACKHOLE_NETS[*]}"
}

# ---------------------------------------------------------------- haproxy
check_haproxy() {
  command -v haproxy >/dev/null || die haproxy "haproxy binary not found (run make deps)"
  log haproxy "binary ok ($(haproxy -v | head -n1 | cut -d' ' -f1-3))"
}

ensure_blackhole_routes
start_consul
start_docker
start_ovs
check_haproxy
bash scripts/image.sh
log services "all up (state in $STATE_DIR)"
