"""`python -m bench.gpu`: one rank's worker at TP=1 on one NVIDIA GPU, against that GPU's own limits.

Run from the repository root on a machine with torch, triton, transformers and safetensors (nothing else: no
Ray, no gRPC, no install of this project):

    python -m bench.gpu                          # Qwen2-7B shape, bf16: about 3 minutes on one H200 (budget: 8)
    python -m bench.gpu --quick                  # tiny shapes: a smoke test of the same code on the GPU
    python -m bench.gpu --device cpu --quick     # the CI smoke test: float32, no graphs, no Triton kernel

What it reports, all measured in the one run (docs/performance.md, "GPU benchmark"):

1. numerics: a small Qwen2 (random checkpoint) in transformers and in our worker, same dtype, same device:
   last-position logits of a few prompts (max |ours - transformers|) and greedy tokens over 16 steps;
2. floors: HBM bandwidth (a large device-to-device copy) and the bf16 matmul rate, best of several;
3. decode: a Qwen2-7B-shaped model with random bf16 weights, one step (forward + sampling) at several batch
   sizes and contexts, eager and with CUDA graphs, each over its floor max(bytes / bandwidth, FLOPs / rate);
4. prefill: one 2K and one 16K prompt in a single chunk, achieved TFLOP/s against the measured matmul rate;
5. attention: the Triton paged-attention kernel alone against torch's scaled_dot_product_attention on dense
   tensors of the same shapes;
6. quant: the fused dequantize-matmul kernels (GPTQ int4, AWQ, NF4) on Qwen2-7B's MLP shapes against a bf16
   matmul of the same weights dequantized: time, the stored bytes read per second, and their difference.

Targets are printed next to the figures, never asserted. Writes JSON to --out (default bench/gpu_results.json)
and the same as Markdown beside it (.md). A section that fails is recorded under `errors` and the run goes on.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from bench.floors import ModelCost
from shards.batch import SeqPlan, StepBatch
from shards.checkpoint import preset_config, write_random_checkpoint
from shards.config import Qwen2Config
from shards.parallel import ParallelGroups
from shards.sampling import SamplingParams
from shards.worker import ShardWorker

GREEDY = SamplingParams(temperature=0.0)
BLOCK_SIZE = 16
SECTIONS = ("numerics", "decode", "prefill", "attention", "quant")  # the floors are always measured: the others need them

# The full run on one H200, with the budget of each section (8 minutes in all; about 3 expected):
#   numerics ~45 s (writing and loading a 0.5B checkpoint dominates), floors ~5 s, building the 7B model and its
#   KV cache ~15 s (+ graph capture), decode ~90 s (12 rows x 23 steps; the slowest row's steps take tens of
#   ms), prefill ~20 s, attention ~30 s (mostly Triton compiling a kernel per shape).
FULL = dict(
    numerics_preset="qwen2-0.5b", prompts=(5, 37, 200), greedy_steps=16,
    copy_bytes=2 * 2**30, matmul_n=8192, floor_repeats=10,
    model_preset="qwen2-7b", headroom_bytes=12 * 2**30,  # left free beside the KV cache: activations, graphs
    decode=[(1, 1024), (16, 1024), (64, 1024), (256, 1024), (1, 8192), (64, 8192)], warmup=3, steps=20,
    prefill=[2048, 16384], prefill_repeats=3,
    attention=[("decode", 64, 1024), ("decode", 64, 8192), ("decode", 1, 8192), ("prefill", 1, 2048)],
    attention_repeats=20, profile=[(1, 1024), (64, 1024)],
    quant=[(3584, 2 * 18944), (18944, 3584)], quant_rows=(1, 64), quant_repeats=20,  # gate_up, down
)
# --quick: tiny shapes, seconds on a CPU (the smoke test) or a GPU.
QUICK = dict(
    numerics_preset="tiny", prompts=(5, 11, 20), greedy_steps=16,
    copy_bytes=64 * 2**20, matmul_n=512, floor_repeats=3,
    model_preset="tiny", headroom_bytes=2**30,
    decode=[(1, 64), (4, 64), (1, 256), (4, 256)], warmup=1, steps=3,
    prefill=[64, 256], prefill_repeats=2,
    attention=[("decode", 4, 64), ("decode", 4, 256), ("prefill", 1, 64)], attention_repeats=3,
    profile=[(1, 64)], quant=[(128, 256)], quant_rows=(1, 4), quant_repeats=3,
)
TARGET_DECODE = 1.5  # decode step <= 1.5x its floor at batch 1 and 64 (with graphs)
TARGET_PREFILL = 0.5  # prefill >= 50% of the measured matmul rate

BEGAN = time.perf_counter()


def log(message: str) -> None:
    print(f"[gpu {time.perf_counter() - BEGAN:6.1f} s] {message}", flush=True)


def seconds(fn, device: torch.device) -> float:
    """One run of fn(): CUDA events around it on the GPU, after the queue has drained, so host time before its
    first kernel counts as it does in serving; the wall clock elsewhere."""
    if device.type != "cuda":
        began = time.perf_counter()
        fn()
        return time.perf_counter() - began
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def timings(fn, device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    return [seconds(fn, device) for _ in range(repeats)]


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def dtype_name(device) -> str:
    """bf16 on the GPU (what it serves); float32 on the CPU, where the smoke test checks exact agreement."""
    return "bfloat16" if device.type == "cuda" else "float32"


def model_config(preset: str, dtype: str) -> dict:
    return preset_config(preset) | {"torch_dtype": dtype}


def tables(lengths, first_block: int = 1) -> list[list[int]]:
    """Consecutive blocks for sequences of these lengths (block 0 left free: padding reads it)."""
    out, block = [], first_block
    for n in lengths:
        need = -(-n // BLOCK_SIZE)
        out.append(list(range(block, block + need)))
        block += need
    return out


def random_prompts(vocab: int, lengths, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


# --- 1. numerics ------------------------------------------------------------------------------------------------


def write_checkpoint(out_dir, preset: str) -> Path:
    """A float32 random checkpoint of `preset`, without tokenizer files (which need a package the GPU machine
    lacks); both sides round the same float32 weights to the compared dtype."""
    return write_random_checkpoint(out_dir, preset_config(preset), seed=0, dtype="float32", tokenizer=False)


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], steps: int, device) -> list[int]:
    """transformers' greedy tokens, each from a full forward of the prompt and the tokens so far (no cache: the
    plainest reference)."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids], device=device)).logits[0, -1].float().argmax()))
    return ids[len(prompt):]


