"""The offline and online workloads (docs/performance.md): one seeded request mix, driven through the SDK against
a running server, greedy with `ignore_eos` so every request generates exactly its max_new_tokens.

Prompts are token ids (random, below the special tokens), so their lengths are exact.
"""

import asyncio
import random
import time
from dataclasses import dataclass

import numpy as np

from qwen2_client import AsyncClient

SPECIAL = 151643  # ids from here on are special tokens


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_new_tokens: int


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) CPU ticks of this machine since boot (Linux /proc/stat). On a shared VM the host takes time
    back as steal; over a measured window it moved our step times by up to 1.6x, so every window reports it."""
    fields = open("/proc/stat").readline().split()[1:]
    return int(fields[7]), sum(map(int, fields))


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    return (after[0] - before[0]) / max(1, after[1] - before[1])


def request_mix(n: int, prompt_tokens: tuple[int, int], new_tokens: tuple[int, int], seed: int = 0) -> list[Request]:
    """`n` requests, prompt lengths and max_new_tokens uniform in the (inclusive) ranges."""
    rng = random.Random(seed)
    return [Request([rng.randrange(SPECIAL) for _ in range(rng.randint(*prompt_tokens))], rng.randint(*new_tokens))
            for _ in range(n)]


# The structured workload's constraint: an array of objects (structural tokens, where few ids are allowed, between
# short free strings, where most are) that cannot close before 400 items, so a constrained request generates
# exactly its max_new_tokens, as an unconstrained one with ignore_eos does: tokens/s compare like for like.
SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "minItems": 400, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "count": {"type": "integer"}},
    "required": ["name", "count"]}}}, "required": ["items"]}


def params(r: Request) -> dict:
    return {"token_ids": r.prompt, "max_new_tokens": r.max_new_tokens, "temperature": 0.0, "ignore_eos": True}


async def offline(target: str, requests: list[Request], constrained: float = 0.0) -> dict:
    """All requests submitted at once; generated tokens per second from first submit to last token. The first
    `constrained` share of them (every 1/share-th) must match SCHEMA."""
    every = round(1 / constrained) if constrained else 0
    async with AsyncClient(target) as client:
        began, ticks = time.perf_counter(), cpu_ticks()
        results = await asyncio.gather(*(client.generate(**params(r), **(
            {"json_schema": SCHEMA} if every and i % every == 0 else {})) for i, r in enumerate(requests)))
        wall, steal = time.perf_counter() - began, steal_share(ticks, cpu_ticks())
    generated = sum(len(res.token_ids) for res in results)
    return {"requests": len(requests), "prompt_tokens": sum(len(r.prompt) for r in requests),
            "requested_tokens": sum(r.max_new_tokens for r in requests), "generated_tokens": generated,
            "wall_s": wall, "tokens_per_s": generated / wall, "constrained": constrained, "steal_share": steal}


def percentiles(values: list[float]) -> dict:
    """p50 and p99 in milliseconds."""
    p50, p99 = np.percentile(values, [50, 99]) if values else (float("nan"), float("nan"))
    return {"p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3}


async def online(target: str, requests: list[Request], rate: float, seed: int = 0) -> dict:
    """The same mix arriving as a Poisson process of `rate` requests/s; latencies seen by the client."""
    rng = random.Random(seed)
    offsets = list(np.cumsum([rng.expovariate(rate) for _ in requests]))
    ttft, itl, e2e, generated = [], [], [], 0

    async def one(client, r: Request, offset: float, start: float):
        nonlocal generated
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        sent, arrivals = time.perf_counter(), []
        async for delta in client.generate_stream(**params(r)):
            arrivals += [time.perf_counter()] * len(delta.token_ids)
        ttft.append(arrivals[0] - sent)
        itl.extend(np.diff(arrivals))
        e2e.append(arrivals[-1] - sent)
        generated += len(arrivals)

    async with AsyncClient(target) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, r, o, start) for r, o in zip(requests, offsets)))
        wall = time.perf_counter() - start
    return {"requests": len(requests), "rate_per_s": rate, "requested_tokens": sum(r.max_new_tokens for r in requests),
            "generated_tokens": generated, "wall_s": wall, "ttft": percentiles(ttft),
            "itl": percentiles(itl), "e2e": percentiles(e2e)}
