import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from shards import sampling
from shards.sampling import SamplingParams, SamplingTensors, SeenTokens, process_logits, sample

V = 64


def _process(logits, params, prompts, outputs):
    t = SamplingTensors.build(params, prompts, outputs, logits.shape[1], logits.device)
    return process_logits(logits, t)


def _hf_process(row_logits, p, prompt, output):
    """One row through transformers' own processors, in generate's order, enabled ones only."""
    scores = row_logits[None].float().clone()
    ids = torch.tensor([prompt + output], dtype=torch.long)
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
    if p.temperature == 0.0:  # greedy: HF applies no warpers
        return scores[0]
    if p.temperature != 1.0:
        scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    if p.min_p > 0.0:
        scores = MinPLogitsWarper(p.min_p)(ids, scores)
    return scores[0]


def test_process_logits_matches_transformers_per_row():
    torch.manual_seed(0)
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(top_p=0.8),
        SamplingParams(temperature=1.3, min_p=0.1),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.8, temperature=0.9, top_k=20, top_p=0.9, min_p=0.05),
        SamplingParams(top_k=1000),  # larger than V
        SamplingParams(top_k=1),
        SamplingParams(top_p=1e-6),  # keeps only the top token
        SamplingParams(temperature=0.0, repetition_penalty=1.5, top_k=3, top_p=0.5),
        SamplingParams(temperature=2.0, top_k=10, min_p=0.2, seed=3),
    ]
    B = len(params)
    logits = torch.randn(B, V) * 3
    prompts = [[int(x) for x in torch.randint(0, V, (i % 4 * 3,))] for i in range(B)]
    outputs = [[int(x) for x in torch.randint(0, V, (i % 3 * 2,))] for i in range(B)]
    ours = _process(logits, params, prompts, outputs)
    for i, p in enumerate(params):
        expected = _hf_process(logits[i], p, prompts[i], outputs[i])
        torch.testing.assert_close(ours[i], expected, atol=1e-6, rtol=0, msg=f"row {i}: {p}")
    assert torch.isfinite(ours[7]).sum() == 1 and torch.isfinite(ours[8]).sum() == 1
    assert torch.isfinite(ours[6]).all()


def test_process_logits_accepts_half_precision_without_mutating_input():
    logits = torch.randn(3, V).to(torch.bfloat16)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.2, top_k=4), SamplingParams(top_p=0.5), SamplingParams()]
    out = _process(logits, params, [[1, 2], [], []], [[3], [], []])
    assert out.dtype == torch.float32
    assert torch.equal(logits, before)
    expected = _hf_process(logits[0].float(), params[0], [1, 2], [3])
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=0)


def test_presence_and_frequency_penalties_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)]
    # prompt tokens never count for presence/frequency; output has token 1 x3, token 3 x1
    out = _process(logits, params, [[0, 0, 4]], [[1, 3, 1, 1]])
    expected = torch.tensor([[1.0, 2.0 - 0.5 - 0.75, 3.0, 4.0 - 0.5 - 0.25, 5.0]])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_repetition_then_presence_frequency_then_temperature():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5, temperature=0.5)
    out = _process(logits, [p], [[0]], [[1, 2, 2]])
    # rep: tok0 2/2=1, tok1 -2*2=-4, tok2 1/2=0.5; then -presence-freq*count; then /0.5
    expected = torch.tensor([[1.0, -4.0 - 1.0 - 0.5, 0.5 - 1.0 - 1.0, 0.5]]) / 0.5
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_empty_penalty_lists_leave_logits_unchanged():
    logits = torch.randn(2, V)
    params = [SamplingParams(repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=1.0), SamplingParams()]
    torch.testing.assert_close(_process(logits, params, [[], []], [[], []]), logits, atol=0, rtol=0)


