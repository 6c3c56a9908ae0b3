"""Qwen2's other heads against transformers' classes on the same random checkpoints (float32, 1e-4): sequence
classification, token classification, extractive QA and embeddings, at TP 1, TP 2 and PP 2 with chunked
prompts; then served end to end (gRPC, SDK, HTTP with the openai SDK and urllib), beside generation, and refused
clearly when the input or the task is wrong."""

import base64
import json
import re
import struct

import urllib.error
import urllib.request
import openai
import pytest
import torch
import transformers

from qwen2_client import Client, UnsupportedTaskError, ValidationError
from router.pooling import join, last_non_pad
from router.validation import PoolingSpec
from shards.batch import SeqPlan
from shards.checkpoint import preset_config, with_architecture, write_random_checkpoint
from tests import ranks
from tests.multiproc import run_ranks
from tests.server_process import InProcessServer

TOLERANCE = 1e-4
PAD = 151643  # the classifiers' pad_token_id (with_architecture's default)
HEADS = {"classify": "Qwen2ForSequenceClassification", "token_classify": "Qwen2ForTokenClassification",
         "qa": "Qwen2ForQuestionAnswering"}
LABELS = {"classify": 3, "token_classify": 5, "qa": 2}


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """task -> a random checkpoint of its class (tiny shape, 3 layers: PP 2 splits them unevenly)."""
    root = tmp_path_factory.mktemp("heads")
    config = preset_config("tiny") | {"num_hidden_layers": 3}
    out = {task: write_random_checkpoint(root / task, with_architecture(config, arch, LABELS[task]), seed=11)
           for task, arch in HEADS.items()}
    out["generate"] = write_random_checkpoint(root / "generate", config, seed=11)
    return out


def reference(model_dir, task: str, **config):
    cls = getattr(transformers, HEADS.get(task, "Qwen2ForCausalLM"))
    return cls.from_pretrained(model_dir, dtype=torch.float32, **config).eval()


def hidden(model, ids: list[int]) -> torch.Tensor:
    """transformers' last_hidden_state of the base model [tokens, hidden]."""
    with torch.no_grad():
        return model.base_model(torch.tensor([ids])).last_hidden_state[0]


def expected_embedding(model, ids, spec: PoolingSpec) -> torch.Tensor:
    h = hidden(model, ids)
    out = (h.mean(0) if spec.pooling == "mean" else h[-1])[: spec.dimensions]
    return torch.nn.functional.normalize(out, dim=-1) if spec.normalize else out


def expected(model, task: str, ids: list[int]) -> torch.Tensor:
    """What the head gives for one unpadded prompt (batch of 1), in join()'s shape."""
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    if task in ("classify", "token_classify"):
        return out.logits[0]
    return torch.stack([out.start_logits[0], out.end_logits[0]], -1)


def random_ids(lengths, seed) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 150000, (n,), generator=g).tolist() for n in lengths]


# -- the heads on the ranks, against transformers ------------------------------------------------------------
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_heads_match_transformers(heads, tp, pp):
    """One batch of prompts of different lengths, the first prefilled in two chunks (the second beside nothing
    else), through each checkpoint's head and both embedding poolings; a prompt ending in pad tokens is pooled
    at its last non-pad token, as transformers does, or at its last token when the config has no pad_token_id."""
    prompts = random_ids([13, 5, 21], seed=1)
    prompts.append(prompts[1] + [PAD, PAD])
    half = len(prompts[0]) // 2
    tables = ranks.block_tables(len(prompts), 8)
    # seq ids: 10 * mode + prompt; modes: every row's head outputs, the last row's hidden state, the hidden states'
    # sum, the head at the last row, the head at the last non-pad row
    modes = [("head", None), ("hidden", "last"), ("hidden_sum", None), ("head", "last"), ("head", "nonpad")]

    def plans(first: bool) -> list[SeqPlan]:
        out = []
        for m, (pooling, at) in enumerate(modes):
            for i, p in enumerate(prompts):
                position = {"last": len(p) - 1, "nonpad": last_non_pad(p, PAD), None: None}[at]
                if i == 0:  # two chunks, the second in a step of its own
                    start, end = (0, half) if first else (half, len(p))
                elif first:
                    start, end = 0, len(p)
                else:
                    continue
                out.append(SeqPlan(10 * m + i, p[start:end], start, tables[i], pooling=pooling,
                                   pool_position=position))
        return out

    tasks = list(HEADS)
    results = run_ranks(ranks.pooled_parts, tp * pp, [str(heads[t]) for t in tasks], tp, pp,
                        [plans(True), plans(False)])[(pp - 1) * tp]
    worst = {}
    for task, parts in zip(tasks, results):
        model = reference(heads[task], task)
        for i, ids in enumerate(prompts):
            diffs = {}
            # Classification at the last non-pad token (transformers skips the trailing pads by itself), or with
            # no pad_token_id at the very last token; the other heads at every token.
            ours = join(PoolingSpec(task), parts[40 + i if task == "classify" else i], len(ids))
            diffs[task] = (ours - expected(model, task, ids)).abs().max().item()
            if task == "classify":
                nopad = reference(heads[task], task, pad_token_id=None)
                ours = join(PoolingSpec(task), parts[30 + i], len(ids))
                diffs["classify (no pad_token_id)"] = (ours - expected(nopad, task, ids)).abs().max().item()
            for m, pooling in ((1, "last"), (2, "mean")):
                spec = PoolingSpec("embed", pooling, normalize=True)
                diffs[f"embed {pooling}"] = (join(spec, parts[10 * m + i], len(ids))
                                             - expected_embedding(model, ids, spec)).abs().max().item()
            for name, d in diffs.items():
                worst[name] = max(worst.get(name, 0.0), d)
    print(f"tp={tp} pp={pp}: max |ours - transformers| " + ", ".join(f"{k} {v:.2g}" for k, v in worst.items()))
    assert max(worst.values()) <= TOLERANCE, worst
    assert {"classify", "token_classify", "qa", "embed last", "embed mean", "classify (no pad_token_id)"} <= set(worst)
