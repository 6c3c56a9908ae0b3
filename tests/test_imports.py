"""docs/architecture.md's layering: imports only go downward, and each layer keeps to its own dependencies."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    # The ranks apply a structured-output token mask; computing it (xgrammar) is the router's.
    "shards": {"ray", "grpc", "cluster", "router", "client", "transformers", "xgrammar"},
    "cluster": {"grpc", "router", "client"},
    "client": {"torch", "ray", "shards", "cluster", "router"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_downward(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    bad = {str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[layer]) for f in files}
    assert not {f: mods for f, mods in bad.items() if mods}


def test_the_checker_sees_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import ray.util\nfrom grpc import aio\nfrom . import sibling\n")
    assert imported_roots(probe) == {"ray", "grpc"}
