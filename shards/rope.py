"""Rotary position embeddings: default RoPE, YaRN and linear scaling, several variants in one table.

Every variant's cos/sin table is built once; a token looks up its row by (variant id, position), so one
batch can mix sequences that use the original RoPE with sequences that use YaRN. The numbers are those
of transformers' `_compute_default_rope_parameters` / `_compute_yarn_parameters`.
"""

import math

import torch

from shards.config import Qwen2Config, RopeScaling

ORIGINAL = 0  # variant id of plain RoPE; the config's scaling (if any) is variant 1
SCALED = 1


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def yarn_parameters(theta: float, dim: int, s: RopeScaling) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies and attention factor (mscale), as transformers computes them."""

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim)
        else:
            attention_factor = mscale(s.factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp

    pos_freqs = theta ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (s.factor * pos_freqs)
    inv_freq = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    return inv_freq, float(attention_factor)


def variant_parameters(config: Qwen2Config) -> list[tuple[torch.Tensor, float]]:
    """(inv_freq, attention factor) per variant: ORIGINAL, then SCALED when the config asks for scaling."""
    dim, theta, s = config.head_dim, config.rope_theta, config.rope_scaling
    variants = [(default_inv_freq(theta, dim), 1.0)]
    if s is not None and s.rope_type == "yarn":
        variants.append(yarn_parameters(theta, dim, s))
    elif s is not None and s.rope_type == "linear":
        variants.append((default_inv_freq(theta, dim) / s.factor, 1.0))
    return variants


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables of shape [variants, max_len, head_dim // 2], attention factor folded in."""

    def __init__(self, config: Qwen2Config, max_len: int | None = None, device=None):
        super().__init__()
        max_len = max_len or config.max_model_len
        positions = torch.arange(max_len, dtype=torch.int64).float()
        cos, sin = [], []
        for inv_freq, attention_factor in variant_parameters(config):
            freqs = positions[:, None] * inv_freq[None, :]
            cos.append(freqs.cos() * attention_factor)
            sin.append(freqs.sin() * attention_factor)
        self.register_buffer("cos", torch.stack(cos).to(device), persistent=False)
        self.register_buffer("sin", torch.stack(sin).to(device), persistent=False)

    @property
    def num_variants(self) -> int:
        return self.cos.shape[0]

    def lookup(self, variants: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
        """Per-token cos/sin, [T, 1, head_dim // 2], for `apply_rotary`."""
        return self.cos[variants, positions, None].to(dtype), self.sin[variants, positions, None].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, heads, head_dim] by the half-split convention of transformers' `rotate_half`."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