def numerics(device, s: dict, workdir: Path) -> dict:
    from transformers import Qwen2ForCausalLM

    dtype = dtype_name(device)
    torch_dtype = getattr(torch, dtype)
    model_dir = write_checkpoint(workdir / "numerics", s["numerics_preset"])
    log(f"numerics: {s['numerics_preset']} checkpoint written")
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = random_prompts(vocab, s["prompts"], seed=1)
    steps = s["greedy_steps"]
    blocks = tables([len(p) + steps for p in prompts])
    worker = ShardWorker(str(model_dir), ParallelGroups(), num_kv_blocks=blocks[-1][-1] + 1, device=device,
                         dtype=dtype, attention_backend=None)
    plans = [SeqPlan(i, p, 0, blocks[i], sampling=GREEDY) for i, p in enumerate(prompts)]
    ours_logits = worker.forward(plans)[0].float().cpu()
    first = worker.execute(plans)
    ours = {r["seq_id"]: [r["token_id"]] for r in first}
    ours_logprobs = {r["seq_id"]: [r["logprob"]] for r in first}
    for k in range(steps - 1):
        step = [SeqPlan(i, [ours[i][-1]], len(p) + k, blocks[i], sampling=GREEDY) for i, p in enumerate(prompts)]
        for r in worker.execute(step):
            ours[r["seq_id"]].append(r["token_id"])
            ours_logprobs[r["seq_id"]].append(r["logprob"])
    del worker
    log("numerics: ours done")

    def load(dt):  # loaded as written (float32), then cast: no from_pretrained dtype keyword across versions
        return Qwen2ForCausalLM.from_pretrained(model_dir).to(device=device, dtype=dt).eval()

    def last_logits(model):
        with torch.inference_mode():
            return torch.stack([model(torch.tensor([p], device=device)).logits[0, -1].float().cpu()
                                for p in prompts])

    ref = load(torch_dtype)
    ref_logits = last_logits(ref)
    ref_tokens = [hf_greedy(ref, p, steps, device) for p in prompts]
    with torch.inference_mode():  # transformers teacher-forced on our tokens: its logprobs at each of our steps
        forced = [ref(torch.tensor([p + ours[i][:-1]], device=device)).logits[0, len(p) - 1 :].float()
                  .log_softmax(-1).cpu() for i, p in enumerate(prompts)]
    del ref
    exact_logits = None
    if torch_dtype != torch.float32:  # the scale of a bf16 error: both sides against the float32 model
        exact = load(torch.float32)
        exact_logits = last_logits(exact)
        del exact
    free_memory(device)
    rows = []
    for i, p in enumerate(prompts):
        agree = next((k for k, (a, b) in enumerate(zip(ours[i], ref_tokens[i])) if a != b), steps)
        ref_lp = forced[i][torch.arange(steps), torch.tensor(ours[i])]
        row = {"prompt_tokens": len(p), "max_abs_diff": (ours_logits[i] - ref_logits[i]).abs().max().item(),
               "ref_max_abs_logit": ref_logits[i].abs().max().item(),
               "greedy_ours": ours[i], "greedy_ref": ref_tokens[i], "greedy_agree": agree,
               "greedy_equal": ours[i] == ref_tokens[i],
               # On our tokens: how far our logprobs are from transformers', and how far below transformers'
               # own argmax our picks were (0 when it picks the same; a bf16 near-tie when small).
               "forced_logprob_diff": (torch.tensor(ours_logprobs[i]) - ref_lp).abs().max().item(),
               "forced_worst_gap": (forced[i].amax(-1) - ref_lp).max().item()}
        if exact_logits is not None:
            row["ours_vs_float32"] = (ours_logits[i] - exact_logits[i]).abs().max().item()
            row["ref_vs_float32"] = (ref_logits[i] - exact_logits[i]).abs().max().item()
        rows.append(row)
        log(f"numerics: prompt {len(p)} tokens: max |ours - transformers| {row['max_abs_diff']:.3g}, "
            f"greedy agree {agree}/{steps}; teacher-forced on ours: logprobs within "
            f"{row['forced_logprob_diff']:.3g}, picks at most {row['forced_worst_gap']:.3g} below its argmax")
    return {"preset": s["numerics_preset"], "dtype": dtype, "greedy_steps": steps, "rows": rows}


