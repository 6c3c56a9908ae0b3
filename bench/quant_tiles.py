"""`python -m bench.quant_tiles`: the fused dequantize-matmul kernels (shards/triton_quant.py) over a set of tile
sizes, warps and pipeline stages on this GPU, on Qwen2-7B's MLP shapes at 1 and 64 rows: which launch settings
read the 4-bit weights fastest, against Triton's defaults (BASE, the settings of the kernels' first GPU run) and
a bf16 matmul of the same weights; shards/triton_quant.py's GROUP_TILES and NF4_TILES come from it. Needs CUDA, or
TRITON_INTERPRET=1 with `--device cpu --quick` (the smoke test: tiny shapes, two settings).

Writes JSON to --out (default bench/quant_tiles.json) and prints each case's settings fastest first.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.gpu import dtype_name, environment, log, quant_layer, stored_bytes, summary, timings

BASE = dict(block_n=64, block_k=64, num_warps=4, num_stages=3)  # Triton's defaults
SETTINGS = [BASE] + [BASE | change for change in (
    dict(block_n=32), dict(block_n=128), dict(block_k=32), dict(block_k=128), dict(num_warps=2), dict(num_warps=8),
    dict(num_stages=2), dict(num_stages=4), dict(block_n=32, block_k=128, num_stages=4),
    dict(block_n=128, block_k=128, num_warps=8), dict(block_n=32, block_k=32, num_warps=2, num_stages=2))]
FULL = dict(formats=("gptq-int4", "nf4"), shapes=[(3584, 2 * 18944), (18944, 3584)], rows=(1, 64), repeats=20,
            settings=SETTINGS)
QUICK = dict(formats=("gptq-int4", "nf4"), shapes=[(128, 256)], rows=(1,), repeats=2, settings=SETTINGS[:2])


@torch.inference_mode()
def case(fmt: str, inp: int, out: int, rows: int, device, s: dict) -> dict:
    dtype = getattr(torch, dtype_name(device))
    gen = torch.Generator().manual_seed(inp + out)
    method, layer = quant_layer(fmt, inp, out, dtype, device, gen)
    dense = method.dense(layer, dtype)
    x = torch.randn(rows, inp, generator=gen).to(device=device, dtype=dtype)
    exact = F.linear(x.float(), dense.float())
    nbytes = stored_bytes(layer)
    row = {"format": fmt, "in": inp, "out": out, "rows": rows, "stored_bytes": nbytes,
           "bf16_s": summary(timings(lambda: F.linear(x, dense), device, 2, s["repeats"]))["median_s"], "runs": []}
    for tiles in s["settings"]:
        try:
            got = method.fused(layer, x, **tiles)
            seconds = summary(timings(lambda: method.fused(layer, x, **tiles), device, 2, s["repeats"]))["median_s"]
            diff = ((got.float() - exact).abs().max() / exact.abs().max()).item()
            row["runs"].append(tiles | {"median_s": seconds, "bytes_per_s": nbytes / seconds, "rel_diff": diff})
        except Exception as e:  # a setting the compiler or the GPU refuses (shared memory, say)
            row["runs"].append(tiles | {"error": f"{type(e).__name__}: {str(e)[:200]}"})
    timed = sorted((r for r in row["runs"] if "median_s" in r), key=lambda r: r["median_s"])
    base = next((r for r in row["runs"] if "median_s" in r and all(r[k] == v for k, v in BASE.items())), None)
    log(f"{fmt} {inp}->{out} x {rows}: bf16 {row['bf16_s'] * 1e3:.3f} ms; base "
        f"{base['median_s'] * 1e3 if base else float('nan'):.3f} ms; fastest first:")
    for r in timed[:4]:
        log(f"    {r['median_s'] * 1e3:.3f} ms ({r['bytes_per_s'] / 1e9:.0f} GB/s, diff {r['rel_diff']:.2g}) "
            f"{ {k: r[k] for k in BASE} }")
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.quant_tiles", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="bench/quant_tiles.json")
    args = p.parse_args(argv)
    device, s = torch.device(args.device), QUICK if args.quick else FULL
    r = {"environment": environment(device), "cases": []}
    for fmt in s["formats"]:
        for inp, out in s["shapes"]:
            for rows in s["rows"]:
                r["cases"].append(case(fmt, inp, out, rows, device, s))
    Path(args.out).write_text(json.dumps(r, indent=2) + "\n")
    log(f"wrote {args.out}")
    return r


if __name__ == "__main__":
    main()
