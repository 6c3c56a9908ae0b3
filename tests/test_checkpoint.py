"""The random checkpoint must be indistinguishable in layout from a published Qwen2 one:
transformers loads it with no missing or unexpected keys, and the real tokenizer works."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from shards.checkpoint import PRESETS, preset_config, write_random_checkpoint

transformers = pytest.importorskip("transformers")

# docs/architecture.md's table of the published configs: hidden, intermediate, layers, heads, KV heads, vocab, tied.
DESIGN_TABLE = {
    "qwen2-0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "qwen2-1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "qwen2-7b": (3584, 18944, 28, 28, 4, 152064, False),
    "qwen2-72b": (8192, 29568, 80, 64, 8, 152064, False),
    "qwen2-7b-instruct-yarn": (3584, 18944, 28, 28, 4, 152064, False),
    "qwen2-72b-instruct-yarn": (8192, 29568, 80, 64, 8, 152064, False),
    "bench-cpu": (512, 1536, 8, 8, 2, 151936, False),
    "tiny": (64, 128, 4, 4, 2, 151936, True),
}
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings")
# Parameters in the published checkpoints' safetensors (tied embeddings counted once).
PUBLISHED_PARAMETERS = {"qwen2-0.5b": 494_032_768, "qwen2-1.5b": 1_543_714_304, "qwen2-7b": 7_615_616_512,
                        "qwen2-72b": 72_706_203_648, "qwen2-7b-instruct-yarn": 7_615_616_512,
                        "qwen2-72b-instruct-yarn": 72_706_203_648}
SMALL_SHARD = 200 * 1024  # one layer of `tiny` is ~140 KB in float32: forces many shards


def qwen2_tensor_shapes(hidden, intermediate, layers, heads, kv_heads, vocab, tied) -> dict:
    """Every tensor of a published Qwen2 checkpoint, by name: its shape (head_dim = hidden / heads)."""
    kv = kv_heads * (hidden // heads)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        layer = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
                 "self_attn.q_proj.weight": (hidden, hidden), "self_attn.q_proj.bias": (hidden,),
                 "self_attn.k_proj.weight": (kv, hidden), "self_attn.k_proj.bias": (kv,),
                 "self_attn.v_proj.weight": (kv, hidden), "self_attn.v_proj.bias": (kv,),
                 "self_attn.o_proj.weight": (hidden, hidden), "mlp.gate_proj.weight": (intermediate, hidden),
                 "mlp.up_proj.weight": (intermediate, hidden), "mlp.down_proj.weight": (hidden, intermediate)}
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    return shapes


def _load_all(d):
    """Every tensor of a checkpoint directory, sharded or not."""
    tensors = {}
    for f in sorted(d.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    calls = []
    write_random_checkpoint(d, preset_config("tiny"), max_shard_bytes=SMALL_SHARD,
                            progress=lambda done, total: calls.append((done, total)))
    return d, calls


def test_sharded_index_is_complete(tiny_dir):
    d, calls = tiny_dir
    shards = sorted(d.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    assert not (d / "model.safetensors").exists()
    assert [s.name for s in shards][-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    tensors = _load_all(d)
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert all(index["weight_map"][k] == shard.name for k in f.keys())
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    assert len(calls) == len(shards) and calls[-1] == (total, total)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_transformers_loads_it_unchanged(tiny_dir):
    d, _ = tiny_dir
    model, info = transformers.Qwen2ForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tensors = _load_all(d)
    assert {name: tuple(t.shape) for name, t in tensors.items()} == qwen2_tensor_shapes(*DESIGN_TABLE["tiny"])
    params = model.state_dict()
    for name, t in tensors.items():
        assert torch.equal(params[name], t), name
    # Tied: no lm_head in the files, and HF shares the embedding.
    assert "lm_head.weight" not in tensors
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # Biases and norms are not at their defaults, so a loader that skips them shows.
    assert tensors["model.layers.0.self_attn.q_proj.bias"].abs().max() > 0
    assert not torch.allclose(tensors["model.norm.weight"], torch.ones(64))
    with torch.no_grad():
        logits = model(torch.tensor([[9707, 1879]])).logits
    assert logits.shape == (1, 2, 151936) and torch.isfinite(logits).all()


def test_tokenizer_and_configs(tiny_dir):
    d, _ = tiny_dir
    tok = transformers.AutoTokenizer.from_pretrained(d)
    assert tok("Hello world").input_ids == [9707, 1879]
    assert tok(" Hello world").input_ids == [21927, 1879]
    assert "chat_template" in json.loads((d / "tokenizer_config.json").read_text())
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (d / name).stat().st_size > 0
    config = transformers.AutoConfig.from_pretrained(d)
    assert config.model_type == "qwen2" and config.dtype == torch.float32
    assert tuple(getattr(config, k) for k in SHAPE_KEYS) == DESIGN_TABLE["tiny"]
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 151643, "eos_token_id": 151643, "do_sample": False}
    assert transformers.GenerationConfig.from_pretrained(d).eos_token_id == 151643


def _small_config(**overrides):
    """`tiny` with a toy vocabulary: fast to write when the real tokenizer isn't exercised."""
    return {**preset_config("tiny"), "vocab_size": 512, "num_hidden_layers": 2, **overrides}


