"""Megatron-style tensor-parallel layers, each parameter carrying the loader that fills its slice.

A loader receives a `source`: a safetensors slice (`safe_open(...).get_slice(name)`) or a tensor. It checks
the full checkpoint shape and reads only this rank's rows/columns, so no rank materialises a whole tensor.
"""

import torch
import torch.nn.functional as F
from torch import nn

from shards.fused import PLAIN, Ops
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


ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def onednn_packing() -> bool:
    """Whether this torch can keep a linear's weight in oneDNN's blocked layout (its inductor's CPU prepacking)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _parameter(shape, loader, dtype) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    param.weight_loader = loader
    return param


class RMSNorm(nn.Module):
    """Adds the layer's input to the residual stream and norms the sum (`ops.add_rmsnorm`: shards/fused.py)."""

    def __init__(self, size: int, eps: float, dtype=torch.float32, ops: Ops = PLAIN):
        super().__init__()
        self.eps, self.add_rmsnorm = eps, ops.add_rmsnorm
        self.weight = _parameter((size,), self._load, dtype)

    def _load(self, param, source, shard_id=None):
        return copy_into(param.data, read_slice(source, param.shape))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed x + residual, x + residual); residual None: x alone."""
        return self.add_rmsnorm(x, residual, self.weight, self.eps)


class ReplicatedLinear(nn.Module):
    """A small linear every rank holds whole (the classification and QA heads: a few outputs each)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=torch.float32):
        super().__init__()
        self.weight = _parameter((out_features, in_features), self._load, dtype)
        self.bias = _parameter((out_features,), self._load, dtype) if bias else None

    def _load(self, param, source, shard_id=None):
        return copy_into(param.data, read_slice(source, param.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(nn.Module):
    """Output features split over TP ranks; the output stays split (no collective).

    `shards` lists the checkpoint tensors fused into this one, as (shard id, full rows, row ranges
    (first, count) read on this rank), laid out one after another in the local weight. With `quant` (a
    shards.quant method) the weight is stored quantized and the method does the matmul.
    """

    def __init__(self, in_features: int, shards: list, bias: bool, dtype=torch.float32, quant=None):
        super().__init__()
        self.in_features, self.quant = in_features, quant
        self.shards, offset = {}, 0
        for shard_id, full, ranges in shards:
            self.shards[shard_id] = (full, ranges, offset)
            offset += sum(count for _, count in ranges)
        if quant is None:
            self.weight = _parameter((offset, in_features), self._load, dtype)
        else:
            quant.create(self, offset, in_features, dtype, self._load, len(self.shards), in_features)
        self.bias = _parameter((offset,), self._load, dtype) if bias else None

    def _load(self, param, source, shard_id=None):
        """Rows of output channels; a quantized parameter says which dimension holds them (`out_dim`, None:
        not split) and how many channels one index covers (`out_div`, > 1 when packed along the output)."""
        dim, div = getattr(param, "out_dim", 0), getattr(param, "out_div", 1)
        if dim is None:
            return copy_into(param.data, read_slice(source, param.shape))
        offset, read = self.shards[shard_id][2] // div, 0
        for part in self.read_rows(source, shard_id, param.shape, dim, div):
            read += copy_into(param.data.narrow(dim, offset, part.shape[dim]), part)
            offset += part.shape[dim]
        return read

    def read_rows(self, source, shard_id, local_shape, dim: int = 0, div: int = 1) -> list[torch.Tensor]:
        """This rank's row ranges of checkpoint tensor `shard_id`, read from `source` (whose other dimensions
        are those of `local_shape`)."""
        full, ranges, _ = self.shards[shard_id]
        expected = list(local_shape)
        expected[dim] = full // div
        parts = []
        for first, count in ranges:
            if first % div or count % div:
                raise ValueError(f"output channels [{first}, {first + count}) of this rank are not whole words "
                                 f"of {div} packed channels")
            parts.append(read_slice(source, expected, dim, first // div, count // div))
        return parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) if self.quant is None else self.quant.apply(self, x, self.bias)


def split(total: int, groups: ParallelGroups) -> tuple[int, int]:
    """(first, size) of this rank's part of `total`, the first `total % tp_size` ranks taking one more.

    Uneven parts let Qwen2-0.5B (intermediate 4,864) run at TP 7 and 14, where an even split cannot.
    """
    base, extra = divmod(total, groups.tp_size)
    rank = groups.tp_rank
    return rank * base + min(rank, extra), base + (rank < extra)


def merged_column_parallel(in_features: int, out_features: int, num: int, groups: ParallelGroups, dtype,
                           quant=None):
    """`num` same-sized projections (gate and up) fused, each split over TP ranks."""
    first, local = split(out_features, groups)
    shards = [(i, out_features, [(first, local)]) for i in range(num)]
    return ColumnParallelLinear(in_features, shards, False, dtype, quant)


def local_kv_heads(heads: int, kv_heads: int, groups: ParallelGroups) -> list[int]:
    """The KV heads this rank holds, in order. Query head h attends KV head h // (heads // kv_heads).

    When this rank's query heads use their KV heads equally (tp_size divides kv_heads, or is a multiple
    of it: each KV head then replicated on tp_size // kv_heads ranks) it keeps each once. Otherwise
    (Qwen2-0.5B's 2 KV heads at TP 7: a rank's 2 query heads may straddle two KV heads) it keeps one
    copy per query head, so attention on every rank stays a uniform grouped-query attention.
    """
    per_kv, q_local = heads // kv_heads, heads // groups.tp_size
    needed = [(groups.tp_rank * q_local + i) // per_kv for i in range(q_local)]
    distinct = sorted(set(needed))
    uniform = all(needed.count(k) * len(distinct) == q_local for k in distinct)
    return distinct if uniform else needed


def qkv_parallel(hidden: int, heads: int, kv_heads: list[int], total_kv: int, head_dim: int,
                 groups: ParallelGroups, dtype, quant=None):
    """Fused q/k/v with bias: this rank's query heads, and the KV heads `kv_heads` they attend."""
    q_local = heads // groups.tp_size
    q_rows = [(groups.tp_rank * q_local * head_dim, q_local * head_dim)]
    kv_rows = [(k * head_dim, head_dim) for k in kv_heads]
    shards = [("q", heads * head_dim, q_rows), ("k", total_kv * head_dim, kv_rows), ("v", total_kv * head_dim, kv_rows)]
    return ColumnParallelLinear(hidden, shards, bias=True, dtype=dtype, quant=quant)


class RowParallelLinear(nn.Module):
    """Input features split over TP ranks; the partial products are summed by one all-reduce."""

    def __init__(self, in_features: int, out_features: int, groups: ParallelGroups, dtype=torch.float32,
                 quant=None):
        super().__init__()
        self.groups, self.quant = groups, quant
        self.in_features = in_features
        self.first, self.local = split(in_features, groups)
        if quant is None:
            self.weight = _parameter((out_features, self.local), self._load, dtype)
        else:
            quant.create(self, out_features, self.local, dtype, self._load, 1, in_features)

    def _load(self, param, source, shard_id=None):
        """Columns of input channels; a quantized parameter says which dimension holds them (`in_dim`, None:
        every rank reads all of it) and how many channels one index covers (`in_div`: packed, or a group)."""
        group = getattr(self, "group_size", 1)
        if self.first % group or self.local % group:
            raise ValueError(
                f"tensor_parallel_size={self.groups.tp_size} gives this rank input channels [{self.first}, "
                f"{self.first + self.local}) of {self.in_features}, which splits a group of group_size={group}: "
                "a quantized row-parallel weight is split on group boundaries only")
        dim, div = getattr(param, "in_dim", 1), getattr(param, "in_div", 1)
        if dim is None:
            return copy_into(param.data, read_slice(source, param.shape))
        return copy_into(param.data, self.read_columns(source, param.shape, dim, div))

    def read_columns(self, source, local_shape, dim: int = 1, div: int = 1) -> torch.Tensor:
        """This rank's input channels of `source` (whose other dimensions are those of `local_shape`)."""
        expected = list(local_shape)
        expected[dim] = -(-self.in_features // div)
        return read_slice(source, expected, dim, self.first // div, self.local // div)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight) if self.quant is None else self.quant.apply(self, x)
        return all_reduce(y, self.groups)


class VocabParallelEmbedding(nn.Module):
    """Tokens of the (padded) vocabulary split over TP ranks. The vocabulary is padded to a multiple of
    tp_size; padding tokens' vectors are zero. Also serves as the LM head (`logits`, `greedy`), tied or not.

    `weight` holds this rank's vocabulary as column blocks, [blocks, hidden, VOCAB_BLOCK] (the last block
    zero-padded), so the LM head is one batched matmul of small [hidden, VOCAB_BLOCK] panels. On CPU MKL
    runs that well faster than one `x @ W.T` at decode batch sizes, where the 151,936-wide LM head
    dominates a small Qwen2's step (bench-cpu on 2 cores, whole decode step: 76 -> 53 ms at batch 8,
    139 -> 119 ms at batch 32), and it is the fastest layout for one row (a GEMV streaming the weight).

    On CPU an LM head (`lm_head=True`) also keeps its vocabulary in oneDNN's blocked layout, PACK_ROWS tokens a
    panel, packed once at load: a matmul then skips repacking the weight on every call, which at M = 2..64 rows
    is as much work as the multiply itself. bench-cpu's LM head, float32, 2 cores: 45 -> 26 ms at 8 rows,
    138 -> 76 ms at 64; one row stays on the GEMV (13 ms; oneDNN's is 20). It costs a second copy of the
    head's weight in memory."""

    VOCAB_BLOCK = 2048
    PACK_ROWS = 16384  # fewer, larger panels cost fewer small ops; 4,096-32,768 measured, 16,384 best

    def __init__(self, vocab_size: int, hidden: int, groups: ParallelGroups, dtype=torch.float32,
                 lm_head: bool = False):
        super().__init__()
        self.groups, self.vocab_size, self.hidden = groups, vocab_size, hidden
        self.local = -(-vocab_size // groups.tp_size)
        self.first = groups.tp_rank * self.local
        self.real = max(0, min(self.local, vocab_size - self.first))  # this rank's ids below vocab_size
        self.weight = _parameter((-(-self.local // self.VOCAB_BLOCK), hidden, self.VOCAB_BLOCK), self._load, dtype)
        self.pack = lm_head and self.weight.device.type == "cpu" and dtype in ONEDNN_DTYPES and onednn_packing()
        self.panels: list[torch.Tensor] = []  # oneDNN-packed [PACK_ROWS, hidden] slices of the real vocabulary

    def _load(self, param, source, shard_id=None):
        part = read_slice(source, (self.vocab_size, self.hidden), 0, self.first, self.real)
        param.data.zero_()
        for block, first in enumerate(range(0, self.real, self.VOCAB_BLOCK)):
            param.data[block].t()[: min(self.VOCAB_BLOCK, self.real - first)].copy_(part[first : first + self.VOCAB_BLOCK])
        if self.pack:
            rows = part.to(param.dtype)
            self.panels = [torch.ops.mkldnn._reorder_linear_weight(rows[first : first + self.PACK_ROWS].contiguous(), 64)
                           for first in range(0, self.real, self.PACK_ROWS)]
        return part.numel() * part.element_size()  # as read from the checkpoint

    def _vectors(self, local_ids: torch.Tensor) -> torch.Tensor:
        """[T, hidden] rows of this rank's vocabulary."""
        return self.weight[local_ids // self.VOCAB_BLOCK, :, local_ids % self.VOCAB_BLOCK]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.groups.tp_size == 1:
            return self._vectors(ids)
        local_ids = ids - self.first
        outside = (local_ids < 0) | (local_ids >= self.local)
        x = self._vectors(local_ids.masked_fill(outside, 0))
        return all_reduce(x.masked_fill(outside[:, None], 0), self.groups)

    # On CPU the block layout's logits are made and reduced this many at a time (4 MB: the reductions read what
    # the matmul just wrote from cache; smaller groups make the matmul itself slower). Batch 64 at bench-cpu's
    # vocabulary, LM head and greedy sampling: 161.8 -> 144.5 ms.
    GREEDY_ELEMENTS = 2**20

    ARGMAX_WIDTH = 128  # oneDNN panels are reduced as runs of this many ids: argmax over whole rows is slow

    def _pieces(self, x: torch.Tensor):
        """This rank's logits of the real vocabulary, a piece at a time, in order: (its first local id, logits
        [rows, runs, width]: `runs` runs of `width` consecutive ids each; a view, maybe strided)."""
        rows, block = x.shape[0], self.VOCAB_BLOCK
        if self.panels and rows > 1:
            for i, panel in enumerate(self.panels):
                out, first = torch.ops.mkldnn._linear_pointwise(x, panel, None, "none", [], ""), i * self.PACK_ROWS
                runs, rest = divmod(out.shape[1], self.ARGMAX_WIDTH)
                if runs:
                    yield first, out[:, : runs * self.ARGMAX_WIDTH].view(rows, runs, self.ARGMAX_WIDTH)
                if rest:
                    yield first + runs * self.ARGMAX_WIDTH, out[:, runs * self.ARGMAX_WIDTH :, None].transpose(1, 2)
            return
        full, rest = divmod(self.real, block)
        group = max(1, self.GREEDY_ELEMENTS // max(1, rows * block)) if x.device.type == "cpu" else max(1, full)
        for first in range(0, full, group):
            last = min(first + group, full)
            yield first * block, torch.bmm(x.expand(last - first, rows, self.hidden), self.weight[first:last]).transpose(0, 1)
        if rest:  # the short last block, alone
            yield full * block, (x @ self.weight[full, :, :rest])[:, None]

    def logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """Full-vocabulary logits on TP rank 0 (None elsewhere), padding columns dropped."""
        rows = x.shape[0]
        local = torch.empty(rows, self.local, dtype=x.dtype, device=x.device)  # written once, contiguous
        for first, piece in self._pieces(x):
            _, runs, width = piece.shape
            local[:, first : first + runs * width].view(rows, runs, width).copy_(piece)
        local[:, self.real :] = 0  # TP padding ids
        full_vocab = gather_last_dim(local, self.groups)
        return None if full_vocab is None else full_vocab[:, : self.vocab_size]

    def greedy(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(token ids, their logits, log-sum-exp) of each row's argmax over the whole vocabulary (the first
        maximum, as argmax), on TP rank 0 (None elsewhere), with no [rows, vocab] logits made: each piece of
        the vocabulary is reduced as it comes out of the matmul, and TP ranks send rank 0 three numbers a
        row instead of their slice of the logits."""
        rows = x.shape[0]
        best = torch.full((rows,), float("-inf"), device=x.device)
        best_ids = torch.zeros(rows, dtype=torch.long, device=x.device)
        total = torch.zeros(rows, device=x.device)  # sum of exp(logit - best)
        every_row = torch.arange(rows, device=x.device)
        for first, logits in self._pieces(x):
            logits = logits.float()
            maxima = logits.amax(dim=2)  # [rows, runs]
            where = maxima.argmax(dim=1)  # the first run holding each row's maximum
            top = maxima[every_row, where]
            cols = logits[every_row, where].argmax(dim=1)
            better = top > best  # strictly: an earlier piece keeps a tie
            best_ids = torch.where(better, self.first + first + where * logits.shape[2] + cols, best_ids)
            peak = torch.maximum(best, top)
            part = logits.sub_(top[:, None, None]).exp_().sum(dim=(1, 2))
            total = total * (best - peak).exp() + part * (top - peak).exp()
            best = peak
        stats = gather_last_dim(torch.stack([best, best_ids.float(), total], dim=1), self.groups)  # ids < 2^24
        if stats is None:
            return None
        best, ids, total = stats.view(rows, -1, 3).unbind(dim=2)  # [rows, tp] each, ranks in vocabulary order
        peak = best.amax(dim=1)
        rank = (best == peak[:, None]).float().argmax(dim=1)[:, None]  # the first rank holding the maximum
        lse = peak + (total * (best - peak[:, None]).exp()).sum(dim=1).log()
        return ids.gather(1, rank).squeeze(1).long(), peak, lse
