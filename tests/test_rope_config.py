"""RoPE (default, linear, YaRN) and Qwen2 config reading checked against transformers, the reference.

Every config is a full Qwen2 `config.json` dict; transformers' `Qwen2Config(**d)` and
`shards.config.Qwen2Config.from_dict(d)` each get their own deep copy of it (transformers edits the
nested rope dict in place).
"""

import copy
import math

import pytest
import torch

from shards.config import Qwen2Config
from shards.rope import (
    ORIGINAL,
    SCALED,
    RotaryEmbedding,
    apply_rotary,
    default_inv_freq,
    variant_parameters,
    yarn_parameters,
)

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

# Attention shapes by head_dim: (hidden_size, heads, KV heads); head_dim is derived from them.
SHAPES = {64: (896, 14, 2), 128: (3584, 28, 4)}


def qwen2_dict(shape=64, layers=4, **overrides) -> dict:
    """A complete Qwen2 config.json, shaped like the published ones; `shape` picks SHAPES[head_dim]."""
    hidden, heads, kv = SHAPES[shape]
    d = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": hidden,
        "intermediate_size": 4864,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "sliding_window": 131072,
        "max_window_layers": layers,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "use_cache": True,
    }
    d.update(overrides)
    return d


def with_rope(d: dict, spelling: str, rope_type: str, theta: float, **params) -> dict:
    """Put a RoPE entry into `d` in the old (`rope_theta` + `rope_scaling.type`) or new
    (`rope_parameters.rope_type` with `rope_theta` inside) spelling."""
    d = dict(d)
    if spelling == "old":
        d["rope_theta"] = theta
        d["rope_scaling"] = {"type": rope_type, **params}
    else:
        d.pop("rope_theta", None)
        d["rope_parameters"] = {"rope_type": rope_type, "rope_theta": theta, **params}
    return d


def both(d: dict):
    """(ours, transformers') configs from independent copies of the same dict."""
    return Qwen2Config.from_dict(copy.deepcopy(d)), transformers.Qwen2Config(**copy.deepcopy(d))


def assert_same_freqs(ours: torch.Tensor, ref: torch.Tensor):
    assert ours.dtype == ref.dtype == torch.float32
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-7, (ours - ref).abs().max().item()


# ---------------------------------------------------------------------------------------------------
# 1. YaRN inverse frequencies and attention factor


YARN_GRID = [
    pytest.param(spelling, factor, head_dim, original, id=f"{spelling}-f{factor}-d{head_dim}-o{original}")
    for spelling in ("old", "new")
    for factor in (2.0, 4.0, 8.0, 16.0)
    for head_dim in (64, 128)
    for original in (2048, 32768)
]


@pytest.mark.parametrize("spelling,factor,head_dim,original", YARN_GRID)
def test_yarn_matches_transformers(spelling, factor, head_dim, original):
    d = with_rope(qwen2_dict(head_dim), spelling, "yarn", 1e6, factor=factor,
                  original_max_position_embeddings=original)
    ours, ref = both(d)
    assert ours.head_dim == head_dim
    assert ours.rope_theta == ref.rope_parameters["rope_theta"] == 1e6
    assert ours.rope_scaling.rope_type == "yarn"
    assert ours.rope_scaling.factor == factor
    assert ours.rope_scaling.original_max_position_embeddings == original

    ref_inv, ref_af = ROPE_INIT_FUNCTIONS["yarn"](ref)
    inv, af = yarn_parameters(ours.rope_theta, ours.head_dim, ours.rope_scaling)
    assert torch.equal(inv, ref_inv)
    assert af == pytest.approx(ref_af, abs=1e-12)
    assert af == pytest.approx(0.1 * math.log(factor) + 1.0, abs=1e-12)

    # variant_parameters exposes the same numbers as the SCALED variant.
    variants = variant_parameters(ours)
    assert len(variants) == 2
    assert torch.equal(variants[SCALED][0], ref_inv)
    assert variants[SCALED][1] == pytest.approx(ref_af, abs=1e-12)


