"""Grouped-query attention over a paged KV cache.

The cache of one layer is two tensors [kv_heads, num_blocks, block_size, head_dim]; a sequence's keys live
in the blocks its block table lists, in order. KV heads outermost: gathering a batch's blocks then gives
[kv_heads, seqs, context, head_dim] as is, which attention reads without another copy (decode attention on
2 cores, 64 sequences x 576 tokens: 9.7 -> 8.5 ms a layer against blocks laid out token-major).

A backend is a function (q, cache, batch, scale, window) -> output, loaded by name from `ATTENTION_BACKENDS`:
`torch` (below: `scaled_dot_product_attention`, CPU and GPU) and `triton` (`shards/triton_attention.py`: one
fused kernel reading the blocks in place; CUDA, or CPU under Triton's interpreter), imported only when chosen.
A fused FlashAttention or FlashInfer kernel fits the same seam: `StepBatch` carries the varlen description
they take (query_start, seq_lens, block_tables); FlashAttention wants blocks token-major, which would be its
`allocate_kv_cache`/`write_kv`.
"""

import torch
import torch.nn.functional as F

from shards.batch import StepBatch


def allocate_kv_cache(num_layers, num_blocks, block_size, kv_heads, head_dim, dtype, device) -> torch.Tensor:
    """One tensor [layers, 2 (k, v), kv_heads, blocks, block_size, head_dim]; layer i uses cache[i]."""
    return torch.zeros(num_layers, 2, kv_heads, num_blocks, block_size, head_dim, dtype=dtype, device=device)


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store this step's keys and values [T, kv_heads, head_dim] at their cache slots."""
    kv_heads, head_dim = k.shape[1:]
    cache[0].view(kv_heads, -1, head_dim).index_copy_(1, slots, k.transpose(0, 1))
    cache[1].view(kv_heads, -1, head_dim).index_copy_(1, slots, v.transpose(0, 1))


def gather_blocks(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """`cache[:, tables]` ([kv_heads, *tables.shape, block_size, head_dim]) as one index_select of whole
    blocks: advanced indexing copies element by element, 3.5x slower on CPU (64 sequences x 9 blocks, one
    layer's keys: 940 -> 272 us)."""
    kv_heads, num_blocks = cache.shape[:2]
    offsets = torch.arange(0, kv_heads * num_blocks, num_blocks, device=tables.device)[:, None]
    blocks = cache.view(kv_heads * num_blocks, -1).index_select(0, (tables.reshape(1, -1) + offsets).reshape(-1))
    return blocks.view(kv_heads, *tables.shape, *cache.shape[2:])


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (and sliding-window) visibility of key positions for query positions, broadcast."""
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    return allowed


# A masked prefill chunk is attended in blocks of this many queries, so the mask is at most
# QUERY_BLOCK x context, never chunk x context (a 100K-token context stays within memory).
QUERY_BLOCK = 512


def torch_paged_attention(q, cache, batch: StepBatch, scale: float, window: int | None) -> torch.Tensor:
    """q [T, heads, head_dim] (already rotated, its K/V already written) -> [T, heads, head_dim]."""
    out = torch.empty_like(q)
    k_cache, v_cache = cache[0], cache[1]
    for p in batch.prefills:
        ctx = p.start + p.count
        k = gather_blocks(k_cache, p.block_table).flatten(1, 2)[None, :, :ctx]  # [1, kv_heads, ctx, head_dim]
        v = gather_blocks(v_cache, p.block_table).flatten(1, 2)[None, :, :ctx]
        qs = q[p.first : p.first + p.count].transpose(0, 1)[None]
        if p.start == 0 and window is None:  # fused causal kernel: no mask materialised at all
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale, enable_gqa=True)
            out[p.first : p.first + p.count] = o[0].transpose(0, 1)
            continue
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        for first in range(0, p.count, QUERY_BLOCK):
            n = min(QUERY_BLOCK, p.count - first)
            q_pos = torch.arange(p.start + first, p.start + first + n, device=q.device)[:, None]
            visible = p.start + first + n  # keys past the block's last query are masked anyway: skip them
            mask = _visible(q_pos, k_pos[:, :visible], window)
            o = F.scaled_dot_product_attention(qs[:, :, first : first + n], k[:, :, :visible], v[:, :, :visible],
                                               attn_mask=mask, scale=scale, enable_gqa=True)
            out[p.first + first : p.first + first + n] = o[0].transpose(0, 1)
    if batch.decode_rows.numel():
        rows, lens, tables = batch.decode_rows, batch.decode_context_lens, batch.decode_block_tables
        kv_heads, (seqs, heads, head_dim) = k_cache.shape[0], q[rows].shape
        k = gather_blocks(k_cache, tables).flatten(2, 3)  # [kv_heads, D, L, head_dim]
        v = gather_blocks(v_cache, tables).flatten(2, 3)
        k_pos = torch.arange(k.shape[2], device=q.device)[None, :]
        mask = _visible((lens - 1)[:, None], k_pos, window)  # the query sits at position len - 1
        # Query head h attends KV head h // (heads // kv_heads): group the queries under their KV head.
        qg = q[rows].view(seqs, kv_heads, heads // kv_heads, head_dim).transpose(0, 1)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[None, :, None], scale=scale)
        out[rows] = o.transpose(0, 1).reshape(seqs, heads, head_dim)
    return out


def _triton(device: torch.device):
    try:
        from shards.triton_attention import INTERPRETED, triton_paged_attention
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        raise RuntimeError("the triton attention backend needs the triton package (it comes with CUDA builds of "
                           "torch; pip install triton), or use --attention-backend torch") from None
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError("the triton attention backend runs on CUDA (on CPU only under Triton's interpreter, "
                         "TRITON_INTERPRET=1); use --attention-backend torch")
    return triton_paged_attention


# name -> loader(device) -> backend; a loader imports what its backend needs, so CPU serving never imports triton.
ATTENTION_BACKENDS = {"torch": lambda device: torch_paged_attention, "triton": _triton}


def load_backend(name: str | None, device):
    """The backend by name (None: triton on CUDA, torch elsewhere) for this device."""
    device = torch.device(device)
    name = name or ("triton" if device.type == "cuda" else "torch")
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name](device)
