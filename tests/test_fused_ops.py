"""shards/triton_fused.py's kernels, run on CPU by Triton's interpreter in the conftest's `interpreter` child,
against shards/fused.py's plain ops: each op alone, and a whole model's logits. And the choice of ops: CPU serving
keeps the plain ones without importing triton."""

import os
import subprocess
import sys

import pytest
import torch

from shards import fused
from shards.parallel import ParallelGroups
from shards.worker import ShardWorker
from tests import ranks
from tests.test_parallel_numerics import random_tokens

pytest.importorskip("triton", reason="triton is not installed (the test extra installs it)")

TOKENS = [1, 7, 33]
# float32: a few ulp of the sums and rsqrt; bfloat16: torch's default, about two units of the last place.
TOLERANCE = {torch.float32: dict(rtol=0, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}


def triton_ops():
    from shards.triton_fused import INTERPRETED, TRITON

    assert INTERPRETED and fused.load_ops("cpu") is TRITON
    return TRITON


def close(ours: tuple, expected: tuple, dtype):
    """The kernel's outputs against the plain op's on float32 copies of the same inputs, rounded to `dtype`: in
    bfloat16 the plain op's own roundings of its intermediates (x1 * cos before the subtraction...) are left out,
    so only the kernel's count."""
    for got, want in zip(ours, expected, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want.to(dtype), **TOLERANCE[dtype])


def norm_cases(dtype):
    g = torch.Generator().manual_seed(0)
    for hidden in (96, 640):  # blocks of 128 and 1024, masked
        weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
        for tokens in TOKENS:
            x, residual = (torch.randn(tokens, hidden, generator=g).to(dtype) for _ in range(2))
            for r in (None, residual):
                ours = triton_ops().add_rmsnorm(x, r, weight, 1e-6)
                close(ours, fused.add_rmsnorm(x.float(), r if r is None else r.float(), weight.float(), 1e-6), dtype)
                assert r is not None or ours[1] is x


def rotary_cases(dtype):
    """q and k are views of one [T, q + k + v] row, as Attention splits it: rotated in place, v untouched."""
    g = torch.Generator().manual_seed(1)
    for heads, kv_heads in ((8, 2), (7, 1)):
        for head_dim in (16, 24):  # halves of 8 and of 12 (padded to 16)
            for tokens in TOKENS:
                qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
                angle = 10 * torch.rand(tokens, 1, head_dim // 2, generator=g)
                cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
                q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
                q, k, v_before = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.clone()
                expected = fused.rotary(q.float(), k.float(), cos.float(), sin.float())
                ours = triton_ops().rotary(q, k, cos, sin)
                assert ours[0].data_ptr() == q.data_ptr() and ours[1].data_ptr() == k.data_ptr()
                close(ours, expected, dtype)
                assert torch.equal(v, v_before)


def silu_cases(dtype):
    g = torch.Generator().manual_seed(2)
    for inter in (96, 1300):  # one block of 128; two of 1024, the second masked
        for tokens in TOKENS:
            gate_up = torch.randn(tokens, 2 * inter, generator=g).to(dtype)
            close((triton_ops().silu_and_mul(gate_up),), (fused.silu_and_mul(gate_up.float()),), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cases", [norm_cases, rotary_cases, silu_cases], ids=["add_rmsnorm", "rotary", "silu_and_mul"])
def test_kernel_matches_the_plain_op(interpreter, cases, dtype):
    """Hidden sizes that are not powers of two, 1 to 33 tokens, GQA groups of 4 and 7, with and without a
    residual."""
    interpreter(cases, dtype)


def teacher_forced(model_dir, interpreted: bool):
    """ranks.teacher_forced's prefill chunks beside decodes: logits per sequence."""
    worker = ShardWorker(model_dir, ParallelGroups(), num_kv_blocks=64, block_size=ranks.BLOCK_SIZE)
    layer = worker.model.layers[0]
    ops = (layer.input_layernorm.add_rmsnorm, layer.self_attn.rotary, layer.mlp.silu_and_mul)
    assert ops == (triton_ops() if interpreted else fused.PLAIN)
    prompts, continuations = random_tokens(1000, [11, 5, 20], seed=1), random_tokens(1000, [6, 6, 6], seed=2)
    return ranks.teacher_forced(worker, prompts, continuations, [0] * 3)


def test_model_logits_with_the_fused_ops_match_the_plain_ones(interpreter, checkpoints):
    """Hidden 96, 12 query heads over 3 KV heads, 2 layers, float32; the torch attention backend in both."""
    model_dir = checkpoints["straddling-kv"]
    for ours, plain in zip(interpreter(teacher_forced, model_dir, True), teacher_forced(model_dir, False), strict=True):
        torch.testing.assert_close(ours, plain, rtol=0, atol=1e-4)


def test_cpu_serving_keeps_the_plain_ops_without_triton(checkpoints):
    """Without the interpreter a CPU model gets the plain ops and never imports triton; a CUDA torch without
    triton falls back to them too."""
    script = f"""
import sys
from shards import fused
from shards.parallel import ParallelGroups
from shards.worker import ShardWorker
worker = ShardWorker({str(checkpoints["gqa-untied"])!r}, ParallelGroups())
assert worker.model.norm.add_rmsnorm is fused.add_rmsnorm
assert "triton" not in sys.modules, "a CPU model imported triton"
sys.modules["triton"] = None  # as if not installed
assert fused.load_ops("cuda") is fused.PLAIN
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
