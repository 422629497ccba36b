# The reconciler daemon as a container image (docs/deploy.md).
#
#   docker build -t reconciler:dev .                                  # python:3.11-slim-bookworm
#   docker build --build-arg BASE=reconciler-base/debian:bookworm -t reconciler:dev .
#
# BASE is any Debian bookworm image: the default is the official slim Python image; the
# tests build on a minimal Debian made with debootstrap (scripts/base-image.sh), since no
# registry is reachable there. What it installs: HAProxy (Debian's 2.6; its package makes
# the `haproxy` user the workers drop root to), iptables (Linux bridges), Python >= 3.11 where the base has none,
# and reconciler's dependencies from PyPI (the OVSDB client `ovs`/`ovsdbapp`, pyroute2,
# docker, py-consul, jinja2, ...) in /opt/reconciler/venv. Layers are ordered so a change
# of reconciler/ or templates/ rebuilds only the last, small layer.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
# No init system in an image: keep package scripts from starting HAProxy.
RUN set -eux; \
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 0755 /usr/sbin/policy-rc.d; \
    pkgs="haproxy ca-certificates iptables"; \
    if ! python3 -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 11)' \
         2>/dev/null; then pkgs="$pkgs python3 python3-venv"; fi; \
    # Debian's own Python: its python3-openvswitch brings the OVSDB client's C JSON
    # parser (ovs._json), linked into the venv below (as scripts/deps.sh does).
    if [ ! -x /usr/local/bin/python3 ]; then pkgs="$pkgs python3-openvswitch"; fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \
    haproxy -v | head -n1; id haproxy

# Dependencies only (from pyproject.toml), so that source changes keep this layer. With a
# wheels/ directory in the build context (scripts/daemon-image.sh makes one from the
# host's pip), they come from there and nothing is fetched; without it, from PyPI.
COPY pyproject.toml wheel[s] /opt/reconciler/build/
RUN set -eux; \
    python3 -m venv /opt/reconciler/venv; \
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open( \
        "/opt/reconciler/build/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        >/opt/reconciler/requirements.txt; \
    offline=; if ls /opt/reconciler/build/*.whl >/dev/null 2>&1; then \
        offline="--no-index --find-links /opt/reconciler/build"; fi; \
    /opt/reconciler/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        $offline -r /opt/reconciler/requirements.txt; \
    rm -rf /opt/reconciler/build; \
    venv=/opt/reconciler/venv/bin/python; \
    suffix=$($venv -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))'); \
    so=/usr/lib/python3/dist-packages/ovs/_json$suffix; \
    site=$($venv -c 'import os, ovs; print(os.path.dirname(ovs.__file__))'); \
    if [ -f "$so" ]; then ln -sf "$so" "$site/_json$suffix"; \
        $venv -c 'import ovs._json' || rm -f "$site/_json$suffix"; fi

# The package runs from its source tree (the project's templates/ sit beside it).
ENV PYTHONPATH=/opt/reconciler PYTHONUNBUFFERED=1 RECONCILER_STATE_DIR=/var/lib/reconciler
COPY reconciler /opt/reconciler/reconciler
COPY templates /opt/reconciler/templates
COPY packaging/reconciler-haproxy /usr/local/bin/reconciler-haproxy
RUN set -eux; \
    printf '#!/bin/sh\nexec /opt/reconciler/venv/bin/python -m reconciler "$@"\n' \
        >/usr/local/bin/reconciler; \
    chmod 0755 /usr/local/bin/reconciler /usr/local/bin/reconciler-haproxy; \
    /opt/reconciler/venv/bin/python -m compileall -q /opt/reconciler/reconciler; \
    reconciler --help >/dev/null

LABEL org.opencontainers.image.title=reconciler \
      org.opencontainers.image.description="container networking and HAProxy blue-green from Consul"
STOPSIGNAL SIGTERM
ENTRYPOINT ["reconciler"]
CMD ["run"]
