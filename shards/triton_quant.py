"""Fused dequantize-matmul in Triton for GPTQ (4 and 8 bits, with or without desc_act's g_idx), AWQ and NF4
weights: y = x @ W.T with W read as stored, never materialised. The GPU path of shards/quant.py's methods (CPU
keeps their torch dequantize-then-matmul); chosen over a library kernel because none is installed with torch here
and the formats' vLLM/ExLlama kernels need their own repacked layouts.

A program computes a [BLOCK_M, BLOCK_N] tile of y, walking the input channels BLOCK_K at a time: it loads the
int32 words that hold the tile's codes (GPTQ packs along the input, AWQ along the output in its interleaved
order), the zero points (packed along the output) and scales of each channel's group (k // group_size, or
g_idx[k]), dequantizes exactly as the torch path does (float32 (q - zero) * scale, cast to x's dtype) and
accumulates tl.dot in float32. The NF4 kernel does the same with a code and its block's absmax.
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
    M, N, K, group_size, stride_qw, stride_qz, stride_s, stride_xm, stride_ym,
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


@triton.jit
def _nf4_matmul(
    x_ptr, codes_ptr, absmax_ptr, code_book_ptr, y_ptr,
    M, N, K, row_stride, skip, stride_xm, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """y = x @ W.T, W[n, k] the NF4 code at flat index n * row_stride + skip + k (two a byte, the first in the
    high nibble) times its block of 64's absmax."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        kn_ok = k_ok[:, None] & n_ok[None, :]
        index = rn[None, :].to(tl.int64) * row_stride + skip + rk[:, None]  # [BLOCK_K, BLOCK_N]
        byte = tl.load(codes_ptr + index // 2, mask=kn_ok, other=0).to(tl.int32)
        q = tl.where(index % 2 == 0, byte >> 4, byte & 0xF)
        values = tl.load(code_book_ptr + q) * tl.load(absmax_ptr + index // 64, mask=kn_ok, other=0.0)
        w = _to(values, x_ptr.dtype.element_ty, UPCAST)
        acc += tl.dot(_operand(x, UPCAST), _operand(w, UPCAST), input_precision=PRECISION)
    y = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    tl.store(y, _to(acc, y_ptr.dtype.element_ty, UPCAST), mask=m_ok[:, None] & n_ok[None, :])


# Launch settings, the fastest of `python -m bench.quant_tiles` on an H200 for Qwen2-7B's MLP shapes
# (bench/RESULTS.md): against Triton's defaults (64 x 64 tiles, 4 warps, 3 stages) GPTQ int4 at one row 2.65 ->
# 1.29 ms (gate and up) and 2.26 -> 0.73 (down); NF4 at 64 rows 3.16 -> 1.25 and 3.13 -> 1.03.
GROUP_TILES = dict(block_n=32, block_k=128, num_warps=4, num_stages=4)
NF4_TILES = {True: dict(block_n=32, block_k=128, num_warps=4, num_stages=4),  # up to 16 rows (decode)
             False: dict(block_n=32, block_k=32, num_warps=2, num_stages=2)}


def nf4_matmul(x: torch.Tensor, state: dict, **tiles) -> torch.Tensor:
    """x [..., K] @ W.T for one NF4 state of shards/quant.py (load-time, or a pre-quantized slice); `tiles`
    overrides NF4_TILES (see _launch)."""
    from shards.quant import NF4_CODE, nf4_absmax

    N, K = state["shape"]
    tiles = NF4_TILES[x.numel() // K <= 16] | tiles
    rows = state.get("rows", 1)
    row_stride = K if rows == 1 else 2 * state["weight"].numel() // rows
    return _launch(_nf4_matmul, x, N, (state["weight"], nf4_absmax(state).float(), NF4_CODE.to(x.device)),
                   (row_stride, state.get("skip", 0)), {}, **tiles)


def _launch(kernel, x: torch.Tensor, N: int, tensors: tuple, scalars: tuple, constexprs: dict,
            block_n: int = 64, block_k: int = 64, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """kernel(x, *tensors, y, M, N, K, *scalars, x's and y's row strides, *constexprs) over x [..., K] (made
    [M, K] contiguous) -> y [..., N] in x's dtype, in tiles of BLOCK_M rows (16 up to 16 rows, else 64) x
    block_n outputs, block_k inputs a step."""
    shape = x.shape
    x = x.reshape(-1, shape[-1]).contiguous()
    M, K = x.shape
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_m = 16 if M <= 16 else 64  # decode steps: one row tile
    kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        x, *tensors, y, M, N, K, *scalars, x.stride(0), y.stride(0), **constexprs,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", UPCAST=INTERPRETED,
        num_warps=num_warps, num_stages=num_stages)
    return y.view(*shape[:-1], N)


def group_matmul(x: torch.Tensor, qweight, qzeros, scales, g_idx, group_size: int, bits: int,
                 awq: bool, **tiles) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N], W given by a GPTQ (`awq` False) or AWQ layer's tensors (shards/quant.py);
    `tiles` overrides GROUP_TILES (see _launch)."""
    return _launch(_group_matmul, x, scales.shape[1], (qweight, qzeros, scales, qweight if g_idx is None else g_idx),
                   (group_size, qweight.stride(0), qzeros.stride(0), scales.stride(0)),
                   dict(BITS=bits, AWQ=awq, G_IDX=g_idx is not None), **(GROUP_TILES | tiles))
