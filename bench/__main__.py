"""`python -m bench`: every figure of docs/performance.md in one run, so all of them see the same machine.

Order: the machine's limits and the transformers baseline first (nothing else running), then for each TP
size a real `qwen2-cluster serve` (gRPC + Ray engine) in a subprocess driven through the SDK: offline, the
step probes, online; the collectives on an engine's ranks; the long workload last. Prints a Markdown table
and writes JSON. Targets are reported, never asserted.
"""

import argparse
import asyncio
import contextlib
import json
import math
import os
import shlex
import tempfile
import time

import torch

from bench import baseline, floors, prefix, report, steps
from bench.long_context import interference, yarn_config
from bench.workloads import offline, online, request_mix
from shards.checkpoint import preset_config, write_random_checkpoint

WORKLOADS = ("floors", "baseline", "offline", "online", "overhead", "prefix", "structured", "long")
# --quick: the same harness at sizes that run in a minute (for development and the smoke test).
QUICK = dict(requests=8, prompt_tokens=(16, 64), new_tokens=(4, 16), baseline_batch_sizes=[4, 8],
             probe_batches=[1, 8], probe_steps=6, prefill_tokens=64, long_prompt_tokens=512, long_streams=4,
             long_warmup_s=3.0, prefix_requests=8, system_tokens=128, question_tokens=(16, 32), prefix_new_tokens=8,
             chat_clients=4, chat_turns=3)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--preset", default="bench-cpu", help="checkpoint preset (written with random weights, seed 0)")
    p.add_argument("--tp", type=ints, default=[1, 2], help="tensor-parallel sizes to serve")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=ints, default=(32, 512), help="min,max prompt length")
    p.add_argument("--new-tokens", type=ints, default=(16, 256), help="min,max max_new_tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--online-load", type=float, default=0.5,
                   help="online arrival rate as a share of the offline request rate at the same TP")
    p.add_argument("--online-requests", type=int, default=32,
                   help="requests of the mix the online workload sends (the 15-minute budget: at half the offline "
                        "rate all 64 take twice the offline run)")
    p.add_argument("--baseline-batch-sizes", type=ints, default=[8, 16, 32, 64])
    p.add_argument("--baseline-batches", type=int, default=1,
                   help="batches run per size, from the start of the mix (0: the whole mix; all four sizes over "
                        "the whole mix take most of the 15-minute budget on 2 cores)")
    p.add_argument("--probe-batches", type=ints, default=[1, 64], help="decode step probes; the last gives the overhead")
    p.add_argument("--probe-steps", type=int, default=16, help="steady decode steps per probe")
    p.add_argument("--probe-prompt-tokens", type=int, default=64)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--long-prompt-tokens", type=int, default=8192,
                   help="docs/performance.md says 32768: minutes of prefill on 2 cores, past the 15-minute budget")
    p.add_argument("--long-streams", type=int, default=16)
    p.add_argument("--long-warmup-s", type=float, default=15.0)
    p.add_argument("--prefix-requests", type=int, default=64, help="prefix: requests sharing the system prompt")
    p.add_argument("--system-tokens", type=int, default=1024, help="prefix: the shared system prompt's length")
    p.add_argument("--question-tokens", type=ints, default=(32, 128), help="prefix: min,max of each own question")
    p.add_argument("--prefix-new-tokens", type=int, default=64)
    p.add_argument("--chat-clients", type=int, default=16, help="prefix: clients replaying a multi-turn chat")
    p.add_argument("--chat-turns", type=int, default=4)
    p.add_argument("--kv-cache-memory-gib", type=float, default=1.0, help="per rank")
    p.add_argument("--serve-args", default="", help="more `qwen2-cluster serve` flags, e.g. '--prefill-latency-factor 0'")
    p.add_argument("--quick", action="store_true", help="small sizes: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--quantization", choices=["gptq-int4", "gptq-int8", "awq", "nf4", "bitsandbytes-nf4"],
                   help="also run the offline workload and the step probes at each TP size on the preset's weights "
                        "in this format (the checkpoint `init-random --quantization` writes, group size 128 or the "
                        "largest that every TP size splits whole; bitsandbytes-nf4: the float checkpoint quantized "
                        "as each rank loads it), the floors from its weight bytes")
    p.add_argument("--json", default="bench/results.json")
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    args.workloads = args.workloads.split(",")
    if unknown := set(args.workloads) - set(WORKLOADS):
        p.error(f"unknown workloads {sorted(unknown)}; choose from {','.join(WORKLOADS)}")
    if "online" in args.workloads and "offline" not in args.workloads:
        p.error("online's arrival rate is set from offline's: run both")
    return args