def test_greedy_is_argmax_of_penalised_logits_in_mixed_batch():
    torch.manual_seed(1)
    B = 16
    logits = torch.randn(B, V)
    prompts = [[int(logits[i].argmax())] for i in range(B)]  # penalise the raw argmax
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=3.0) if i % 2 == 0 else SamplingParams(temperature=1.0)
        for i in range(B)
    ]
    out = sample(logits, params, prompts, [[] for _ in range(B)])
    for i in range(0, B, 2):
        penalised = RepetitionPenaltyLogitsProcessor(3.0)(torch.tensor([prompts[i]]), logits[i : i + 1].clone())
        assert out.token_ids[i] == penalised.argmax()
        assert out.token_ids[i] != logits[i].argmax()


def test_greedy_ties_pick_lowest_id():
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0, 5.0]])
    out = sample(logits, [SamplingParams(temperature=0.0, top_k=2, top_p=0.1)], [[]], [[]])
    assert out.token_ids.tolist() == [1]


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 9.99e-6])
def test_vanishing_temperature_is_greedy_not_nan(temperature):
    """logits / 1e-45 overflows to inf and softmax to NaN: such temperatures sample the argmax."""
    torch.manual_seed(3)
    logits = torch.randn(32, V) * 10
    params = [SamplingParams(temperature=temperature, seed=i, logprobs=2) for i in range(32)]
    out = sample(logits, params, [[] for _ in range(32)], [[] for _ in range(32)])
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert torch.isfinite(out.logprobs).all()


def test_top_k_1_equals_greedy():
    torch.manual_seed(2)
    B = 200
    logits = torch.randn(B, V)
    params = [SamplingParams(top_k=1, temperature=1.5, seed=i if i % 2 else None) for i in range(B)]
    sampled = sample(logits, params, [[] for _ in range(B)], [[] for _ in range(B)])
    greedy = sample(logits, [SamplingParams(temperature=0.0)] * B, [[] for _ in range(B)], [[] for _ in range(B)])
    assert torch.equal(sampled.token_ids, greedy.token_ids)
    assert torch.equal(sampled.token_ids, logits.argmax(dim=-1))


def test_b_equals_1():
    logits = torch.randn(1, V)
    out = sample(logits, [SamplingParams(seed=7, logprobs=2)], [[1, 2]], [[3]])
    assert out.token_ids.shape == (1,) and out.top_ids.shape == (1, 2)
    assert 0 <= int(out.token_ids[0]) < V


def test_seeded_rows_ignore_batch_composition_and_position():
    torch.manual_seed(3)
    vocab = 1000
    row = torch.randn(vocab)
    target = SamplingParams(seed=1234, top_p=0.95)
    history = [5, 6, 7]
    alone = sample(row[None], [target], [[1]], [history]).token_ids[0]
    for position in (0, 3, 7):
        params = [SamplingParams(seed=i, temperature=0.7) if i % 2 else SamplingParams() for i in range(8)]
        params[position] = target
        logits = torch.randn(8, vocab)
        logits[position] = row
        outputs = [[int(x) for x in torch.randint(0, vocab, (i,))] for i in range(8)]
        outputs[position] = history
        prompts = [[0]] * 8
        prompts[position] = [1]
        assert sample(logits, params, prompts, outputs).token_ids[position] == alone


def test_seed_and_step_change_the_draw():
    n = 300
    logits = torch.zeros(n, 1000)  # uniform: the draw is pure noise
    empty = [[] for _ in range(n)]
    by_seed = sample(logits, [SamplingParams(seed=s) for s in range(n)], empty, empty).token_ids
    assert len(set(by_seed.tolist())) > 200  # ~259 distinct expected for 300 uniform draws from 1000
    same_seed = [SamplingParams(seed=42)] * n
    by_step = sample(logits, same_seed, empty, [[0] * k for k in range(n)]).token_ids
    assert len(set(by_step.tolist())) > 200
    again = sample(logits, same_seed, empty, [[0] * k for k in range(n)]).token_ids
    assert torch.equal(by_step, again)
    # seeds differing only in the high 32 bits still differ
    high = sample(logits, [SamplingParams(seed=s << 32) for s in range(1, n + 1)], empty, empty).token_ids
    assert len(set(high.tolist())) > 200


