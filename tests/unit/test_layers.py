"""Layering contract (like kopf's import-linter rules): each external system's client
library is imported by its adapter module only, and adapters never import the model.
`lint-imports` (make lint; [tool.importlinter] in pyproject.toml) enforces these too."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "reconciler"

# library -> the only modules (relative to reconciler/) that may import it
ONLY_IN = {
    "consul": {"adapters/consul_kv.py"},
    "docker": {"adapters/docker_engine.py"},
    "pyroute2": {"adapters/netlink.py", "adapters/vxlan.py"},
    "ovsdbapp": {"adapters/ovs.py"},
    "ovs": {"adapters/ovs.py"},
    "jinja2": {"proxy/render.py"},
    "prometheus_client": {"observe/metrics.py"},
    "requests": {"adapters/consul_kv.py", "adapters/docker_engine.py"},
    "urllib3": {"adapters/consul_kv.py", "adapters/docker_engine.py"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_client_libraries_only_in_their_adapter() -> None:
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        for mod in _imports(path):
            top = mod.split(".")[0]
            allowed = ONLY_IN.get(top)
            if allowed is not None and rel not in allowed:
                offenders.append(f"{rel} imports {mod}")
    assert offenders == []


def test_adapters_take_plain_values_not_the_model() -> None:
    offenders = [f"{p.name} imports {m}" for p in sorted((PKG / "adapters").glob("*.py"))
                 for m in _imports(p) if m.startswith("reconciler.") and m not in (
                     "reconciler.errors",) and not m.startswith("reconciler.adapters.")]
    assert offenders == []


def test_every_module_opens_with_a_docstring() -> None:
    missing = [p.relative_to(PKG).as_posix() for p in sorted(PKG.rglob("*.py"))
               if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert missing == []
