"""Prefix caching end to end: requests that reuse cached KV blocks get exactly transformers' greedy tokens and
logprobs, and say how many prompt tokens came from the cache."""

import concurrent.futures

import pytest
import torch
from transformers import Qwen2ForCausalLM

from qwen2_client import Client
from shards.checkpoint import preset_config, write_random_checkpoint
from tests.server_process import InProcessServer

NEW = 6
SYSTEM = [(k * 37 + 11) % 5000 + 100 for k in range(42)]  # 10 full blocks of 4 and 2 tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("prefix") / "tiny", preset_config("tiny"), seed=23)


@pytest.fixture(scope="module")
def reference(model_dir):
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def greedy(prompt: list[int]) -> tuple[list[int], list[float]]:
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        with torch.no_grad():
            logprobs = model(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        tokens = ids[0, len(prompt):].tolist()
        return tokens, [float(logprobs[i, t]) for i, t in enumerate(tokens)]

    return greedy


@pytest.fixture(scope="module")
def server(model_dir):
    s = InProcessServer(model_dir, tp=1, max_num_seqs=8)
    yield s
    s.stop()


def generate(target: str, prompt: list[int], **kw):
    with Client(target) as client:
        return client.generate(token_ids=prompt, max_new_tokens=NEW, temperature=0, logprobs=0, ignore_eos=True,
                               timeout=120, **kw)


def check(result, reference, prompt, cached: int | None = None):
    tokens, logprobs = reference(prompt)
    assert result.token_ids == tokens
    assert [lp.logprob for lp in result.logprobs] == pytest.approx(logprobs, abs=1e-4)
    if cached is not None:
        assert result.usage.cached_tokens == cached


def test_requests_sharing_a_system_prompt(server, reference):
    first = SYSTEM + [7, 8, 9]
    check(generate(server.target, first), reference, first, cached=0)
    for i, question in enumerate([[300, 301], [302] * 9, [5]]):
        prompt = SYSTEM + question
        check(generate(server.target, prompt), reference, prompt, cached=40)  # the 10 full blocks shared


def test_a_prefix_that_ends_mid_block_shares_its_full_blocks(server, reference):
    prompt = SYSTEM[:30] + [4000, 4001, 4002]  # 30 tokens in common: 7 full blocks of 4, then it differs
    check(generate(server.target, prompt), reference, prompt, cached=28)


def test_a_multi_turn_chat_reuses_every_earlier_turn(server, reference):
    history, computed = [900 + k for k in range(13)], 0
    for turn in range(3):
        # What the last turn computed (its prompt and all its tokens but the last) in full blocks, up to the
        # last full block before this prompt's last token.
        cached = min(computed // 4, (len(history) - 1) // 4) * 4
        result = generate(server.target, history)
        check(result, reference, history, cached=cached)
        computed = len(history) + NEW - 1
        history = history + result.token_ids + [1000 + turn, 1001 + turn, 1002 + turn]


def test_identical_prompts_in_the_same_step(server, reference):
    prompt = [2000 + k for k in range(21)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: generate(server.target, prompt), range(4)))
    for r in results:
        check(r, reference, prompt)
    assert sorted(r.usage.cached_tokens for r in results)[-1] == 20  # all but the first shared its 5 blocks
    hits = server.runner.metrics.registry.get_sample_value("qwen2_prefix_cache_hit_tokens_total")
    assert hits >= 3 * 20


def test_salted_requests_share_only_with_their_tenant(server, reference):
    prompt = [3000 + k for k in range(17)]
    check(generate(server.target, prompt, cache_salt="a"), reference, prompt, cached=0)
    check(generate(server.target, prompt, cache_salt="b"), reference, prompt, cached=0)
    check(generate(server.target, prompt, cache_salt="a"), reference, prompt, cached=16)
    check(generate(server.target, prompt), reference, prompt, cached=0)


def test_a_shared_prefix_under_tensor_and_pipeline_parallelism(model_dir, reference):
    server = InProcessServer(model_dir, tp=2, engine_options={"pp": 2, "cpus_per_rank": 0.25}, max_num_seqs=8)
    try:
        for question, cached in [([7, 8, 9], 0), ([300, 301], 40), ([5], 40)]:
            prompt = SYSTEM + question
            check(generate(server.target, prompt), reference, prompt, cached=cached)
    finally:
        server.stop()


def test_no_prefix_caching_computes_every_prompt(model_dir, reference):
    server = InProcessServer(model_dir, tp=1, max_num_seqs=8, prefix_caching=False)
    try:
        for question in ([7, 8, 9], [300, 301]):
            check(generate(server.target, SYSTEM + question), reference, SYSTEM + question, cached=0)
    finally:
        server.stop()
