#!/usr/bin/env bash
# Install everything reconciler needs on a bare Debian machine. Idempotent.
#  - Debian packages (docker.io, openvswitch-switch, haproxy, busybox-static, ...);
#    iptables (iptables + ip6tables) for the Linux bridges' FORWARD rules (adapters/bridgefw.py);
#    nftables (`nft -j`) for the group policy on Linux bridges (adapters/nftables.py)
#  - consul 1.8.7 from Debian's bullseye suite, added as a low-pinned extra source
#  - a virtualenv at .venv with the package installed editable (+ dev tools)
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
PKGS=(docker.io openvswitch-switch python3-openvswitch haproxy busybox-static iptables wrk
      docker-compose curl iproute2 hey python3-venv procps make util-linux debootstrap
      nftables)

need=()
for p in "${PKGS[@]}" consul; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done

add_bullseye_source() {
  local src=/etc/apt/sources.list.d/reconciler-bullseye.sources
  local pin=/etc/apt/preferences.d/reconciler-bullseye
  if [ -f "$pin" ] && { [ -f "$src" ] || [ -f "${src%.sources}.list" ]; }; then return 0; fi
  local codename f stanza=""
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  # Copy the machine's own deb822 entry for its main suite (its mirror and keyring),
  # not -security/-updates or a third-party repository, and change the suite.
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    case $f in */reconciler-*) continue ;; esac
    stanza=$(awk -v c="$codename" 'BEGIN{RS="";ORS="\n"}
      /(^|\n)Suites:/ && $0 ~ ("Suites:([^\n]* )?" c "( |\n|$)") && /Components:[^\n]*main/ \
      && !/(^|\n)Enabled: *no/ {print; exit}' "$f")
    [ -n "$stanza" ] && break
  done
  if [ -n "$stanza" ]; then
    printf '%s\n' "$stanza" \
      | sed -E -e 's/^Suites:.*/Suites: bullseye/' -e 's/^Components:.*/Components: main/' \
      >"$src.tmp"
    mv "$src.tmp" "$src"
  else
    local line
    line=$(grep -hsE "^deb (\[[^]]*\] )?[a-z]+://[^ ]+ $codename( |$)" \
      /etc/apt/sources.list /etc/apt/sources.list.d/*.list | head -n1 || true)
    [ -n "$line" ] || { echo "deps: no apt source entry to copy for bullseye" >&2; exit 1; }
    src=${src%.sources}.list
    echo "$line" | awk -v c="$codename" \
      '{for (i = 1; i <= NF; i++) if ($i == c) {$i = "bullseye"; NF = i; break}; print $0 " main"}' \
      >"$src"
  fi
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

for c in consul dockerd haproxy ovs-vsctl ovsdb-server busybox wrk iptables ip6tables debootstrap \
         nft; do
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

# The OVSDB client (PyPI's `ovs`, under ovsdbapp) parses JSON in pure Python unless its C
# parser `ovs._json` was built, which needs libopenvswitch headers Debian does not ship:
# every update ovs-vswitchd sends was lexed character by character (most of the daemon's
# CPU when 200 ports were added; bench/attach.py). Debian's python3-openvswitch has that
# module built for the system Python; link it in when the ABI tag matches ours.
if ! .venv/bin/python -c 'import ovs._json' 2>/dev/null; then
  suffix=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  site=$(.venv/bin/python -c 'import os, ovs; print(os.path.dirname(ovs.__file__))')
  so=/usr/lib/python3/dist-packages/ovs/_json$suffix
  if [ -f "$so" ]; then
    ln -sf "$so" "$site/_json$suffix"
  fi
  if .venv/bin/python -c 'import ovs._json' 2>/dev/null; then
    echo "deps: ovs JSON parser: C (from python3-openvswitch)"
  else
    rm -f "$site/_json$suffix"
    echo "deps: ovs JSON parser: pure Python (no C parser for $suffix; slower OVSDB updates)"
  fi
fi
echo "deps: ok"
