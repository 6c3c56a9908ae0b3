"""The small elementwise ops of a decoder layer, plain torch or fused Triton kernels (shards/triton_fused.py).

Each op is a handful of memory-bound torch kernels whose launches and round trips through memory a GPU step pays
for at every layer; one Triton kernel each reads its inputs once. CPU keeps the plain ops: they are faster there
than Triton's interpreter, and they are the arithmetic the tests compare with transformers. A model picks its
ops once, when it is built (`load_ops`).
"""

import os
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from shards.rope import apply_rotary


class Ops(NamedTuple):
    add_rmsnorm: Callable  # (x, residual | None, weight, eps) -> (weight * rmsnorm(x + residual), x + residual)
    rotary: Callable  # (q [T, heads, D], k [T, kv_heads, D], cos, sin [T, 1, D // 2]) -> (q, k) rotated
    silu_and_mul: Callable  # (gate_up [T, 2I]) -> silu(gate) * up [T, I]


def add_rmsnorm(x, residual, weight, eps):
    """vLLM's residual style: the layer adds its input to the residual stream here, where it is normed."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


def rotary(q, k, cos, sin):
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def silu_and_mul(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


PLAIN = Ops(add_rmsnorm, rotary, silu_and_mul)


def load_ops(device) -> Ops:
    """The Triton ops on CUDA (on CPU only under Triton's interpreter, for the tests), the plain ones otherwise.

    Triton is imported only then, so CPU serving never imports it; a CUDA torch without triton runs the plain ops.
    """
    device = torch.device(device)
    if device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
        return PLAIN
    try:
        from shards.triton_fused import INTERPRETED, TRITON
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        return PLAIN
    return TRITON if device.type == "cuda" or INTERPRETED else PLAIN
