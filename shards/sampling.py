"""Batched token sampling for the last pipeline stage.

One call handles every sequence that samples this step, whatever mix of knobs it
uses: all per-row parameters become [B] tensors, so the hot path is a fixed
sequence of batched torch ops with no Python loop per sequence.
"""

import math
from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF
# Temperatures this small are argmax in all but name, and dividing logits by them overflows to inf/NaN.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # below GREEDY_BELOW means greedy (argmax; ties -> lowest id)
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0  # 1.0 = disabled
    min_p: float = 0.0  # 0.0 = disabled
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt + generated tokens
    presence_penalty: float = 0.0  # OpenAI style, over generated tokens only
    frequency_penalty: float = 0.0  # OpenAI style, over generated tokens only
    seed: int | None = None
    logprobs: int = 0  # how many top logprobs to return (0 = only the chosen token's)
    # Added to the logits before anything else (greedy included): (token id, bias) pairs.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # While fewer than min_tokens were generated, stop_token_ids (the ids that would end the sequence: EOS
    # unless ignored, and the request's stop ids; set only with min_tokens) cannot be sampled.
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    prompt_logprobs: int | None = None  # top-n logprobs per prompt token; None = not asked


@dataclass
class TokenLogprobs:
    """Tokens with their logprobs and the top-N alternatives, under the raw distribution."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32, logprob of token_ids
    top_ids: torch.Tensor  # [B, N] int64, N = the most top logprobs any row asked
    top_logprobs: torch.Tensor  # [B, N] float32

    @classmethod
    def of(cls, logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> "TokenLogprobs":
        """log_softmax of the raw logits [B, V] at token_ids [B], and its top num_top."""
        logprobs = logits.float().log_softmax(dim=-1)
        top_logprobs, top_ids = logprobs.topk(min(num_top, logits.shape[1]), dim=-1)
        return cls(token_ids, logprobs.gather(1, token_ids[:, None]).squeeze(1), top_ids, top_logprobs)

    def to_lists(self, num_top: list[int]) -> list[dict]:
        """Plain Python per row, top-N trimmed to that row's own num_top (one device sync)."""
        ids, lps = self.token_ids.tolist(), self.logprobs.tolist()
        top_ids, top_lps = self.top_ids.tolist(), self.top_logprobs.tolist()
        return [{"token_id": ids[i], "logprob": lps[i], "top": list(zip(top_ids[i], top_lps[i]))[:n]}
                for i, n in enumerate(num_top)]


