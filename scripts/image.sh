#!/usr/bin/env bash
# Build the local test image reconciler-test/busybox:latest (no registry is reachable):
# a rootfs holding Debian's static busybox plus one symlink per applet (sh, ip, ping,
# httpd, nc, sleep, ...), imported with `docker import`. Does nothing if the image exists.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/services-lib.sh
. scripts/services-lib.sh

if docker image inspect "$TEST_IMAGE" >/dev/null 2>&1; then
  log image "$TEST_IMAGE present"
  exit 0
fi

BUSYBOX=${BUSYBOX:-/bin/busybox}
file_out=$(LC_ALL=C od -An -c -N4 "$BUSYBOX" 2>/dev/null | tr -d ' \n' || true)
[ "$file_out" = '177ELF' ] || die image "$BUSYBOX is not an ELF binary (install busybox-static)"
if ldd "$BUSYBOX" >/dev/null 2>&1; then
  die image "$BUSYBOX is dynamically linked; the image needs busybox-static"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,root,var/www,run}
chmod 1777 "$root/tmp"
install -m 0755 "$BUSYBOX" "$root/bin/busybox"
for applet in $("$BUSYBOX" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
cat >"$root/etc/passwd" <<'PW'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PW
cat >"$root/etc/group" <<'GR'
root:x:0:
nogroup:x:65534:
GR
echo 'hosts: files dns' >"$root/etc/nsswitch.conf"

for a in sh ip ping httpd nc sleep; do
  [ -L "$root/bin/$a" ] || die image "busybox at $BUSYBOX has no '$a' applet"
done

log image "importing $TEST_IMAGE from $BUSYBOX"
tar --numeric-owner --owner=0 --group=0 -C "$root" -cf "$work/rootfs.tar" .
docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["sh"]' \
  --change 'LABEL org.opencontainers.image.title=reconciler-test-busybox' \
  "$work/rootfs.tar" "$TEST_IMAGE" >/dev/null \
  || die image "docker import failed"

out=$(docker run --rm --net none "$TEST_IMAGE" sh -c 'which httpd nc ping sleep ip' 2>&1) \
  || die image "a container from $TEST_IMAGE does not run: $out"
log image "$TEST_IMAGE built"