@contextlib.contextmanager
def server(model_dir, tp: int, threads: int, kv_gib: float, extra: str = ""):
    """`qwen2-cluster serve` in a subprocess; the ranks share `threads` threads, as the baseline uses."""
    from tests.server_process import ServerProcess

    proc = ServerProcess(model_dir, "--cpus-per-rank", str(max(1, threads // tp)), "--block-size", "16",
                         "--kv-cache-memory-gib", str(kv_gib), *shlex.split(extra), tp=tp)
    try:
        proc.wait_serving()
        yield proc.target, f"http://127.0.0.1:{proc.metrics_port}/metrics"
    finally:
        proc.stop()


def attempt(errors: list, name: str, fn):
    """fn(), timed; a failure is noted in `errors` and the run goes on to the next figure (None)."""
    began = time.perf_counter()
    try:
        value = fn()
    except Exception as e:
        errors.append(f"{name}: {type(e).__name__}: {e}")
        print(f"[bench] {name} failed: {e}", flush=True)
        return None
    print(f"[bench] {name}: {time.perf_counter() - began:.0f} s", flush=True)
    return value


def serve_workloads(args, model_dir, cost: floors.ModelCost, limits: dict, tp: int, threads: int,
                    errors: list) -> dict:
    """Everything measured through one server at one TP size."""
    out, w = {}, args.workloads
    mix = request_mix(args.requests, args.prompt_tokens, args.new_tokens, args.seed)

    def decode(batch):
        probe = asyncio.run(steps.decode_step(target, metrics, batch, args.probe_prompt_tokens, args.probe_steps))
        return probe | {"floor": cost.decode_floor(batch, probe["context"], limits["matmul_flops"],
                                                   limits["bandwidth_bytes"])}

    def prefill():
        return asyncio.run(steps.prefill_step(target, metrics, args.prefill_tokens)) | {
            "floor": cost.prefill_floor(args.prefill_tokens, limits["matmul_flops"])}

    with server(model_dir, tp, threads, args.kv_cache_memory_gib, args.serve_args) as (target, metrics):
        asyncio.run(offline(target, request_mix(2, (64, 64), (4, 4), seed=-1)))  # first-step set-up off the clock
        if "offline" in w:
            out["offline"] = attempt(errors, f"offline TP={tp}", lambda: asyncio.run(offline(target, mix)))
        if "floors" in w or "overhead" in w:
            out["decode"] = [p for b in args.probe_batches
                             if (p := attempt(errors, f"decode batch {b} TP={tp}", lambda: decode(b)))]
        if "floors" in w:
            out["prefill"] = attempt(errors, f"prefill TP={tp}", prefill)
        if "online" in w and tp == args.tp[0] and out.get("offline"):
            rate = args.online_load * out["offline"]["requests"] / out["offline"]["wall_s"]
            arrivals = mix[: args.online_requests]
            out["online"] = attempt(errors, f"online TP={tp}",
                                    lambda: asyncio.run(online(target, arrivals, rate, args.seed)))
    if "overhead" in w and tp > 1:
        out["collectives"] = attempt(errors, f"collectives TP={tp}",
                                     lambda: asyncio.run(steps.collectives(model_dir, tp, args.probe_batches[-1])))
    return {k: v for k, v in out.items() if v}


def prefix_workloads(args, model_dir, threads: int, errors: list) -> dict:
    """The prefix workloads and the offline mix (which shares nothing) with prefix caching on, then off."""
    tp = args.tp[0]
    out = {"tp": tp}
    mix = request_mix(args.requests, args.prompt_tokens, args.new_tokens, args.seed)
    for mode, flag in (("on", ""), ("off", " --no-enable-prefix-caching")):
        with server(model_dir, tp, threads, args.kv_cache_memory_gib, args.serve_args + flag) as (target, metrics):
            asyncio.run(offline(target, request_mix(2, (64, 64), (4, 4), seed=-1)))  # set-up off the clock
            shared = lambda: asyncio.run(prefix.shared_prompt(  # noqa: E731
                target, args.prefix_requests, args.system_tokens, args.question_tokens, args.prefix_new_tokens,
                args.seed))
            chat = lambda: asyncio.run(prefix.chat(  # noqa: E731
                target, args.chat_clients, args.chat_turns, args.system_tokens, args.question_tokens[0],
                args.prefix_new_tokens, args.seed))
            out[mode] = {
                "offline": attempt(errors, f"prefix {mode}: offline", lambda: asyncio.run(offline(target, mix))),
                "shared": attempt(errors, f"prefix {mode}: shared prompt", lambda: prefix.measured(metrics, shared)),
                "chat": attempt(errors, f"prefix {mode}: chat", lambda: prefix.measured(metrics, chat)),
            }
    return out


def structured_workloads(args, model_dir, threads: int, errors: list) -> dict:
    """The offline mix with 0%, 25% and 100% of its requests constrained by a JSON schema, the mean time a step
    spent filling token masks (the engine loop's `mask` phase, per step that had any), and the mean execute
    and driver sampling (token masks applied) time per step."""
    out = {"tp": args.tp[0]}
    mix = request_mix(args.requests, args.prompt_tokens, args.new_tokens, args.seed)
    extra = args.serve_args + " --no-enable-prefix-caching"  # the three runs share their prompts
    with server(model_dir, args.tp[0], threads, args.kv_cache_memory_gib, extra) as (target, metrics):
        asyncio.run(offline(target, request_mix(2, (64, 64), (4, 4), seed=-1), 1.0))  # grammar set-up off the clock
        for share in (0.0, 0.25, 1.0):
            before = steps.scrape(metrics)
            run = attempt(errors, f"structured {share:.0%}", lambda: asyncio.run(offline(target, mix, share)))
            d = steps.scrape(metrics) - before
            masked, count = d["qwen2_step_phase_seconds_count{phase=mask}"], d["qwen2_batch_size_count"]
            out[f"{share:.2f}"] = run and run | {
                "steps": count, "masked_steps": masked,
                "mask_ms_per_step": 1e3 * d["qwen2_step_phase_seconds_sum{phase=mask}"] / masked if masked else 0.0,
                **{f"{phase}_ms_per_step": 1e3 * d[f"qwen2_step_phase_seconds_sum{{phase={phase}}}"] / count
                   for phase in ("execute", "sample")}}
    return out


def quantized_workloads(args, workdir: str, model_dir, limits: dict, threads: int, errors: list) -> dict:
    """serve_workloads' offline workload and step probes on the quantized weights, at each TP size."""
    config, extra = preset_config(args.preset), args.serve_args
    if args.quantization == "bitsandbytes-nf4":
        extra += " --quantization bitsandbytes-nf4"
        config["quantization_config"] = {"quant_method": "bitsandbytes"}  # for the floors
    else:
        if args.quantization != "nf4":
            sizes = [n // tp for tp in args.tp for n in (config["hidden_size"], config["intermediate_size"])]
            config["quantization_config"] = {"group_size": math.gcd(128, *sizes)}
        model_dir = write_random_checkpoint(os.path.join(workdir, args.quantization), config, seed=0,
                                            quantization=args.quantization)
        config = json.loads((model_dir / "config.json").read_text())
    cost = floors.ModelCost(config)
    run = argparse.Namespace(**vars(args) | {"workloads": ["offline", "floors"], "serve_args": extra})
    out = {"quantization": args.quantization, "weight_bytes": cost.weight_bytes, "tp": {}}
    for tp in args.tp:
        out["tp"][str(tp)] = attempt(errors, f"{args.quantization} TP={tp}", lambda: serve_workloads(
            run, model_dir, cost, limits, tp, threads, errors)) or {}
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    threads, began = torch.get_num_threads(), time.perf_counter()
    workdir = tempfile.TemporaryDirectory(prefix="bench-")
    model_dir = write_random_checkpoint(os.path.join(workdir.name, args.preset), preset_config(args.preset), seed=0)
    cost = floors.ModelCost(preset_config(args.preset))
    results = report.header() | {"preset": args.preset, "threads": threads, "settings": vars(args), "tp": {}}

    errors = results["errors"] = []
    limits = floors.measure(args.quick)
    results["limits"] = limits | {"weight_bytes": cost.weight_bytes}
    if "baseline" in args.workloads:
        mix = request_mix(args.requests, args.prompt_tokens, args.new_tokens, args.seed)
        results["baseline"] = attempt(errors, "baseline", lambda: baseline.run(
            model_dir, mix, args.baseline_batch_sizes, args.baseline_batches or None))
    if set(args.workloads) - {"baseline", "long", "prefix", "structured"}:
        for tp in args.tp:
            results["tp"][str(tp)] = attempt(errors, f"TP={tp}", lambda: serve_workloads(
                args, model_dir, cost, limits, tp, threads, errors)) or {}
    if args.quantization:
        results["quantized"] = attempt(errors, args.quantization, lambda: quantized_workloads(
            args, workdir.name, model_dir, limits, threads, errors))
    if "prefix" in args.workloads:
        results["prefix"] = attempt(errors, "prefix", lambda: prefix_workloads(args, model_dir, threads, errors))
    if "structured" in args.workloads:
        results["structured"] = attempt(errors, "structured", lambda: structured_workloads(
            args, model_dir, threads, errors))
    if "long" in args.workloads:
        long_dir = write_random_checkpoint(os.path.join(workdir.name, "yarn"),
                                           yarn_config(args.preset, args.long_prompt_tokens))
        results["long"] = attempt(errors, "long", lambda: interference(
            long_dir, args.long_prompt_tokens, 2048, args.long_streams, args.long_warmup_s))
    workdir.cleanup()
    results = {k: v for k, v in results.items() if v is not None} | {"wall_s": time.perf_counter() - began}
    print(report.table(results))
    report.write(results, args.json)
    print(f"[bench] {results['wall_s']:.0f} s in all; JSON: {args.json}")
    return results


if __name__ == "__main__":
    main()
