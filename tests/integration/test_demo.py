"""`make demo` end to end (issue 10): scripts/demo.sh up (what `make demo` runs after
deps and services) brings up the daemon (a process, or its image through
compose/reconciler.yml), compose/demo.yml, serves blue, cuts over to green and rolls back
(and switches with `consul kv put`) under a request loop with 0 failed requests; then
`scripts/demo.sh down` (`make demo-down`) leaves nothing: containers, compose networks,
KV keys, bridge, daemon, HAProxy, the demo's directory.

Each run uses a project, prefix, port, subnet and directory of its own (DEMO_* settings),
so a demo someone runs by hand on this machine is not touched.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest
from helpers import free_port

from reconciler.adapters.consul_kv import ConsulKV, ConsulSettings

from .daemon_helpers import REPO, free_subnet_octets, run
from .test_deploy import fetch

pytestmark = pytest.mark.integration


def demo(cmd: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(REPO / "scripts/demo.sh"), cmd], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **env}, check=False)


@pytest.mark.parametrize("mode", ["process", "container"])
def test_demo_up_cutover_rollback_down_leaves_nothing(tmp_path: Path, mode: str) -> None:
    tag = secrets.token_hex(3)
    octet = free_subnet_octets(1, seed=int(tag, 16) % 200 + 5)[0]
    port = free_port()
    project, prefix, bridge = f"rdemo{tag}", f"test-demo-{tag}/", f"br-dm{tag}"
    env = {"DEMO_DIR": str(tmp_path / "demo"), "DEMO_PROJECT": project, "DEMO_PREFIX": prefix,
           "DEMO_PORT": str(port), "DEMO_OCTET": str(octet), "DEMO_BRIDGE": bridge,
           "DEMO_DAEMON": mode}
    daemon_pid = None
    try:
        t0 = time.monotonic()
        up = demo("up", env, timeout=600)
        took_up = time.monotonic() - t0
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-3000:]
        out = up.stdout
        assert "failed requests: 0\n" in out, out[-3000:]
        assert "web: switched blue -> green" in out and "web: switched green -> blue" in out
        assert "== the demo is running; try next" in out
        # Still up after the script: blue served by the two blue replicas on the subnet.
        assert (fetch(port) or "").startswith("blue ")
        ids = run(["docker", "ps", "-q", "--filter",
                   f"label=com.docker.compose.project={project}"]).stdout.split()
        assert len(ids) == 4
        addr = run(["docker", "exec", ids[0], "ip", "-o", "-4", "addr", "show", "eth1"]).stdout
        assert f"10.77.{octet}." in addr
        if mode == "process":
            daemon_pid = int((tmp_path / "demo/daemon.pid").read_text())
            assert Path(f"/proc/{daemon_pid}").exists()
        else:
            assert run(["docker", "ps", "-q", "--filter",
                        f"label=com.docker.compose.project={project}-reconciler"]
                       ).stdout.split(), "the daemon's containers"
        t0 = time.monotonic()
        down = demo("down", env, timeout=120)
        took_down = time.monotonic() - t0
        assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
        print(f"demo ({mode}): up {took_up:.1f}s, down {took_down:.1f}s; "
              + next(ln for ln in out.splitlines() if "request loop:" in ln))
    finally:
        demo("down", env, timeout=120)

    # Nothing left behind.
    left = run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"]
               ).stdout + run(["docker", "ps", "-aq", "--filter",
                               f"label=com.docker.compose.project={project}-reconciler"]).stdout
    assert not left.split(), left
    nets = run(["docker", "network", "ls", "--format", "{{.Name}}"]).stdout.split()
    assert not [n for n in nets if n.startswith(project)], nets
    with ConsulKV(ConsulSettings.from_env()) as kv:
        assert not kv.read_prefix(prefix).items
    assert run(["ip", "link", "show", bridge], check=False).returncode != 0
    assert bridge not in run(["ovs-vsctl", "list-br"]).stdout.split()
    assert not (tmp_path / "demo").exists()
    assert fetch(port) is None, "the demo's HAProxy is gone"
    if daemon_pid is not None:
        assert not Path(f"/proc/{daemon_pid}").exists()
