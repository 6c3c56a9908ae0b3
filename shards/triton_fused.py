"""shards/fused.py's ops as Triton kernels, each one pass over its rows: the residual add with the RMSNorm after it,
the rotation of q and k in one launch, SiLU-and-mul. Each computes in float32 from inputs as loaded and rounds
once to the input's dtype (rounding to nearest under the interpreter too: triton_quant's `_to`), where the plain
ops round each bf16 intermediate; in float32 they agree with the plain ops to a few ulp.
"""

import torch
import triton
import triton.language as tl

from shards.fused import Ops
from shards.triton_attention import INTERPRETED
from shards.triton_quant import _to


@triton.jit
def _add_rmsnorm(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, n, eps, stride_x, stride_r,
                 HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # the sum is rounded to the stream's dtype before it is normed, as the plain op does
        x = _to(x + tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32),
                sum_ptr.dtype.element_ty, UPCAST)
        tl.store(sum_ptr + row * n + cols, x, mask=ok)
        x = x.to(tl.float32)
    normed = _to(x * tl.rsqrt(tl.sum(x * x, 0) / n + eps), out_ptr.dtype.element_ty, UPCAST)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + cols, _to(w * normed.to(tl.float32), out_ptr.dtype.element_ty, UPCAST), mask=ok)


def add_rmsnorm(x, residual, weight, eps):
    """x, residual [T, hidden] (unit stride along hidden) -> (normed, x + residual), both new tensors; x itself
    as the second when residual is None."""
    rows, n = x.shape
    out = torch.empty_like(x)
    total = x if residual is None else torch.empty_like(x)
    _add_rmsnorm[(rows,)](x, x if residual is None else residual, weight, out, total, n, eps, x.stride(0),
                          x.stride(0) if residual is None else residual.stride(0), HAS_RESIDUAL=residual is not None,
                          BLOCK=triton.next_power_of_2(n), UPCAST=INTERPRETED)
    return out, total


@triton.jit
def _rotate(x_ptr, stride_h, cos, sin, d, HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr,
            UPCAST: tl.constexpr):
    """Rotate one token's HEADS heads in place: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    h = tl.arange(0, HEADS_PAD)
    ok = (h < HEADS)[:, None] & (d < HALF)[None, :]
    first = x_ptr + h[:, None] * stride_h + d[None, :]
    x1 = tl.load(first, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=ok, other=0.0).to(tl.float32)
    tl.store(first, _to(x1 * cos - x2 * sin, x_ptr.dtype.element_ty, UPCAST), mask=ok)
    tl.store(first + HALF, _to(x2 * cos + x1 * sin, x_ptr.dtype.element_ty, UPCAST), mask=ok)


@triton.jit
def _rotary(q_ptr, k_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
            HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, KV_HEADS: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
            HALF: tl.constexpr, HALF_PAD: tl.constexpr, UPCAST: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_ptr + t * stride_ct + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * stride_ct + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate(q_ptr + t * stride_qt, stride_qh, cos, sin, d, HEADS, HEADS_PAD, HALF, UPCAST)
    _rotate(k_ptr + t * stride_kt, stride_kh, cos, sin, d, KV_HEADS, KV_HEADS_PAD, HALF, UPCAST)


def rotary(q, k, cos, sin):
    """Rotates q [T, heads, D] and k [T, kv_heads, D] (any token and head strides, unit stride along D) in place,
    one program a token, and returns them; cos, sin [T, 1, D // 2] contiguous."""
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    _rotary[(tokens,)](q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
                       HEADS=heads, HEADS_PAD=triton.next_power_of_2(heads), KV_HEADS=kv_heads,
                       KV_HEADS_PAD=triton.next_power_of_2(kv_heads), HALF=head_dim // 2,
                       HALF_PAD=triton.next_power_of_2(head_dim // 2), UPCAST=INTERPRETED)
    return q, k


@triton.jit
def _silu_and_mul(x_ptr, out_ptr, n, stride_x, BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + cols, _to(gate * tl.sigmoid(gate) * up, out_ptr.dtype.element_ty, UPCAST), mask=ok)


def silu_and_mul(gate_up):
    """gate_up [T, 2I] (unit stride along it) -> [T, I], blocks of up to 1024 of a row a program."""
    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, n, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(n))
    _silu_and_mul[(rows, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0), BLOCK=block, UPCAST=INTERPRETED)
    return out


TRITON = Ops(add_rmsnorm, rotary, silu_and_mul)
