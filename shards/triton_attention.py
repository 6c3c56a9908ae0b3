"""Paged attention in Triton: one kernel for a step's prefill chunks and decode tokens together.

A program attends one tile of BLOCK_Q consecutive query tokens of one sequence for every query head that
shares one KV head: the tile's rows are (token, head of the group) pairs, so GQA reads each KV head once for
its group and never expands it. It walks the keys the tile may see (up to its last query; from its first
query's window start on a sliding-window layer) BLOCK_N positions at a time, reading each straight from the
cache: the key at position p of a sequence is cache[k or v, kv_head, block_table[p // block_size],
p % block_size]. Nothing is gathered, padded to the longest sequence or masked through a tensor: causality
and the window are compared position by position, and an online softmax (FlashAttention's) folds the keys
in, in float32. Queries and keys come rotated (either RoPE variant) and this step's K/V already written.

The grid is (tokens // BLOCK_Q + sequences, kv_heads, splits): sequence i owns the tiles from query_start[i] //
BLOCK_Q + i on, which is always enough for its tokens (vLLM's counting), so sizing the grid needs no host
work, and a program finds its sequence by binary search. Surplus tiles return at once.

Decode steps of few sequences split each tile's keys over several programs (FlashDecoding): one program per
(tile, KV head) walks a whole context alone, so a batch of one 8K-token sequence at 4 KV heads kept 4 of an H200's
132 SMs busy (28 layers: ~6 ms a step, the weights' read ~3.4). Each split folds its share of the keys into a
partial (running max, sum, unnormalised output), and a second kernel merges a row's partials. The split count
depends on the batch's shape only (sequences x KV heads against the SMs), never on its lengths, so a CUDA graph
captured for a batch size stays right for any context: each split takes an equal share of whatever keys its
tile sees, and splits left with none write an empty partial.
"""

import functools

import torch
import triton
import triton.language as tl
from triton import knobs

from shards.batch import StepBatch

INTERPRETED = knobs.runtime.interpret  # TRITON_INTERPRET=1 when this module was imported: runs on CPU tensors