YARN_OPTIONS = {
    "betas": dict(beta_fast=16.0, beta_slow=2.0),
    "betas-wide": dict(beta_fast=64, beta_slow=0.5),
    "betas-zero-means-default": dict(beta_fast=0, beta_slow=0),
    "attention-factor": dict(attention_factor=0.85),
    "attention-factor-wins-over-mscale": dict(attention_factor=1.3, mscale=0.707, mscale_all_dim=0.707),
    "mscale": dict(mscale=1.0, mscale_all_dim=0.5),
    "mscale-equal": dict(mscale=0.707, mscale_all_dim=0.707),
    "mscale-only": dict(mscale=2.0),  # mscale_all_dim missing: falls back to get_mscale(factor)
    "no-truncate": dict(truncate=False),
    "no-truncate-betas": dict(truncate=False, beta_fast=24.0, beta_slow=1.5),
    "truncate-true": dict(truncate=True),
}


@pytest.mark.parametrize("spelling", ["old", "new"])
@pytest.mark.parametrize("option", list(YARN_OPTIONS))
@pytest.mark.parametrize("head_dim,factor,original", [(64, 4.0, 32768), (128, 8.0, 2048)])
def test_yarn_options_match_transformers(spelling, option, head_dim, factor, original):
    d = with_rope(qwen2_dict(head_dim), spelling, "yarn", 1e6, factor=factor,
                  original_max_position_embeddings=original, **YARN_OPTIONS[option])
    ours, ref = both(d)
    ref_inv, ref_af = ROPE_INIT_FUNCTIONS["yarn"](ref)
    inv, af = variant_parameters(ours)[SCALED]
    assert torch.equal(inv, ref_inv)
    assert af == pytest.approx(ref_af, abs=1e-12)
    if "attention_factor" in YARN_OPTIONS[option]:
        assert af == YARN_OPTIONS[option]["attention_factor"]


@pytest.mark.parametrize("spelling", ["old", "new"])
def test_yarn_options_change_the_result(spelling):
    """The optional fields are really read: each one moves inv_freq or the attention factor."""
    def params(**extra):
        d = with_rope(qwen2_dict(128), spelling, "yarn", 1e6, factor=8.0,
                      original_max_position_embeddings=2048, **extra)
        return variant_parameters(Qwen2Config.from_dict(d))[SCALED]

    base_inv, base_af = params()
    assert not torch.equal(params(beta_fast=16.0)[0], base_inv)
    assert not torch.equal(params(beta_slow=2.0)[0], base_inv)
    assert not torch.equal(params(truncate=False)[0], base_inv)
    assert params(attention_factor=0.5)[1] == 0.5
    assert params(mscale=1.0, mscale_all_dim=0.5)[1] != pytest.approx(base_af)


def test_yarn_explicit_head_dim_matches_transformers():
    """head_dim given explicitly (not hidden_size // heads): both sides use it."""
    d = with_rope(qwen2_dict(64, head_dim=128), "new", "yarn", 1e6, factor=4.0,
                  original_max_position_embeddings=32768)
    ours, ref = both(d)
    assert ours.head_dim == 128 != ours.hidden_size // ours.num_attention_heads
    ref_inv, ref_af = ROPE_INIT_FUNCTIONS["yarn"](ref)
    inv, af = variant_parameters(ours)[SCALED]
    assert inv.shape == (64,)
    assert torch.equal(inv, ref_inv)
    assert af == pytest.approx(ref_af, abs=1e-12)


def test_yarn_original_window_defaults_to_max_position_embeddings():
    """No original_max_position_embeddings: transformers uses max_position_embeddings."""
    d = with_rope(qwen2_dict(64, max_position_embeddings=4096), "old", "yarn", 1e6, factor=4.0)
    ours, ref = both(d)
    assert ours.rope_scaling.original_max_position_embeddings == 4096
    assert ref.rope_parameters["original_max_position_embeddings"] == 4096
    ref_inv, ref_af = ROPE_INIT_FUNCTIONS["yarn"](ref)
    inv, af = variant_parameters(ours)[SCALED]
    assert torch.equal(inv, ref_inv)
    assert af == pytest.approx(ref_af, abs=1e-12)


