"""The Ray engine on a local Ray instance: numerics at TP x PP, steps in flight, failures, placement."""

import asyncio
import time

import pytest
import ray
import torch

from cluster.engine import Engine, EngineConfig, EngineError
from cluster.placement import PlacementError
from tests.engine_scenarios import NEW_TOKENS, PROMPTS, engine_config, greedy, tables


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


async def generate_with(config: EngineConfig, prompts=PROMPTS):
    engine = Engine(config)
    await engine.start()
    try:
        return await greedy(engine.step, prompts, NEW_TOKENS, tables(len(prompts), 8)), engine
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("tp,pp,compiled", [(2, 1, True), (1, 2, True), (2, 2, True), (2, 1, False)])
def test_engine_matches_transformers(checkpoints, expected_greedy, tp, pp, compiled):
    rows, engine = asyncio.run(generate_with(engine_config(checkpoints["gqa-untied"], tp, pp, compiled_graph=compiled)))
    assert engine.num_kv_blocks == 64 and engine.startup_s is not None
    for seq_rows, (tokens, logprobs) in zip(rows, expected_greedy):
        assert [r["token_id"] for r in seq_rows] == tokens
        ours = torch.tensor([r["logprob"] for r in seq_rows])
        assert (ours - logprobs[range(len(tokens)), tokens]).abs().max() <= 1e-4
        top = torch.tensor([[lp for _, lp in r["top"]] for r in seq_rows])
        assert (top - logprobs.topk(3, dim=-1).values).abs().max() <= 1e-4


def test_steps_in_flight_overlap_and_keep_their_order(checkpoints, expected_greedy):
    """PP=2 with two independent groups of sequences stepped concurrently (micro-batches in flight)."""

    async def scenario():
        engine = Engine(engine_config(checkpoints["gqa-untied"], 1, 2))
        await engine.start()
        try:
            t = tables(len(PROMPTS), 8)
            first = greedy(engine.step, PROMPTS[:2], NEW_TOKENS, t[:2])
            second = greedy(engine.step, PROMPTS[2:], NEW_TOKENS, t[2:], first_id=2)
            return sum(await asyncio.gather(first, second), [])
        finally:
            await engine.shutdown()

    rows = asyncio.run(scenario())
    assert [[r["token_id"] for r in seq] for seq in rows] == [tokens for tokens, _ in expected_greedy]


def test_dead_rank_fails_the_step_in_bounded_time_and_a_restart_serves(checkpoints, expected_greedy):
    async def scenario():
        engine = Engine(engine_config(checkpoints["gqa-untied"], 2, 1, step_timeout_s=10))
        await engine.start()
        try:
            await greedy(engine.step, PROMPTS[:1], 2, tables(1, 8))
            ray.kill(engine.actors[1])
            began = time.perf_counter()
            with pytest.raises(EngineError):
                for _ in range(50):  # the kill lands asynchronously: a step may still finish before it
                    await greedy(engine.step, PROMPTS[:1], 1, tables(1, 8))
            failed_after = time.perf_counter() - began
            assert not engine.healthy
            with pytest.raises(EngineError, match="restart"):
                await engine.step([])
            await engine.restart()
            rows = await greedy(engine.step, PROMPTS, NEW_TOKENS, tables(len(PROMPTS), 8))
            return failed_after, rows
        finally:
            await engine.shutdown()

    failed_after, rows = asyncio.run(scenario())
    print(f"dead rank surfaced after {failed_after:.2f}s")
    assert failed_after < 10 + 5
    assert [[r["token_id"] for r in seq] for seq in rows] == [tokens for tokens, _ in expected_greedy]


def test_unsatisfiable_placement_fails_fast_and_says_why(checkpoints):
    config = engine_config(checkpoints["gqa-untied"], 2, 1, cpus_per_rank=3, placement_timeout_s=2)
    began = time.perf_counter()
    with pytest.raises(PlacementError) as e:
        asyncio.run(Engine(config).start())
    assert time.perf_counter() - began < 10
    message = str(e.value)
    assert "tensor_parallel_size=2" in message and "{'CPU': 3" in message and "CPU=4" in message
    assert ray.available_resources().get("CPU") == 4  # the failed request left nothing reserved


def test_layout_the_model_cannot_take_is_refused_before_any_actor_starts(checkpoints):
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tensor_parallel_size=3"):
        Engine(engine_config(checkpoints["gqa-untied"], 3, 1))
