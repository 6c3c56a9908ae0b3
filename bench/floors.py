"""This machine's limits, measured in the run, and the step times they allow (docs/performance.md, "The limits").

A decode step must at least stream every weight matrix once (and each sequence's KV cache) and do its
multiply-adds; whichever takes longer at the measured rates is the floor. A prefill is compute-bound.
Only matrices count: norms, biases and the embedding lookup are a rounding error at these sizes.
"""

import time

import torch

from shards.config import DTYPES


def best_seconds(fn, repeats: int) -> float:
    """Fastest of `repeats` runs: on a shared machine the minimum is the least disturbed."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
    return best


def matmul_rate(n: int = 4096, repeats: int = 3) -> float:
    """float32 FLOP/s of one large square `torch.mm` on this process's threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_seconds(lambda: torch.mm(a, b), repeats)


def bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a tensor copy far larger than the caches, counting bytes read + written."""
    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / best_seconds(lambda: dst.copy_(src), repeats)


def bytes_per_weight(config: dict, itemsize: int) -> float:
    """What one decoder linear weight takes as a rank holds it: `itemsize`, or in the config's
    quantization_config 4 (or 8) bits plus its share of the group's float16 scale and packed zero point (GPTQ,
    AWQ), or of its block's float32 absmax (bitsandbytes NF4, blocks of 64)."""
    qc = config.get("quantization_config")
    if not qc:
        return itemsize
    if qc["quant_method"] == "bitsandbytes":
        return 0.5 + 4 / 64
    bits, group = qc["bits"], qc["group_size"] if qc["group_size"] > 0 else config["hidden_size"]
    return bits / 8 + (2 + bits / 8) / group


class ModelCost:
    """Bytes and FLOPs of the Qwen2 in a config.json dict (the LM head in the checkpoint's dtype, the decoder's
    linears as its quantization_config holds them)."""

    def __init__(self, config: dict):
        h, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
        self.head_dim = config.get("head_dim") or h // heads
        self.layers, self.heads, self.kv_heads = config["num_hidden_layers"], heads, kv_heads
        q, kv = heads * self.head_dim, kv_heads * self.head_dim
        layer = h * q + 2 * h * kv + q * h + 3 * h * config["intermediate_size"]
        self.body_params = self.layers * layer
        self.head_params = config["vocab_size"] * h
        self.itemsize = torch.empty((), dtype=DTYPES[config.get("torch_dtype", "float32")]).element_size()
        self.body_bytes = round(self.body_params * bytes_per_weight(config, self.itemsize))

    @property
    def weight_bytes(self) -> int:
        """Weight matrices one decode step reads (every layer and the LM head)."""
        return self.body_bytes + self.head_params * self.itemsize

    def attention_flops(self, queries: int, context: int) -> int:
        """Scores and weighted sum for `queries` tokens each attending to `context` tokens."""
        return 4 * self.layers * self.heads * self.head_dim * queries * context

    def decode_floor(self, batch: int, context: int, flop_rate: float, byte_rate: float) -> dict:
        """One step decoding `batch` sequences of `context` tokens each."""
        kv_bytes = batch * context * self.layers * 2 * self.kv_heads * self.head_dim * self.itemsize
        flops = 2 * batch * (self.body_params + self.head_params) + batch * self.attention_flops(1, context)
        memory_s, compute_s = (self.weight_bytes + kv_bytes) / byte_rate, flops / flop_rate
        return {"batch": batch, "context": context, "bytes": self.weight_bytes + kv_bytes, "flops": flops,
                "memory_s": memory_s, "compute_s": compute_s, "floor_s": max(memory_s, compute_s),
                "bound": "memory" if memory_s >= compute_s else "compute"}

    def prefill_floor(self, tokens: int, flop_rate: float) -> dict:
        """One `tokens`-long prompt: every token through the body, causal attention, one row of logits."""
        flops = 2 * tokens * self.body_params + self.attention_flops(tokens, (tokens + 1) // 2) + 2 * self.head_params
        return {"tokens": tokens, "flops": flops, "floor_s": flops / flop_rate}


def measure(quick: bool = False) -> dict:
    """The machine's rates on this process's threads (smaller and fewer runs with `quick`)."""
    return {"threads": torch.get_num_threads(),
            "matmul_flops": matmul_rate(1024 if quick else 4096),
            "bandwidth_bytes": bandwidth(64 if quick else 512)}