def test_yarn_theta_in_rope_parameters_wins_over_top_level():
    d = qwen2_dict(64, rope_theta=10000.0,
                   rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                    "original_max_position_embeddings": 2048})
    ours, ref = both(d)
    assert ours.rope_theta == ref.rope_parameters["rope_theta"] == 1e6
    assert torch.equal(variant_parameters(ours)[SCALED][0], ROPE_INIT_FUNCTIONS["yarn"](ref)[0])


# ---------------------------------------------------------------------------------------------------
# 2. Linear scaling and default RoPE


@pytest.mark.parametrize("spelling", ["old", "new"])
@pytest.mark.parametrize("factor", [2.0, 4.0, 8.0])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_linear_matches_transformers(spelling, factor, head_dim):
    d = with_rope(qwen2_dict(head_dim), spelling, "linear", 1e6, factor=factor)
    ours, ref = both(d)
    assert ours.rope_scaling.rope_type == "linear"
    ref_inv, ref_af = ROPE_INIT_FUNCTIONS["linear"](ref)
    variants = variant_parameters(ours)
    assert len(variants) == 2
    assert_same_freqs(variants[SCALED][0], ref_inv)
    assert variants[SCALED][1] == ref_af == 1.0
    # ORIGINAL stays plain RoPE.
    assert_same_freqs(variants[ORIGINAL][0], Qwen2RotaryEmbedding.compute_default_rope_parameters(ref)[0])


@pytest.mark.parametrize("spelling", ["old", "new", "absent"])
@pytest.mark.parametrize("theta", [10000.0, 1e6])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_default_rope_matches_transformers(spelling, theta, head_dim):
    d = qwen2_dict(head_dim)
    if spelling == "old":
        d["rope_theta"] = theta
    elif spelling == "new":
        d = with_rope(d, "new", "default", theta)
    else:
        d.pop("rope_theta")
        theta = 10000.0  # both sides' default
    ours, ref = both(d)
    assert ours.rope_scaling is None
    assert ours.rope_theta == ref.rope_parameters["rope_theta"] == theta
    ref_inv, ref_af = Qwen2RotaryEmbedding.compute_default_rope_parameters(ref)
    assert_same_freqs(default_inv_freq(ours.rope_theta, ours.head_dim), ref_inv)
    variants = variant_parameters(ours)
    assert len(variants) == 1
    assert_same_freqs(variants[ORIGINAL][0], ref_inv)
    assert variants[ORIGINAL][1] == ref_af == 1.0


@pytest.mark.parametrize("head_dim", [64, 128])
def test_original_variant_of_yarn_config_is_default_rope(head_dim):
    d = qwen2_dict(head_dim)
    ours, _ = both(with_rope(d, "old", "yarn", 1e6, factor=4.0, original_max_position_embeddings=32768))
    _, ref_plain = both(d)
    inv, af = variant_parameters(ours)[ORIGINAL]
    assert_same_freqs(inv, Qwen2RotaryEmbedding.compute_default_rope_parameters(ref_plain)[0])
    assert af == 1.0


# ---------------------------------------------------------------------------------------------------
# 3. cos/sin tables and the rotation against Qwen2RotaryEmbedding + apply_rotary_pos_emb


def _hf_rotate(ref_config, q, k, positions):
    """transformers' rotation of [T, heads, head_dim] q/k at `positions` ([T])."""
    rope = Qwen2RotaryEmbedding(ref_config)
    cos, sin = rope(q, positions[None, :])  # [1, T, head_dim]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return q_hf[0].transpose(0, 1), k_hf[0].transpose(0, 1), cos[0], sin[0]


def _ours_rotate(rope, variants, q, k, positions, dtype=torch.float32):
    cos, sin = rope.lookup(variants, positions, dtype)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), cos, sin


