"""Qwen2 as one pipeline stage of one tensor-parallel rank: the layers it owns, over a paged KV cache.

The first stage embeds token ids, middle stages map hidden states to hidden states, the last stage applies
the final norm and the head of the checkpoint's class: the (vocab-parallel) LM head, or a small classification
or QA head replicated on each TP rank, or none (Qwen2Model). With one stage and one rank this is the whole model.
"""

import torch
from torch import nn

from shards.attention import load_backend, write_kv
from shards.batch import StepBatch
from shards.config import Qwen2Config
from shards.fused import Ops, load_ops
from shards.layers import (
    ReplicatedLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    local_kv_heads,
    merged_column_parallel,
    qkv_parallel,
)
from shards.parallel import ParallelGroups
from shards.quant import QuantConfig, linear_method
from shards.rope import RotaryEmbedding


# The pooling heads: checkpoint module name, outputs (None: num_labels) and bias, per class.
HEADS = {
    "Qwen2ForSequenceClassification": ("score", None, False),
    "Qwen2ForTokenClassification": ("score", None, True),
    "Qwen2ForQuestionAnswering": ("qa_outputs", 2, True),
}

# Our fused parameters and the checkpoint tensors (with shard ids) they are made of.
FUSED = {
    "self_attn.qkv_proj": [("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v")],
    "mlp.gate_up_proj": [("mlp.gate_proj", 0), ("mlp.up_proj", 1)],
}


def partition_layers(num_layers: int, pp_size: int) -> list[range]:
    """Contiguous layer ranges per stage; the first `num_layers % pp_size` stages get one layer more."""
    base, extra = divmod(num_layers, pp_size)
    bounds = [0]
    for stage in range(pp_size):
        bounds.append(bounds[-1] + base + (stage < extra))
    return [range(bounds[i], bounds[i + 1]) for i in range(pp_size)]


class Attention(nn.Module):
    def __init__(self, config: Qwen2Config, window, groups: ParallelGroups, backend: str, ops: Ops, quant=None):
        super().__init__()
        tp, dt = groups.tp_size, config.dtype
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        local_kv = local_kv_heads(heads, kv_heads, groups)
        self.heads, self.kv_heads = heads // tp, len(local_kv)
        self.head_dim, self.window = config.head_dim, window
        self.scale = config.head_dim**-0.5
        self.attend = load_backend(backend, torch.get_default_device())  # built under `with device`
        self.rotary = ops.rotary
        self.qkv_proj = qkv_parallel(config.hidden_size, heads, local_kv, kv_heads, config.head_dim, groups, dt,
                                     quant)
        self.o_proj = RowParallelLinear(heads * config.head_dim, config.hidden_size, groups, dt, quant)

    def forward(self, x, cos, sin, cache, batch: StepBatch):
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q, k = self.rotary(q.view(-1, self.heads, self.head_dim), k.view(-1, self.kv_heads, self.head_dim), cos, sin)
        write_kv(cache, k, v.view(-1, self.kv_heads, self.head_dim), batch.slot_mapping)
        out = self.attend(q, cache, batch, self.scale, self.window)
        return self.o_proj(out.flatten(1))