def test_unseeded_rows_are_fresh_each_call_but_follow_global_rng():
    n = 300
    logits = torch.zeros(n, 1000)  # uniform: the draw is pure noise
    empty = [[] for _ in range(n)]
    params = [SamplingParams()] * n
    torch.manual_seed(5)
    a = sample(logits, params, empty, empty).token_ids
    b = sample(logits, params, empty, empty).token_ids
    torch.manual_seed(5)
    c = sample(logits, params, empty, empty).token_ids
    assert (a != b).float().mean() > 0.9
    assert torch.equal(a, c)
    assert len(set(a.tolist())) > 200


def _empirical(tokens, vocab):
    return torch.bincount(tokens, minlength=vocab).float() / len(tokens)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.6),
        SamplingParams(temperature=1.4, top_k=5),
        SamplingParams(top_p=0.8),
        SamplingParams(min_p=0.15, temperature=1.2),
        SamplingParams(top_k=6, top_p=0.9, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.3),
    ],
    ids=["plain", "temp", "topk", "topp", "minp", "all"],
)
def test_empirical_frequencies_match_processed_distribution(params):
    torch.manual_seed(6)
    vocab, n = 8, 20000
    base = torch.log(torch.tensor([0.30, 0.22, 0.15, 0.12, 0.09, 0.06, 0.04, 0.02]))
    logits = base.expand(n, vocab)
    # half seeded (each its own seed, various steps), half unseeded
    rows = [
        SamplingParams(**{**params.__dict__, "seed": (i * 7919 if i % 2 else None)}) for i in range(n)
    ]
    prompts = [[0, 3]] * n
    outputs = [[2, 2]] * n
    tokens = sample(logits, rows, prompts, outputs).token_ids
    expected = _process(base[None], [params], [[0, 3]], [[2, 2]]).softmax(dim=-1)[0]
    tv = 0.5 * (_empirical(tokens, vocab) - expected).abs().sum()
    assert tv < 0.02, (tv, _empirical(tokens, vocab), expected)
    truncated = expected == 0
    assert not torch.isin(tokens, truncated.nonzero().flatten()).any()
    if params.top_p < 1 or params.min_p > 0 or params.top_k:
        assert truncated.any()  # the case really truncates something


