"""The SDK's committed gRPC stubs match proto/ (client/regen_stubs.py --check), and the check notices drift."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "client" / "regen_stubs.py"
STUBS = ROOT / "client" / "qwen2_client" / "proto"
PROTO = "qwen2/serving/v1/serving.proto"
OUTPUTS = ("serving_pb2.py", "serving_pb2.pyi", "serving_pb2_grpc.py")


def regen(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_committed_stubs_are_not_stale():
    run = regen("--check")
    assert run.returncode == 0, (
        f"stale stubs (regenerate with `python client/regen_stubs.py`; needs `pip install './client[dev]'`):\n"
        f"{run.stdout}{run.stderr}")


def test_check_reports_a_changed_proto_and_regeneration_fixes_it(tmp_path):
    proto_root = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", proto_root)
    out = tmp_path / "stubs"
    shutil.copytree(STUBS, out)

    assert regen("--proto-root", proto_root, "--out", out, "--check").returncode == 0  # same inputs: fresh

    proto = proto_root / PROTO
    proto.write_text(proto.read_text().replace("message ModelInfoRequest {}",
                                               "message ModelInfoRequest {\n  bool verbose = 1;\n}"))
    run = regen("--proto-root", proto_root, "--out", out, "--check")
    assert run.returncode == 1
    assert "serving_pb2.py" in run.stderr and "stale" in run.stderr
    assert (out / "serving_pb2.py").read_bytes() == (STUBS / "serving_pb2.py").read_bytes()  # --check wrote nothing

    assert regen("--proto-root", proto_root, "--out", out).returncode == 0
    assert regen("--proto-root", proto_root, "--out", out, "--check").returncode == 0
    assert b"verbose" in (out / "serving_pb2.py").read_bytes()
    grpc_src = (out / "serving_pb2_grpc.py").read_text()
    assert "from . import serving_pb2 as" in grpc_src and "from qwen2." not in grpc_src


def test_check_names_a_missing_stub(tmp_path):
    out = tmp_path / "stubs"
    shutil.copytree(STUBS, out)
    (out / "serving_pb2.pyi").unlink()
    run = regen("--out", out, "--check")
    assert run.returncode == 1 and "serving_pb2.pyi" in run.stderr


def test_stubs_import_as_part_of_the_package():
    from qwen2_client.proto import serving_pb2, serving_pb2_grpc

    assert serving_pb2_grpc.qwen2_dot_serving_dot_v1_dot_serving__pb2 is serving_pb2  # the relative import
    assert serving_pb2.DESCRIPTOR.package == "qwen2.serving.v1"
    assert {m.name for m in serving_pb2.DESCRIPTOR.services_by_name["Generation"].methods} == {
        "Generate", "GenerateStream", "Tokenize", "ModelInfo", "Embed", "Classify", "ClassifyTokens", "ExtractiveQA"}
    assert hasattr(serving_pb2_grpc, "GenerationStub") and hasattr(serving_pb2_grpc, "add_GenerationServicer_to_server")