def test_untied_writes_lm_head(tmp_path):
    write_random_checkpoint(tmp_path, _small_config(tie_word_embeddings=False))
    assert (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "model.safetensors.index.json").exists()
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["lm_head.weight"].shape == (512, 64)
    assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    model, info = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"])


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, seed in ((a, 7), (b, 7), (c, 8)):
        write_random_checkpoint(d, _small_config(), seed=seed, max_shard_bytes=64 * 1024)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and len(files) > 8
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ta, tc = _load_all(a), _load_all(c)
    assert ta.keys() == tc.keys()
    assert all(not torch.equal(ta[k], tc[k]) for k in ta)


def test_bfloat16(tmp_path):
    write_random_checkpoint(tmp_path, _small_config(), dtype="bfloat16")
    tensors = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # Same seed, other dtype: the same values, rounded.
    f32 = tmp_path / "f32"
    write_random_checkpoint(f32, _small_config(), dtype="float32")
    ref = load_file(f32 / "model.safetensors")
    assert all(torch.equal(ref[k].bfloat16(), tensors[k]) for k in ref)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes(name):
    preset = preset_config(name)
    assert tuple(preset[k] for k in SHAPE_KEYS) == DESIGN_TABLE[name]
    assert preset["architectures"] == ["Qwen2ForCausalLM"] and preset["model_type"] == "qwen2"
    assert preset["rope_theta"] == 1e6 and preset["rms_norm_eps"] == 1e-6
    assert preset["bos_token_id"] == 151643 and not preset["use_sliding_window"]
    hf = transformers.Qwen2Config(**preset)
    with torch.device("meta"):  # shapes without memory, even at 72B
        model = transformers.Qwen2ForCausalLM(hf)
    params = dict(model.named_parameters())  # a tied LM head is the embedding, listed once
    assert {n: tuple(p.shape) for n, p in params.items()} == qwen2_tensor_shapes(*DESIGN_TABLE[name])
    if name in PUBLISHED_PARAMETERS:
        assert sum(p.numel() for p in params.values()) == PUBLISHED_PARAMETERS[name]
    head_dim = params["model.layers.0.self_attn.k_proj.weight"].shape[0] // preset["num_key_value_heads"]
    assert head_dim == {"qwen2-0.5b": 64, "bench-cpu": 64, "tiny": 16}.get(name, 128)
    if name.endswith("-yarn"):
        assert preset["eos_token_id"] == 151645
        assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 4.0
        assert hf.rope_parameters["original_max_position_embeddings"] == 32768
    else:
        assert preset["eos_token_id"] == 151643 and "rope_scaling" not in preset
        assert hf.rope_parameters["rope_type"] == "default"


def test_max_position_embeddings():
    assert preset_config("qwen2-0.5b")["max_position_embeddings"] == 131072  # as its file says
    for name in ("qwen2-1.5b", "qwen2-7b", "qwen2-72b", "bench-cpu"):
        assert preset_config(name)["max_position_embeddings"] == 32768


def test_instruct_generation_config(tmp_path):
    config = _small_config(eos_token_id=151645, rope_scaling=preset_config("qwen2-7b-instruct-yarn")["rope_scaling"])
    write_random_checkpoint(tmp_path, config)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and gen["do_sample"] is True
    assert (gen["temperature"], gen["top_p"], gen["top_k"], gen["repetition_penalty"]) == (0.7, 0.8, 20, 1.05)
    assert json.loads((tmp_path / "config.json").read_text())["rope_scaling"]["type"] == "yarn"


def test_preset_config_is_a_copy():
    preset = preset_config("qwen2-7b-instruct-yarn")
    preset["rope_scaling"]["factor"] = 8.0
    preset["hidden_size"] = 1
    assert PRESETS["qwen2-7b-instruct-yarn"]["rope_scaling"]["factor"] == 4.0
    assert PRESETS["qwen2-7b-instruct-yarn"]["hidden_size"] == 3584


def test_bad_names_list_valid_ones(tmp_path):
    with pytest.raises(ValueError) as e:
        preset_config("qwen3-8b")
    assert all(name in str(e.value) for name in PRESETS)
    with pytest.raises(ValueError) as e:
        write_random_checkpoint(tmp_path / "x", _small_config(), dtype="int8")
    assert all(d in str(e.value) for d in ("float32", "bfloat16", "float16"))
    assert not (tmp_path / "x").exists()
