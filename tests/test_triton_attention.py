"""The Triton paged-attention kernel, run on CPU by Triton's interpreter, against the torch backend and, through
the model, against transformers.

Triton picks the interpreter when it is imported (for its own library functions) and at each `@triton.jit`,
and transformers imports it, so the conftest already has. The cases therefore run in one child process started
with TRITON_INTERPRET=1 (the conftest's `interpreter` fixture); nothing else in the suite sees the variable.
"""

import os
import random
import subprocess
import sys

import pytest
import torch

from shards.attention import allocate_kv_cache, load_backend, torch_paged_attention
from shards.batch import SeqPlan, StepBatch
from shards.parallel import ParallelGroups
from shards.rope import ORIGINAL, SCALED
from shards.worker import ShardWorker
from tests import ranks
from tests.test_parallel_numerics import TOLERANCE, random_tokens, reference

pytest.importorskip("triton", reason="triton is not installed (the test extra installs it)")


def kernel():
    from shards.triton_attention import INTERPRETED, triton_paged_attention

    assert INTERPRETED
    return triton_paged_attention


BLOCK_SIZE, KV_HEADS, NUM_BLOCKS = 4, 2, 96
# (start, count): a prefill from 0, one starting mid-block (a cached prefix of 6), decodes at 1, 17 and 30
# tokens of context, and a 20-token chunk after 3 that spans several query tiles.
MIXED = [(0, 13), (6, 9), (0, 1), (16, 1), (29, 1), (3, 20)]


