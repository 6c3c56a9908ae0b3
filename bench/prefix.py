"""The prefix workloads (docs/performance.md): traffic that repeats itself, run against one server with prefix
caching and one without, in the same run.

- shared prompt: requests that share a long system prompt, each with its own question, all sent at once;
- chat: clients replaying a multi-turn chat, each turn re-sending the whole conversation so far.
Prompts are token ids (random, below the special tokens), greedy with `ignore_eos`, so both servers do the
same work apart from what the cache saves.
"""

import asyncio
import random
import time
import urllib.request

from bench.workloads import SPECIAL, percentiles
from qwen2_client import AsyncClient


async def _stream(client, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """(TTFT in seconds, generated ids) of one greedy request."""
    sent, first, ids = time.perf_counter(), None, []
    async for delta in client.generate_stream(token_ids=prompt, max_new_tokens=new_tokens, temperature=0.0,
                                              ignore_eos=True):
        if first is None and delta.token_ids:
            first = time.perf_counter() - sent
        ids += delta.token_ids
    return first, ids


async def shared_prompt(target: str, requests: int, system_tokens: int, question_tokens: tuple[int, int],
                        new_tokens: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    system = [rng.randrange(SPECIAL) for _ in range(system_tokens)]
    prompts = [system + [rng.randrange(SPECIAL) for _ in range(rng.randint(*question_tokens))] for _ in range(requests)]
    async with AsyncClient(target) as client:
        began = time.perf_counter()
        results = await asyncio.gather(*(_stream(client, p, new_tokens) for p in prompts))
        wall = time.perf_counter() - began
    generated = sum(len(ids) for _, ids in results)
    return {"requests": requests, "prompt_tokens": sum(map(len, prompts)), "generated_tokens": generated,
            "wall_s": wall, "tokens_per_s": generated / wall, "ttft": percentiles([t for t, _ in results])}


async def chat(target: str, clients: int, turns: int, first_tokens: int, user_tokens: int, new_tokens: int,
               seed: int = 0) -> dict:
    """Each client: a first message of `first_tokens`, then `turns - 1` follow-ups of `user_tokens`, each turn
    sending the whole conversation (its earlier turns and the replies) again."""
    rng = random.Random(seed)
    ttfts, generated = [], 0

    async def one(client, opening: list[int], follow_ups: list[list[int]]):
        nonlocal generated
        history = opening
        for follow_up in [None] + follow_ups:
            if follow_up is not None:
                history = history + follow_up
            ttft, ids = await _stream(client, history, new_tokens)
            ttfts.append(ttft)
            generated += len(ids)
            history = history + ids

    conversations = [([rng.randrange(SPECIAL) for _ in range(first_tokens)],
                      [[rng.randrange(SPECIAL) for _ in range(user_tokens)] for _ in range(turns - 1)])
                     for _ in range(clients)]
    async with AsyncClient(target) as client:
        began = time.perf_counter()
        await asyncio.gather(*(one(client, *c) for c in conversations))
        wall = time.perf_counter() - began
    return {"clients": clients, "turns": turns, "generated_tokens": generated, "wall_s": wall,
            "tokens_per_s": generated / wall, "ttft": percentiles(ttfts)}


def cache_counts(metrics_url: str) -> tuple[float, float]:
    """(prompt tokens looked up in the prefix cache, of them found) over the server's life so far."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        samples = dict(line.rsplit(" ", 1) for line in r.read().decode().splitlines()
                       if line.startswith("qwen2_prefix_cache_"))
    return (float(samples.get("qwen2_prefix_cache_query_tokens_total", 0)),
            float(samples.get("qwen2_prefix_cache_hit_tokens_total", 0)))


def measured(metrics_url: str, run) -> dict:
    """run()'s figures and the share of its prompt tokens the prefix cache held."""
    before = cache_counts(metrics_url)
    out = run()
    (q0, h0), (q1, h1) = before, cache_counts(metrics_url)
    return out | {"hit_ratio": (h1 - h0) / (q1 - q0) if q1 > q0 else 0.0}
