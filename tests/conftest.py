import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import openai
import pytest
import torch
from transformers import Qwen2ForCausalLM

from qwen2_client import Client
from shards.checkpoint import preset_config, write_random_checkpoint
from tests.engine_scenarios import NEW_TOKENS as GREEDY_NEW_TOKENS
from tests.engine_scenarios import PROMPTS as GREEDY_PROMPTS

# On a loaded 2-core machine a local Ray's GCS and raylet can take longer to register than Ray's default wait;
# every Ray cluster the tests start (in this process or in a server subprocess) inherits this.
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")

# Small Qwen2 shapes that still exercise what a split can get wrong.
MODELS = {
    # 2 KV heads: TP 4 replicates them. Vocab 1003 is divisible by neither 2 nor 4, nor is the MLP's 130
    # (split unevenly, as Qwen2-0.5B's 4,864 must be at TP 7). 3 layers split unevenly over 2 stages.
    "gqa-untied": dict(vocab_size=1003, tie_word_embeddings=False, num_hidden_layers=3, intermediate_size=130,
                       max_position_embeddings=256),
    # Tied embeddings, YaRN past a 16-token original window, and a sliding window on the last layer.
    "tied-yarn-sliding": dict(
        vocab_size=1001, tie_word_embeddings=True, num_hidden_layers=3, max_position_embeddings=64,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        use_sliding_window=True, sliding_window=6, max_window_layers=2,
    ),
    # 12 query heads over 3 KV heads: at TP 2 and 4 a rank's query heads straddle KV heads unevenly
    # (as Qwen2-0.5B's at TP 7, Qwen2-7B's at TP 7), so each rank keeps one KV head per query head.
    "straddling-kv": dict(vocab_size=1000, hidden_size=96, num_attention_heads=12, num_key_value_heads=3,
                          num_hidden_layers=2, max_position_embeddings=256),
}


def model_config(name: str) -> dict:
    config = preset_config("tiny")
    config.update(MODELS[name])
    return config


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> directory of a random-weight checkpoint (written once per session)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: write_random_checkpoint(root / name, model_config(name), seed=7, max_shard_bytes=300_000)
            for name in MODELS}


@pytest.fixture(scope="session")
def expected_greedy(checkpoints):
    """transformers' greedy tokens and the logprobs of its logits at each generated position."""
    model_dir = checkpoints["gqa-untied"]
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in GREEDY_PROMPTS:
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=GREEDY_NEW_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            logprobs = model(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        out.append((ids[0, len(prompt):].tolist(), logprobs))
    return out


@pytest.fixture(scope="module")
def interpreter():
    """A child process whose Triton runs kernels on CPU tensors; `interpreter(fn, *args)` runs fn there (why a
    child: tests/test_triton_attention.py's docstring)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # the child copies the environment when it starts, at the first submit
    pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
    try:
        pool.submit(int).result()
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    yield lambda fn, *args: pool.submit(fn, *args).result()
    pool.shutdown()


# Clients of a module's `server` fixture (an InProcessServer with http=True): the real openai SDK and ours.
@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(server):
    with Client(server.target) as c:
        yield c
