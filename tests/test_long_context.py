"""Long context: YaRN chosen per request, chunked prefill past the original window, and everyone else
still streaming while a long prompt is prefilled. A 2,048-token original window (factor 4: 8,192 tokens)
makes YaRN engage cheaply on CPU."""

import threading
import time

import grpc
import pytest
import torch
from transformers import Qwen2Config as HFConfig
from transformers import Qwen2ForCausalLM

from qwen2_client import Client, RetryPolicy, ValidationError
from shards.batch import SeqPlan
from shards.checkpoint import preset_config, write_random_checkpoint
from shards.parallel import ParallelGroups
from shards.rope import SCALED
from shards.sampling import SamplingParams
from shards.worker import ShardWorker
from tests.server_process import InProcessServer

ORIGINAL_WINDOW, FACTOR = 2048, 4
MAX_LEN = ORIGINAL_WINDOW * FACTOR
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = preset_config("tiny") | {
        "num_hidden_layers": 2, "max_position_embeddings": ORIGINAL_WINDOW,
        "rope_scaling": {"type": "yarn", "factor": float(FACTOR), "original_max_position_embeddings": ORIGINAL_WINDOW},
    }
    return write_random_checkpoint(tmp_path_factory.mktemp("yarn") / "tiny-yarn", config, seed=3)


def reference(model_dir, scaled: bool) -> Qwen2ForCausalLM:
    config = HFConfig.from_pretrained(model_dir)
    if not scaled:
        config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_parameters["rope_theta"]}
    return Qwen2ForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32).eval()


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 150_000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_logprobs(model, ids: list[int], first: int) -> torch.Tensor:
    """log_softmax of the reference logits at positions first-1 .. len-2 (the ones that predict ids[first:])."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, first - 1 : -1].log_softmax(-1)


def test_chunked_prefill_past_the_window_matches_transformers_with_yarn(model_dir):
    """5,000 tokens in 1,024-token chunks (each after the first attends the cached ones), then decodes."""
    worker = ShardWorker(model_dir, ParallelGroups(), num_kv_blocks=400, block_size=16)
    ids = tokens(5000, seed=1)
    table = list(range(400))
    greedy = SamplingParams(temperature=0.0)
    logits = []
    for start in range(0, 4990, 1024):
        chunk = ids[start : min(start + 1024, 4990)]
        out, _ = worker.forward([SeqPlan(0, chunk, start, table, SCALED, greedy)])
        logits.append(out[0])
    for pos in range(4990, 4999):  # decode the rest, teacher-forced
        out, _ = worker.forward([SeqPlan(0, [ids[pos]], pos, table, SCALED, greedy)])
        logits.append(out[0])
    with torch.no_grad():
        expected = reference(model_dir, scaled=True)(torch.tensor([ids])).logits[0]
    ours = torch.stack(logits[-10:])
    assert (ours - expected[4989:4999]).abs().max() <= TOLERANCE
    assert (logits[0] - expected[1023]).abs().max() <= TOLERANCE  # the first chunk's last position too


@pytest.fixture(scope="module")
def per_request(model_dir):
    server = InProcessServer(model_dir, tp=1, max_num_seqs=8, max_num_batched_tokens=512, max_waiting=16)
    yield server
    server.stop()


@pytest.mark.parametrize("prompt_len,variant", [(300, "original"), (2500, "yarn")])
def test_per_request_variant_and_its_numerics(per_request, model_dir, prompt_len, variant):
    ids = tokens(prompt_len, seed=prompt_len)
    with Client(per_request.target) as client:
        result = client.generate(token_ids=ids, max_new_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
    assert result.rope_variant == variant
    expected = reference_logprobs(reference(model_dir, scaled=variant == "yarn"), ids + result.token_ids, len(ids))
    ours = torch.tensor([lp.logprob for lp in result.logprobs])
    assert (ours - expected[range(8), result.token_ids]).abs().max() <= TOLERANCE


def test_static_mode_gives_yarn_to_short_requests(model_dir):
    server = InProcessServer(model_dir, tp=1, server_options={"rope_scaling_mode": "static"})
    try:
        ids = tokens(300, seed=300)
        with Client(server.target) as client:
            result = client.generate(token_ids=ids, max_new_tokens=4, temperature=0, ignore_eos=True, logprobs=1)
        assert result.rope_variant == "yarn"
        expected = reference_logprobs(reference(model_dir, scaled=True), ids + result.token_ids, len(ids))
        ours = torch.tensor([lp.logprob for lp in result.logprobs])
        assert (ours - expected[range(4), result.token_ids]).abs().max() <= TOLERANCE
    finally:
        server.stop()


def test_the_maximum_length_is_served_and_one_more_token_is_refused(per_request):
    with Client(per_request.target, retry=RetryPolicy(max_attempts=1)) as client:
        result = client.generate(token_ids=tokens(MAX_LEN - 1, seed=9), max_new_tokens=1, ignore_eos=True)
        assert result.usage.generated_tokens == 1 and result.rope_variant == "yarn"
        with pytest.raises(ValidationError) as e:
            client.generate(token_ids=tokens(MAX_LEN, seed=9), max_new_tokens=1)
        assert str(MAX_LEN) in str(e.value) and e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_short_streams_progress_while_a_long_prompt_is_prefilled(per_request):
    arrivals: list[list[float]] = [[], []]
    with Client(per_request.target) as client:
        def short(i):
            for delta in client.generate_stream(f"short {i}", max_new_tokens=400, ignore_eos=True):
                arrivals[i].extend([time.monotonic()] * len(delta.token_ids))

        readers = [threading.Thread(target=short, args=(i,)) for i in range(2)]
        for r in readers:
            r.start()
        while not all(arrivals):
            time.sleep(0.01)
        sent = time.monotonic()
        long_stream = client.generate_stream(token_ids=tokens(7000, seed=4), max_new_tokens=1, ignore_eos=True)
        first = next(iter(long_stream))
        long_first_token = time.monotonic()
        assert first.token_ids
        for r in readers:
            r.join(120)
    during = [sum(sent < t < long_first_token for t in a) for a in arrivals]
    # 7,000 prompt tokens at 512 per step, shared with the two decodes: about 14 steps of prefill.
    assert min(during) >= 5, during