@triton.jit
def _operand(x, UPCAST: tl.constexpr):
    """A tl.dot operand: as loaded, or in float32 under the interpreter, whose bf16 tl.dot multiplies raw bits
    (triton#11584). A bf16 tensor-core dot multiplies exactly and sums in float32, so the two agree."""
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _paged_attention(
    q_ptr, o_ptr, k_ptr, v_ptr, block_tables_ptr, query_start_ptr, seq_lens_ptr, part_ptr, stats_ptr,
    num_seqs, scale_log2, window, num_splits, num_rows,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kh, stride_kb, stride_kt, stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tile, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lo: tl.int32 = 0  # the sequence: the last i with query_start[i] // BLOCK_Q + i <= tile
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    first = tl.load(query_start_ptr + seq)
    count = tl.load(query_start_ptr + seq + 1) - first
    q_first = (tile - first // BLOCK_Q - seq) * BLOCK_Q  # the tile's first query, counted within the sequence
    if q_first >= count:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    start = seq_len - count  # position of the sequence's first query

    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    token, head = q_first + rows // GROUP_PAD, kv_head * GROUP + rows % GROUP_PAD
    row_ok = (token < count) & (rows % GROUP_PAD < GROUP)
    pos = start + tl.minimum(token, count - 1)  # rows past the last query repeat it (and are not stored)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_offsets = (first + token)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = _operand(tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0), UPCAST)

    m = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)  # running max (log2 units), sum, output
    l = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    kv_end = tl.minimum(seq_len, start + q_first + BLOCK_Q)  # causal: nothing past the tile's last query
    kv_begin = tl.maximum(start + q_first - window + 1, 0)  # nothing before its first query's window
    if num_splits > 1:  # this split's equal share of those keys, in whole BLOCK_N tiles (maybe none)
        share = tl.cdiv(tl.cdiv(kv_end - kv_begin, num_splits), BLOCK_N) * BLOCK_N
        kv_begin = kv_begin + split * share
        kv_end = tl.minimum(kv_end, kv_begin + share)
    table = block_tables_ptr + seq * stride_bt
    head_base = kv_head.to(tl.int64) * stride_kh
    for key0 in range(kv_begin, kv_end, BLOCK_N):
        k_pos = key0 + tl.arange(0, BLOCK_N)
        k_ok = k_pos < kv_end
        block = tl.load(table + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        slot = head_base + block * stride_kb + (k_pos % BLOCK_SIZE) * stride_kt
        k = _operand(tl.load(k_ptr + slot[None, :] + d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0), UPCAST)
        s = tl.dot(q, k, input_precision=PRECISION) * scale_log2
        seen = (k_pos[None, :] <= pos[:, None]) & (pos[:, None] - k_pos[None, :] < window) & k_ok[None, :]
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet stays at zero
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        v = _operand(tl.load(v_ptr + slot[:, None] + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0), UPCAST)
        p = _operand(p.to(v_ptr.dtype.element_ty), UPCAST)  # rounded to the cache's dtype, as the GPU's dot takes it
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        l = l * alpha + tl.sum(p, 1)
        m = m_new
    if num_splits > 1:  # the partial, float32: [splits, rows (token x head), HEAD_DIM_PAD]; max and sum beside
        row = (first + token) * (GROUP * tl.num_programs(1)) + head
        at = split * num_rows + row
        tl.store(part_ptr + at[:, None] * HEAD_DIM_PAD + d[None, :], acc, mask=row_ok[:, None])
        tl.store(stats_ptr + 2 * at, m, mask=row_ok)
        tl.store(stats_ptr + 2 * at + 1, l, mask=row_ok)
        return
    out = acc / l[:, None]
    o_offsets = (first + token)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr + o_offsets, out.to(o_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _merge_splits(part_ptr, stats_ptr, o_ptr, num_splits, num_rows, heads, stride_ot, stride_oh,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """One output row (token, head) from its splits' partials: each rescaled to the largest running max."""
    row = tl.program_id(0)
    s = tl.arange(0, SPLITS_PAD)
    at = s * num_rows + row
    m = tl.load(stats_ptr + 2 * at, mask=s < num_splits, other=float("-inf"))
    l = tl.load(stats_ptr + 2 * at + 1, mask=s < num_splits, other=0.0)
    peak = tl.max(m, 0)
    weight = tl.where(m == float("-inf"), 0.0, tl.exp2(m - peak))  # an empty split adds nothing
    d = tl.arange(0, HEAD_DIM_PAD)
    acc = tl.load(part_ptr + at[:, None] * HEAD_DIM_PAD + d[None, :], mask=(s < num_splits)[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(l * weight, 0)
    token, head = row // heads, row % heads
    tl.store(o_ptr + token * stride_ot + head * stride_oh + d, out.to(o_ptr.dtype.element_ty), mask=d < HEAD_DIM)


# Decode splits: enough programs for about this many a streaming multiprocessor, at most MAX_SPLITS a tile.
PROGRAMS_PER_SM, MAX_SPLITS = 4, 64


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(device: torch.device, programs: int) -> int:
    """How many programs share each tile's keys on a decode step whose tiles x KV heads are `programs`: none
    once there is a program per SM (on an H200, 64 sequences x 4 KV heads: the kernel took 0.11 ms a layer
    unsplit at 1K contexts, 0.19 split in two with the merge)."""
    sms = _multiprocessors(device) if device.type == "cuda" else 0  # the interpreter: tests choose their splits
    return 1 if programs >= sms else min(MAX_SPLITS, PROGRAMS_PER_SM * sms // programs)


def triton_paged_attention(q, cache, batch: StepBatch, scale: float, window: int | None,
                           block_q: int | None = None, block_n: int = 64, splits: int | None = None) -> torch.Tensor:
    """q [T, heads, head_dim] (already rotated, its K/V already written) -> [T, heads, head_dim].

    Tiles of 64 query rows (16 on decode-only steps), BLOCK_Q tokens x the group padded to a power of two. On
    decode-only steps each tile's keys are shared by `splits` programs (default: decode_splits)."""
    tokens, heads, head_dim = q.shape
    kv_heads, _, block_size, _ = cache[0].shape
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    num_seqs = len(batch.seq_lens)
    decode_only = tokens == num_seqs
    block_q = block_q or max(1, (16 if decode_only else 64) // group_pad)
    if splits is None:
        splits = decode_splits(q.device, num_seqs * kv_heads) if decode_only else 1
    q = q.contiguous()
    out = torch.empty_like(q)
    part = stats = out  # unused with one split
    if splits > 1:
        part = torch.empty(splits, tokens * heads, head_dim_pad, dtype=torch.float32, device=q.device)
        stats = torch.empty(splits, tokens * heads, 2, dtype=torch.float32, device=q.device)
    grid = (tokens // block_q + num_seqs, kv_heads, splits)
    _paged_attention[grid](
        q, out, cache[0], cache[1], batch.block_tables, batch.query_start, batch.seq_lens, part, stats,
        num_seqs, scale * 1.4426950408889634, window or 2**31 - 1, splits, tokens * heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *cache[0].stride()[:3], batch.block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", UPCAST=INTERPRETED,
    )
    if splits > 1:
        _merge_splits[(tokens * heads,)](
            part, stats, out, splits, tokens * heads, heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, SPLITS_PAD=triton.next_power_of_2(splits),
        )
    return out
