"""The step plan a rank receives, and the tensors one forward needs, built from it once per step.

A step flattens every scheduled sequence's tokens into one batch: a prefill chunk contributes several
tokens (possibly starting mid-prompt), a decode contributes one. All ranks build the same batch from the
same plan, so nothing but hidden states and collectives crosses between them.

What does not change for a sequence between its steps (its block table so far, sampling parameters, prompt and
outputs for the penalties) stays on the ranks (`KeptSequences`): after its first plan, a sequence's plans carry
only what is new, so a decode step's plan is a few dozen bytes per sequence whatever the context length.
"""

from dataclasses import dataclass, field
from itertools import chain

import torch
from torch.nn.functional import pad as pad_right
from torch.nn.utils.rnn import pad_sequence

from shards.sampling import SamplingParams, SeenTokens


@dataclass
class SeqPlan:
    """One sequence's part of a step. Plain values only: it is pickled to every rank each step."""

    seq_id: int
    token_ids: list[int]
    start: int  # position of token_ids[0]
    block_table: list[int]  # its blocks; on a continuing plan, those appended since its previous plan
    rope_variant: int = 0
    sampling: SamplingParams | None = None  # set when this step samples (a continuing plan: see keeps_sampling)
    prompt_token_ids: list[int] = field(default_factory=list)  # for the repetition penalty only; sent with `sampling`
    # For penalties and the seeded RNG counter, when it samples; on a continuing plan, those since the last sent.
    output_token_ids: list[int] = field(default_factory=list)
    # Set on the prompt chunks of a request that asked prompt logprobs: top-n, and the prompt token after the
    # chunk (None on the last chunk), which the chunk's last row predicts.
    prompt_logprobs: int | None = None
    next_token_id: int | None = None
    # A structured-output sequence's allowed next tokens, set with `sampling`: a packed bitmask (little-endian
    # int32 words, bit i of word w allows id 32w + i), computed by the router's grammar matcher. None: any.
    token_mask: bytes | None = None
    # Set on the prompt chunks of a pooling request, which never samples: what the last stage returns for the
    # chunk's rows instead. "head": the pooling head's outputs, "hidden": the final hidden states, "hidden_sum":
    # their sum over the chunk (mean pooling). With pool_position, only the row at that position (if in the chunk).
    pooling: str | None = None
    pool_position: int | None = None
    # A continuing plan: the ranks have this sequence's earlier plans (since it was admitted) and resolve this one
    # against them (KeptSequences). keeps_sampling: it samples with the parameters sent before (sampling is None).
    continues: bool = False
    keeps_sampling: bool = False

    @property
    def samples(self) -> bool:
        return self.sampling is not None or self.keeps_sampling

    @property
    def prompt_targets(self) -> list[int]:
        """The prompt tokens this chunk's rows predict, in row order (row i predicts the token after it)."""
        return self.token_ids[1:] + ([] if self.next_token_id is None else [self.next_token_id])


@dataclass
class _Kept:
    block_table: list[int]
    table: torch.Tensor  # the same blocks as int32, grown with them: a step's tables are stacked from these
    sampling: SamplingParams | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # With a repetition penalty, on the rank that samples: the distinct tokens so far, made from the whole context
    # when first asked (KeptSequences.seen), then grown by each step's outputs.
    seen: SeenTokens | None = None


class KeptSequences:
    """A rank's copy of what its sequences' plans sent so far, keyed by seq_id: continuing plans are resolved
    against it into whole plans. Every rank sees every step in submission order and a sequence is in one step at
    a time, so the copies stay in step with the router's; it forgets a sequence when told (finished, preempted)
    and a plan that does not continue starts its sequence afresh."""

    def __init__(self):
        self._seqs: dict[int, _Kept] = {}

    def __len__(self) -> int:
        return len(self._seqs)

    def seen(self, seq_id: int) -> SeenTokens | None:
        """The distinct tokens a repetition-penalised sequence has seen so far (None: no penalty, or unknown)."""
        kept = self._seqs.get(seq_id)
        if kept is None or kept.sampling is None or kept.sampling.repetition_penalty == 1.0:
            return None
        if kept.seen is None:
            kept.seen = SeenTokens(kept.prompt_token_ids + kept.output_token_ids)
        return kept.seen

    def resolve(self, plans: list[SeqPlan], forget=()) -> list[SeqPlan]:
        """The plans made whole (continuing ones completed in place), after forgetting `forget`'s ids."""
        for seq_id in forget:
            self._seqs.pop(seq_id, None)
        for plan in plans:
            if not plan.continues:
                self._seqs[plan.seq_id] = _Kept(list(plan.block_table), int32(plan.block_table), plan.sampling,
                                                plan.prompt_token_ids, list(plan.output_token_ids))
                continue
            kept = self._seqs.get(plan.seq_id)
            if kept is None:
                raise ValueError(f"sequence {plan.seq_id}: a continuing plan for a sequence this rank does not hold")
            if plan.block_table:
                kept.block_table += plan.block_table
                kept.table = torch.cat([kept.table, int32(plan.block_table)])
            kept.output_token_ids += plan.output_token_ids
            if plan.sampling is not None:
                kept.sampling, kept.prompt_token_ids, kept.seen = plan.sampling, plan.prompt_token_ids, None
            elif kept.seen is not None:
                kept.seen.add(plan.output_token_ids)
            if plan.keeps_sampling:
                if kept.sampling is None:
                    raise ValueError(f"sequence {plan.seq_id}: keeps sampling parameters it was never sent")
                plan.sampling = kept.sampling
            plan.block_table, plan.prompt_token_ids = kept.block_table, kept.prompt_token_ids
            plan.output_token_ids = kept.output_token_ids
        return plans

    def tables(self, plans: list[SeqPlan]) -> list[torch.Tensor]:
        """The int32 block tables of resolved plans (StepBatch.build's `tables`)."""
        return [self._seqs[plan.seq_id].table for plan in plans]