def step(specs, seed=0):
    """A StepBatch of sequences (start, count), each over blocks scattered across the cache."""
    blocks = random.Random(seed).sample(range(NUM_BLOCKS), NUM_BLOCKS)
    plans = []
    for i, (start, count) in enumerate(specs):
        need = -(-(start + count) // BLOCK_SIZE)
        plans.append(SeqPlan(i, [0] * count, start, blocks[:need]))
        blocks = blocks[need:]
    return StepBatch.build(plans, BLOCK_SIZE, "cpu")


def inputs(batch, group, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = allocate_kv_cache(1, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, head_dim, torch.float32, "cpu")[0]
    cache.normal_(generator=g)
    q = torch.randn(batch.num_tokens, KV_HEADS * group, head_dim, generator=g)
    return q.to(dtype), cache.to(dtype)


def mixed_step(group, dtype, window):
    batch = step(MIXED)
    q, cache = inputs(batch, group, 16, dtype)
    ours = kernel()(q, cache, batch, 0.25, window, block_n=16)  # several key tiles per program
    assert ours.dtype == dtype
    exact = torch_paged_attention(q.float(), cache.float(), batch, 0.25, window)  # on the same rounded inputs
    if dtype == torch.float32:
        torch.testing.assert_close(ours, exact, rtol=0, atol=1e-5)
    else:
        # The softmax weights go into the PV dot in bf16, as on the GPU (2**-9 of them: ~2**-9 of |v| < 4 on an
        # output), and the interpreter truncates the float32 output to bf16 where a GPU rounds to nearest (one
        # bf16 unit: 2**-7 relative).
        torch.testing.assert_close(ours.float(), exact, rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 7])
def test_mixed_step_matches_the_torch_backend(interpreter, group, dtype, window):
    interpreter(mixed_step, group, dtype, window)


def default_tiles(window):
    for specs in ([(149, 1), (0, 1), (77, 1), (40, 1)], [(0, 150), (61, 30)]):
        batch = step(specs)
        q, cache = inputs(batch, 4, 8, torch.float32)
        ours = kernel()(q, cache, batch, 8**-0.5, window)
        torch.testing.assert_close(ours, torch_paged_attention(q, cache, batch, 8**-0.5, window), rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [None, 40])
def test_decode_only_prefill_only_and_long_contexts_with_default_tiles(interpreter, window):
    """Decode-only steps take 16-row tiles; 150-token contexts take several 64-key tiles; head_dim 8 is padded
    to the 16 a tensor-core dot needs."""
    interpreter(default_tiles, window)


def split_decodes(window, dtype):
    """Decode contexts of 1 to 150 keys over 2, 3 and 7 splits of 16-key tiles: long ones split unevenly, short
    ones leave splits with no keys (empty partials the merge must skip)."""
    batch = step([(149, 1), (0, 1), (77, 1), (40, 1), (15, 1)])
    q, cache = inputs(batch, 7, 16, dtype)
    exact = torch_paged_attention(q.float(), cache.float(), batch, 0.25, window)
    for splits in (2, 3, 7):
        ours = kernel()(q, cache, batch, 0.25, window, block_n=16, splits=splits)
        if dtype == torch.float32:
            torch.testing.assert_close(ours, exact, rtol=0, atol=1e-5, msg=lambda m: f"{splits} splits: {m}")
        else:  # as mixed_step's bf16 case
            torch.testing.assert_close(ours.float(), exact, rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_keys_split_over_programs_merge_to_the_whole(interpreter, window, dtype):
    interpreter(split_decodes, window, dtype)


def random_steps(block_q):
    rng = random.Random(block_q)
    for trial in range(3):
        specs = [(rng.randrange(0, 24), rng.choice([1, 1, rng.randrange(2, 19)])) for _ in range(rng.randrange(1, 7))]
        batch = step(specs, seed=trial)
        q, cache = inputs(batch, 7, 16, torch.float32, seed=trial)
        window = rng.choice([None, 3])
        ours = kernel()(q, cache, batch, 0.25, window, block_q=block_q, block_n=16)
        expected = torch_paged_attention(q, cache, batch, 0.25, window)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5, msg=lambda m: f"{specs}, window {window}: {m}")


@pytest.mark.parametrize("block_q", [1, 2])
def test_any_query_tiling_covers_every_row(interpreter, block_q):
    """Random steps at several tile heights: sequence i's tiles start at query_start[i] // BLOCK_Q + i, which
    must leave no query row of any sequence unattended."""
    interpreter(random_steps, block_q)


def teacher_forced(model_dir, name):
    vocab = reference(model_dir).config.vocab_size
    prompts, continuations = random_tokens(vocab, [11, 5, 20], seed=1), random_tokens(vocab, [6, 6, 6], seed=2)
    yarn = name == "tied-yarn-sliding"
    variants = [SCALED, ORIGINAL, SCALED] if yarn else [ORIGINAL] * 3
    worker = ShardWorker(model_dir, ParallelGroups(), num_kv_blocks=64, block_size=ranks.BLOCK_SIZE,
                         attention_backend="triton")
    assert worker.model.layers[0].self_attn.attend is kernel()
    ours = ranks.teacher_forced(worker, prompts, continuations, variants)
    worst = 0.0
    for i, (prompt, cont) in enumerate(zip(prompts, continuations)):
        with torch.no_grad():
            model = reference(model_dir, scaled=variants[i] == SCALED or not yarn)
            expected = model(torch.tensor([prompt + cont])).logits[0, len(prompt) - 1 :]
        worst = max(worst, (ours[i] - expected).abs().max().item())
    assert worst <= TOLERANCE, f"{name} on the triton backend: max |ours - transformers| = {worst:.3g}"


@pytest.mark.parametrize("name", ["tied-yarn-sliding", "straddling-kv"])
def test_model_logits_match_transformers_with_the_triton_backend(interpreter, checkpoints, name):
    """tests/test_parallel_numerics.py's teacher-forced run (chunked prefill beside decodes, a sliding-window
    layer, YaRN and original RoPE in one batch; or 4 query heads a KV head at head_dim 8) on the kernel."""
    interpreter(teacher_forced, checkpoints[name], name)


def test_backend_choice_and_its_errors():
    """Default by device; CPU serving never imports triton; triton on CPU without the interpreter, a missing
    triton and an unknown name are clear errors; the CLI flag reaches the engine config."""
    from router.cli import build_parser, engine_config

    assert load_backend(None, "cpu") is torch_paged_attention
    with pytest.raises(ValueError, match="unknown attention backend 'flash'; known: torch, triton"):
        load_backend("flash", "cpu")
    args = build_parser().parse_args(["generate", "--model", "m", "--attention-backend", "triton"])
    assert engine_config(args).attention_backend == "triton"
    assert engine_config(build_parser().parse_args(["generate", "--model", "m"])).attention_backend is None
    script = """
import sys
import pytest
from shards.attention import load_backend
import shards.worker
load_backend(None, "cpu")
assert "triton" not in sys.modules, "the torch backend imported triton"
with pytest.raises(ValueError, match="runs on CUDA .on CPU only under Triton's interpreter, TRITON_INTERPRET=1"):
    load_backend("triton", "cpu")
sys.modules["triton"] = None  # as if not installed
del sys.modules["shards.triton_attention"]
with pytest.raises(RuntimeError, match="needs the triton package"):
    load_backend("triton", "cuda")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
