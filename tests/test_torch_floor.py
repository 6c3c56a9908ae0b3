"""The code keeps to the oldest torch that pyproject allows (and helm/Dockerfile ships).

Tests run a newer torch, which accepts every newer parameter, so a call using one (gather's `group_dst`,
added in 2.6) passes here and fails at call time on the floor. This file checks each torch.distributed
call in shards/ and cluster/ against the floor's signatures, recorded below.
"""

import ast
import inspect
import re
import tomllib
from pathlib import Path

import pytest
import torch.distributed as dist
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
FLOOR = "2.5"
# torch 2.5's torch.distributed (distributed_c10d.py) parameters, for every function the code calls.
TORCH_FLOOR_SIGNATURES = {
    "init_process_group": ("backend", "init_method", "timeout", "world_size", "rank", "store", "group_name",
                           "pg_options", "device_id"),
    "new_group": ("ranks", "timeout", "backend", "pg_options", "use_local_synchronization", "group_desc"),
    "all_reduce": ("tensor", "op", "group", "async_op"),
    "gather": ("tensor", "gather_list", "dst", "group", "async_op"),
    "send": ("tensor", "dst", "group", "tag"),
    "recv": ("tensor", "src", "group", "tag"),
    "get_rank": ("group",),
    "get_world_size": ("group",),
    "get_global_rank": ("group", "group_rank"),
    "is_initialized": (),
    "destroy_process_group": ("group",),
}


def dist_calls(source: str) -> list[tuple[int, str, int, list[str]]]:
    """(line, function, positional count, keywords) of each torch.distributed call in `source`."""
    tree = ast.parse(source)
    aliases, direct = {"torch.distributed"}, {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            direct |= {a.asname or a.name: a.name for a in node.names}
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func, name = node.func, None
        if isinstance(func, ast.Attribute) and ast.unparse(func.value) in aliases:
            name = func.attr
        elif isinstance(func, ast.Name) and func.id in direct:
            name = direct[func.id]
        if name:
            calls.append((node.lineno, name, len(node.args), [k.arg for k in node.keywords]))
    return calls


def floor_violations(source: str) -> list[str]:
    out = []
    for line, name, positional, keywords in dist_calls(source):
        params = TORCH_FLOOR_SIGNATURES.get(name)
        if params is None:
            out.append(f"line {line}: dist.{name} is not recorded: add its torch {FLOOR} signature")
        elif positional > len(params) or set(keywords) - set(params):
            out.append(f"line {line}: dist.{name}({positional} positional, {keywords}) is not torch {FLOOR}'s "
                       f"{name}({', '.join(params)})")
    return out


def test_pyproject_and_the_image_are_at_the_recorded_floor():
    """The image's base is the floor release, so the one place the floor runs (on GPU) is the one checked here."""
    deps = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    torch_req = next(r for r in deps if r.name == "torch")
    assert [s.version for s in torch_req.specifier if s.operator == ">="] == [FLOOR], \
        "pyproject's torch floor changed: record that release's signatures here"
    (base,) = re.findall(r"^FROM pytorch/pytorch:(\d+\.\d+)\.\d+-", (ROOT / "helm" / "Dockerfile").read_text(), re.M)
    assert base == FLOOR


def test_recorded_signatures_are_real():
    """The installed (newer) torch has each recorded parameter, in the same order: no typo in the table."""
    for name, params in TORCH_FLOOR_SIGNATURES.items():
        installed = list(inspect.signature(getattr(dist, name)).parameters)
        assert [p for p in installed if p in params] == list(params), name


@pytest.mark.parametrize("layer", ["shards", "cluster"])
def test_distributed_calls_exist_in_the_floor_release(layer):
    seen = 0
    for path in sorted((ROOT / layer).rglob("*.py")):
        source = path.read_text()
        seen += len(dist_calls(source))
        assert not floor_violations(source), (path.relative_to(ROOT), floor_violations(source))
    assert seen, f"no torch.distributed call seen in {layer}/"


def test_the_checker_sees_newer_parameters():
    probe = ("import torch.distributed as d\nfrom torch.distributed import gather as g\n"
             "d.gather(x, parts, group=tp, group_dst=0)\ng(x, group_dst=0)\nd.all_reduce(x, group=tp)\n"
             "d.send_object_list([x], group_dst=1)\n")
    assert [v.split(":")[0] for v in floor_violations(probe)] == ["line 3", "line 4", "line 6"]
