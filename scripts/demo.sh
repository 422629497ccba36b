#!/usr/bin/env bash
# `make demo` / `make demo-down`: the product as a user runs it, from the files in compose/.
#
#   scripts/demo.sh [up]   Consul must be up (`make services` starts its dev agent):
#     1. desired state (compose/demo-state.yaml) validated and written to Consul;
#     2. the daemon: a process (default), or with DEMO_DAEMON=container the image
#        (scripts/daemon-image.sh) run as compose/reconciler.yml runs it;
#     3. the app: `docker-compose -p demo -f compose/demo.yml up -d` (blue and green, two
#        replicas each, --net none; the daemon gives them eth1 and publishes them);
#     4. requests go to blue; then, under a request loop counting failed requests:
#        `reconciler cutover web --to green`, `reconciler cutover web --rollback`,
#        `consul kv put demo/services/web/active green` and back to blue;
#     5. prints the failed-request count (exit 1 unless 0) and what to try next.
#     Everything stays up; `make demo-down` removes it. `up` on a running demo takes it
#     down first.
#   scripts/demo.sh down   removes everything the demo made and nothing else: the
#     compose projects, the daemon (and its HAProxy), the KV prefix, the bridge, ports and
#     veths (a last sweep pass of the daemon), and DEMO_DIR.
#
# Settings (environment; the defaults are what the docs show): DEMO_DIR
# (/tmp/reconciler-demo), DEMO_PROJECT (demo), DEMO_PREFIX (demo/), DEMO_PORT (18080),
# DEMO_OCTET (250: 10.77.250.0/24, vlan 250), DEMO_BRIDGE (br-demo), DEMO_DAEMON
# (process|container).
set -euo pipefail
cd "$(dirname "$0")/.."

R=$PWD/.venv/bin/reconciler
PY=$PWD/.venv/bin/python
DIR=${DEMO_DIR:-/tmp/reconciler-demo}
PROJECT=${DEMO_PROJECT:-demo}
PREFIX=${DEMO_PREFIX:-demo/}
PORT=${DEMO_PORT:-18080}
OCTET=${DEMO_OCTET:-250}
BRIDGE=${DEMO_BRIDGE:-br-demo}
MODE=${DEMO_DAEMON:-process}
BIND=127.0.0.1:$PORT
NODE=$PROJECT-$(hostname | tr -c 'A-Za-z0-9_.\n-' '-' | cut -c1-40)
export RECONCILER_PREFIX=$PREFIX
export CONSUL_HTTP_ADDR=${CONSUL_HTTP_ADDR:-127.0.0.1:8500}
APP=(docker-compose -p "$PROJECT" -f compose/demo.yml)
DAEMON_COMPOSE=(docker-compose -p "$PROJECT-reconciler" -f compose/reconciler.yml)
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

daemon_env() { # what compose/reconciler.yml reads
  export RECONCILER_IMAGE=reconciler:dev RECONCILER_STATE_DIR=$DIR/state \
    RECONCILER_NODE=$NODE RECONCILER_LISTEN=off
}

