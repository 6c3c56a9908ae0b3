"""Generation stops where transformers stops (every EOS id of config.json and generation_config.json), and the
served maximum length is what the KV cache can hold whole, so no request is ever silently cut short."""

import concurrent.futures

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2ForCausalLM

from qwen2_client import Client
from qwen2_client.errors import ValidationError
from shards.checkpoint import BOS, IM_END, preset_config, write_random_checkpoint
from tests.server_process import InProcessServer

ENDOFTEXT = BOS  # <|endoftext|>: an EOS id of Qwen2-Instruct's generation_config.json only
BLOCKS, BLOCK_SIZE = 12, 4  # the server's whole KV cache: 48 tokens
PROMPTS = [[9707, 1879, 11, 358, 1079], [785, 6722, 315, 9625, 374], [1, 2, 3], [40, 1075, 311, 1281, 264, 1809]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An Instruct-style checkpoint (config.json: eos 151645; generation_config.json: [151645, 151643]) whose
    LM head favours <|endoftext|> whenever the final hidden state's first coordinate is high, so greedy
    decoding emits it now and then, as a real model ends a text."""
    out = tmp_path_factory.mktemp("instruct") / "instruct"
    write_random_checkpoint(out, preset_config("tiny") | {"eos_token_id": IM_END, "tie_word_embeddings": False},
                            seed=5)
    weights = load_file(out / "model.safetensors")
    weights["lm_head.weight"][ENDOFTEXT, 0] += 3.0
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def reference(model_dir):
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def greedy(prompt: list[int], new_tokens: int, **kw) -> list[int]:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                             repetition_penalty=1.0, top_k=None, top_p=None, temperature=None, **kw)
        return out[0, len(prompt):].tolist()

    return greedy


@pytest.fixture(scope="module")
def server(model_dir):
    s = InProcessServer(model_dir, tp=1, engine_options={"max_num_blocks": BLOCKS}, max_num_seqs=8)
    yield s
    s.stop()


def test_generation_stops_on_every_eos_id_as_transformers_does(server, reference):
    expected = [reference(p, 16) for p in PROMPTS]  # transformers' generation_config: eos [151645, 151643]
    assert any(e[-1] == ENDOFTEXT and len(e) < 16 for e in expected), "no prompt ends early: the test proves nothing"
    with Client(server.target) as client:
        assert client.model_info().eos_token_ids == [IM_END, ENDOFTEXT]
        for prompt, want in zip(PROMPTS, expected):
            got = client.generate(token_ids=prompt, max_new_tokens=16, temperature=0, repetition_penalty=1.0)
            assert got.token_ids == want
            assert got.finish_reason == ("eos" if want[-1] in (IM_END, ENDOFTEXT) else "length")


def test_max_model_len_is_the_kv_capacity(server):
    with Client(server.target) as client:
        assert client.model_info().max_model_len == BLOCKS * BLOCK_SIZE  # the model itself allows 4,096
        with pytest.raises(ValidationError, match=r"prompt \(30 tokens\) \+ `max_new_tokens` \(30\) must be <= the "
                                                  r"maximum model length 48"):
            client.generate(token_ids=list(range(1, 31)), max_new_tokens=30)


def test_sequences_that_each_fill_the_cache_are_preempted_and_recomputed_never_truncated(server, reference):
    """Four requests of 48 tokens share a 48-token cache: each is preempted and recomputed as the others
    run, and each still gets every token it asked for, the tokens of an undisturbed run."""
    prompts = [[5 + i, 17, 300 + i, 42, 9, 77, 1000 + i, 3] for i in range(4)]
    preemptions = server.runner.metrics.registry.get_sample_value("qwen2_preemptions_total")

    def run(prompt):
        with Client(server.target) as client:
            return client.generate(token_ids=prompt, max_new_tokens=40, temperature=0, repetition_penalty=1.0,
                                   ignore_eos=True, timeout=300)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, prompts))
    assert server.runner.metrics.registry.get_sample_value("qwen2_preemptions_total") > preemptions
    for prompt, result in zip(prompts, results):
        assert result.finish_reason == "length" and len(result.token_ids) == 40
        assert result.token_ids == reference(prompt, 40, eos_token_id=None)
