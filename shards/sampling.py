"""Batched token sampling for the last pipeline stage.

One call handles every sequence that samples this step, whatever mix of knobs it
uses: all per-row parameters become [B] tensors, so the hot path is a fixed
sequence of batched torch ops with no Python loop per sequence.
"""

import functools
import math
from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF
# Temperatures this small are argmax in all but name, and dividing logits by them overflows to inf/NaN.
GREEDY_BELOW = 1e-5
_NO_TOKENS = torch.empty(0, dtype=torch.long)


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
    top_ids: torch.Tensor  # [B, N] int64, N = the most top logprobs any row asked (rows asking none: zeros)
    top_logprobs: torch.Tensor  # [B, N] float32

    @classmethod
    def of(cls, logits: torch.Tensor, token_ids: torch.Tensor, num_top: int | list[int]) -> "TokenLogprobs":
        """Logprobs of the raw logits [B, V] at token_ids [B] (see RawLogprobs)."""
        return RawLogprobs.of(logits, num_top).choose(logits, token_ids)

    @classmethod
    def argmax(cls, token_ids: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor) -> "TokenLogprobs":
        """Greedy rows reduced in the LM head (see plain_greedy): their ids, logits and log-sum-exps."""
        none = torch.zeros(len(token_ids), 0, device=token_ids.device)
        return cls(token_ids, logits - lse, none.long(), none)

    def to_lists(self, num_top: list[int]) -> list[dict]:
        """Plain Python per row, top-N trimmed to that row's own num_top: one device-to-host copy of every
        field packed as float64 (exact for token ids and float32 logprobs)."""
        n = self.top_ids.shape[1]
        packed = torch.cat([self.token_ids[:, None].double(), self.logprobs[:, None].double(),
                            self.top_ids.double(), self.top_logprobs.double()], 1).cpu().tolist()
        return [{"token_id": int(row[0]), "logprob": row[1], "top": list(zip(map(int, row[2 : 2 + k]),
                                                                         row[2 + n : 2 + n + k]))}
                for row, k in zip(packed, (min(k, n) for k in num_top))]


@dataclass
class RawLogprobs:
    """What logprobs need of whole raw rows: each row's log-sum-exp and its top-n (one int for every row, or a list
    per row; found only for the rows that ask any). No [B, V] log_softmax is made."""

    lse: torch.Tensor  # [B] float32
    top_ids: torch.Tensor  # [B, N] int64
    top_logprobs: torch.Tensor  # [B, N] float32

    @classmethod
    def of(cls, logits: torch.Tensor, num_top: int | list[int], lse: torch.Tensor | None = None) -> "RawLogprobs":
        rows = logits.shape[0]
        num_top = [num_top] * rows if isinstance(num_top, int) else num_top
        lse = _logsumexp(logits) if lse is None else lse
        n = min(max(num_top, default=0), logits.shape[1])
        top_ids = torch.zeros(rows, n, dtype=torch.long, device=logits.device)
        top_logprobs = torch.zeros(rows, n, device=logits.device)
        asking = [i for i, k in enumerate(num_top) if k > 0]
        if asking:
            which = torch.tensor(asking, device=logits.device)
            values, ids = _topk(_take(logits, which), n)
            top_ids[which], top_logprobs[which] = ids, values.float() - lse[which, None]
        return cls(lse, top_ids, top_logprobs)

    def choose(self, logits: torch.Tensor, token_ids: torch.Tensor) -> TokenLogprobs:
        """The logprobs of token_ids [B], whose raw logits are these (logits raw at least there)."""
        chosen = logits.gather(1, token_ids[:, None]).squeeze(1).float() - self.lse
        return TokenLogprobs(token_ids, chosen, self.top_ids, self.top_logprobs)


def plain_greedy(params: list[SamplingParams], token_masks: list[bytes | None]) -> bool:
    """Whether every row takes the argmax of its raw logits and wants only that token's logprob: then the LM head
    can reduce the rows as it makes them (VocabParallelEmbedding.greedy) and nothing here runs."""
    return all(p.temperature < GREEDY_BELOW and p.logprobs == 0 and not p.logit_bias and p.min_tokens == 0
               and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
               for p in params) and all(m is None for m in token_masks)