down() {
  [ -d "$DIR" ] || { echo "demo-down: nothing to remove ($DIR absent)"; return 0; }
  local mode; mode=$(cat "$DIR/mode" 2>/dev/null || echo process)
  say "removing the demo ($DIR, project $PROJECT, prefix $PREFIX)"
  "${APP[@]}" down -t 1 2>&1 | sed 's/^/  /' || true
  if [ "$mode" = container ]; then
    daemon_env; "${DAEMON_COMPOSE[@]}" down -t 2 2>&1 | sed 's/^/  /' || true
  elif [ -f "$DIR/daemon.pid" ]; then
    local pid; pid=$(cat "$DIR/daemon.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  curl -sf -X DELETE "http://$CONSUL_HTTP_ADDR/v1/kv/$PREFIX?recurse" >/dev/null || true
  # With nothing desired any more, one pass sweeps the demo's ports, veths, addresses and
  # the bridge it made; then its status key goes too.
  "$R" run --once --node "$NODE" --state-dir "$DIR/state" --listen off >/dev/null 2>&1 || true
  curl -sf -X DELETE "http://$CONSUL_HTTP_ADDR/v1/kv/$PREFIX?recurse" >/dev/null || true
  if [ "$mode" = process ] && [ -f "$DIR/state/haproxy.pid" ]; then
    kill "$(cut -d' ' -f1 "$DIR/state/haproxy.pid")" 2>/dev/null || true
  fi
  rm -rf "$DIR"
  echo "demo removed"
}

wait_for() { # wait_for SECONDS CMD...: poll until CMD succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge "$deadline" ]; then
      echo "timed out: $*" >&2; tail -30 "$DIR/daemon.log" >&2 2>/dev/null || true; exit 1
    fi
    sleep 0.2
  done
}
serves() { curl -sf --max-time 1 "http://$BIND/" | grep -q "^$1 "; }
loop_saw() { # loop_saw POOL N: the request loop has had N answers from POOL
  "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(d.get(sys.argv[2], 0) < int(sys.argv[3]))' \
    "$DIR/loop.json" "$1" "$2"
}

up() {
  curl -sf "http://$CONSUL_HTTP_ADDR/v1/status/leader" >/dev/null \
    || { echo "Consul is not answering on $CONSUL_HTTP_ADDR: run 'make services'" >&2; exit 1; }
  [ -d "$DIR" ] && down
  mkdir -p "$DIR/state"
  echo "$MODE" >"$DIR/mode"

  say "desired state (compose/demo-state.yaml), validated, then written to Consul under $PREFIX"
  # The file itself with the default settings (docs/blue-green.md shows these commands);
  # a copy on another subnet, bridge and port otherwise.
  local state=compose/demo-state.yaml
  if [ "$OCTET/$BRIDGE/$PORT" != 250/br-demo/18080 ]; then
    state=$DIR/state.yaml
    sed -e "s/10\.77\.250\./10.77.$OCTET./g; s/br-demo/$BRIDGE/; s/vlan: 250/vlan: $OCTET/" \
        -e "s/127\.0\.0\.1:18080/$BIND/" compose/demo-state.yaml >"$state"
  fi
  grep -v '^#' "$state"
  run "$R" validate -f "$state"
  run "$R" apply -f "$state" --prune

  if [ "$MODE" = container ]; then
    say "the daemon as a container: compose/reconciler.yml (image reconciler:dev)"
    bash scripts/daemon-image.sh reconciler:dev >"$DIR/image.log" 2>&1 \
      || { tail -30 "$DIR/image.log" >&2; exit 1; }
    daemon_env
    run "${DAEMON_COMPOSE[@]}" up -d
    ln -sf /dev/null "$DIR/daemon.log"
  else
    say "the daemon as a process (log: $DIR/daemon.log)"
    setsid "$R" run --node "$NODE" --state-dir "$DIR/state" --resync 10 --listen off \
      >"$DIR/daemon.log" 2>&1 </dev/null &
    echo $! >"$DIR/daemon.pid"
    echo "reconciler run --node $NODE (pid $(cat "$DIR/daemon.pid"))"
  fi

  say "the app: compose/demo.yml (blue and green, two replicas each, --net none)"
  run "${APP[@]}" up -d
  wait_for 90 serves blue
  for c in $("${APP[@]}" ps -q); do
    printf '  %s: %s\n' "$(docker inspect -f '{{.Name}}' "$c" | tr -d /)" \
      "$(docker exec "$c" ip -o -4 addr show eth1 | awk '{print $2, $4}')"
  done

  say "reconciler status"
  wait_for 30 bash -c "'$R' status | grep -q 'web=blue'"
  run "$R" status

  say "requests to http://$BIND/"
  for _ in 1 2 3 4; do curl -s "http://$BIND/"; done

  say "a request loop in the background (new connection per request, counts failures)"
  "$PY" - "$BIND" "$DIR/loop.json" "$DIR/loop.stop" <<'EOF' &
import http.client, json, os, sys, time
bind, out, stop = sys.argv[1], sys.argv[2], sys.argv[3]
host, port = bind.rsplit(":", 1)
counts = {"ok": 0, "failed": 0}
last = 0.0
while not os.path.exists(stop):
    try:
        c = http.client.HTTPConnection(host, int(port), timeout=2)
        c.request("GET", "/")
        r = c.getresponse()
        body = r.read().decode()
        c.close()
        if r.status != 200:
            raise OSError(f"HTTP {r.status}")
        counts["ok"] += 1
        pool = body.split()[0] if body else "?"
        counts[pool] = counts.get(pool, 0) + 1
    except (OSError, http.client.HTTPException):
        counts["failed"] += 1
    if time.monotonic() - last > 0.1 or os.path.exists(stop):
        with open(out + ".tmp", "w") as f:
            json.dump(counts, f)
        os.replace(out + ".tmp", out)
        last = time.monotonic()
with open(out + ".tmp", "w") as f:
    json.dump(counts, f)
os.replace(out + ".tmp", out)
EOF
  LOOP=$!
  wait_for 10 loop_saw blue 20

  say "cutover to green (health gate, audit, every node applied)"
  run "$R" cutover web --to green --timeout 30
  wait_for 10 serves green
  wait_for 20 loop_saw green 20
  for _ in 1 2 3 4; do curl -s "http://$BIND/"; done

  say "rollback (to the pool before the last cutover)"
  run "$R" cutover web --rollback --timeout 30
  wait_for 10 serves blue
  local blue; blue=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["blue"])' "$DIR/loop.json")
  wait_for 20 loop_saw blue $((blue + 20))
  for _ in 1 2 3 4; do curl -s "http://$BIND/"; done

  say "the raw switch: the active pool is a key in Consul"
  run consul kv put "${PREFIX}services/web/active" green
  wait_for 10 serves green
  run consul kv put "${PREFIX}services/web/active" blue
  wait_for 10 serves blue

  touch "$DIR/loop.stop"; wait "$LOOP"
  local failed ok
  failed=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["failed"])' "$DIR/loop.json")
  ok=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["ok"])' "$DIR/loop.json")
  say "request loop: $ok answered, $failed failed ($(cat "$DIR/loop.json"))"
  echo "failed requests: $failed"
  [ "$failed" = 0 ] || { echo "requests failed during the cutovers" >&2; exit 1; }

  local env="RECONCILER_PREFIX=$PREFIX"
  cat <<EOF

== the demo is running; try next
  $env .venv/bin/reconciler status
  ${APP[*]} up -d --scale green=3      # members follow
  $env .venv/bin/reconciler cutover web --to green
  $env .venv/bin/reconciler cutover web --to green --steps 10,50,100 --interval 10s
  $env .venv/bin/reconciler cutover web --rollback
  consul kv put ${PREFIX}services/web/active blue
  $env .venv/bin/reconciler render web --state-dir $DIR/state
  curl http://$BIND/
  docs: docs/blue-green.md, docs/deploy.md
  make demo-down                       # removes all of it
EOF
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 [up|down]" >&2; exit 2 ;;
esac
