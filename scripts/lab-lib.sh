# shellcheck shell=bash
# Shared helpers for scripts/lab (the multi-host lab): the layout (names, addresses and
# paths of host K), pid files that must name a process of that host, stopping processes
# by pid, finding what a killed run left behind (processes, mounts, namespaces, links).
# Sourced after scripts/services-lib.sh (log, wait_until, pid_is). Not run.
#
# Layout of host K (K = 1..N):
#   network namespace  lab-hostK (/run/netns/lab-hostK), eth0 = 198.18.0.K/24, lo up
#   underlay           veth lab-hostK (root side) <-> eth0 (host side), in bridge labund0
#                      (root namespace: 198.18.0.254/24 on labund0)
#   run dir            /run/lab/hostK: docker.sock, dockerd.pid, daemon.json,
#                      docker-exec/ (dockerd --exec-root: containerd, runc state),
#                      ovs/ (OVS_RUNDIR: db.sock, *.pid, *.ctl), consul.pid, reconciler.pid
#   data dir           /var/lib/lab/hostK: docker/ (--data-root), ovs/conf.db, consul/,
#                      reconciler/ (--state-dir), and the logs *.log (kept by `down`)

# shellcheck disable=SC2034  # used by scripts/lab
{
LAB_RUN=/run/lab
LAB_VAR=/var/lib/lab
LAB_BRIDGE=labund0
LAB_NET=198.18.0
LAB_PLEN=24
LAB_ROOT_ADDR=$LAB_NET.254
LAB_MTU=1500
LAB_MAX_HOSTS=64
LAB_FW_COMMENT="lab:$LAB_BRIDGE"
LAB_OVS_SCHEMA=/usr/share/openvswitch/vswitch.ovsschema
}

lab_log() { log "$@"; }

lab_die() {
  printf 'lab: %s FAILED: %s\n' "$1" "${*:2}" >&2
  exit 1
}

# lab_fail_with_log WHAT REASON PID LOGFILE...: like services-lib's fail_with_log.
lab_fail_with_log() {
  local what=$1 reason=$2 pid=$3 f
  shift 3
  {
    printf 'lab: %s FAILED: %s\n' "$what" "$reason"
    if [ -n "$pid" ]; then
      if kill -0 "$pid" 2>/dev/null; then
        printf '  (process %s is still running)\n' "$pid"
      else
        printf '  (process %s has exited)\n' "$pid"
      fi
    fi
    for f in "$@"; do
      if [ -z "$f" ] || [ ! -f "$f" ]; then continue; fi
      printf -- '--- last lines of %s ---\n' "$f"
      tail -n 25 "$f"
    done
  } >&2
  exit 1
}