def _token_counts(rows: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """[B, V] float32 occurrence counts, built with one scatter instead of a loop per row."""
    flat = torch.tensor([tok for row in rows for tok in row], dtype=torch.long, device=device)
    row_idx = torch.repeat_interleave(
        torch.arange(len(rows), device=device), torch.tensor([len(row) for row in rows], device=device)
    )
    counts = torch.zeros(len(rows), vocab_size, device=device)
    return counts.index_put_((row_idx, flat), torch.ones(len(flat), device=device), accumulate=True)


def _additions(params: list[SamplingParams], output_token_ids: list[list[int]], device):
    """(rows, token ids, values) of every row's logit_bias, and -inf on the stop ids of rows still short of
    min_tokens; None when there are none."""
    entries = []
    for row, (p, out) in enumerate(zip(params, output_token_ids)):
        entries += [(row, t, b) for t, b in p.logit_bias]
        if len(out) < p.min_tokens:
            entries += [(row, t, -math.inf) for t in p.stop_token_ids]
    if not entries:
        return None
    rows, ids, values = zip(*entries)
    return (torch.tensor(rows, device=device), torch.tensor(ids, device=device),
            torch.tensor(values, dtype=torch.float32, device=device))


def _allowed(token_masks: list[bytes | None] | None, vocab_size: int, device):
    """(rows, [R, V] bool) of the rows that carry a packed token bitmask; None when none does."""
    rows = [i for i, m in enumerate(token_masks or ()) if m is not None]
    if not rows:
        return None
    words = torch.stack([torch.frombuffer(bytearray(token_masks[i]), dtype=torch.int32) for i in rows]).to(device)
    bits = (words[:, :, None] >> torch.arange(32, dtype=torch.int32, device=device)) & 1
    allowed = bits.flatten(1)[:, :vocab_size].bool()
    if allowed.shape[1] < vocab_size:  # ids past the mask (padding rows of the LM head) are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]))
    return torch.tensor(rows, device=device), allowed


@dataclass
class SamplingTensors:
    """The batch's sampling parameters as [B] tensors, built once per step from Python lists.

    Greedy rows get temperature 1 and no truncation, so their processed logits are
    just the penalised ones (HF generate applies no warpers when do_sample=False).
    """

    temperature: torch.Tensor  # [B] float32, 1.0 on greedy rows
    greedy: torch.Tensor  # [B] bool
    top_k: torch.Tensor  # [B] int64 in 1..V (V when disabled)
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    repetition_penalty: torch.Tensor  # [B] float32
    presence_penalty: torch.Tensor  # [B] float32
    frequency_penalty: torch.Tensor  # [B] float32
    # (rows, token ids, values) added to the logits: logit_bias, and -inf on the ids min_tokens still bans;
    # None when no row has either (those rows cost nothing).
    additions: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    # (rows, [R, V] bool) of the structured-output rows: tokens outside their grammar are -inf, greedy too.
    allowed: tuple[torch.Tensor, torch.Tensor] | None
    seen: torch.Tensor | None  # [B, V] bool, token in prompt or output; None when no row uses it
    output_counts: torch.Tensor | None  # [B, V] float32; None when no row uses it
    keys: torch.Tensor  # [B] int64 in 0..2^32-1, per-row RNG key for this step
    use_top_k_top_p: bool
    use_min_p: bool
    use_temperature: bool  # some row's temperature is neither 0 (greedy) nor 1
    all_greedy: bool
    num_top: int  # N in TokenLogprobs.top_ids

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        vocab_size: int,
        device,
        token_masks: list[bytes | None] | None = None,
    ) -> "SamplingTensors":
        def tensor(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        greedy = [p.temperature < GREEDY_BELOW for p in params]
        rep = [p.repetition_penalty != 1.0 for p in params]
        pres_freq = [p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params]
        seen = output_counts = None
        if any(rep):  # rows without the penalty contribute no tokens: their counts stay zero
            rows = [prompt + out if r else [] for r, prompt, out in zip(rep, prompt_token_ids, output_token_ids)]
            seen = _token_counts(rows, vocab_size, device) > 0
        if any(pres_freq):
            rows = [out if pf else [] for pf, out in zip(pres_freq, output_token_ids)]
            output_counts = _token_counts(rows, vocab_size, device)
        top_k = [vocab_size if g or p.top_k <= 0 else min(p.top_k, vocab_size) for g, p in zip(greedy, params)]
        top_p = [1.0 if g else p.top_p for g, p in zip(greedy, params)]
        min_p = [0.0 if g else p.min_p for g, p in zip(greedy, params)]
        return cls(
            temperature=tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)]),
            greedy=tensor(greedy, torch.bool),
            additions=_additions(params, output_token_ids, device),
            allowed=_allowed(token_masks, vocab_size, device),
            top_k=tensor(top_k, torch.long),
            top_p=tensor(top_p),
            min_p=tensor(min_p),
            repetition_penalty=tensor([p.repetition_penalty for p in params]),
            presence_penalty=tensor([p.presence_penalty for p in params]),
            frequency_penalty=tensor([p.frequency_penalty for p in params]),
            seen=seen,
            output_counts=output_counts,
            keys=_row_keys(params, [len(out) for out in output_token_ids], device),
            use_top_k_top_p=any(k < vocab_size for k in top_k) or any(p < 1.0 for p in top_p),
            use_min_p=any(p > 0.0 for p in min_p),
            use_temperature=any(not g and p.temperature != 1.0 for g, p in zip(greedy, params)),
            all_greedy=all(greedy),
            num_top=max((p.logprobs for p in params), default=0),
        )


