"""Megatron-style tensor-parallel layers, each parameter carrying the loader that fills its slice.

A loader receives a `source`: a safetensors slice (`safe_open(...).get_slice(name)`) or a tensor. It checks
the full checkpoint shape and reads only this rank's rows/columns, so no rank materialises a whole tensor.
"""

import torch
import torch.nn.functional as F
from torch import nn

from shards.parallel import ParallelGroups, all_reduce, gather_last_dim


def source_shape(source) -> tuple[int, ...]:
    return tuple(source.shape) if isinstance(source, torch.Tensor) else tuple(source.get_shape())


def read_slice(source, expected: tuple[int, ...], dim: int = 0, start: int = 0, size: int | None = None):
    """Rows (dim 0) or columns (dim 1) [start, start + size) of `source`, after checking its full shape."""
    got = source_shape(source)
    if got != tuple(expected):
        raise ValueError(f"checkpoint shape {list(got)} does not match the expected {list(expected)}")
    size = got[dim] - start if size is None else size
    index = (slice(start, start + size),) if dim == 0 else (slice(None), slice(start, start + size))
    part = source[index]
    return part if isinstance(part, torch.Tensor) else torch.as_tensor(part)


def copy_into(dest: torch.Tensor, part: torch.Tensor) -> int:
    """Copy a checkpoint slice into (part of) a parameter; return the bytes read from the checkpoint."""
    dest.copy_(part)
    return part.numel() * part.element_size()


def _parameter(shape, loader, dtype) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    param.weight_loader = loader
    return param


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = _parameter((size,), self._load, dtype)

    def _load(self, param, source, shard_id=None):
        return copy_into(param.data, read_slice(source, param.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class ColumnParallelLinear(nn.Module):
    """Output features split over TP ranks; the output stays split (no collective).

    `shards` lists the checkpoint tensors fused into this one, as (shard id, full rows, rows on this
    rank, first row read on this rank), laid out one after another in the local weight.
    """

    def __init__(self, in_features: int, shards: list, bias: bool, dtype=torch.float32):
        super().__init__()
        self.in_features = in_features
        self.shards, offset = {}, 0
        for shard_id, full, local, first in shards:
            self.shards[shard_id] = (full, local, first, offset)
            offset += local
        self.weight = _parameter((offset, in_features), self._load, dtype)
        self.bias = _parameter((offset,), self._load, dtype) if bias else None

    def _load(self, param, source, shard_id=None):
        full, local, first, offset = self.shards[shard_id]
        expected = (full, self.in_features) if param.dim() == 2 else (full,)
        return copy_into(param.data[offset : offset + local], read_slice(source, expected, 0, first, local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def split(total: int, groups: ParallelGroups) -> tuple[int, int]:
    """(first, size) of this rank's part of `total`, the first `total % tp_size` ranks taking one more.

    Uneven parts let Qwen2-0.5B (intermediate 4,864) run at TP 7 and 14, where an even split cannot.
    """
    base, extra = divmod(total, groups.tp_size)
    rank = groups.tp_rank
    return rank * base + min(rank, extra), base + (rank < extra)


def merged_column_parallel(in_features: int, out_features: int, num: int, groups: ParallelGroups, dtype):
    """`num` same-sized projections (gate and up) fused, each split over TP ranks."""
    first, local = split(out_features, groups)
    shards = [(i, out_features, local, first) for i in range(num)]
    return ColumnParallelLinear(in_features, shards, bias=False, dtype=dtype)


def qkv_parallel(hidden: int, heads: int, kv_heads: int, head_dim: int, groups: ParallelGroups, dtype):
    """Fused q/k/v with bias. KV heads are split when tp_size divides them and replicated when tp_size
    exceeds them (each rank then holds the one KV head its query heads attend to)."""
    tp, rank = groups.tp_size, groups.tp_rank
    q_local = heads // tp
    kv_local = max(1, kv_heads // tp)
    kv_first = rank * kv_local if kv_heads >= tp else rank // (tp // kv_heads)
    shards = [
        ("q", heads * head_dim, q_local * head_dim, rank * q_local * head_dim),
        ("k", kv_heads * head_dim, kv_local * head_dim, kv_first * head_dim),
        ("v", kv_heads * head_dim, kv_local * head_dim, kv_first * head_dim),
    ]
    return ColumnParallelLinear(hidden, shards, bias=True, dtype=dtype)


class RowParallelLinear(nn.Module):
    """Input features split over TP ranks; the partial products are summed by one all-reduce."""

    def __init__(self, in_features: int, out_features: int, groups: ParallelGroups, dtype=torch.float32):
        super().__init__()
        self.groups = groups
        self.in_features = in_features
        self.first, self.local = split(in_features, groups)
        self.weight = _parameter((out_features, self.local), self._load, dtype)

    def _load(self, param, source, shard_id=None):
        expected = (param.shape[0], self.in_features)
        return copy_into(param.data, read_slice(source, expected, 1, self.first, self.local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(F.linear(x, self.weight), self.groups)


class VocabParallelEmbedding(nn.Module):
    """Rows of the (padded) vocabulary split over TP ranks. The vocabulary is padded to a multiple of
    tp_size; padding rows are zero. Also serves as the LM head (`logits`), tied or not."""

    def __init__(self, vocab_size: int, hidden: int, groups: ParallelGroups, dtype=torch.float32):
        super().__init__()
        self.groups, self.vocab_size, self.hidden = groups, vocab_size, hidden
        self.local = -(-vocab_size // groups.tp_size)
        self.first = groups.tp_rank * self.local
        self.weight = _parameter((self.local, hidden), self._load, dtype)

    def _load(self, param, source, shard_id=None):
        rows = max(0, min(self.local, self.vocab_size - self.first))
        param.data.zero_()
        return copy_into(param.data[:rows], read_slice(source, (self.vocab_size, self.hidden), 0, self.first, rows))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.groups.tp_size == 1:
            return F.embedding(ids, self.weight)
        local_ids = ids - self.first
        outside = (local_ids < 0) | (local_ids >= self.local)
        x = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        return all_reduce(x.masked_fill(outside[:, None], 0), self.groups)

    def logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """Full-vocabulary logits on TP rank 0 (None elsewhere), padding columns dropped."""
        full = gather_last_dim(F.linear(x, self.weight), self.groups)
        return None if full is None else full[:, : self.vocab_size]