# Milliseconds since the epoch, and "12.3 s" since a start taken with it.
lab_now_ms() { local t=${EPOCHREALTIME//[!0-9]/}; echo $((10#$t / 1000)); }
lab_since() {
  local ms=$(($(lab_now_ms) - $1))
  printf '%d.%d s' $((ms / 1000)) $(((ms % 1000) / 100))
}

# ------------------------------------------------------------------ layout of host K
lab_ns() { echo "lab-host$1"; }
lab_veth() { echo "lab-host$1"; }
lab_addr() { echo "$LAB_NET.$1"; }
lab_run() { echo "$LAB_RUN/host$1"; }
lab_var() { echo "$LAB_VAR/host$1"; }
lab_docker_host() { echo "unix://$LAB_RUN/host$1/docker.sock"; }
lab_ovs_rundir() { echo "$LAB_RUN/host$1/ovs"; }

# lab_index HOST: K for "hostK" (or "K"); fails on anything else.
lab_index() {
  local h=${1#host}
  [[ $h =~ ^[1-9][0-9]?$ ]] && [ "$h" -le $LAB_MAX_HOSTS ] || return 1
  echo "$h"
}

# Number of hosts of the lab that is up (recorded by `up`), or nothing.
lab_recorded_hosts() {
  local n
  n=$(cat "$LAB_RUN/hosts" 2>/dev/null) || return 1
  [[ $n =~ ^[1-9][0-9]*$ ]] || return 1
  echo "$n"
}

# Indexes of every host anything is left of: recorded, run/data dirs, namespaces, links.
# (LAB_VAR/hostK/{docker,...}: the data directories `down` removes.)
lab_known_indexes() {
  local n k d name
  {
    if n=$(lab_recorded_hosts); then
      for ((k = 1; k <= n; k++)); do echo "$k"; done
    fi
    # A data directory that holds only logs is no leftover (`down` keeps the logs).
    for d in "$LAB_RUN"/host* "$LAB_VAR"/host*/{docker,consul,ovs,reconciler}; do
      [ -e "$d" ] || continue
      d=${d#"$LAB_RUN"/}
      d=${d#"$LAB_VAR"/}
      lab_index "${d%%/*}" || true
    done
    for name in $(ip netns list 2>/dev/null | awk '{print $1}'); do
      if [[ $name == lab-host* ]]; then lab_index "${name#lab-}" || true; fi
    done
    for name in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
      if [[ $name == lab-host* ]]; then lab_index "${name#lab-}" || true; fi
    done
  } | sort -n -u
}

# ------------------------------------------------------------------ processes
# lab_cmdline PID: the command line with spaces for NULs (empty for a zombie or none).
lab_cmdline() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true; }

# lab_alive PID: the process exists and is not a zombie.
lab_alive() {
  local state
  state=$(awk '{sub(/.*\) /, ""); print $1}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# lab_pid K PIDFILE: print the pid in PIDFILE if that process is alive and its command
# line names host K's run or data directory (a reused pid is not taken for ours).
lab_pid() {
  local k=$1 f=$2 pid cmd
  pid=$(cat "$f" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  lab_alive "$pid" || return 1
  cmd=$(lab_cmdline "$pid")
  [[ $cmd == *"$LAB_RUN/host$k/"* || $cmd == *"$LAB_VAR/host$k/"* ]] || return 1
  echo "$pid"
}

_lab_none_alive() { local q; for q in "$@"; do ! lab_alive "$q" || return 1; done; }

# lab_stop_pids TIMEOUT PID...: SIGTERM, then SIGKILL whatever is left after TIMEOUT s.
lab_stop_pids() {
  local timeout=$1 p left
  shift
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  if ! wait_until "$timeout" _lab_none_alive "$@"; then
    left=()
    for p in "$@"; do lab_alive "$p" && left+=("$p"); done
    lab_log lab "pid ${left[*]} ignored SIGTERM for $timeout s; sending SIGKILL"
    kill -KILL "${left[@]}" 2>/dev/null || true
    wait_until 10 _lab_none_alive "${left[@]}" || lab_log lab "pid ${left[*]} survive SIGKILL"
  fi
}

# The pids of this shell and its ancestors: never swept.
_lab_self_pids() {
  local p=$BASHPID
  while [ -n "$p" ] && [ "$p" != 0 ]; do
    echo "$p"
    p=$(awk '/^PPid:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
  done
}

# lab_leftover_pids [K]: live processes of the lab (of host K only, with K): those in
# its network namespaces, and those whose command line names a lab run or data directory
# (containerd shims, HAProxy of a daemon, anything a killed run left).
lab_leftover_pids() {
  local k=${1:-} self p ns pats=()
  self=" $(_lab_self_pids | tr '\n' ' ') "
  if [ -n "$k" ]; then
    pats=(-e "$LAB_RUN/host$k/" -e "$LAB_VAR/host$k/")
  else
    pats=(-e "$LAB_RUN/" -e "$LAB_VAR/")
  fi
  {
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}'); do
      [[ $ns == lab-host* ]] || continue
      [ -z "$k" ] || [ "$ns" = "$(lab_ns "$k")" ] || continue
      ip netns pids "$ns" 2>/dev/null || true
    done
    # One grep over every command line (grep's own matches too: it is gone by the check).
    grep -lsaF "${pats[@]}" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3 || true
  } | sort -n -u | while read -r p; do
    [[ $self == *" $p "* ]] && continue
    if lab_alive "$p"; then echo "$p"; fi
  done
}

# ------------------------------------------------------------------ mounts
# lab_mounts [DIR...]: mount points under DIRs (default: the lab's run and data
# directories), deepest first. /proc/mounts escapes blanks as \040 etc.
lab_mounts() {
  local dirs=("$@")
  [ ${#dirs[@]} -gt 0 ] || dirs=("$LAB_RUN" "$LAB_VAR")
  local mp d
  while read -r _ mp _; do
    mp=$(printf '%b' "${mp//\\/\\0}")
    for d in "${dirs[@]}"; do
      if [ "$mp" = "$d" ] || [[ $mp == "$d/"* ]]; then echo "$mp"; break; fi
    done
  done </proc/mounts | awk '{print length($0) "\t" $0}' | sort -rn | cut -f2- | uniq
}

# lab_unmount_all DIR...: unmount everything under DIRs (lazily where a plain umount fails).
lab_unmount_all() {
  local mp n=0
  while read -r mp; do
    [ -n "$mp" ] || continue
    umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || lab_log lab "cannot unmount $mp"
    n=$((n + 1))
  done < <(lab_mounts "$@")
  [ $n -eq 0 ] || lab_log lab "unmounted $n mount(s) under $*"
}