YARN_SMALL = dict(factor=4.0, original_max_position_embeddings=2048)


@pytest.fixture(scope="module", params=[64, 128], ids=["d64", "d128"])
def yarn_pair(request):
    """(ours, transformers' YaRN config, transformers' config without scaling) for one head_dim."""
    d = qwen2_dict(request.param, max_position_embeddings=2048)
    ours, ref_yarn = both(with_rope(d, "new", "yarn", 1e6, **YARN_SMALL))
    _, ref_plain = both(d)
    return ours, ref_yarn, ref_plain


def _random_qk(ours, T, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, ours.num_attention_heads, ours.head_dim, generator=g)
    k = torch.randn(T, ours.num_key_value_heads, ours.head_dim, generator=g)
    positions = torch.randint(0, ours.max_model_len, (T,), generator=g)
    positions[:3] = torch.tensor([0, 1, ours.max_model_len - 1])  # the edges too
    return q, k, positions


@pytest.mark.parametrize("variant", [SCALED, ORIGINAL], ids=["scaled", "original"])
def test_rotary_matches_transformers(yarn_pair, variant):
    ours, ref_yarn, ref_plain = yarn_pair
    rope = RotaryEmbedding(ours)
    assert rope.num_variants == 2
    assert rope.cos.shape == (2, ours.max_model_len, ours.head_dim // 2) == (2, 8192, ours.head_dim // 2)
    q, k, positions = _random_qk(ours, 97, seed=variant)
    ref = ref_yarn if variant == SCALED else ref_plain
    q_ref, k_ref, cos_ref, sin_ref = _hf_rotate(ref, q, k, positions)
    variants = torch.full_like(positions, variant)
    q_out, k_out, cos, sin = _ours_rotate(rope, variants, q, k, positions)

    # Tables: ours hold one half; transformers repeats it ([freqs, freqs]).
    half = ours.head_dim // 2
    assert cos.shape == sin.shape == (97, 1, half)
    assert torch.allclose(cos[:, 0], cos_ref[:, :half], rtol=0, atol=1e-6)
    assert torch.allclose(sin[:, 0], sin_ref[:, :half], rtol=0, atol=1e-6)
    assert torch.equal(cos_ref[:, :half], cos_ref[:, half:])
    # Rotated q/k.
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert (q_out - q_ref).abs().max().item() <= 1e-6
    assert (k_out - k_ref).abs().max().item() <= 1e-6


def test_scaled_and_original_really_differ(yarn_pair):
    """Guard against a vacuous pass: YaRN and plain RoPE give different rotations far from 0."""
    ours, _, _ = yarn_pair
    rope = RotaryEmbedding(ours)
    positions = torch.tensor([1000, 5000])
    a = rope.lookup(torch.full_like(positions, ORIGINAL), positions, torch.float32)[0]
    b = rope.lookup(torch.full_like(positions, SCALED), positions, torch.float32)[0]
    assert (a - b).abs().max() > 0.1


def test_rotary_bf16_tables_match_transformers(yarn_pair):
    """In bf16 the tables are the float32 ones rounded once, as transformers does."""
    ours, ref_yarn, _ = yarn_pair
    rope = RotaryEmbedding(ours)
    _, _, positions = _random_qk(ours, 64, seed=3)
    x = torch.zeros(1, dtype=torch.bfloat16)
    cos_ref, sin_ref = Qwen2RotaryEmbedding(ref_yarn)(x, positions[None, :])
    cos, sin = rope.lookup(torch.full_like(positions, SCALED), positions, torch.bfloat16)
    half = ours.head_dim // 2
    assert cos.dtype == torch.bfloat16
    assert torch.equal(cos[:, 0], cos_ref[0, :, :half])
    assert torch.equal(sin[:, 0], sin_ref[0, :, :half])


def test_one_lookup_mixes_variants_per_token(yarn_pair):
    ours, ref_yarn, ref_plain = yarn_pair
    rope = RotaryEmbedding(ours)
    T = 120
    q, k, positions = _random_qk(ours, T, seed=11)
    g = torch.Generator().manual_seed(12)
    variants = torch.randint(0, 2, (T,), generator=g)
    variants[:2] = torch.tensor([ORIGINAL, SCALED])
    q_mix, k_mix, cos_mix, sin_mix = _ours_rotate(rope, variants, q, k, positions)

    q_y, k_y, _, _ = _hf_rotate(ref_yarn, q, k, positions)
    q_p, k_p, _, _ = _hf_rotate(ref_plain, q, k, positions)
    scaled = (variants == SCALED)[:, None, None]
    assert (q_mix - torch.where(scaled, q_y, q_p)).abs().max().item() <= 1e-6
    assert (k_mix - torch.where(scaled, k_y, k_p)).abs().max().item() <= 1e-6

    # And exactly what single-variant lookups give each token.
    for v in (ORIGINAL, SCALED):
        cos_v, sin_v = rope.lookup(torch.full_like(positions, v), positions, torch.float32)
        sel = variants == v
        assert torch.equal(cos_mix[sel], cos_v[sel])
        assert torch.equal(sin_mix[sel], sin_v[sel])


def test_rotary_table_without_scaling_has_one_variant():
    ours, ref = both(qwen2_dict(64, max_position_embeddings=4096))
    rope = RotaryEmbedding(ours)
    assert rope.num_variants == 1
    assert rope.cos.shape == (1, 4096, 32)
    q, k, positions = _random_qk(ours, 50, seed=5)
    q_ref, k_ref, _, _ = _hf_rotate(ref, q, k, positions)
    q_out, k_out, _, _ = _ours_rotate(rope, torch.full_like(positions, ORIGINAL), q, k, positions)
    assert (q_out - q_ref).abs().max().item() <= 1e-6
    assert (k_out - k_ref).abs().max().item() <= 1e-6


def test_rotary_linear_matches_transformers():
    d = qwen2_dict(128, max_position_embeddings=4096)
    ours, ref = both(with_rope(d, "old", "linear", 1e6, factor=4.0))
    rope = RotaryEmbedding(ours)
    q, k, positions = _random_qk(ours, 50, seed=6)
    q_ref, k_ref, _, _ = _hf_rotate(ref, q, k, positions)
    q_out, k_out, _, _ = _ours_rotate(rope, torch.full_like(positions, SCALED), q, k, positions)
    assert (q_out - q_ref).abs().max().item() <= 1e-6
    assert (k_out - k_ref).abs().max().item() <= 1e-6


# ---------------------------------------------------------------------------------------------------
# 4. max_model_len


@pytest.mark.parametrize("spelling", ["old", "new"])
def test_max_model_len_qwen_documented_yarn(spelling):
    """Qwen2-7B/72B-Instruct README: factor 4 over the original 32,768 window."""
    d = with_rope(qwen2_dict(128, max_position_embeddings=32768), spelling, "yarn", 1e6, factor=4.0,
                  original_max_position_embeddings=32768)
    ours = Qwen2Config.from_dict(d)
    assert ours.max_model_len == 131072
    rope = RotaryEmbedding(ours, max_len=16)  # the full 131,072-row table is not needed here
    assert rope.cos.shape == (2, 16, 64)


@pytest.mark.parametrize("mpe", [32768, 131072, 4096])
def test_max_model_len_without_scaling_is_max_position_embeddings(mpe):
    assert Qwen2Config.from_dict(qwen2_dict(64, max_position_embeddings=mpe)).max_model_len == mpe


def test_max_model_len_linear_is_max_position_embeddings():
    d = with_rope(qwen2_dict(64, max_position_embeddings=8192), "new", "linear", 1e6, factor=4.0)
    assert Qwen2Config.from_dict(d).max_model_len == 8192


def test_max_model_len_yarn_never_below_max_position_embeddings():
    d = with_rope(qwen2_dict(64, max_position_embeddings=32768), "new", "yarn", 1e6, factor=4.0,
                  original_max_position_embeddings=2048)
    assert Qwen2Config.from_dict(d).max_model_len == 32768
    d = with_rope(qwen2_dict(64, max_position_embeddings=2048), "old", "yarn", 1e6, factor=2.5,
                  original_max_position_embeddings=2048)
    assert Qwen2Config.from_dict(d).max_model_len == 5120


# ---------------------------------------------------------------------------------------------------
# 5. Config reading


def test_head_dim_derived_and_explicit():
    ours, ref = both(qwen2_dict(64))
    assert ours.head_dim == 64 == 896 // 14
    assert getattr(ref, "head_dim", None) in (None, 64)

    ours, ref = both(qwen2_dict(64, head_dim=128))
    assert ours.head_dim == 128 == ref.head_dim

    ours, _ = both(qwen2_dict(128, head_dim=None))
    assert ours.head_dim == 128


def test_kv_heads_null_means_heads():
    ours, ref = both(qwen2_dict(64, num_key_value_heads=None))
    assert ours.num_key_value_heads == ref.num_key_value_heads == 14


def test_kv_heads_missing_means_heads():
    """A missing key also gives multi-head attention. (transformers' Qwen2Config would take its class
    default of 32 here, meaningless for a 14-head model; published Qwen2 configs always carry the key.)"""
    d = qwen2_dict(64)
    del d["num_key_value_heads"]
    assert Qwen2Config.from_dict(d).num_key_value_heads == 14


@pytest.mark.parametrize("value", [True, False, None])
def test_tie_word_embeddings(value):
    d = qwen2_dict(64)
    if value is None:
        del d["tie_word_embeddings"]
    else:
        d["tie_word_embeddings"] = value
    ours, ref = both(d)
    assert ours.tie_word_embeddings is ref.tie_word_embeddings is bool(value)


@pytest.mark.parametrize("keys,expected", [
    ({"torch_dtype": "bfloat16"}, torch.bfloat16),
    ({"dtype": "bfloat16"}, torch.bfloat16),
    ({"torch_dtype": "float16"}, torch.float16),
    ({"dtype": "float32"}, torch.float32),
    ({"dtype": "float16", "torch_dtype": "bfloat16"}, torch.float16),  # new spelling wins, as in transformers
    ({}, torch.float32),
])
def test_dtype_spellings(keys, expected):
    d = qwen2_dict(64)
    del d["torch_dtype"]
    d.update(keys)
    ours, ref = both(d)
    assert ours.dtype == expected
    if keys:
        assert ref.dtype == expected


@pytest.mark.parametrize("eos,expected", [(151645, (151645,)), ([151645, 151643], (151645, 151643)),
                                          (0, (0,)), (None, ())])
def test_eos_token_ids(eos, expected):
    d = qwen2_dict(64, eos_token_id=eos)
    if eos is None:
        del d["eos_token_id"]
    ours = Qwen2Config.from_dict(d)
    assert ours.eos_token_ids == expected
    assert isinstance(ours.eos_token_ids, tuple)


def _hf_windows(ref):
    return tuple(ref.sliding_window if t == "sliding_attention" else None for t in ref.layer_types)


S, F = "sliding_attention", "full_attention"
SLIDING_CASES = {
    "off": dict(use_sliding_window=False, sliding_window=4096, max_window_layers=2),
    "off-missing-keys": dict(),
    "from-layer-2": dict(use_sliding_window=True, sliding_window=4096, max_window_layers=2),
    "all-layers": dict(use_sliding_window=True, sliding_window=512, max_window_layers=0),
    "none-at-max": dict(use_sliding_window=True, sliding_window=4096, max_window_layers=6),
    "none-past-max": dict(use_sliding_window=True, sliding_window=4096, max_window_layers=9),
    "window-null": dict(use_sliding_window=True, sliding_window=None, max_window_layers=1),
    "layer-types": dict(use_sliding_window=True, sliding_window=1024, max_window_layers=6,
                        layer_types=[F, S, F, S, S, F]),
    "layer-types-win-over-max": dict(use_sliding_window=True, sliding_window=1024, max_window_layers=0,
                                     layer_types=[F, F, F, F, F, S]),
    "layer-types-but-off": dict(use_sliding_window=False, sliding_window=1024, layer_types=[S] * 6),
}


@pytest.mark.parametrize("case", list(SLIDING_CASES))
def test_sliding_windows_match_transformers(case):
    d = qwen2_dict(64, layers=6)
    del d["use_sliding_window"], d["sliding_window"], d["max_window_layers"]
    d.update(SLIDING_CASES[case])
    ours, ref = both(d)
    assert len(ours.sliding_windows) == 6
    assert ours.sliding_windows == _hf_windows(ref)


def test_sliding_windows_nontrivial():
    ours = Qwen2Config.from_dict(qwen2_dict(64, layers=6, **SLIDING_CASES["from-layer-2"]))
    assert ours.sliding_windows == (None, None, 4096, 4096, 4096, 4096)
    ours = Qwen2Config.from_dict(qwen2_dict(64, layers=6, **SLIDING_CASES["layer-types"]))
    assert ours.sliding_windows == (None, 1024, None, 1024, 1024, None)


def test_sliding_windows_default_max_window_layers_matches_transformers():
    d = qwen2_dict(64, layers=32, use_sliding_window=True, sliding_window=4096)
    del d["max_window_layers"]
    ours, ref = both(d)
    assert _hf_windows(ref) == (None,) * 28 + (4096,) * 4
    assert ours.sliding_windows == _hf_windows(ref)


def test_sliding_windows_default_window_matches_transformers():
    d = qwen2_dict(64, layers=6, use_sliding_window=True, max_window_layers=2)
    del d["sliding_window"]
    ours, ref = both(d)
    assert _hf_windows(ref) == (None, None) + (4096,) * 4
    assert ours.sliding_windows == _hf_windows(ref)


def test_layer_types_wrong_length_is_refused():
    d = qwen2_dict(64, layers=6, use_sliding_window=True, layer_types=[F] * 5)
    with pytest.raises(ValueError, match=r"layer_types has 5 entries but num_hidden_layers=6"):
        Qwen2Config.from_dict(d)


@pytest.mark.parametrize("spelling", ["old", "new"])
@pytest.mark.parametrize("rope_type", ["dynamic", "longrope", "llama3", "su", "nonsense"])
def test_unsupported_rope_type_is_refused(spelling, rope_type):
    d = with_rope(qwen2_dict(64), spelling, rope_type, 1e6, factor=2.0)
    with pytest.raises(ValueError, match=repr(rope_type)):
        Qwen2Config.from_dict(d)


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
@pytest.mark.parametrize("name", ["float8_e4m3fn", "int8", "bf16"])
def test_unknown_dtype_is_refused(key, name):
    d = qwen2_dict(64)
    del d["torch_dtype"]
    d[key] = name
    with pytest.raises(ValueError, match=repr(name)):
        Qwen2Config.from_dict(d)


def test_from_pretrained_reads_config_json(tmp_path):
    import json

    d = with_rope(qwen2_dict(128), "old", "yarn", 1e6, factor=4.0, original_max_position_embeddings=32768)
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert Qwen2Config.from_pretrained(tmp_path) == Qwen2Config.from_dict(d)
    with pytest.raises(FileNotFoundError, match="config.json"):
        Qwen2Config.from_pretrained(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------
# 6. check_layout


def layout_config(hidden, inter, layers, heads, kv, vocab, tied) -> Qwen2Config:
    return Qwen2Config.from_dict(dict(
        qwen2_dict(64), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied,
        max_window_layers=layers))


# docs/architecture.md's table of the published configs: hidden, intermediate, layers, heads, KV heads, vocab, tied.
QWEN2_05B = (896, 4864, 24, 14, 2, 151936, True)
QWEN2_15B = (1536, 8960, 28, 12, 2, 151936, True)
QWEN2_7B = (3584, 18944, 28, 28, 4, 152064, False)
QWEN2_72B = (8192, 29568, 80, 64, 8, 152064, False)
NAMES = {QWEN2_05B: "0.5B", QWEN2_15B: "1.5B", QWEN2_7B: "7B", QWEN2_72B: "72B"}


def test_heads_not_divisible_by_tp():
    cfg = layout_config(*QWEN2_05B)
    with pytest.raises(ValueError) as e:
        cfg.check_layout(4, 1)
    assert "num_attention_heads=14" in str(e.value)
    assert "tensor_parallel_size=4" in str(e.value)


@pytest.mark.parametrize("tp,kv_per_rank", [
    (1, [[0, 1, 2]]),
    (2, [[0, 0, 0, 0, 1, 1], [1, 1, 2, 2, 2, 2]]),  # straddling unevenly: one KV copy per query head
    (3, [[0], [1], [2]]),  # split
    (4, [[0], [0, 1, 1], [1, 1, 2], [2]]),
    (6, [[0], [0], [1], [1], [2], [2]]),  # replicated on 2 ranks each
    (12, [[r // 4] for r in range(12)]),
])
def test_local_kv_heads(tp, kv_per_rank):
    """12 query heads over 3 KV heads: which KV heads each TP rank holds."""
    from shards.layers import local_kv_heads
    from shards.parallel import ParallelGroups

    got = [local_kv_heads(12, 3, ParallelGroups(tp_rank=r, tp_size=tp)) for r in range(tp)]
    assert got == kv_per_rank
    layout_config(1536, 8960, 28, 12, 3, 151936, False).check_layout(tp, 1)


def test_more_stages_than_layers():
    cfg = layout_config(896, 4864, 4, 14, 2, 151936, True)
    with pytest.raises(ValueError) as e:
        cfg.check_layout(1, 5)
    assert "pipeline_parallel_size=5" in str(e.value)
    assert "num_hidden_layers=4" in str(e.value)
    cfg.check_layout(1, 4)  # one layer per stage is fine


@pytest.mark.parametrize("tp,pp", [(0, 1), (1, 0), (-2, 1)])
def test_non_positive_sizes(tp, pp):
    with pytest.raises(ValueError, match="must be >= 1"):
        layout_config(*QWEN2_05B).check_layout(tp, pp)


@pytest.mark.parametrize("model,tp,pp", [
    (QWEN2_05B, 1, 1), (QWEN2_05B, 2, 1), (QWEN2_05B, 2, 3),
    # 4,864 / 14 is not an integer: the MLP is split unevenly (layers.split), which check_layout allows.
    (QWEN2_05B, 14, 1), (QWEN2_05B, 14, 2),
    (QWEN2_15B, 1, 1), (QWEN2_15B, 2, 1), (QWEN2_15B, 4, 1), (QWEN2_15B, 6, 1), (QWEN2_15B, 12, 1),
    (QWEN2_7B, 1, 1), (QWEN2_7B, 2, 1), (QWEN2_7B, 4, 2),
    (QWEN2_72B, 8, 1), (QWEN2_72B, 8, 2), (QWEN2_72B, 16, 1), (QWEN2_72B, 16, 2),
], ids=lambda v: NAMES[v] if isinstance(v, tuple) else str(v))
def test_valid_real_layouts_pass(model, tp, pp):
    layout_config(*model).check_layout(tp, pp)


# docs/architecture.md lists these: a rank's query heads straddle two KV heads, so it keeps one KV head per query head.
@pytest.mark.parametrize("model,tp", [(QWEN2_05B, 7), (QWEN2_15B, 3), (QWEN2_7B, 7)],
                         ids=["0.5B-tp7", "1.5B-tp3", "7B-tp7"])
def test_design_table_layouts_with_kv_heads_not_dividing_tp(model, tp):
    layout_config(*model).check_layout(tp, 1)
