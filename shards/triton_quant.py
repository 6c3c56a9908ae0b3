"""Fused dequantize-matmul in Triton for GPTQ (4 and 8 bits, with or without desc_act's g_idx) and AWQ weights:
y = x @ W.T with W read as stored, never materialised. The GPU path of shards/quant.py's GroupMethod (CPU
keeps its torch dequantize-then-matmul); chosen over a library kernel because none is installed with torch here
and the formats' vLLM/ExLlama kernels need their own repacked layouts.

A program computes a [BLOCK_M, BLOCK_N] tile of y, walking the input channels BLOCK_K at a time: it loads the
int32 words that hold the tile's codes (GPTQ packs along the input, AWQ along the output in its interleaved
order), the zero points (packed along the output) and scales of each channel's group (k // group_size, or
g_idx[k]), dequantizes exactly as the torch path does (float32 (q - zero) * scale, cast to x's dtype) and
accumulates tl.dot in float32.
"""

import torch
import triton
import triton.language as tl

from shards.triton_attention import INTERPRETED, _operand


@triton.jit
def _to(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(dtype), rounding to nearest even. Triton's interpreter truncates float32 -> bfloat16 casts (about
    half of random values come out one ulp low), so under it bfloat16 is rounded by hand first."""
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _group_matmul(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, y_ptr,
    M, N, K, group_size,
    stride_xm, stride_qw, stride_qz, stride_s, stride_ym,
    BITS: tl.constexpr, AWQ: tl.constexpr, G_IDX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    if AWQ:  # output channel c of its word's 8 sits in slot [0, 4, 1, 5, 2, 6, 3, 7][c]
        slot = (rn % 8) // 2 + (rn % 2) * 4
    else:
        slot = rn % PACK
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        kn_ok = k_ok[:, None] & n_ok[None, :]
        if AWQ:  # qweight [K, N / 8]
            words = tl.load(qweight_ptr + rk[:, None].to(tl.int64) * stride_qw + (rn // PACK)[None, :], mask=kn_ok,
                            other=0)
            q = (words >> (slot * BITS)[None, :]) & MASK
        else:  # qweight [K / PACK, N]
            words = tl.load(qweight_ptr + (rk // PACK)[:, None].to(tl.int64) * stride_qw + rn[None, :], mask=kn_ok,
                            other=0)
            q = (words >> ((rk % PACK) * BITS)[:, None]) & MASK
        if G_IDX:
            g = tl.load(g_idx_ptr + rk, mask=k_ok, other=0)
        else:
            g = rk // group_size
        zeros = tl.load(qzeros_ptr + g[:, None] * stride_qz + (rn // PACK)[None, :], mask=kn_ok, other=0)
        zeros = (zeros >> (slot * BITS)[None, :]) & MASK
        if not AWQ:  # GPTQ v1 stores zero - 1
            zeros += 1
        scales = tl.load(scales_ptr + g[:, None] * stride_s + rn[None, :], mask=kn_ok, other=0.0)
        w = _to((q - zeros).to(tl.float32) * scales.to(tl.float32), x_ptr.dtype.element_ty, UPCAST)
        acc += tl.dot(_operand(x, UPCAST), _operand(w, UPCAST), input_precision=PRECISION)
    y = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    tl.store(y, _to(acc, y_ptr.dtype.element_ty, UPCAST), mask=m_ok[:, None] & n_ok[None, :])


def group_matmul(x: torch.Tensor, qweight, qzeros, scales, g_idx, group_size: int, bits: int, awq: bool,
                 block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N], W given by a GPTQ (`awq` False) or AWQ layer's tensors (shards/quant.py)."""
    shape = x.shape
    x = x.reshape(-1, shape[-1]).contiguous()
    M, K = x.shape
    N = scales.shape[1]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_m = 16 if M <= 16 else 64  # decode steps: one row tile
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _group_matmul[grid](
        x, qweight, qzeros, scales, qweight if g_idx is None else g_idx, y,
        M, N, K, group_size,
        x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), y.stride(0),
        BITS=bits, AWQ=awq, G_IDX=g_idx is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", UPCAST=INTERPRETED,
    )
    return y.view(*shape[:-1], N)
