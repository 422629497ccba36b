#!/usr/bin/env bash
# Install everything reconciler needs on a bare Debian machine. Idempotent.
#  - Debian packages (docker.io, openvswitch-switch, haproxy, busybox-static, ...)
#  - consul 1.8.7 from Debian's bullseye suite, added as a low-pinned extra source
#  - a virtualenv at .venv with the package installed editable (+ dev tools)
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
PKGS=(docker.io openvswitch-switch haproxy busybox-static iptables wrk docker-compose
      curl iproute2 hey python3-venv procps)

need=()
for p in "${PKGS[@]}" consul; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done

add_bullseye_source() {
  local src=/etc/apt/sources.list.d/reconciler-bullseye.sources
  local pin=/etc/apt/preferences.d/reconciler-bullseye
  [ -f "$src" ] && [ -f "$pin" ] && return 0
  local base
  base=$(ls /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v reconciler- | head -n1 || true)
  if [ -n "$base" ]; then
    # Copy the machine's own deb822 entry (its mirror and keyring) and change the suite.
    awk 'BEGIN{RS="";ORS="\n\n"} NR==1' "$base" \
      | sed -E 's/^Suites:.*/Suites: bullseye/' >"$src.tmp"
  elif [ -f /etc/apt/sources.list ]; then
    grep -E '^deb ' /etc/apt/sources.list | head -n1 \
      | awk '{print "deb " $2 " bullseye main"}' >"${src%.sources}.list"
    src=${src%.sources}.list
  else
    echo "deps: no apt source entry to copy for bullseye" >&2; exit 1
  fi
  [ -f "$src.tmp" ] && mv "$src.tmp" "$src"
  cat >"$pin" <<'PIN'
# Added by reconciler's make deps: bullseye only for consul, never preferred.
Package: *
Pin: release n=bullseye
Pin-Priority: 100
PIN
  apt-get update -qq
}

if [ ${#need[@]} -gt 0 ]; then
  echo "deps: installing ${need[*]}"
  apt-get update -qq
  add_bullseye_source
  apt-get install -y -qq --no-install-recommends "${PKGS[@]}" consul >/dev/null
fi

for c in consul dockerd haproxy ovs-vsctl ovsdb-server busybox wrk; do
  command -v "$c" >/dev/null || { echo "deps: $c missing after install" >&2; exit 1; }
done

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.deps-stamp
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
echo "deps: ok"
