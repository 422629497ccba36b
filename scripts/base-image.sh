#!/usr/bin/env bash
# Make the local base image for the daemon's image (the top-level Dockerfile's BASE),
# since no registry is reachable here: a minimal Debian made with debootstrap from the
# Debian mirror this machine uses, imported with `docker import`.
#
#   scripts/base-image.sh            -> prints the image name (reconciler-base/debian:bookworm)
#
# Made once per machine: the root filesystem tarball is kept in $BASE_CACHE
# (/var/cache/reconciler-base, owned by this script and the tests); when the image is gone
# (docker rmi, a wiped /var/lib/docker) it is re-imported from there in a few seconds.
# Nothing else is cached or left behind.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_CACHE=${RECONCILER_BASE_CACHE:-/var/cache/reconciler-base}
SUITE=${RECONCILER_BASE_SUITE:-bookworm}
IMAGE=${RECONCILER_BASE_IMAGE:-reconciler-base/debian:$SUITE}
TARBALL=$BASE_CACHE/debian-$SUITE-minbase.tar
say() { printf 'base-image: %s\n' "$*" >&2; }

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE"; exit 0
fi

mkdir -p "$BASE_CACHE"
exec 9>"$BASE_CACHE/lock"
flock -w 900 9 || { say "another run holds $BASE_CACHE/lock"; exit 1; }

if [ ! -s "$TARBALL" ]; then
  command -v debootstrap >/dev/null || { say "debootstrap missing (make deps)"; exit 1; }
  # The mirror of this machine's own apt source for the suite (deb822 or one-line).
  mirror=$(awk '/^URIs:/{u=$2} /^Suites:/ && / '"$SUITE"'( |$)/ && u {print u; exit}' \
             /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(grep -hsE "^deb (\[[^]]*\] )?[a-z]+://[^ ]+ $SUITE( |$)" \
      /etc/apt/sources.list /etc/apt/sources.list.d/*.list | head -n1 \
      | sed -E 's/^deb (\[[^]]*\] )?//' | awk '{print $1}' || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  root=$(mktemp -d "$BASE_CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$root" "$TARBALL.tmp"' EXIT
  say "debootstrap --variant=minbase $SUITE from $mirror (once per machine)"
  t0=$SECONDS
  debootstrap --variant=minbase "$SUITE" "$root" "$mirror" >"$BASE_CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$BASE_CACHE/debootstrap.log" >&2; say "debootstrap failed"; exit 1; }
  # Smaller image, same behaviour: apt lists and caches are fetched again by apt-get update.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
         "$root"/var/cache/apt/archives/*.deb
  tar --numeric-owner -C "$root" -cf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
  rm -rf "$root"
  trap - EXIT
  say "rootfs made in $((SECONDS - t0)) s: $TARBALL ($(du -h "$TARBALL" | cut -f1))"
fi

say "docker import $TARBALL -> $IMAGE"
docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["bash"]' \
  --change 'LABEL org.opencontainers.image.title=reconciler-base-debian' \
  "$TARBALL" "$IMAGE" >/dev/null
echo "$IMAGE"