# Counter-based RNG: every uniform is a pure hash of (seed, step, token id), so a
# seeded row draws the same noise whatever else is in the batch and wherever it sits.
# Values stay in 0..2^32-1 inside int64, where every op below is exact (no overflow).


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32; c is split in 16-bit halves so no int64 product can overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection on 0..2^32-1 with full avalanche."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _row_keys(params: list[SamplingParams], steps: list[int], device) -> torch.Tensor:
    """Per-row key: hash(seed, step) for seeded rows, a fresh random draw for the others.

    step = tokens generated so far, so a seeded sequence's k-th token is reproducible.
    """
    seeds = [(p.seed if p.seed is not None else 0) & (2**64 - 1) for p in params]
    lo = torch.tensor([s & _M32 for s in seeds], device=device)
    hi = torch.tensor([s >> 32 for s in seeds], device=device)
    step = torch.tensor(steps, dtype=torch.long, device=device) & _M32
    seeded_keys = _fmix32(lo ^ _fmix32(hi ^ _fmix32(step ^ 0x9E3779B9)))
    fresh = torch.randint(0, 2**32, (len(params),), device=device)
    has_seed = torch.tensor([p.seed is not None for p in params], device=device)
    return torch.where(has_seed, seeded_keys, fresh)


def _exponential_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] Exp(1) noise; uniforms use 23 bits centred in their bin, so u is never 0 or 1."""
    token_hash = _fmix32(torch.arange(vocab_size, device=keys.device) ^ 0x7F4A7C15)
    bits = _fmix32(keys[:, None] ^ token_hash[None, :])
    u = ((bits >> 9).float() + 0.5) * 2.0**-23
    return -torch.log(u)


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """TopKLogitsWarper then TopPLogitsWarper, sharing one ascending sort.

    Masking below the k-th largest value in sorted order leaves the same tensor HF's
    top-p would get by sorting the top-k output, so the cumulative sums agree exactly.
    """
    sorted_logits, order = logits.sort(dim=-1)
    kth_largest = sorted_logits.gather(1, (logits.shape[1] - top_k)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = (cum_probs <= 1 - top_p[:, None]) & (top_p < 1)[:, None]
    remove[:, -1] = False  # top-p always keeps the most likely token
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """MinPLogitsWarper: drop tokens whose probability is below min_p * the top probability."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))


def process_logits(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Final float32 logits the token is drawn from: logit_bias and the min_tokens mask first (as vLLM), then
    the grammar's token mask (after the bias, so no bias revives a banned token), then transformers' generate order: repetition penalty, presence/frequency penalties, temperature,
    top-k, top-p, min-p. Truncated tokens are -inf. The input is not modified."""
    logits = logits.float()
    if t.additions is not None:
        rows, ids, values = t.additions
        logits = logits.index_put((rows, ids), values, accumulate=True)
    if t.allowed is not None:
        rows, allowed = t.allowed
        logits = logits.index_put((rows,), logits[rows].masked_fill(~allowed, float("-inf")))
    if t.seen is not None:
        rp = t.repetition_penalty[:, None]
        logits = torch.where(t.seen, torch.where(logits < 0, logits * rp, logits / rp), logits)
    if t.output_counts is not None:
        counts = t.output_counts
        logits = logits - t.frequency_penalty[:, None] * counts - t.presence_penalty[:, None] * (counts > 0)
    if t.use_temperature:
        logits = logits / t.temperature[:, None]
    if t.use_top_k_top_p:
        logits = _apply_top_k_top_p(logits, t.top_k, t.top_p)
    if t.use_min_p:
        logits = _apply_min_p(logits, t.min_p)
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    token_masks: list[bytes | None] | None = None,
) -> TokenLogprobs:
    """Pick one token per row of logits [B, V] (float32, or bf16/fp16, computed in float32).

    Greedy rows (temperature 0) take the argmax of the penalised logits. Other rows use
    the exponential race: argmax(p / E) with E ~ Exp(1) is an exact draw from p, and E
    comes from the counter-based hash above, so seeded rows are batch-independent.

    Returned logprobs (chosen token and top-N) are log_softmax of the RAW logits, before
    logit_bias, the min_tokens mask, the token mask, penalties, temperature and truncation (vLLM's default
    "raw_logprobs"): they describe the model, not the sampling knobs. `token_masks`: per row, a packed bitmask
    of the tokens it may take (structured outputs), or None.
    """
    t = SamplingTensors.build(params, prompt_token_ids, output_token_ids, logits.shape[1], logits.device,
                              token_masks)
    processed = process_logits(logits, t)
    token_ids = processed.max(dim=-1).indices  # first maximum, like argmax, and faster on CPU
    if not t.all_greedy:
        sampled = (processed.softmax(dim=-1) / _exponential_noise(t.keys, logits.shape[1])).argmax(dim=-1)
        token_ids = torch.where(t.greedy, token_ids, sampled)
    return TokenLogprobs.of(logits, token_ids, t.num_top)