def test_seeded_steps_sample_the_right_distribution():
    """Consecutive steps of seeded sequences (step = output length) are distributed correctly."""
    vocab, n, steps = 8, 20000, 200
    probs = torch.tensor([0.30, 0.22, 0.15, 0.12, 0.09, 0.06, 0.04, 0.02])
    logits = probs.log().expand(n, vocab)
    histories = [[0] * k for k in range(steps)]
    params = [SamplingParams(seed=i // steps) for i in range(n)]
    tokens = sample(logits, params, [[]] * n, [histories[i % steps] for i in range(n)]).token_ids
    assert 0.5 * (_empirical(tokens, vocab) - probs).abs().sum() < 0.02


def test_logprobs_are_raw_and_top_n_matches_topk():
    torch.manual_seed(7)
    B = 5
    logits = torch.randn(B, V) * 2
    params = [
        SamplingParams(logprobs=0, temperature=0.5, top_k=3),
        SamplingParams(logprobs=5, repetition_penalty=2.0),
        SamplingParams(logprobs=2, temperature=0.0),
        SamplingParams(logprobs=1, top_p=0.3, seed=1),
        SamplingParams(logprobs=3, min_p=0.5),
    ]
    prompts = [[1, 2, 3]] * B
    outputs = [[4, 5]] * B
    out = sample(logits, params, prompts, outputs)
    raw = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    values, ids = torch.topk(raw, 5, dim=-1)
    assert out.top_ids.shape == (B, 5) and out.top_ids.dtype == torch.int64
    asked = [i for i, p in enumerate(params) if p.logprobs]  # rows asking none get no top-n computed
    assert torch.equal(out.top_ids[asked], ids[asked])
    torch.testing.assert_close(out.top_logprobs[asked], values[asked])
    assert out.token_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32

    rows = out.to_lists([p.logprobs for p in params])
    assert [len(r["top"]) for r in rows] == [0, 5, 2, 1, 3]
    for i, r in enumerate(rows):
        assert r["token_id"] == int(out.token_ids[i])
        assert math.isclose(r["logprob"], float(raw[i, r["token_id"]]), abs_tol=1e-6)
        assert [tok for tok, _ in r["top"]] == ids[i, : params[i].logprobs].tolist()


def test_no_logprobs_requested_gives_empty_top():
    out = sample(torch.randn(3, V), [SamplingParams()] * 3, [[]] * 3, [[]] * 3)
    assert out.top_ids.shape == (3, 0) and out.top_logprobs.shape == (3, 0)
    assert all(r["top"] == [] for r in out.to_lists([0] * 3))


def test_logit_bias_changes_the_greedy_choice_not_the_logprobs():
    """The bias moves the argmax (greedy included); reported logprobs stay the raw distribution's."""
    torch.manual_seed(4)
    logits = torch.randn(2, V)
    target = int(logits[0].argsort()[V // 2])  # a middling token
    bias = float(logits[0].max() - logits[0, target]) + 0.5
    params = [SamplingParams(temperature=0.0, logit_bias=((target, bias), (3, -2.0)), logprobs=2),
              SamplingParams(temperature=0.0, logprobs=2)]
    out = sample(logits, params, [[], []], [[], []])
    assert out.token_ids.tolist() == [target, int(logits[1].argmax())]
    raw = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs[0], raw[0, target])
    assert out.top_ids[0].tolist() == raw[0].topk(2).indices.tolist()
    expected = logits[0].clone()
    expected[target] += bias
    expected[3] -= 2.0
    torch.testing.assert_close(_process(logits, params, [[], []], [[], []]), torch.stack([expected, logits[1]]))


def test_minus_100_bias_bans_even_a_dominant_token():
    logits = torch.zeros(256, V)
    logits[:, 7] = 8.0  # p(7) ~ 0.98 under temperature 1
    free = sample(logits, [SamplingParams(seed=i) for i in range(256)], [[]] * 256, [[]] * 256)
    assert (free.token_ids == 7).float().mean() > 0.9
    banned = sample(logits, [SamplingParams(seed=i, logit_bias=((7, -100.0),)) for i in range(256)],
                    [[]] * 256, [[]] * 256)
    assert not (banned.token_ids == 7).any()


def test_min_tokens_masks_stop_ids_as_transformers_min_new_tokens():
    """Before min_tokens generated tokens the stop ids are -inf (transformers' MinNewTokensLengthLogitsProcessor),
    from then on nothing changes; repetition penalty and the rest still apply on top."""
    torch.manual_seed(5)
    logits = torch.randn(1, V)
    stop = (int(logits[0].argmax()), 11)
    prompt = [1, 2, 3]
    for generated in range(5):
        p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=stop, repetition_penalty=1.2)
        output = list(range(20, 20 + generated))
        hf = MinNewTokensLengthLogitsProcessor(len(prompt), 3, list(stop))(
            torch.tensor([prompt + output]), logits.clone())
        expected = _hf_process(hf[0], p, prompt, output)
        torch.testing.assert_close(_process(logits, [p], [prompt], [output])[0], expected, atol=1e-6, rtol=0)
        token = int(sample(logits, [p], [prompt], [output]).token_ids[0])
        assert (token == stop[0]) == (generated >= 3)


def _packed(allowed_ids: list[int], vocab: int) -> bytes:
    """A token bitmask as the router packs it (xgrammar's layout: int32 words, bit i of word w is id 32w + i)."""
    words = [0] * -(-vocab // 32)
    for t in allowed_ids:
        words[t // 32] |= 1 << (t % 32)
    return torch.tensor([w - 2**32 if w >= 2**31 else w for w in words], dtype=torch.int32).numpy().tobytes()


def test_token_mask_bounds_greedy_and_sampled_rows_only():
    vocab = 100
    logits = torch.randn(3, vocab)
    allowed = [5, 31, 32, 63, 99]
    params = [SamplingParams(temperature=0.0, logit_bias=((7, 100.0),)), SamplingParams(temperature=1.5, seed=1),
              SamplingParams(temperature=0.0)]
    masks = [_packed(allowed, vocab), _packed(allowed, vocab), None]
    for step in range(20):
        out = sample(logits, params, [[]] * 3, [[0] * step] * 3, masks)
        assert out.token_ids[0].item() in allowed and out.token_ids[1].item() in allowed  # bias cannot revive 7
        assert out.token_ids[2].item() == logits[2].argmax().item()  # a row without a mask is untouched
    best = max(allowed, key=lambda t: logits[0, t].item())
    assert out.token_ids[0].item() == best
    assert out.logprobs[0].item() == pytest.approx(logits[0].log_softmax(-1)[best].item())  # raw logprobs


@pytest.mark.parametrize("row_by_row", [True, False])
def test_token_masks_set_exactly_the_disallowed_logits_to_minus_inf(row_by_row):
    """Both ways of applying packed masks (row by row on CPU, the whole batch elsewhere) leave allowed logits
    bit for bit and make every other one -inf, the LM head's padding ids past the mask included."""
    torch.manual_seed(3)
    vocab, padded = 77, 80  # the mask covers 77 ids; the logits have 80 columns
    x = torch.randn(4, padded)
    allowed = {0: [0, 7, 8, 31, 32, 76], 2: list(range(0, 77, 3))}
    t = SamplingTensors.build([SamplingParams()] * 4, [[]] * 4, [[]] * 4, padded, "cpu",
                              [_packed(allowed[r], vocab) if r in allowed else None for r in range(4)])
    out = x.clone()
    sampling._apply_token_masks_(out, *t.token_masks, row_by_row=row_by_row)
    for row in range(4):
        keep = torch.zeros(padded, dtype=torch.bool)
        keep[allowed.get(row, range(padded))] = True
        assert torch.equal(out[row][keep], x[row][keep])
        assert (out[row][~keep] == float("-inf")).all()


def test_masked_sampling_leaves_the_logits_alone_unless_told_to_overwrite():
    logits = torch.randn(2, 64)
    before = logits.clone()
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=3)]
    masks = [_packed([5, 9], 64), _packed([1, 2, 3], 64)]
    kept = sample(logits, params, [[]] * 2, [[]] * 2, masks)
    assert torch.equal(logits, before)
    overwritten = sample(logits, params, [[]] * 2, [[]] * 2, masks, overwrite=True)
    assert torch.equal(kept.token_ids, overwritten.token_ids) and torch.equal(kept.logprobs, overwritten.logprobs)
    # Logprobs describe the raw logits: the top-n is the whole row's, not the mask's.
    assert (kept.top_ids[0] == 0).all() and torch.equal(kept.top_ids[1], before[1].topk(3).indices)
    torch.testing.assert_close(kept.top_logprobs[1], before[1].log_softmax(-1).topk(3).values)
    torch.testing.assert_close(kept.logprobs, before.log_softmax(-1).gather(1, kept.token_ids[:, None])[:, 0])


def test_no_token_masks_build_no_tensor():
    t = SamplingTensors.build([SamplingParams()], [[]], [[]], 10, "cpu", [None])
    assert t.token_masks is None


def _whole_vocabulary_draw(logits, params, prompts, outputs):
    """The reference draw: process_logits over the whole vocabulary (checked against transformers above), then
    the exponential race over every token."""
    t = SamplingTensors.build(params, prompts, outputs, logits.shape[1], logits.device)
    warped = process_logits(logits, t)
    noise = sampling._exponential_noise(t.keys, torch.arange(logits.shape[1]))
    drawn = (warped.softmax(dim=-1) / noise).argmax(dim=-1)
    return torch.where(t.greedy, warped.argmax(dim=-1), drawn)


@pytest.mark.parametrize("vocab", [4096, 151936])
def test_candidate_draws_equal_the_whole_vocabulary_draw(vocab):
    """Rows with top-k or top-p draw among their CANDIDATES most likely tokens; seeded, they take exactly
    the token the whole-vocabulary warp and race take, including top-p rows whose nucleus outgrows the
    candidates (flat logits) and so fall back. Greedy and logprobs are untouched by the path taken."""
    torch.manual_seed(11)
    kinds = [
        dict(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),  # Qwen2-Instruct's defaults
        dict(top_k=5),
        dict(top_p=0.9, temperature=0.8),
        dict(top_p=0.95, min_p=0.05),
        dict(top_k=50, min_p=0.1, temperature=1.3, frequency_penalty=0.5),
        dict(temperature=0.0, top_k=3),
        dict(temperature=0.9),  # neither: the whole vocabulary
        dict(top_p=0.99, temperature=3.0),  # a nucleus far past the candidates on flat rows
    ]
    rows = 48
    params = [SamplingParams(seed=1000 + i, **kinds[i % len(kinds)]) for i in range(rows)]
    logits = torch.randn(rows, vocab) * torch.linspace(0.5, 6, rows)[:, None]  # flat to peaked rows
    prompts = [[int(x) for x in torch.randint(0, vocab, (30,))] for _ in range(rows)]
    outputs = [[int(x) for x in torch.randint(0, vocab, (i % 7,))] for i in range(rows)]
    ours = sample(logits, params, prompts, outputs)
    assert torch.equal(ours.token_ids, _whole_vocabulary_draw(logits, params, prompts, outputs))
    exact = logits.double().log_softmax(-1).gather(1, ours.token_ids[:, None]).squeeze(1)  # float32's is off 2e-5
    torch.testing.assert_close(ours.logprobs.double(), exact, atol=2e-6, rtol=0)


def test_argmax_and_logsumexp_by_chunks_equal_torchs():
    """The chunked reductions, at sizes that end mid-chunk, with ties (first index wins) and -inf rows."""
    torch.manual_seed(12)
    x = torch.randn(5, 3 * sampling.LSE_CHUNK + 77)
    x[1, 9] = x[1, 2000] = x[1, -1] = 50.0  # ties: the first wins
    x[2, -1] = 60.0  # the maximum in the short last chunk
    x[3] = float("-inf")
    x[3, 100] = 0.0
    ids, values = sampling._argmax(x)
    expected_values, expected_ids = x.max(dim=-1)
    assert torch.equal(ids, expected_ids) and torch.equal(values, expected_values)
    torch.testing.assert_close(sampling._logsumexp(x), x.logsumexp(dim=-1))
    for k in (1, 3, 20):
        values, ids = sampling._topk(x[[0, 2, 4]], k)
        expected_values, _ = x[[0, 2, 4]].topk(k, dim=-1)
        assert torch.equal(values, expected_values)
        assert torch.equal(x[[0, 2, 4]].gather(1, ids), values)  # the ids are those values' columns


def test_kept_seen_tokens_penalise_as_the_lists_do():
    """A rank's SeenTokens, grown step by step, give the tokens and logprobs the prompt and output lists give."""
    gen = torch.Generator().manual_seed(3)
    vocab, steps = 500, 6
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.3), SamplingParams(temperature=0.8, seed=4,
              repetition_penalty=0.7, frequency_penalty=0.5), SamplingParams(temperature=0.0)]
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (40, 7, 12)]
    outputs = [[], [], []]
    seen = [SeenTokens(prompts[0]), SeenTokens(prompts[1]), None]
    for _ in range(steps):
        logits = torch.randn(3, vocab, generator=gen)
        kept = sample(logits, params, prompts, outputs, None, seen)
        lists = sample(logits, params, prompts, outputs)
        assert kept.token_ids.tolist() == lists.token_ids.tolist()
        assert torch.equal(kept.logprobs, lists.logprobs)
        for row, token in enumerate(kept.token_ids.tolist()):
            outputs[row].append(token)
            if seen[row] is not None:
                seen[row].add([token])
    assert sorted(seen[0].ids.tolist()) == sorted(set(prompts[0] + outputs[0]))