# On CPU a row-wise reduction over 151,936 logits is memory-bound: these column chunks keep the exp pass of
# logsumexp in cache, and argmax (a slow scalar loop in torch, 6x amax) becomes amax per chunk plus one
# argmax inside the winning chunk. Batch 64 greedy at bench-cpu's vocabulary: 48 -> 16 ms with logprobs.
# Chunks are as wide as LSE_ELEMENTS allows (every op's dispatch costs); up to LSE_WHOLE_ROWS rows need none:
# batch 1, 5 -> 0.3 ms.
LSE_CHUNK, LSE_ELEMENTS, LSE_WHOLE_ROWS, ARGMAX_CHUNK = 2048, 2**17, 4, 256


def _logsumexp(x: torch.Tensor, row_max: torch.Tensor | None = None) -> torch.Tensor:
    """[R] float32 log-sum-exp of each row of x [R, V], given its max if known."""
    x = x.float()
    if x.device.type != "cpu" or x.shape[1] <= LSE_CHUNK or x.shape[0] <= LSE_WHOLE_ROWS:
        return x.logsumexp(dim=-1)  # a few rows stay in cache whole
    m = x.amax(dim=-1) if row_max is None else row_max
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all -inf row: logsumexp -inf, not NaN
    total = torch.zeros_like(m)
    width = max(LSE_CHUNK, LSE_ELEMENTS // x.shape[0])  # few rows: few wide chunks (each op's dispatch costs)
    scratch = torch.empty(x.shape[0], width, device=x.device)
    for first in range(0, x.shape[1], width):
        part = x[:, first : first + width]
        out = scratch[:, : part.shape[1]]
        torch.sub(part, m[:, None], out=out)
        total += out.exp_().sum(dim=-1)
    return total.log_() + m


def _argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first index of each row's maximum, the maximum) of x [R, V]: what x.max(-1) gives, faster on CPU."""
    rows, vocab = x.shape
    if x.device.type != "cpu" or vocab < 4 * ARGMAX_CHUNK:
        values, ids = x.max(dim=-1)
        return ids, values
    full = vocab // ARGMAX_CHUNK * ARGMAX_CHUNK
    maxima = x[:, :full].view(rows, -1, ARGMAX_CHUNK).amax(dim=-1)
    if full < vocab:
        maxima = torch.cat([maxima, x[:, full:].amax(dim=-1, keepdim=True)], dim=1)
    best = maxima.argmax(dim=-1)  # the first chunk holding the maximum
    # The last chunk may be short: its columns past the vocabulary repeat the last one, after the real ones.
    cols = (best[:, None] * ARGMAX_CHUNK + torch.arange(ARGMAX_CHUNK, device=x.device)).clamp_(max=vocab - 1)
    within = x.gather(1, cols).argmax(dim=-1)
    return cols.gather(1, within[:, None]).squeeze(1), maxima.amax(dim=-1)


class SeenTokens:
    """The distinct tokens of a sequence's prompt and outputs so far: what its repetition penalty touches. A rank
    keeps one per sequence (shards/batch.py KeptSequences) and adds each step's new outputs, instead of
    deduplicating the whole context every step."""

    def __init__(self, tokens=()):
        self._set: set[int] = set()
        self._ids = torch.empty(0, dtype=torch.long)
        self._new: list[int] = []
        self.add(tokens)

    def add(self, tokens) -> None:
        for token in tokens:
            if token not in self._set:
                self._set.add(token)
                self._new.append(token)

    @property
    def ids(self) -> torch.Tensor:
        """[N] int64 on the CPU, in first-seen order."""
        if self._new:
            self._ids = torch.cat([self._ids, torch.tensor(self._new, dtype=torch.long)])
            self._new = []
        return self._ids


def _seen_entries(ids: list[torch.Tensor], device):
    """(rows, token ids) of every row's distinct seen tokens; None when no row has any."""
    lengths = [len(t) for t in ids]
    if not any(lengths):
        return None
    rows = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor(lengths))
    return rows.to(device), torch.cat(ids).to(device)


