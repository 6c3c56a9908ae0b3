"""Our sharded model against transformers' Qwen2ForCausalLM on the same checkpoint, at several TP x PP splits."""

import json

import pytest
import torch
from transformers import Qwen2Config as HFConfig
from transformers import Qwen2ForCausalLM

from shards.rope import ORIGINAL, SCALED
from tests import ranks
from tests.multiproc import run_ranks

LAYOUTS = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2)]  # (tp, pp): 4 x 2 is 8 processes, 12-22 s a case on 2 cores
TOLERANCE = 1e-4  # float32


def reference(model_dir, scaled: bool = True) -> Qwen2ForCausalLM:
    config = HFConfig.from_pretrained(model_dir)
    if not scaled:
        config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_parameters["rope_theta"]}
    return Qwen2ForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32).eval()


def random_tokens(vocab: int, lengths, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name,tp,pp", [(name, tp, pp) for name in ("gqa-untied", "tied-yarn-sliding")
                                        for tp, pp in LAYOUTS] + [("straddling-kv", 2, 1), ("straddling-kv", 4, 1)])
def test_prefill_and_decode_logits_match_transformers(checkpoints, name, tp, pp):
    model_dir = checkpoints[name]
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = random_tokens(vocab, [11, 5, 20], seed=1)
    continuations = random_tokens(vocab, [17, 17, 17], seed=2)
    yarn = name == "tied-yarn-sliding"
    # With YaRN in the config, sequence 1 runs with the original RoPE in the same batch as YaRN sequences.
    variants = [SCALED, ORIGINAL, SCALED] if yarn else [ORIGINAL] * 3
    results = run_ranks(ranks.teacher_forced_logits, tp * pp, str(model_dir), tp, pp, prompts, continuations,
                        variants)
    ours = results[(pp - 1) * tp]
    refs = {True: reference(model_dir, scaled=True), False: reference(model_dir, scaled=False)}
    worst = 0.0
    for i, (prompt, cont) in enumerate(zip(prompts, continuations)):
        model = refs[variants[i] == SCALED or not yarn]
        with torch.no_grad():
            expected = model(torch.tensor([prompt + cont])).logits[0, len(prompt) - 1 :]
        assert ours[i].shape == expected.shape  # prefill row + one row per decode step (17 >= 16)
        worst = max(worst, (ours[i] - expected).abs().max().item())
    print(f"{name} tp={tp} pp={pp}: max |ours - transformers| = {worst:.3g}")
    assert worst <= TOLERANCE


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_greedy_generation_matches_transformers_generate(checkpoints, tp, pp):
    model_dir = checkpoints["gqa-untied"]
    prompts = random_tokens(1003, [9, 4, 15], seed=3)
    ours = run_ranks(ranks.greedy_generate, tp * pp, str(model_dir), tp, pp, prompts, 32)[(pp - 1) * tp]
    model = reference(model_dir)
    for prompt, (generated, logprobs) in zip(prompts, ours):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        assert generated == out.sequences[0, len(prompt):].tolist()
        # Plain greedy: the logprobs come from the LM head's own reduction (no logits made).
        expected = torch.cat(out.logits).float().log_softmax(-1)[range(len(generated)), generated]
        assert (torch.tensor(logprobs) - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("tp,pack_rows", [(1, None), (2, None), (3, None), (1, 700), (3, 700)])
def test_lm_head_greedy_reduction_equals_argmax_and_logsumexp_of_its_logits(tp, pack_rows):
    """Plain greedy rows are reduced inside the LM head, piece of the vocabulary by piece, ranks combined from
    three numbers a row: the same first-maximum ids, the max logit and the log-sum-exp of the gathered logits.
    The vocabulary (5,003) splits unevenly, leaves short last blocks / panels and TP padding ids; groups of 1
    block in the block layout, 700-token panels in oneDNN's."""
    vocab, hidden, rows = 5003, 16, 4
    ids, top, lse, logits = run_ranks(ranks.lm_head_greedy, tp, vocab, hidden, rows, 2048 * rows, pack_rows)[0]
    assert logits.shape == (rows, vocab)
    generator = torch.Generator().manual_seed(5)  # the ranks' weight and rows
    weight, x = torch.randn(vocab, hidden, generator=generator), torch.randn(rows, hidden, generator=generator)
    x[1] = 0
    torch.testing.assert_close(logits, x @ weight.T, atol=1e-5, rtol=1e-5)
    assert torch.equal(ids, logits.argmax(dim=-1)) and ids[1] == 0  # the all-zero row: the first id
    torch.testing.assert_close(top, logits.amax(dim=-1), atol=0, rtol=0)
    torch.testing.assert_close(lse, logits.logsumexp(dim=-1), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2), (4, 1)])
def test_two_all_reduces_per_layer_and_nothing_else(checkpoints, tp, pp):
    model_dir = checkpoints["gqa-untied"]
    prompts = random_tokens(1003, [6, 3], seed=4)
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    for rank, r in enumerate(run_ranks(ranks.count_collectives, tp * pp, str(model_dir), tp, pp, prompts)):
        expected = {"all_reduce": 2 * r["layers"] + r["first"]}  # + the vocab-parallel embedding's
        if r["last"]:
            expected["gather"] = 1  # vocab-parallel logits to TP rank 0
        if pp > 1:
            expected["recv" if r["last"] else "send"] = 1
        assert r["calls"] == expected, f"rank {rank}"
        # Each all-reduce carries exactly the step's hidden states: 9 tokens x hidden x float32.
        assert r["stats"]["all_reduce.bytes"] == expected["all_reduce"] * 9 * hidden * 4


def test_bfloat16_error_is_that_of_transformers_in_bfloat16(checkpoints):
    """The GPU dtype, on CPU: our bf16 logits are as close to the float32 reference as transformers' bf16 are."""
    from shards.batch import SeqPlan
    from shards.parallel import ParallelGroups
    from shards.sampling import SamplingParams
    from shards.worker import ShardWorker

    model_dir = checkpoints["gqa-untied"]
    prompts = random_tokens(1003, [12, 7], seed=5)
    worker = ShardWorker(model_dir, ParallelGroups(), num_kv_blocks=16, block_size=4, dtype="bfloat16")
    assert worker.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    plans = [SeqPlan(i, p, 0, ranks.block_tables(2, 8)[i], sampling=SamplingParams()) for i, p in enumerate(prompts)]
    ours, _ = worker.forward(plans)
    fp32 = reference(model_dir)
    bf16 = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        exact = torch.stack([fp32(torch.tensor([p])).logits[0, -1] for p in prompts])
        theirs = torch.stack([bf16(torch.tensor([p])).logits[0, -1].float() for p in prompts])
    our_error, their_error = (ours - exact).abs().max().item(), (theirs - exact).abs().max().item()
    print(f"bf16 max error vs float32: ours {our_error:.3g}, transformers {their_error:.3g}")
    assert our_error <= 2 * their_error