class MLP(nn.Module):
    def __init__(self, config: Qwen2Config, groups: ParallelGroups, ops: Ops, quant=None):
        super().__init__()
        hidden, inter, dt = config.hidden_size, config.intermediate_size, config.dtype
        self.silu_and_mul = ops.silu_and_mul
        self.gate_up_proj = merged_column_parallel(hidden, inter, 2, groups, dt, quant)
        self.down_proj = RowParallelLinear(inter, hidden, groups, dt, quant)

    def forward(self, x):
        return self.down_proj(self.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """vLLM's residual style: a layer returns its MLP's output and the residual stream apart, and the next norm
    adds them (fused on CUDA). The same additions as x + attn(norm(x)), then + mlp(norm(...)), bit for bit."""

    def __init__(self, config: Qwen2Config, window, groups: ParallelGroups, backend: str, ops: Ops, quant=None):
        super().__init__()
        hidden, eps, dt = config.hidden_size, config.rms_norm_eps, config.dtype
        self.input_layernorm = RMSNorm(hidden, eps, dt, ops)
        self.self_attn = Attention(config, window, groups, backend, ops, quant)
        self.post_attention_layernorm = RMSNorm(hidden, eps, dt, ops)
        self.mlp = MLP(config, groups, ops, quant)

    def forward(self, x, residual, cos, sin, cache, batch):
        x, residual = self.input_layernorm(x, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(x, cos, sin, cache, batch), residual)
        return self.mlp(x), residual


class Qwen2Stage(nn.Module):
    """`quant` (a shards.quant.QuantConfig) quantizes the decoder layers' linears; embeddings, norms and the
    LM head stay in the compute dtype, as transformers keeps them."""

    def __init__(self, config: Qwen2Config, groups: ParallelGroups, attention_backend: str = "torch",
                 quant: QuantConfig | None = None):
        super().__init__()
        self.config, self.groups = config, groups
        self.layer_range = partition_layers(config.num_hidden_layers, groups.pp_size)[groups.pp_rank]
        vocab, hidden, dt = config.vocab_size, config.hidden_size, config.dtype
        ops = load_ops(torch.get_default_device())  # built under `with device`
        generates = groups.is_last_stage and "generate" in config.tasks
        tied_here = generates and config.tie_word_embeddings and groups.is_first_stage
        if groups.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(vocab, hidden, groups, dt, lm_head=tied_here)
        self.layers = nn.ModuleList(
            DecoderLayer(config, config.sliding_windows[i], groups, attention_backend, ops, linear_method(quant))
            for i in self.layer_range
        )
        self.rotary = RotaryEmbedding(config)
        self.lm_head = self.head = None
        if groups.is_last_stage:
            self.norm = RMSNorm(hidden, config.rms_norm_eps, dt, ops)
            if generates:
                self.lm_head = self.embed_tokens if tied_here else VocabParallelEmbedding(vocab, hidden, groups, dt, True)
            if config.architecture in HEADS:
                name, outputs, bias = HEADS[config.architecture]
                bias = bias and config.raw.get("token_classification_bias", True)
                self.head_name, self.head = name, ReplicatedLinear(hidden, outputs or config.num_labels, bias, dt)

    def forward(self, batch: StepBatch, kv_cache: torch.Tensor, hidden: torch.Tensor | None = None):
        """Hidden states [T, hidden] after this stage's layers (normed on the last stage)."""
        x = self.embed_tokens(batch.input_ids) if self.groups.is_first_stage else hidden
        cos, sin = self.rotary.lookup(batch.rope_variants, batch.positions, x.dtype)
        residual = None
        for layer, cache in zip(self.layers, kv_cache):
            x, residual = layer(x, residual, cos, sin, cache, batch)
        return self.norm(x, residual)[0] if self.groups.is_last_stage else x + residual

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits [rows, vocab] of these hidden rows on the driver rank; None on other ranks (every
        TP rank of the last stage must call it: the vocabulary is gathered)."""
        logits = self.lm_head.logits(hidden)
        return None if logits is None else logits.float()

    def greedy(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(argmax ids, their logits, log-sum-exp) of these rows on the driver rank, None on other ranks, with no
        logits made (VocabParallelEmbedding.greedy; every TP rank of the last stage must call it)."""
        return self.lm_head.greedy(hidden)

    def pool_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 outputs [rows, labels] of the checkpoint's pooling head on these rows (any TP rank: it is
        replicated, no collective)."""
        return self.head(hidden).float()

    def checkpoint_targets(self) -> dict[str, list[tuple[nn.Parameter, object]]]:
        """Checkpoint tensor name -> the (parameter, shard id) pairs it fills on this rank."""
        targets: dict[str, list] = {}

        def add(name, param, shard_id=None):
            targets.setdefault(name, []).append((param, shard_id))

        base = self.config.base_prefix
        if self.groups.is_first_stage:
            add(f"{base}embed_tokens.weight", self.embed_tokens.weight)
        if self.groups.is_last_stage:
            add(f"{base}norm.weight", self.norm.weight)
            if self.lm_head is not None and not self.config.tie_word_embeddings:
                add("lm_head.weight", self.lm_head.weight)
            elif self.lm_head is not None and not self.groups.is_first_stage:
                add(f"{base}embed_tokens.weight", self.lm_head.weight)
            if self.head is not None:
                for kind, param in self.head.named_parameters():
                    add(f"{self.head_name}.{kind}", param)
        for i, layer in zip(self.layer_range, self.layers):
            for local_name, param in layer.named_parameters():
                module, kind = local_name.rsplit(".", 1)
                kind = getattr(param, "checkpoint_name", kind)  # a pre-quantized NF4 weight's "weight.absmax", ...
                for checkpoint_module, shard_id in FUSED.get(module, [(module, None)]):
                    add(f"{base}layers.{i}.{checkpoint_module}.{kind}", param, shard_id)
        return targets
