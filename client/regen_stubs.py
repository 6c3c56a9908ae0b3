#!/usr/bin/env python
"""Regenerate (or, with --check, verify) the SDK's gRPC stubs from the public .proto contract.

    python client/regen_stubs.py            # rewrite client/qwen2_client/proto/serving_pb2{,_grpc}.py{,i}
    python client/regen_stubs.py --check    # exit 1 naming every stale or missing file

Runs `python -m grpc_tools.protoc -I <proto-root> --python_out --pyi_out --grpc_python_out` into a
temporary folder, rewrites the grpc module's absolute import of serving_pb2 to a relative one (so the
stubs live inside the qwen2_client package), and writes or compares the three files. Needs grpcio-tools
(`pip install './client[dev]'`), pinned there so the output is byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_PROTO_ROOT = HERE.parent / "proto"
DEFAULT_OUT = HERE / "qwen2_client" / "proto"
PROTO = "qwen2/serving/v1/serving.proto"
OUTPUTS = ("serving_pb2.py", "serving_pb2.pyi", "serving_pb2_grpc.py")

_ABSOLUTE_IMPORT = re.compile(r"^from qwen2\.serving\.v1 import serving_pb2 as ", re.MULTILINE)


def generate(proto_root: Path) -> dict[str, bytes]:
    """File name -> contents, as they should be committed."""
    proto_root = proto_root.resolve()
    if not (proto_root / PROTO).is_file():
        raise FileNotFoundError(f"{proto_root / PROTO} not found")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_root}",
               f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", PROTO]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"protoc failed ({run.returncode}): {run.stderr.strip() or run.stdout.strip()}")
        gen = Path(tmp) / Path(PROTO).parent
        files = {name: (gen / name).read_bytes() for name in OUTPUTS}
    grpc_src = files["serving_pb2_grpc.py"].decode()
    grpc_src, n = _ABSOLUTE_IMPORT.subn("from . import serving_pb2 as ", grpc_src)
    if n != 1:
        raise RuntimeError("serving_pb2_grpc.py: expected exactly one `from qwen2.serving.v1 import serving_pb2`")
    files["serving_pb2_grpc.py"] = grpc_src.encode()
    return files


def _tools_version() -> str:
    try:
        from importlib.metadata import version
        return version("grpcio-tools")
    except Exception:  # noqa: BLE001 - only used in a hint
        return "?"


def check(files: dict[str, bytes], out: Path) -> list[str]:
    """Names of committed files that differ from (or are missing next to) the freshly generated ones."""
    return [name for name, data in files.items()
            if not (out / name).is_file() or (out / name).read_bytes() != data]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--proto-root", type=Path, default=DEFAULT_PROTO_ROOT,
                    help=f"folder holding {PROTO} (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="stub folder (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 if stale")
    args = ap.parse_args(argv)
    try:
        files = generate(args.proto_root)
    except (OSError, RuntimeError) as e:
        print(f"regen_stubs: {e}", file=sys.stderr)
        return 2
    if args.check:
        stale = check(files, args.out)
        if stale:
            print(f"regen_stubs: stale stubs in {args.out}: {', '.join(stale)} "
                  f"(generated with grpcio-tools {_tools_version()}); run: python client/regen_stubs.py",
                  file=sys.stderr)
            return 1
        print(f"regen_stubs: {len(files)} stubs in {args.out} are up to date")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (args.out / name).write_bytes(data)
    print(f"regen_stubs: wrote {', '.join(files)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
