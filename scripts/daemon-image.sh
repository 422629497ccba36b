#!/usr/bin/env bash
# Build the daemon's image from the top-level Dockerfile on this machine, where no
# registry is reachable:
#   - the base is scripts/base-image.sh's debootstrap Debian (made once per machine);
#   - the Python dependencies come from a wheelhouse made with this machine's pip (which
#     reaches PyPI through its own configuration and CA bundle; the build container has
#     neither), cached per dependency list under $BASE_CACHE/wheels-<digest>;
#   - Debian packages (HAProxy) come from the Debian mirror during the build.
# The build context is a temporary copy of the files the Dockerfile uses plus wheels/:
# the layer cache keys on content, so an unchanged tree rebuilds from cache in seconds.
#   scripts/daemon-image.sh [TAG]        (default reconciler:dev; prints the tag)
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${1:-${RECONCILER_IMAGE:-reconciler:dev}}
BASE_CACHE=${RECONCILER_BASE_CACHE:-/var/cache/reconciler-base}
say() { printf 'daemon-image: %s\n' "$*" >&2; }

base=$(bash scripts/base-image.sh)
mkdir -p "$BASE_CACHE"
reqs=$(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
digest=$(printf '%s\n' "$reqs" | sha256sum | cut -c1-16)
wheels=$BASE_CACHE/wheels-$digest
if [ ! -f "$wheels/.complete" ]; then
  say "wheelhouse for the dependencies ($wheels)"
  rm -rf "$wheels.tmp"
  printf '%s\n' "$reqs" >"$BASE_CACHE/requirements-$digest.txt"
  .venv/bin/pip wheel -q --disable-pip-version-check -w "$wheels.tmp" \
    -r "$BASE_CACHE/requirements-$digest.txt" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  ls "$wheels.tmp"/*.whl >/dev/null 2>&1 || { say "pip wheel made nothing"; exit 1; }
  touch "$wheels.tmp/.complete"
  rm -rf "$wheels"; mv "$wheels.tmp" "$wheels"
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp -a Dockerfile .dockerignore pyproject.toml reconciler templates packaging "$ctx/"
cp -a "$wheels" "$ctx/wheels"
rm -f "$ctx/wheels/.complete"
find "$ctx" -name __pycache__ -prune -exec rm -rf {} +
# Same mtimes for the same content: the legacy builder's cache keys on content only, but
# keep the copy deterministic anyway.
say "docker build -t $TAG (BASE=$base)"
docker build --network host --build-arg "BASE=$base" -t "$TAG" "$ctx" >"$ctx/build.log" 2>&1 \
  || { tail -40 "$ctx/build.log" >&2; say "docker build failed"; exit 1; }
# (grep -c exits 1 when it counts 0: a full rebuild is no failure)
cached=$(grep -c "Using cache" "$ctx/build.log" || true)
echo "daemon-image: cached steps: ${cached:-0}" >&2
echo "$TAG"
