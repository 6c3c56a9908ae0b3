"""Qwen2 model configuration read from a Hugging Face `config.json`, and the parallel layout checks."""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The Qwen2 classes a checkpoint's `architectures` may name -> the tasks it serves. Every one serves embeddings
# (the final norm's hidden states, pooled); each head class serves its own task; only the causal LM generates.
TASKS = {
    "Qwen2ForCausalLM": ("generate", "embed"),
    "Qwen2ForSequenceClassification": ("classify", "embed"),
    "Qwen2ForTokenClassification": ("token_classify", "embed"),
    "Qwen2ForQuestionAnswering": ("qa", "embed"),
    "Qwen2Model": ("embed",),
}


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE scaling entry (`rope_scaling` in old configs, `rope_parameters` in new ones)."""

    rope_type: str  # "yarn", "linear"
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    # Per layer: None for full attention, else the window (keys with q_pos - k_pos < window are seen).
    sliding_windows: tuple[int | None, ...] = ()
    dtype: torch.dtype = torch.float32
    eos_token_ids: tuple[int, ...] = ()  # config.json's, plus generation_config.json's (from_pretrained)
    architecture: str = "Qwen2ForCausalLM"  # one of TASKS
    num_labels: int = 2  # the classification heads' outputs
    pad_token_id: int | None = None  # sequence classification pools the last token that is not this one
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def max_model_len(self) -> int:
        """Longest sequence the positions support: the original window times the YaRN factor."""
        if self.rope_scaling and self.rope_scaling.rope_type == "yarn":
            scaled = int(self.rope_scaling.original_max_position_embeddings * self.rope_scaling.factor)
            return max(scaled, self.max_position_embeddings)
        return self.max_position_embeddings

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS[self.architecture]

    @property
    def base_prefix(self) -> str:
        """Where the decoder's tensors sit in the checkpoint (each class's base_model_prefix in transformers)."""
        return {"Qwen2ForQuestionAnswering": "transformer.", "Qwen2Model": ""}.get(self.architecture, "model.")

    @property
    def labels(self) -> list[str]:
        """The classification heads' label names by index (id2label; transformers' LABEL_i where absent)."""
        id2label = self.raw.get("id2label") or {}
        return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(self.num_labels)]

    @classmethod
    def from_dict(cls, cfg: dict) -> "Qwen2Config":
        heads = cfg["num_attention_heads"]
        layers = cfg["num_hidden_layers"]
        theta, scaling = _read_rope(cfg)
        dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        architecture = (cfg.get("architectures") or ["Qwen2ForCausalLM"])[0]
        if architecture not in TASKS:
            raise ValueError(f"architecture {architecture!r} is not supported (supported: {', '.join(TASKS)})")
        if dtype_name not in DTYPES:
            raise ValueError(f"config dtype {dtype_name!r} is not one of {sorted(DTYPES)}")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            sliding_windows=_read_sliding_windows(cfg, layers),
            dtype=DTYPES[dtype_name],
            eos_token_ids=_ids(cfg.get("eos_token_id")),
            architecture=architecture,
            num_labels=cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2,
            pad_token_id=cfg.get("pad_token_id"),
            raw=cfg,
        )

    @classmethod
    def from_pretrained(cls, model_dir) -> "Qwen2Config":
        """config.json, with the end-of-sequence ids of generation_config.json joined to its own: the one
        source of EOS ids for everything that stops a generation."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a Qwen2 checkpoint directory needs config.json")
        config = cls.from_dict(json.loads(path.read_text()))
        generation = Path(model_dir) / "generation_config.json"
        if not generation.is_file():
            return config
        extra = _ids(json.loads(generation.read_text()).get("eos_token_id"))
        return dataclasses.replace(config, eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + extra)))

    def check_layout(self, tp_size: int, pp_size: int) -> None:
        """Refuse splits that cannot shard this model, naming the numbers involved."""
        if tp_size < 1 or pp_size < 1:
            raise ValueError(f"tensor_parallel_size={tp_size} and pipeline_parallel_size={pp_size} must be >= 1")
        if self.num_attention_heads % tp_size:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by tensor_parallel_size={tp_size}"
            )
        # Any KV head count works (layers.local_kv_heads replicates KV heads as the split needs), and the
        # MLP may split unevenly; the attention heads are the one thing that must divide.
        if pp_size > self.num_hidden_layers:
            raise ValueError(
                f"pipeline_parallel_size={pp_size} exceeds num_hidden_layers={self.num_hidden_layers}"
            )


def _ids(value) -> tuple[int, ...]:
    """An `eos_token_id` field: one id, a list of them, or absent."""
    return tuple(value if isinstance(value, list) else [] if value is None else [value])


def _read_rope(cfg: dict) -> tuple[float, RopeScaling | None]:
    """Both spellings: old (`rope_theta` + `rope_scaling` with `type`) and new (`rope_parameters` with `rope_type`)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ("yarn", "linear"):
        raise ValueError(f"rope type {rope_type!r} is not supported (supported: default, yarn, linear)")
    original = params.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 32768))
    factor = params.get("factor")
    if factor is None:  # transformers derives it from the two windows for YaRN
        factor = cfg["max_position_embeddings"] / original
    optional = {k: params[k] for k in ("attention_factor", "mscale", "mscale_all_dim", "truncate") if k in params}
    # transformers treats a missing or zero beta as its default (`or 32`, `or 1`).
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        **optional,
    )


def _read_sliding_windows(cfg: dict, layers: int) -> tuple[int | None, ...]:
    """Per-layer window, as transformers derives it: `layer_types` if given, else layers >= max_window_layers
    (with transformers' Qwen2 defaults: sliding_window 4096, max_window_layers 28)."""
    window = cfg.get("sliding_window", 4096) if cfg.get("use_sliding_window", False) else None
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        first = cfg.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if window and i >= first else "full_attention" for i in range(layers)]
    if len(layer_types) != layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries but num_hidden_layers={layers}")
    return tuple(window if t == "sliding_attention" else None for t in layer_types)