def _output_counts(rows: list[list[int]], vocab_size: int, device):
    """(rows, token ids, counts) of every distinct output token of each row: the few entries the presence and
    frequency penalties touch, instead of a [B, V] matrix. None when no row has any."""
    lengths = [len(tokens) for tokens in rows]
    if not any(lengths):
        return None
    flat = torch.tensor([t for tokens in rows for t in tokens], dtype=torch.long, device=device)
    row_of = torch.repeat_interleave(torch.arange(len(rows), device=device), torch.tensor(lengths, device=device))
    keys, n = torch.unique(row_of * vocab_size + flat, return_counts=True)
    return keys // vocab_size, keys % vocab_size, n.float()


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


def _token_masks(token_masks: list[bytes | None] | None, vocab_size: int, device):
    """(rows, [R, W] uint8: the packed bitmasks) of the rows that carry one (bit k of byte b allows id 8b + k, the
    same as xgrammar's little-endian int32 words), W covering the whole vocabulary; None when no row does. The
    bytes past a mask (the LM head's padding ids) are zero: never allowed."""
    rows = [i for i, m in enumerate(token_masks or ()) if m is not None]
    if not rows:
        return None
    width = -(-vocab_size // 8)
    packed = bytearray(b"".join(token_masks[i][:width].ljust(width, b"\0") for i in rows))
    return rows, torch.frombuffer(packed, dtype=torch.uint8).view(len(rows), width).to(device)


@functools.cache
def _bit_bias(device) -> torch.Tensor:
    """[256, 8] float32: row b is what to add to 8 logits whose allowed bits are the byte b (0 or -inf)."""
    return torch.tensor([[0.0 if b >> k & 1 else float("-inf") for k in range(8)] for b in range(256)],
                        device=device)


def _apply_token_masks_(x: torch.Tensor, rows: list[int], packed: torch.Tensor, row_by_row: bool | None = None):
    """Disallowed logits of x [B, V] to -inf, in place, by adding a bias looked up byte by byte (a bool
    masked_fill over random-looking masks branches per element: ~6x slower on CPU). Row by row by default on
    CPU, so each row's bias stays in cache; elsewhere the whole batch in one lookup."""
    vocab, bias = x.shape[1], _bit_bias(x.device)
    if x.device.type == "cpu" if row_by_row is None else row_by_row:
        for row, bits in zip(rows, packed):
            x[row].add_(bias.index_select(0, bits.long()).view(-1)[:vocab])
    else:
        index = torch.tensor(rows, device=x.device)
        x.index_add_(0, index, bias[packed.long()].view(len(rows), -1)[:, :vocab])


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
    # (rows, [R, ceil(V / 8)] uint8 packed bitmasks) of the structured-output rows: tokens outside their grammar
    # are -inf, greedy too.
    token_masks: tuple[list[int], torch.Tensor] | None
    # (rows, ids) of each repetition-penalised row's distinct prompt and output tokens; None when none.
    seen: tuple[torch.Tensor, torch.Tensor] | None
    # (rows, ids, counts) of each presence/frequency-penalised row's output tokens; None when none.
    output_counts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    keys: torch.Tensor  # [B] int64 in 0..2^32-1, per-row RNG key for this step
    all_greedy: bool

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        vocab_size: int,
        device,
        token_masks: list[bytes | None] | None = None,
        seen: list[SeenTokens | None] | None = None,
    ) -> "SamplingTensors":
        def tensor(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        greedy = [p.temperature < GREEDY_BELOW for p in params]
        rep = [p.repetition_penalty != 1.0 for p in params]
        pres_freq = [p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params]
        output_counts = None
        if any(rep):  # rows without the penalty contribute no tokens; a row's kept SeenTokens, else its lists
            kept = seen or [None] * len(params)
            seen = _seen_entries([_NO_TOKENS if not r else k.ids if k is not None else SeenTokens(prompt + out).ids
                                  for r, k, prompt, out in zip(rep, kept, prompt_token_ids, output_token_ids)], device)
        else:
            seen = None
        if any(pres_freq):
            rows = [out if pf else [] for pf, out in zip(pres_freq, output_token_ids)]
            output_counts = _output_counts(rows, vocab_size, device)
        top_k = [vocab_size if g or p.top_k <= 0 else min(p.top_k, vocab_size) for g, p in zip(greedy, params)]
        top_p = [1.0 if g else p.top_p for g, p in zip(greedy, params)]
        min_p = [0.0 if g else p.min_p for g, p in zip(greedy, params)]
        return cls(
            temperature=tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)]),
            greedy=tensor(greedy, torch.bool),
            additions=_additions(params, output_token_ids, device),
            token_masks=_token_masks(token_masks, vocab_size, device),
            top_k=tensor(top_k, torch.long),
            top_p=tensor(top_p),
            min_p=tensor(min_p),
            repetition_penalty=tensor([p.repetition_penalty for p in params]),
            presence_penalty=tensor([p.presence_penalty for p in params]),
            frequency_penalty=tensor([p.frequency_penalty for p in params]),
            seen=seen,
            output_counts=output_counts,
            keys=_row_keys(params, [len(out) for out in output_token_ids], device),
            all_greedy=all(greedy),
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


