"""Single steps, measured through the running server: a decode step at a given batch, a prefill, the control
overhead around the forward; and the collectives a step issues, counted on the ranks of an engine.

Step times come from the client and the server's own Prometheus metrics. In steady decoding every step
gives every stream one token, so the step period is the time between a stream's tokens; the forward is
what the ranks report (`qwen2_stage_forward_seconds`). The difference is the control overhead: scheduling,
plan delivery, result return, detokenizing and streaming the tokens back.
"""

import asyncio
import time
import urllib.request
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from bench.workloads import cpu_ticks, params, request_mix, steal_share
from qwen2_client import AsyncClient
from shards.batch import SeqPlan
from shards.sampling import SamplingParams


def scrape(url: str) -> Counter:
    """Every sample of the server's /metrics, keyed `name` or `name{label=value,...}`."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return Counter({s.name + ("{%s}" % ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) if s.labels else ""):
                    s.value for family in text_string_to_metric_families(text) for s in family.samples})


def phase_means(d: Counter) -> dict:
    """Mean seconds per step of the forward (all stages) and of each engine-loop phase, over a scrape delta."""
    steps = d["qwen2_batch_size_count"]
    forward = sum(v for k, v in d.items() if k.startswith("qwen2_stage_forward_seconds_sum"))
    return {"steps": steps, "mean_batch": d["qwen2_batch_size_sum"] / steps, "forward_s": forward / steps,
            **{f"{p}_s": d[f"qwen2_step_phase_seconds_sum{{phase={p}}}"] / steps
               for p in ("schedule", "execute", "sample", "detokenize")}}


async def decode_step(target: str, metrics_url: str, batch: int, prompt_tokens: int, steps: int) -> dict:
    """`batch` streams decoding together: the step period over `steps` steps once all are past prefill."""
    # Long enough that no stream ends while the last ones are still prefilling; cancelled after the window.
    requests = request_mix(batch, (prompt_tokens, prompt_tokens), (1024, 1024), seed=batch)
    counts, marks, done = [0] * batch, [], asyncio.Event()

    async def stream(client, i):
        async for delta in client.generate_stream(**params(requests[i])):
            counts[i] += len(delta.token_ids)
            # Stream 0 (first admitted, so first to finish) marks the window, right after a step's tokens.
            # Two marks only: tokens can still arrive between the second and the cancellation.
            if i == 0 and min(counts) > 0 and len(marks) < 2 and (not marks or counts[0] - marks[0][2] >= steps):
                marks.append((time.perf_counter(), scrape(metrics_url), counts[0], cpu_ticks()))
                if len(marks) == 2:
                    done.set()

    async with AsyncClient(target) as client:
        tasks = [asyncio.create_task(stream(client, i)) for i in range(batch)]
        await asyncio.wait([asyncio.create_task(done.wait()), *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()  # cancels the calls: the server frees the sequences
        ended = await asyncio.gather(*tasks, return_exceptions=True)
    if len(marks) < 2:
        errors = [e for e in ended if not isinstance(e, asyncio.CancelledError)]
        raise RuntimeError(f"decode probe at batch {batch} ended before {steps} steady steps: {errors[:1]}")
    (t0, m0, n0, c0), (t1, m1, n1, c1) = marks
    period = (t1 - t0) / (n1 - n0)
    means = phase_means(m1 - m0)
    return {"batch": batch, "context": prompt_tokens + (n0 + n1) // 2, "step_s": period, **means,
            "overhead_s": period - means["forward_s"], "overhead_share": 1 - means["forward_s"] / period,
            "steal_share": steal_share(c0, c1)}


async def prefill_step(target: str, metrics_url: str, tokens: int) -> dict:
    """One `tokens`-long prompt on an idle server: its forward time and time to first token."""
    request = request_mix(1, (tokens, tokens), (1, 1), seed=tokens)[0]
    async with AsyncClient(target) as client:
        before = scrape(metrics_url)
        began = time.perf_counter()
        await client.generate(**params(request))
        ttft = time.perf_counter() - began
    means = phase_means(scrape(metrics_url) - before)
    return {"tokens": tokens, "ttft_s": ttft, "steps": means["steps"], "forward_s": means["forward_s"] * means["steps"]}


def _comm_stats(actor, reset: bool) -> dict:
    """Runs inside a shard actor (via __ray_call__): its collective counters, then optionally zeroed."""
    from shards.parallel import COMM_STATS

    stats = dict(COMM_STATS)
    if reset:
        COMM_STATS.clear()
    return stats


async def collectives(model_dir: str, tp: int, batch: int, steps: int = 4) -> dict:
    """Collective calls and bytes per decode step at `batch`, per rank, counted where they are issued."""
    from cluster.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(str(model_dir), tp, rendezvous_host="127.0.0.1", block_size=16,
                                 max_num_blocks=2 * batch, cpus_per_rank=1.0))
    await engine.start()
    try:
        greedy, tables = SamplingParams(temperature=0.0), [[2 * i, 2 * i + 1] for i in range(batch)]
        await engine.step([SeqPlan(i, [1 + i] * 8, 0, tables[i], sampling=greedy) for i in range(batch)])
        await asyncio.gather(*(a.__ray_call__.remote(_comm_stats, True) for a in engine.actors))
        for k in range(steps):
            await engine.step([SeqPlan(i, [7], 8 + k, tables[i], sampling=greedy) for i in range(batch)])
        ranks = await asyncio.gather(*(a.__ray_call__.remote(_comm_stats, False) for a in engine.actors))
        layers = engine.model.num_hidden_layers
    finally:
        await engine.shutdown()
    per_step = {k: v / steps for k, v in ranks[0].items()}
    return {"tp": tp, "batch": batch, "steps": steps, "layers": layers, "rank0_per_step": per_step,
            # The vocab-parallel embedding adds one all-reduce per step to the two per layer.
            "all_reduce_per_layer": (per_step.get("all_reduce", 0) - 1) / layers,
            "ranks_agree": all(r == ranks[0] for r in ranks[1:]) if tp > 1 else True}
