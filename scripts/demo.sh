#!/usr/bin/env bash
# `make demo`: the whole product on embedded defaults, on this machine.
#  1. desired state into Consul: an OVS network (vlan, gateway, address pool), a container
#     entry matched by label, a service with blue and green pools;
#  2. four containers (--net none) running busybox httpd, labelled blue/green;
#  3. the daemon attaches them, publishes them as members, runs HAProxy;
#  4. requests go to blue; `reconciler cutover web --to green`; requests go to green;
#     `--rollback`; then everything is cleaned up (KEEP=1 leaves it running).
set -euo pipefail
cd "$(dirname "$0")/.."

R=.venv/bin/reconciler
export RECONCILER_PREFIX=demo/
NODE=demo-$(hostname | tr -c 'A-Za-z0-9_.\n-' '-' | cut -c1-40)
STATE=$(mktemp -d /tmp/reconciler-demo.XXXXXX)
BIND=127.0.0.1:18080
IMAGE=reconciler-test/busybox:latest
DAEMON=
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then
    echo "KEEP=1: daemon pid ${DAEMON:-none}, state $STATE, log $STATE/daemon.log"; return
  fi
  say "cleaning up"
  [ -n "$DAEMON" ] && kill "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null || true
  docker rm -f demo-blue-1 demo-blue-2 demo-green-1 demo-green-2 >/dev/null 2>&1 || true
  curl -sf -X DELETE "http://127.0.0.1:8500/v1/kv/demo/?recurse" >/dev/null || true
  # With nothing desired any more, one pass sweeps the demo's ports, veths, addresses
  # and the bridge it made; then its status key goes too.
  $R run --once --node "$NODE" --state-dir "$STATE" >/dev/null 2>&1 || true
  curl -sf -X DELETE "http://127.0.0.1:8500/v1/kv/demo/?recurse" >/dev/null || true
  if [ -f "$STATE/haproxy.pid" ]; then kill "$(cat "$STATE/haproxy.pid")" 2>/dev/null || true; fi
  rm -rf "$STATE"
}
trap cleanup EXIT

cat >"$STATE/state.yaml" <<EOF
networks:
  demo-net: {subnet: 10.77.250.0/24, bridge: br-demo, vlan: 250, gateway: 10.77.250.1,
             mtu: 1450, pool: {start: 10.77.250.100, end: 10.77.250.199}}
containers:
  demo-web:
    interfaces: [{name: eth1, network: demo-net, address: auto, gateway: true}]
services:
  web:
    config: {bind: "$BIND", mode: http, balance: roundrobin,
             health: {path: /health, interval_ms: 500}}
    active: blue
EOF

say "desired state (validated, then written to Consul under demo/)"
cat "$STATE/state.yaml"
$R validate -f "$STATE/state.yaml"
$R apply -f "$STATE/state.yaml" --prune

say "four containers with --net none: two blue, two green"
for c in blue-1 blue-2 green-1 green-2; do
  pool=${c%-*}
  docker rm -f "demo-$c" >/dev/null 2>&1 || true
  docker run -d --name "demo-$c" --net none \
    -l reconciler.name=demo-web -l reconciler.service=web -l reconciler.pool="$pool" \
    -l reconciler.port=8080 -l reconciler.network=demo-net "$IMAGE" \
    sh -c "mkdir -p /www && echo '$pool ($c)' >/www/index.html && echo ok >/www/health \
           && exec httpd -f -p 8080 -h /www" >/dev/null
  echo "demo-$c: $(docker exec "demo-$c" ip -o link | awk -F': ' '{print $2}' | tr '\n' ' ')"
done

say "the daemon (log: $STATE/daemon.log)"
$R run --node "$NODE" --state-dir "$STATE" --resync 10 >"$STATE/daemon.log" 2>&1 &
DAEMON=$!

wait_for() { # wait_for SECONDS CMD...: poll until CMD succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then echo "timed out: $*"; tail -30 "$STATE/daemon.log"; exit 1; fi
    sleep 0.2
  done
}
serves() { curl -sf --max-time 1 "http://$BIND/" | grep -q "^$1"; }
wait_for 60 serves blue

for c in blue-1 green-1; do
  echo "demo-$c: $(docker exec "demo-$c" ip -o -4 addr show eth1 | awk '{print $4}')"
done
echo "host -> demo-blue-1 via the gateway:"
busybox ping -c1 -W2 "$(docker exec demo-blue-1 ip -o -4 addr show eth1 | awk '{print $4}' | cut -d/ -f1)" | tail -1

say "reconciler status"
wait_for 30 bash -c "$R status | grep -q 'web=blue'"
$R status

say "requests to http://$BIND/"
for _ in 1 2 3 4; do curl -s "http://$BIND/"; done

say "reconciler cutover web --to green"
$R cutover web --to green --timeout 20
for _ in 1 2 3 4; do curl -s "http://$BIND/"; done

say "reconciler cutover web --rollback"
$R cutover web --rollback --timeout 20
for _ in 1 2 3 4; do curl -s "http://$BIND/"; done

say "the rendered HAProxy config (reconciler render web)"
$R render web --state-dir "$STATE" | sed -n '1,60p'

say "demo done"