def _exponential_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise of each row's key at token_ids ([V] for every row, or [R, W] per row): a pure function of
    (key, token id), so a candidate set draws exactly the noise the full vocabulary would have. Uniforms use 23
    bits centred in their bin, so u is never 0 or 1."""
    token_hash = _fmix32(token_ids ^ 0x7F4A7C15)
    bits = _fmix32(keys[:, None] ^ (token_hash if token_hash.dim() == 2 else token_hash[None, :]))
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


def _adjust_(x: torch.Tensor, t: SamplingTensors):
    """Adjust float32 logits x in place for what applies to greedy rows too: logit_bias and the min_tokens
    mask first (as vLLM), then the grammar's token mask (after the bias, so no bias revives a banned token),
    then transformers' order: repetition penalty, presence/frequency penalties. Each touches only its entries.
    Returns a function that puts back the entries the bias and penalties touched (None when there are none):
    after it, x is raw wherever its token mask allows, which is all the chosen token's logprob needs (the
    normaliser and top-n of a masked row are taken before, see sample)."""
    entries = [e for e in (t.additions, t.seen, t.output_counts) if e is not None]
    touched = (torch.cat([e[0] for e in entries]), torch.cat([e[1] for e in entries])) if entries else None
    saved = x[touched] if touched else None
    if t.additions is not None:
        rows, ids, values = t.additions
        x.index_put_((rows, ids), values, accumulate=True)
    if t.token_masks is not None:
        _apply_token_masks_(x, *t.token_masks)
    if t.seen is not None:
        rows, ids = t.seen  # distinct per row, so each entry is penalised once
        values, penalty = x[rows, ids], t.repetition_penalty[rows]
        x[rows, ids] = torch.where(values < 0, values * penalty, values / penalty)
    if t.output_counts is not None:
        rows, ids, counts = t.output_counts
        x.index_put_((rows, ids), -t.frequency_penalty[rows] * counts, accumulate=True)
        x.index_put_((rows, ids), -t.presence_penalty[rows], accumulate=True)

    def undo():
        x[touched] = saved

    return undo if touched else None


def _warp(x: torch.Tensor, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p over the whole vocabulary (transformers' warpers, in
    generate's order): the reference the candidate-set draw must equal, and its fallback."""
    x = x / temperature[:, None]
    if bool((top_k < x.shape[1]).any() or (top_p < 1).any()):
        x = _apply_top_k_top_p(x, top_k, top_p)
    if bool((min_p > 0).any()):
        x = _apply_min_p(x, min_p)
    return x