# --- 2. floors --------------------------------------------------------------------------------------------------


def best_matmul_s(n: int, dtype, device, repeats: int) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return min(timings(lambda: torch.mm(a, b), device, 2, repeats))


def best_copy_s(nbytes: int, device, repeats: int) -> float:
    src = torch.ones(nbytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return min(timings(lambda: dst.copy_(src), device, 2, repeats))


@torch.inference_mode()
def measure_floors(device, s: dict) -> dict:
    """Best of several: the least disturbed run is the nearest to what the hardware can do."""
    matmul_s = best_matmul_s(s["matmul_n"], getattr(torch, dtype_name(device)), device, s["floor_repeats"])
    copy_s = best_copy_s(s["copy_bytes"], device, s["floor_repeats"])
    free_memory(device)
    n = s["matmul_n"]
    out = {"matmul_n": n, "matmul_dtype": dtype_name(device), "matmul_flops": 2 * n**3 / matmul_s,
           "copy_bytes": s["copy_bytes"], "bandwidth_bytes": 2 * s["copy_bytes"] / copy_s}  # read + written
    log(f"floors: matmul {per_s(out['matmul_flops'], 1e12)} TFLOP/s, copy {per_s(out['bandwidth_bytes'], 1e9)} GB/s")
    return out


# --- 3 and 4. decode and prefill on the Qwen2-7B shape ------------------------------------------------------------


def build_worker(cfg: dict, device, num_blocks: int | None, graphs: bool) -> ShardWorker:
    return ShardWorker(None, ParallelGroups(), num_kv_blocks=num_blocks, device=device, dtype=cfg["torch_dtype"],
                       config=Qwen2Config.from_dict(cfg), attention_backend=None, cuda_graphs=graphs)


def graph_worker(cfg: dict, device, num_blocks: int) -> tuple[ShardWorker, str | None]:
    """The worker with CUDA graphs captured where it can take them, and why not otherwise (None: it can)."""
    if device.type != "cuda":
        return build_worker(cfg, device, num_blocks, False), "not available: CUDA graphs need a CUDA device"
    try:
        return build_worker(cfg, device, num_blocks, True), None
    except Exception as e:  # a failed capture: measure eager rather than nothing
        log(f"decode: building with CUDA graphs failed ({type(e).__name__}: {e}); eager only")
        free_memory(device)
        return build_worker(cfg, device, num_blocks, False), f"failed: {type(e).__name__}: {e}"


def kv_blocks(batch: int, context: int) -> int:
    return batch * -(-context // BLOCK_SIZE)


def plan_capacity(cfg: dict, device, s: dict) -> dict:
    """How many KV blocks the largest case needs and how many fit beside the weights (measured on a worker
    built without a cache, then freed)."""
    need = 1 + max([kv_blocks(b, c) for b, c in s["decode"]] + [kv_blocks(1, t) for t in s["prefill"]])
    probe = build_worker(cfg, device, None, False)
    block_bytes = probe.kv_block_bytes
    out = {"kv_block_bytes": block_bytes, "weight_bytes": probe.bytes_loaded, "needed_blocks": need}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        out |= {"free_after_weights_bytes": free, "total_bytes": total,
                "fit_blocks": max(0, (free - s["headroom_bytes"]) // block_bytes)}
    else:
        out["fit_blocks"] = need
    del probe
    free_memory(device)
    out["blocks"] = min(need, out["fit_blocks"])
    return out


def decode_plans(worker: ShardWorker, batch: int, context: int, steps: int):
    """Plans decoding `batch` sequences at `context` tokens each (their caches hold whatever they hold: the time
    does not depend on it), as the router sends them: whole once (run here), then `steps` steps of continuing
    plans that carry only what is new (each step rewrites the same position). Fresh objects each step: a rank
    completes a continuing plan in place, as it does an unpickled one."""
    rows = tables([context] * batch)
    tokens = random_prompts(worker.config.vocab_size, [1] * batch, seed=batch)
    worker.execute([SeqPlan(i, tokens[i], context - 1, rows[i], sampling=GREEDY) for i in range(batch)])
    return iter([[SeqPlan(i, tokens[i], context - 1, [], continues=True, keeps_sampling=True) for i in range(batch)]
                 for _ in range(steps)])


@torch.inference_mode()
def decode_row(worker: ShardWorker, batch: int, context: int, device, s: dict) -> dict:
    """One decode step of `batch` sequences at `context` tokens each, timed around worker.execute."""
    plans = decode_plans(worker, batch, context, s["warmup"] + s["steps"])
    sample_s = []

    def step():
        worker.execute(next(plans))
        sample_s.append(worker.last_sample_s)  # the driver's sampling, inside the step

    times = timings(step, device, s["warmup"], s["steps"])
    return summary(times) | {"sample_s_median": statistics.median(sample_s[s["warmup"]:])}


def decode(worker, graphs_reason, capacity, cost: ModelCost, limits: dict, device, s: dict) -> dict:
    out = {"graphs": graphs_reason or "captured", "rows": []}
    modes = ["eager"] + (["graphs"] if graphs_reason is None else [])
    for batch, context in s["decode"]:
        row = {"batch": batch, "context": context,
               "floor": cost.decode_floor(batch, context, limits["matmul_flops"], limits["bandwidth_bytes"])}
        if kv_blocks(batch, context) + 1 > capacity["blocks"]:
            row["skipped"] = f"needs {kv_blocks(batch, context)} KV blocks, {capacity['blocks']} fit"
            out["rows"].append(row)
            log(f"decode batch {batch} context {context}: skipped ({row['skipped']})")
            continue
        for mode in modes:
            try:
                if graphs_reason is None:
                    worker.use_cuda_graphs = mode == "graphs"
                row[mode] = decode_row(worker, batch, context, device, s)
                row[mode]["over_floor"] = row[mode]["median_s"] / row["floor"]["floor_s"]
                log(f"decode batch {batch} context {context} {mode}: {row[mode]['median_s'] * 1e3:.2f} ms, "
                    f"{row[mode]['over_floor']:.2f}x its floor ({row['floor']['floor_s'] * 1e3:.2f} ms)")
            except Exception as e:
                row[mode] = {"error": f"{type(e).__name__}: {e}"}
                log(f"decode batch {batch} context {context} {mode} failed: {row[mode]['error']}")
                free_memory(device)
        if graphs_reason is not None:
            row["graphs"] = {"unavailable": graphs_reason}
        out["rows"].append(row)
    if graphs_reason is None:
        worker.use_cuda_graphs = True
    out["profiles"] = [profile_row(worker, batch, context, device, s) for batch, context in s["profile"]
                       if kv_blocks(batch, context) + 1 <= capacity["blocks"]]
    return out


@torch.inference_mode()
def profile_row(worker: ShardWorker, batch: int, context: int, device, s: dict, steps: int = 5) -> dict:
    """Where a decode step's host time goes (replayed where the worker has graphs): torch.profiler's ops by self
    CPU time over a few steps (those outside the graph, and the replay itself), with the GPU's time beside."""
    from torch.profiler import ProfilerActivity, profile

    plans = decode_plans(worker, batch, context, steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for step in plans:
            worker.execute(step)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=s.get("profile_rows", 20))
    mode = "replayed" if worker.use_cuda_graphs else "eager"
    log(f"profile of {steps} {mode} decode steps, batch {batch}, context {context}:\n{table}")
    return {"batch": batch, "context": context, "steps": steps, "mode": mode, "table": table}


@torch.inference_mode()
def prefill(worker, cost: ModelCost, limits: dict, device, s: dict) -> dict:
    rows = []
    for tokens in s["prefill"]:
        prompt = random_prompts(worker.config.vocab_size, [tokens], seed=tokens)[0]
        plan = [SeqPlan(0, prompt, 0, tables([tokens])[0], sampling=GREEDY)]
        row = {"tokens": tokens, "floor": cost.prefill_floor(tokens, limits["matmul_flops"])}
        row |= summary(timings(lambda: worker.execute(plan), device, 1, s["prefill_repeats"]))
        row["flops_per_s"] = row["floor"]["flops"] / row["median_s"]
        row["of_matmul_rate"] = row["flops_per_s"] / limits["matmul_flops"]
        rows.append(row)
        log(f"prefill {tokens} tokens: {ms(row['median_s'])} ms, {per_s(row['flops_per_s'], 1e12)} TFLOP/s, "
            f"{row['of_matmul_rate']:.0%} of the matmul rate")
    return {"rows": rows}


# --- 5. the Triton kernel alone --------------------------------------------------------------------------------


def attention_skip_reason(device) -> str | None:
    if device.type != "cuda" and not interpreted(device):
        return "skipped: the Triton kernel runs on CUDA (on CPU only with TRITON_INTERPRET=1)"
    try:
        import shards.triton_attention  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        return "skipped: triton is not installed"
    return None


@torch.inference_mode()
def attention_row(kind: str, batch: int, context: int, cfg: dict, device, s: dict) -> dict:
    """One layer's attention for `batch` sequences of `context` tokens: the paged kernel over a block-scattered
    cache (decode: one query each, at the end; prefill: every position, causal) against SDPA on the same keys
    and values laid out dense."""
    import torch.nn.functional as F

    from shards.triton_attention import triton_paged_attention

    dtype = getattr(torch, cfg["torch_dtype"])
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim, scale = cfg["hidden_size"] // heads, (cfg["hidden_size"] // heads) ** -0.5
    queries = 1 if kind == "decode" else context
    block_tables = tables([context] * batch)
    plans = [SeqPlan(i, [0] * queries, context - queries, block_tables[i]) for i in range(batch)]
    step = StepBatch.build(plans, BLOCK_SIZE, device)
    g = torch.Generator(device=device).manual_seed(0)
    cache = torch.randn(2, kv_heads, block_tables[-1][-1] + 1, BLOCK_SIZE, head_dim, generator=g, device=device,
                        dtype=dtype)
    q = torch.randn(batch * queries, heads, head_dim, generator=g, device=device, dtype=dtype)
    index = torch.tensor(block_tables, device=device)  # [batch, blocks]
    k, v = (cache[i][:, index].flatten(2, 3)[:, :, :context].transpose(0, 1).contiguous() for i in (0, 1))
    qd = q.view(batch, queries, heads, head_dim).transpose(1, 2).contiguous()  # [batch, heads, queries, dim]

    def paged():
        return triton_paged_attention(q, cache, step, scale, None)

    def dense():
        return F.scaled_dot_product_attention(qd, k, v, is_causal=kind == "prefill", scale=scale, enable_gqa=True)

    diff = (paged().float() - dense().transpose(1, 2).reshape(q.shape).float()).abs().max().item()
    itemsize = cache.element_size()
    pairs = context * (context + 1) // 2 if kind == "prefill" else context  # (query, key) pairs a sequence scores
    moved = batch * (2 * context * kv_heads + 2 * queries * heads) * head_dim * itemsize  # K, V, q read; out written
    flops = 4 * batch * heads * head_dim * pairs
    row = {"kind": kind, "batch": batch, "context": context, "max_abs_diff": diff, "bytes": moved, "flops": flops}
    for name, fn in (("triton", paged), ("sdpa", dense)):
        row[name] = summary(timings(fn, device, 2, s["attention_repeats"]))
        row[name] |= {"bytes_per_s": moved / row[name]["median_s"], "flops_per_s": flops / row[name]["median_s"]}
    log(f"attention {kind} batch {batch} context {context}: triton {row['triton']['median_s'] * 1e3:.3f} ms, "
        f"sdpa {row['sdpa']['median_s'] * 1e3:.3f} ms, max |diff| {diff:.3g}")
    return row


def attention(r: dict, device, s: dict) -> dict:
    if reason := attention_skip_reason(device):
        log(f"attention: {reason}")
        return {"skipped": reason}
    cfg = model_config(s["model_preset"], dtype_name(device))
    rows = []
    for kind, batch, context in s["attention"]:
        row = attempt(r, f"attention {kind} {batch}x{context}", device,
                      lambda: attention_row(kind, batch, context, cfg, device, s))
        free_memory(device)  # this case's cache and dense copies
        if row:
            rows.append(row)
    return {"rows": rows}


# --- 6. the fused dequantize-matmul kernels --------------------------------------------------------------------

QUANT_FORMATS = ("gptq-int4", "awq", "nf4")


def quant_layer(fmt: str, inp: int, out: int, dtype, device, gen):
    """(method, layer): a linear [out, inp] stored in `fmt` with random codes, built on the device as the worker
    builds one (NF4: a random bf16 weight quantized as it is loaded)."""
    from shards.checkpoint import QUANTIZATIONS, _quantized_specs, _random_quantized
    from shards.layers import ColumnParallelLinear
    from shards.quant import QuantConfig, linear_method

    qc = QUANTIZATIONS[fmt]
    config = QuantConfig("bitsandbytes-nf4") if fmt == "nf4" else QuantConfig.resolve({"quantization_config": qc}, None)
    method = linear_method(config)
    with device:
        layer = ColumnParallelLinear(inp, [("w", out, [(0, out)])], bias=False, dtype=dtype, quant=method)
    if fmt == "nf4":
        layer.weight.weight_loader(layer.weight, torch.randn(out, inp, generator=gen).mul_(0.02).to(dtype), "w")
        return method, layer
    for name, shape, kind in _quantized_specs([("x.up_proj.weight", (out, inp), "matrix")], qc):
        param = getattr(layer, name.rsplit(".", 1)[1], None)  # g_idx without desc_act: not read
        if param is not None:
            param.weight_loader(param, _random_quantized(shape, kind, 0.02, gen, qc), "w")
    return method, layer


def stored_bytes(layer) -> int:
    """What the layer's matmul reads of its weight: its parameters, or its NF4 states' tensors."""
    tensors = list(layer.parameters()) + [t for states in getattr(layer, "nf4", {}).values() for state in states
                                          for t in state.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.inference_mode()
def quant_row(fmt: str, inp: int, out: int, rows: int, device, s: dict) -> dict:
    import torch.nn.functional as F

    dtype = getattr(torch, dtype_name(device))
    gen = torch.Generator().manual_seed(inp + out)
    method, layer = quant_layer(fmt, inp, out, dtype, device, gen)
    method.triton_on_cpu = interpreted(device)
    dense = method.dense(layer, dtype)  # [out, inp], what the torch path multiplies by
    x = torch.randn(rows, inp, generator=gen).to(device=device, dtype=dtype)
    exact = F.linear(x.float(), dense.float())
    diff = ((method.apply(layer, x).float() - exact).abs().max() / exact.abs().max()).item()
    nbytes = stored_bytes(layer)
    row = {"format": fmt, "in": inp, "out": out, "rows": rows, "stored_bytes": nbytes, "rel_diff": diff,
           "fused": summary(timings(lambda: method.apply(layer, x), device, 2, s["quant_repeats"])),
           "dense": summary(timings(lambda: F.linear(x, dense), device, 2, s["quant_repeats"]))}
    row["fused"]["bytes_per_s"] = nbytes / row["fused"]["median_s"]
    row["dense"]["bytes_per_s"] = dense.numel() * dense.element_size() / row["dense"]["median_s"]
    log(f"quant {fmt} {inp}->{out} x {rows} rows: fused {ms(row['fused']['median_s'])} ms "
        f"({per_s(row['fused']['bytes_per_s'], 1e9)} GB/s of stored weight), {dtype_name(device)} "
        f"{ms(row['dense']['median_s'])} ms, relative diff {diff:.3g}")
    return row


def interpreted(device) -> bool:
    """Triton kernels on CPU tensors: only under its interpreter (TRITON_INTERPRET=1)."""
    return device.type != "cuda" and bool(os.environ.get("TRITON_INTERPRET"))


def quant(r: dict, device, s: dict) -> dict:
    """On CPU the methods dequantize and multiply in torch unless Triton's interpreter runs the kernels."""
    rows = []
    for fmt in QUANT_FORMATS:
        for inp, out in s["quant"]:
            for m in s["quant_rows"]:
                row = attempt(r, f"quant {fmt} {inp}x{out} x {m}", device,
                              lambda: quant_row(fmt, inp, out, m, device, s))
                free_memory(device)
                if row:
                    rows.append(row)
    kernel = "triton" if device.type == "cuda" or interpreted(device) else "torch (dequantize, then matmul)"
    return {"kernel": kernel, "rows": rows}


# --- the run ----------------------------------------------------------------------------------------------------


def environment(device) -> dict:
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(), "torch": torch.__version__,
           "device": str(device), "cpu_threads": torch.get_num_threads()}
    for name in ("triton", "transformers", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out |= {"gpu": props.name, "gpu_memory_bytes": props.total_memory, "sms": props.multi_processor_count,
                "cuda": torch.version.cuda}
    return out


def targets(r: dict) -> list[dict]:
    """Every target this run measured: (figure, value, target, met). Decode is judged with graphs where the
    worker has them, eager otherwise (said in the figure's name)."""
    rows = []
    for d in r.get("decode", {}).get("rows", []):
        if d["batch"] not in (1, 64):
            continue
        mode = "graphs" if "over_floor" in d.get("graphs", {}) else "eager"
        if "over_floor" in d.get(mode, {}):
            value = d[mode]["over_floor"]
            rows.append({"figure": f"decode step / floor, batch {d['batch']}, context {d['context']}, {mode}",
                         "value": value, "target": f"<= {TARGET_DECODE}x", "met": value <= TARGET_DECODE})
    for p in r.get("prefill", {}).get("rows", []):
        rows.append({"figure": f"prefill {p['tokens']} tokens, share of the matmul rate",
                     "value": p["of_matmul_rate"], "target": f">= {TARGET_PREFILL:.0%}",
                     "met": p["of_matmul_rate"] >= TARGET_PREFILL})
    return rows


def ms(x: float) -> str:
    return f"{x * 1e3:.3g}" if x * 1e3 < 100 else f"{x * 1e3:.0f}"


def per_s(x: float, unit: float) -> str:
    """A rate in `unit`s (1e12: TFLOP/s, 1e9: GB/s), three figures at most below 1000."""
    return f"{x / unit:.3g}" if x < 1000 * unit else f"{x / unit:.0f}"


def markdown(r: dict) -> str:
    env, lines = r["environment"], []
    lines += [f"# GPU benchmark, {env.get('gpu', env['device'])}", "",
              f"{env['date']}; torch {env['torch']}, CUDA {env.get('cuda')}, triton {env['triton']}, transformers "
              f"{env['transformers']}; {'--quick, ' if r['settings']['quick'] else ''}{r['settings']['dtype']}; "
              f"{r['elapsed_s']:.0f} s in all.", ""]
    if f := r.get("floors"):
        lines += ["## Floors", "", "| figure | value |", "|---|---|",
                  f"| matmul {f['matmul_n']}^3 {f['matmul_dtype']} | {per_s(f['matmul_flops'], 1e12)} TFLOP/s |",
                  f"| copy of {f['copy_bytes'] / 2**20:.0f} MiB (read + written) | "
                  f"{per_s(f['bandwidth_bytes'], 1e9)} GB/s |", ""]
    if n := r.get("numerics"):
        extra = "ours_vs_float32" in n["rows"][0]
        lines += [f"## Numerics: {n['preset']}, {n['dtype']}, ours against transformers", "",
                  "| prompt tokens | max abs logit diff | max abs logit | greedy tokens agree | forced: logprob "
                  "diff | forced: gap below argmax |" + (" ours vs float32 | transformers vs float32 |" if extra else ""),
                  "|---|---|---|---|---|---|" + ("---|---|" if extra else "")]
        for row in n["rows"]:
            lines.append(f"| {row['prompt_tokens']} | {row['max_abs_diff']:.3g} | {row['ref_max_abs_logit']:.3g} | "
                         f"{row['greedy_agree']}/{n['greedy_steps']} | {row['forced_logprob_diff']:.3g} | "
                         f"{row['forced_worst_gap']:.3g} |"
                         + (f" {row['ours_vs_float32']:.3g} | {row['ref_vs_float32']:.3g} |" if extra else ""))
        lines.append("")
    if d := r.get("decode"):
        lines += [f"## Decode step: {r['settings']['model_preset']}, random weights (graphs: {d['graphs']})", "",
                  "| batch | context | floor ms | bound | eager ms | eager / floor | graphs ms | graphs / floor |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in d["rows"]:
            cells = []
            for mode in ("eager", "graphs"):
                m = row.get(mode, {})
                cells += ([ms(m["median_s"]), f"{m['over_floor']:.2f}x"] if "median_s" in m else
                          [row.get("skipped") or ("error" if "error" in m else "n/a"), "-"])
            lines.append(f"| {row['batch']} | {row['context']} | {ms(row['floor']['floor_s'])} | "
                         f"{row['floor']['bound']} | " + " | ".join(cells) + " |")
        lines.append("")
    for p in (r.get("decode") or {}).get("profiles", []):
        lines += [f"## Profile: {p['steps']} {p['mode']} decode steps, batch {p['batch']}, context {p['context']}", "",
                  "```", p["table"], "```", ""]
    if p := r.get("prefill"):
        lines += ["## Prefill: one prompt, one chunk", "",
                  "| tokens | ms | TFLOP/s | of matmul rate | floor ms |", "|---|---|---|---|---|"]
        for row in p["rows"]:
            lines.append(f"| {row['tokens']} | {ms(row['median_s'])} | {per_s(row['flops_per_s'], 1e12)} | "
                         f"{row['of_matmul_rate']:.0%} | {ms(row['floor']['floor_s'])} |")
        lines.append("")
    if a := r.get("attention"):
        lines += ["## Attention kernel alone: Triton paged vs SDPA dense", ""]
        if "skipped" in a:
            lines += [a["skipped"], ""]
        else:
            lines += ["| case | triton ms | triton GB/s | sdpa ms | sdpa GB/s | triton / sdpa | max abs diff |",
                      "|---|---|---|---|---|---|---|"]
            for row in a["rows"]:
                t, d = row["triton"], row["sdpa"]
                lines.append(f"| {row['kind']} {row['batch']} x {row['context']} | {ms(t['median_s'])} | "
                             f"{per_s(t['bytes_per_s'], 1e9)} | {ms(d['median_s'])} | {per_s(d['bytes_per_s'], 1e9)} | "
                             f"{t['median_s'] / d['median_s']:.2f}x | {row['max_abs_diff']:.3g} |")
            lines.append("")
    if q := r.get("quant"):
        lines += [f"## Quantized linears: {q['kernel']} against {r['settings']['dtype']} on the dequantized weights",
                  "", "| format | in -> out | rows | stored MB | fused ms | fused GB/s | dense ms | fused / dense | "
                  "relative diff |", "|---|---|---|---|---|---|---|---|---|"]
        for row in q["rows"]:
            f, d = row["fused"], row["dense"]
            lines.append(f"| {row['format']} | {row['in']} -> {row['out']} | {row['rows']} | "
                         f"{row['stored_bytes'] / 1e6:.3g} | {ms(f['median_s'])} | {per_s(f['bytes_per_s'], 1e9)} | "
                         f"{ms(d['median_s'])} | {f['median_s'] / d['median_s']:.2f}x | {row['rel_diff']:.3g} |")
        lines.append("")
    if r["targets"]:
        lines += ["## Targets (reported, not asserted)", "", "| figure | value | target | met |", "|---|---|---|---|"]
        for t in r["targets"]:
            value = f"{t['value']:.0%}" if "%" in t["target"] else f"{t['value']:.2f}x"
            lines.append(f"| {t['figure']} | {value} | {t['target']} | {'yes' if t['met'] else 'no'} |")
        lines.append("")
    if r["errors"]:
        lines += ["## Errors", ""] + [f"- {e}" for e in r["errors"]] + [""]
    return "\n".join(lines)


def attempt(r: dict, name: str, device, fn):
    """fn(), timed; a failure is recorded in r["errors"] and the run goes on (None)."""
    began = time.perf_counter()
    try:
        return fn()
    except Exception as e:
        r["errors"].append(f"{name}: {type(e).__name__}: {e}")
        log(f"{name} failed:\n{traceback.format_exc()}")
        free_memory(device)
        return None
    finally:
        r["sections_s"][name] = round(time.perf_counter() - began, 1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes (the smoke test)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (the floors always run)")
    p.add_argument("--out", default="bench/gpu_results.json", help="JSON here, Markdown beside it (.md)")
    args = p.parse_args(argv)
    args.sections = args.sections.split(",")
    if unknown := set(args.sections) - set(SECTIONS):
        p.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, s = torch.device(args.device), QUICK if args.quick else FULL
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --quick for the smoke test")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # events and allocations on this device (set_device refuses a bare "cuda")
    dtype = dtype_name(device)
    r = {"environment": environment(device),
         "settings": {"quick": args.quick, "dtype": dtype, "sections": args.sections} | s,
         "errors": [], "sections_s": {}}
    log(f"{r['environment'].get('gpu', device)}: {'quick' if args.quick else 'full'} run, sections "
        f"{','.join(args.sections)}")
    workdir = tempfile.TemporaryDirectory(prefix="bench-gpu-")
    try:
        limits = attempt(r, "floors", device, lambda: measure_floors(device, s))
        r["floors"] = limits
        if "numerics" in args.sections:
            r["numerics"] = attempt(r, "numerics", device, lambda: numerics(device, s, Path(workdir.name)))
        if limits and {"decode", "prefill"} & set(args.sections):
            model_sections(r, args, device, s, limits)
            free_memory(device)  # the 7B worker
        if "attention" in args.sections:
            r["attention"] = attention(r, device, s)
        if "quant" in args.sections:
            r["quant"] = quant(r, device, s)
    finally:
        workdir.cleanup()
    r = {k: v for k, v in r.items() if v is not None}
    r["targets"] = targets(r)
    r["elapsed_s"] = time.perf_counter() - BEGAN
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    text = markdown(r)
    out.with_suffix(".md").write_text(text)
    print(text, flush=True)
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return r


def model_sections(r: dict, args, device, s: dict, limits: dict) -> None:
    """Decode and prefill on one worker: its KV cache sized for the largest case that fits."""
    cfg = model_config(s["model_preset"], dtype_name(device))
    cost = ModelCost(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    capacity = attempt(r, "kv sizing", device, lambda: plan_capacity(cfg, device, s))
    if capacity is None:
        return
    r["capacity"] = capacity
    log(f"{s['model_preset']}: {capacity['weight_bytes'] / 2**30:.1f} GiB of weights, KV cache "
        f"{capacity['blocks']} blocks ({capacity['blocks'] * capacity['kv_block_bytes'] / 2**30:.1f} GiB; "
        f"the largest case needs {capacity['needed_blocks']})")
    built = attempt(r, "build", device, lambda: graph_worker(cfg, device, capacity["blocks"]))
    if built is None:
        return
    log(f"{s['model_preset']}: built; CUDA graphs {built[1] or 'captured'}")
    if "decode" in args.sections:
        r["decode"] = attempt(r, "decode", device, lambda: decode(*built, capacity, cost, limits, device, s))
    if "prefill" in args.sections:
        fits = [t for t in s["prefill"] if kv_blocks(1, t) + 1 <= capacity["blocks"]]
        r["prefill"] = attempt(r, "prefill", device,
                               lambda: prefill(built[0], cost, limits, device, s | {"prefill": fits}))
    if device.type == "cuda":
        capacity["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)


if __name__ == "__main__":
    main()