def int32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


@dataclass
class Prefill:
    """A sequence contributing several tokens: token rows [first, first + count) at positions start..."""

    first: int
    count: int
    start: int
    block_table: torch.Tensor


@dataclass
class Padding:
    """A decode-only step padded to a fixed shape (a CUDA graph's): `size` sequences of one token each, block
    tables up to `table_width` wide. The padding rows are one-token sequences at position 0 whose block table is
    `pad_block` (a spare block no sequence owns): they write and read only there and are never sampled, so real
    rows compute exactly what they would unpadded. A step's tables are only as wide as its longest (copied into
    the left of the graph's static [size, table_width] tables, see StepBatch.copy_inputs_): building and copying
    the whole width every step cost ~0.7 ms a sequence (7B shape, 32K context: 2,048 blocks a row)."""

    size: int
    table_width: int
    pad_block: int

    def fits(self, seqs: list[SeqPlan], block_size: int) -> bool:
        return len(seqs) <= self.size and all(
            len(s.token_ids) == 1 and s.start < self.table_width * block_size for s in seqs
        )


class HostStaging:
    """Every step input in one host buffer, copied to the device once per step.

    On CUDA the buffer is pinned and reused, the copy non-blocking (a pageable tensor per field would be ~11
    synchronous copies a step); before it is overwritten the previous step's copy must have left it (an event).
    On CPU the host tensors are the inputs. int64 fields first, then int32 ones, in one byte buffer."""

    def __init__(self, device):
        self.device = torch.device(device)
        self._host = self._dev = self._copied = None

    def stage(self, longs: torch.Tensor, ints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Host int64 and int32 vectors -> the same on the device."""
        if self.device.type != "cuda":
            return longs, ints
        nbytes = 8 * len(longs) + 4 * len(ints)
        if self._host is None or self._host.numel() < nbytes:
            size = max(nbytes, 2 * (0 if self._host is None else self._host.numel()), 1 << 16)
            self._host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self._dev = torch.empty(size, dtype=torch.uint8, device=self.device)
        elif self._copied is not None:
            self._copied.synchronize()
        split = 8 * len(longs)
        self._host[:split].view(torch.long).copy_(longs)
        self._host[split:nbytes].view(torch.int32).copy_(ints)
        self._dev[:nbytes].copy_(self._host[:nbytes], non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return self._dev[:split].view(torch.long), self._dev[split:nbytes].view(torch.int32)


# The int64 fields of a StepBatch, then its int32 ones (the varlen description a fused kernel reads), in the
# order they are staged.
LONG_FIELDS = ("input_ids", "positions", "rope_variants", "slot_mapping", "decode_rows", "decode_context_lens",
               "decode_block_tables", "sample_rows")
INT_FIELDS = ("query_start", "seq_lens", "block_tables")


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    rope_variants: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) each token's K/V goes to
    decode_rows: torch.Tensor  # [D] token rows of single-token sequences
    decode_context_lens: torch.Tensor  # [D]
    decode_block_tables: torch.Tensor  # [D, max blocks], padded with block 0 (masked by context length)
    sample_rows: torch.Tensor  # [S] token rows whose logits are sampled
    # Every sequence in plan order, prefills and decodes alike (what a fused varlen kernel reads):
    query_start: torch.Tensor  # [N + 1] int32: sequence i's token rows are [query_start[i], query_start[i + 1])
    seq_lens: torch.Tensor  # [N] int32: positions after this step (its last token's position + 1)
    block_tables: torch.Tensor  # [N, max blocks] int32, padded with block 0 (never read past seq_lens)
    prefills: list[Prefill]
    sampling_seqs: list[SeqPlan]
    prompt_scored: list[tuple[SeqPlan, int]]  # sequences asking prompt logprobs, with their first token row
    pooled: list[tuple[SeqPlan, int]]  # pooling sequences, with their first token row

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def copy_inputs_(self, other: "StepBatch") -> None:
        """Copy another batch of as many rows' device inputs into this one's tensors (a graph's static inputs);
        its block tables, possibly narrower, into the left of this one's. Entries past a row's length keep what
        an earlier step left there: valid blocks, never attended (past seq_lens). sample_rows is not an input of
        the forward: it is left alone."""
        for name in LONG_FIELDS + INT_FIELDS:
            if name != "sample_rows":
                src, dst = getattr(other, name), getattr(self, name)
                (dst[:, : src.shape[1]] if src.dim() == 2 else dst).copy_(src, non_blocking=True)

    @classmethod
    def build(cls, seqs: list[SeqPlan], block_size: int, device, staging: HostStaging | None = None,
              padding: Padding | None = None, table_width: int = 0,
              tables: list[torch.Tensor] | None = None) -> "StepBatch":
        """The batch of these plans, its inputs staged through `staging` (default: a fresh one), padded to
        `padding`'s rows if given (see Padding.fits); block tables at least `table_width` wide. `tables`: each
        plan's block table as int32 (KeptSequences.tables: kept between steps, so a step stacks them rather
        than converting every block id from Python again: 64 x 512 blocks, 1.8 ms); made here if not given."""
        if tables is None:
            tables = [int32(seq.block_table) for seq in seqs]
        ids, positions, variants, slots = [], [], [], []
        decode_rows, decode_lens, decode_seqs, sample_rows, scored, pooled = [], [], [], [], [], []
        query_start, seq_lens, used, prefill_seqs = [], [], [], []
        for i, seq in enumerate(seqs):
            first, count = len(ids), len(seq.token_ids)
            end = seq.start + count
            if end > len(seq.block_table) * block_size:
                raise ValueError(
                    f"sequence {seq.seq_id}: {end} positions need {-(-end // block_size)} blocks of "
                    f"{block_size}, block table has {len(seq.block_table)}"
                )
            query_start.append(first)
            seq_lens.append(end)
            need = -(-end // block_size)
            used.append(tables[i] if len(tables[i]) == need else tables[i][:need])
            ids += seq.token_ids
            positions += range(seq.start, end)
            variants += [seq.rope_variant] * count
            slots += [seq.block_table[p // block_size] * block_size + p % block_size for p in range(seq.start, end)]
            if count == 1:
                decode_rows.append(first)
                decode_lens.append(end)
                decode_seqs.append(i)
            else:
                prefill_seqs.append(i)
            if seq.sampling is not None:
                sample_rows.append(first + count - 1)
            if seq.prompt_logprobs is not None:
                scored.append((seq, first))
            if seq.pooling is not None:
                pooled.append((seq, first))
        pad = 0
        if padding is not None:
            pad = padding.pad_block
            for row in range(len(seqs), padding.size):
                query_start.append(row)
                seq_lens.append(1)
                used.append(int32([pad]))
                ids.append(0)
                positions.append(0)
                variants.append(0)
                slots.append(pad * block_size)
                decode_rows.append(row)
                decode_lens.append(1)
                decode_seqs.append(row)
        block_tables = _stack(used, table_width, pad)  # [N, widest]: entries past a row's blocks are `pad`
        decode_width = max([table_width] + [len(used[i]) for i in decode_seqs])
        every_row_decodes = len(decode_seqs) == len(used)  # then in order: decode_seqs is 0, 1, ...
        decode_tables = (block_tables if every_row_decodes else block_tables[decode_seqs, :decode_width]).long()
        small = [ids, positions, variants, slots, decode_rows, decode_lens]
        long_host = torch.cat([torch.tensor(list(chain(*small)), dtype=torch.long), decode_tables.flatten(),
                               torch.tensor(sample_rows, dtype=torch.long)])
        int_host = torch.cat([int32(query_start + [len(ids)] + seq_lens), block_tables.flatten()])
        long_buf, int_buf = (staging or HostStaging(device)).stage(long_host, int_host)
        long_sizes = [len(p) for p in small] + [decode_tables.numel(), len(sample_rows)]
        int_sizes = [len(query_start) + 1, len(seq_lens), block_tables.numel()]
        fields = {}
        for names, sizes, buf in ((LONG_FIELDS, long_sizes, long_buf), (INT_FIELDS, int_sizes, int_buf)):
            for name, part in zip(names, buf.split(sizes)):
                fields[name] = part
        fields["decode_block_tables"] = fields["decode_block_tables"].view(decode_tables.shape)
        fields["block_tables"] = fields["block_tables"].view(block_tables.shape)
        prefills = [Prefill(query_start[i], len(seqs[i].token_ids), seqs[i].start,
                            fields["block_tables"][i, : len(used[i])]) for i in prefill_seqs]
        return cls(**fields, prefills=prefills, sampling_seqs=[s for s in seqs if s.sampling is not None],
                   prompt_scored=scored, pooled=pooled)


def _stack(rows: list[torch.Tensor], width: int, pad: int) -> torch.Tensor:
    """int32 rows stacked into [len(rows), max(width, longest)], each padded on the right with `pad`."""
    if not rows:
        return torch.full((0, width), pad, dtype=torch.int32)
    same = all(len(r) == len(rows[0]) for r in rows)  # one copy, not one a row (pad_sequence's)
    stacked = torch.stack(rows) if same else pad_sequence(rows, batch_first=True, padding_value=pad)
    return pad_right(stacked, (0, width - stacked.shape[1]), value=pad) if stacked.shape[1] < width else stacked