def process_logits(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Final float32 logits the token is drawn from (_adjust_, then _warp); truncated tokens are -inf. The input
    is not modified. Greedy rows come out merely adjusted (temperature 1, nothing truncated)."""
    x = logits.float()
    x = x.clone() if x is logits else x
    _adjust_(x, t)
    return _warp(x, t.temperature, t.top_k, t.top_p, t.min_p)


# A row with top-k, or top-p, draws from the CANDIDATES most likely tokens (top-p: when they hold its
# nucleus, else from the whole vocabulary), not from a sort of all 151,936: batch 64 with Qwen2-Instruct's
# defaults (top-k 20, top-p 0.8) spent over a second a step sorting.
CANDIDATES = 1024


def _draw(x: torch.Tensor, temperature, top_k, top_p, min_p, keys) -> torch.Tensor:
    """One token per row of the adjusted logits x [R, V]: the exponential race (argmax of p / E, E ~ Exp(1)
    from the counter-based hash) over the warped distribution. Rows whose kept tokens lie among their top
    candidates never touch the rest of the vocabulary; the others take the whole-vocabulary path."""
    rows, vocab = x.shape
    tokens = torch.empty(rows, dtype=torch.long, device=x.device)
    whole = torch.ones(rows, dtype=torch.bool, device=x.device)
    bounded = top_k < vocab
    nucleus = ~bounded & (top_p < 1)
    width = int(torch.where(bounded, top_k, CANDIDATES).masked_fill(~(bounded | nucleus), 0).max())
    if 0 < width * 4 <= vocab:
        part = (bounded | nucleus).nonzero().squeeze(1)
        chosen, covered = _draw_candidates(_take(x, part), width, temperature[part], top_k[part], top_p[part],
                                           min_p[part], keys[part], bounded[part])
        tokens[part] = chosen
        whole[part[covered]] = False
    if bool(whole.any()):
        part = whole.nonzero().squeeze(1)
        xs, scale = _take(x, part), temperature[part]
        if bool((top_k[part] < vocab).any() or (top_p[part] < 1).any() or (min_p[part] > 0).any()):
            xs, scale = _warp(xs, scale, top_k[part], top_p[part], min_p[part]), torch.ones_like(scale)
        tokens[part] = _race(xs, scale, keys[part])
    return tokens


RACE_CHUNK = 4096


def _race(x: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary of softmax(x / temperature) / E, column chunk by column chunk (on CPU the
    hash and the exp of a whole [R, V] row set spill out of cache: 64 rows at temperature 1 took ~3 s)."""
    rows, vocab = x.shape
    chunk = RACE_CHUNK if x.device.type == "cpu" else vocab
    top = x.amax(dim=-1)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    best = torch.full((rows,), -1.0, device=x.device)
    best_ids = torch.zeros(rows, dtype=torch.long, device=x.device)
    for first in range(0, vocab, chunk):
        part = x[:, first : first + chunk]
        ids = torch.arange(first, first + part.shape[1], device=x.device)
        # exp((x - max) / T) is softmax(x / T) times a per-row constant: the same argmax.
        score = ((part - top[:, None]) / temperature[:, None]).exp_() / _exponential_noise(keys, ids)
        value, where = score.max(dim=-1)
        better = value > best  # the first maximum wins, as argmax
        best, best_ids = torch.where(better, value, best), torch.where(better, where + first, best_ids)
    return best_ids


def _draw_candidates(x, width, temperature, top_k, top_p, min_p, keys, bounded):
    """(tokens, covered) for rows with top-k (bounded) or top-p: _warp and the race over each row's `width`
    most likely tokens. A bounded row's distribution is its top-k's own; a top-p row's is the whole row's, and
    it is `covered` only when its candidates hold at least top_p of it (else its nucleus may reach past them).
    Ties at the k-th largest logit past the candidates are the one difference from _warp."""
    values, ids = _topk(x, width)  # descending
    values = values / temperature[:, None]
    values = values.masked_fill(values < values.gather(1, (top_k.clamp(max=width) - 1)[:, None]), float("-inf"))
    # The normaliser top-p sees: the top-k's own for bounded rows, the whole (scaled) row's otherwise.
    norm = values.logsumexp(dim=-1)
    free = (~bounded).nonzero().squeeze(1)
    if len(free):
        norm[free] = _logsumexp(x[free] / temperature[free, None])
    probs = (values - norm[:, None]).exp()
    outside = (1 - probs.sum(dim=-1)).clamp(min=0)  # probability past the candidates (0 when bounded)
    covered = bounded | (probs.sum(dim=-1) >= top_p)
    # top-p as transformers computes it, on the ascending cumulative sum (the mass outside comes first).
    ascending = probs.flip(-1).cumsum(dim=-1).flip(-1) + outside[:, None]
    remove = (ascending <= 1 - top_p[:, None]) & (top_p < 1)[:, None]
    remove[:, 0] = False  # the most likely token stays
    values = values.masked_fill(remove, float("-inf"))
    kept = values.softmax(dim=-1)
    values = values.masked_fill(kept < min_p[:, None] * kept[:, :1], float("-inf"))  # min-p: vs the top one
    race = values.softmax(dim=-1) / _exponential_noise(keys, ids)
    return ids.gather(1, race.argmax(dim=-1, keepdim=True)).squeeze(1), covered


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    token_masks: list[bytes | None] | None = None,
    seen: list[SeenTokens | None] | None = None,
    overwrite: bool = False,
) -> TokenLogprobs:
    """Pick one token per row of logits [B, V] (float32, or bf16/fp16, computed in float32).

    Greedy rows (temperature 0) take the argmax of the adjusted logits. Other rows use the exponential race:
    argmax(p / E) with E ~ Exp(1) is an exact draw from p, and E comes from the counter-based hash above, so
    seeded rows are batch-independent.

    Returned logprobs (chosen token and top-N) are log_softmax of the RAW logits, before logit_bias, the
    min_tokens mask, the token mask, penalties, temperature and truncation (vLLM's default "raw_logprobs"):
    they describe the model, not the sampling knobs. `token_masks`: per row, a packed bitmask of the tokens
    it may take (structured outputs), or None. `seen`: per row, its kept SeenTokens (prompt and outputs), or None
    to take them from the lists. `overwrite`: the caller is done with logits, so a token mask may be applied to
    them in place (else to a copy: a fresh [B, V] on CPU costs its page faults, ~4x the copy).
    """
    t = SamplingTensors.build(params, prompt_token_ids, output_token_ids, logits.shape[1], logits.device,
                              token_masks, seen)
    x = logits.float()  # adjusted in place (a bf16 input is copied here): the caller's logits are restored below
    x = x if x.is_contiguous() else x.contiguous()  # an expanded input's rows share memory
    num_top = [p.logprobs for p in params]
    raw = None
    if t.token_masks is not None:  # a mask is not undone: x is a copy, and the logprobs' raw rows are read first
        x = x.clone() if x is logits and not overwrite else x
        raw = RawLogprobs.of(x, num_top)
    undo = _adjust_(x, t)
    token_ids, row_max = _argmax(x)  # first maximum, as argmax
    if not t.all_greedy:
        rows = (~t.greedy).nonzero().squeeze(1)
        token_ids[rows] = _draw(_take(x, rows), *(v[rows] for v in (t.temperature, t.top_k, t.top_p, t.min_p,
                                                                     t.keys)))
    if undo is not None:
        undo()
    if raw is None:
        raw = RawLogprobs.of(x, num_top, _logsumexp(x, row_max if undo is None else None))
    return raw.choose(x, token_ids)


def _take(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows], without copying x when rows are all of its rows."""
    return x if len(rows) == x.shape[0] else x[rows]


def _topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x.topk(k) of each row of x [R, V], descending, found among the columns of the k chunks with the largest
    maxima (they hold every token of the top k): on CPU torch's topk over 151,936 columns costs 10x an amax."""
    rows, vocab = x.shape
    chunk = max(1, min(256, vocab // (16 * k)))
    if x.device.type != "cpu" or chunk < 4:
        return x.topk(k, dim=-1)
    full = vocab // chunk * chunk
    maxima = x[:, :full].view(rows, -1, chunk).amax(dim=-1)
    if full < vocab:
        maxima = torch.cat([maxima, x[:, full:].amax(dim=-1, keepdim=True)], dim=1)
    best = maxima.topk(k, dim=-1).indices
    cols = (best[:, :, None] * chunk + torch.arange(chunk, device=x.device)).flatten(1)
    inside = cols < vocab  # the short last chunk's columns past the vocabulary are never chosen
    values = x.gather(1, cols.clamp(max=vocab - 1)).masked_fill(~inside, float("-inf"))
    top, where = values.topk(k, dim=-1)
    return top, cols.gather(1, where)
