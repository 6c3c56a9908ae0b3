"""4-bit weights (shards/quant.py): NF4 against bitsandbytes itself (quantized at load time, and checkpoints
saved pre-quantized by transformers + bitsandbytes or written by init-random in that format), GPTQ and AWQ
unpacking against values packed by hand from each format's definition, and the served quantized model against
transformers' Qwen2 on the same dequantized weights at several TP x PP layouts."""

import json
import os
import subprocess
import sys
import textwrap

import bitsandbytes.functional as bnb
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import BitsAndBytesConfig, Qwen2ForCausalLM

from shards import loader
from shards.checkpoint import preset_config, write_random_checkpoint
from shards.config import Qwen2Config
from shards.model import Qwen2Stage
from shards.parallel import ParallelGroups
from shards.quant import AWQ_ORDER, QuantConfig, dynamic_map, nf4_dequantize, nf4_quantize, pack, unpack
from tests import quant_ranks
from tests.multiproc import run_ranks

TOLERANCE = 1e-4  # float32
# 4 heads over 2 KV heads, MLP 256: every TP size here splits heads, words of 8 and groups of 16 evenly.
CONFIG = dict(vocab_size=1003, tie_word_embeddings=False, num_hidden_layers=3, intermediate_size=256,
              max_position_embeddings=256)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def _bnb_dequantize(state: dict, shape) -> torch.Tensor:
    """Our NF4 state dequantized by bitsandbytes (float32): its blockwise dequantization of the double-quantized
    absmax, and its torch 4-bit dequantization (its CPU C kernel mis-indexes absmax when a row's length is not
    a multiple of the block size: 40 x 96 round-trips with 4x the error)."""
    absmax = state["absmax"]
    if "offset" in state:
        absmax = bnb.dequantize_blockwise(absmax, absmax=state["absmax2"], code=bnb.create_dynamic_map(),
                                          blocksize=256) + state["offset"]
    return _dequantize_4bit_compute(state["weight"], absmax, bnb.get_4bit_type("nf4", device="cpu"), 64, shape,
                                    torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(130, 64), (33, 65), (700, 96)])
def test_nf4_matches_bitsandbytes(shape, dtype):
    """Codes, absmax, offset and the second-level absmax bit for bit; dequantized weights bit for bit
    (bitsandbytes' dequantize_4bit of our state)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype) * 0.02
    for double in (False, True):
        theirs, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=double, quant_type="nf4")
        ours = nf4_quantize(w, double)
        assert torch.equal(ours["weight"], theirs.flatten())
        if not double:
            assert torch.equal(ours["absmax"], state.absmax)
        else:
            assert torch.equal(ours["offset"], state.offset) and torch.equal(ours["absmax2"], state.state2.absmax)
            # The 8-bit absmax codes: ours is always the nearest code (as bitsandbytes' CUDA kernel and torch
            # path choose); its CPU C kernel's approximate search picks the other neighbour for values within
            # 2e-5 of a midpoint. Those are the only differences.
            code = dynamic_map()
            first_level = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")[1].absmax
            scaled = first_level - state.offset
            scaled = scaled / state.state2.absmax.repeat_interleave(256)[: scaled.numel()]
            assert torch.equal((code[None] - scaled[:, None]).abs().argmin(1).to(torch.uint8), ours["absmax"])
            differ = ours["absmax"] != state.absmax
            mid = (code[ours["absmax"][differ].long()] + code[state.absmax[differ].long()]) / 2
            assert ((scaled[differ] - mid).abs() < 2e-5).all() and differ.float().mean() < 0.02
        again = _bnb_dequantize(ours, shape).to(dtype)
        assert torch.equal(nf4_dequantize(ours, shape, dtype), again)


def test_unpacking_matches_values_packed_by_hand():
    """From the formats' definitions: GPTQ puts element j of a word at bits [j*bits, ...), AWQ puts output
    channel [0, 2, 4, 6, 1, 3, 5, 7][j] of its 8 in nibble j."""
    words = torch.tensor([[0x76543210, 0x0FEDCBA9 - 2**32 * 0]], dtype=torch.int64).to(torch.int32)
    assert unpack(words.t(), 4, 0).flatten().tolist() == list(range(8)) + [9, 10, 11, 12, 13, 14, 15, 0]
    assert unpack(torch.tensor([[0x03020100]], dtype=torch.int32), 8, 0).flatten().tolist() == [0, 1, 2, 3]
    awq = torch.tensor([[0x75316420]], dtype=torch.int32)  # channel k holds value k
    assert unpack(awq, 4, 1, AWQ_ORDER).flatten().tolist() == list(range(8))
    negative = torch.tensor([[-1]], dtype=torch.int32)  # all bits set: every value 15
    assert unpack(negative, 4, 1).flatten().tolist() == [15] * 8
    values = torch.randint(0, 16, (64, 24))
    for dim in (0, 1):
        assert torch.equal(unpack(pack(values, 4, dim, AWQ_ORDER), 4, dim, AWQ_ORDER), values)


def _reference_dequantize(tensors: dict, base: str, qc: dict) -> torch.Tensor:
    """[out, in] float32 from a checkpoint's qweight/qzeros/scales(/g_idx), written from the formats'
    definitions with explicit shifts (independent of shards.quant)."""
    bits, mask = qc["bits"], 2 ** qc["bits"] - 1
    per = 32 // bits
    qweight, qzeros, scales = (tensors[base + k].to(torch.int64) & 0xFFFFFFFF for k in ("qweight", "qzeros", "scales"))
    scales = tensors[base + "scales"].float()
    if qc["quant_method"] == "gptq":
        q = torch.stack([(qweight >> (bits * j)) & mask for j in range(per)], 1).reshape(-1, qweight.shape[1])
        zeros = torch.stack([(qzeros >> (bits * j)) & mask for j in range(per)], 2).reshape(qzeros.shape[0], -1) + 1
        g = tensors[base + "g_idx"].long()
    else:
        reverse = [0, 4, 1, 5, 2, 6, 3, 7]  # AutoAWQ's AWQ_REVERSE_ORDER: channel k sits in nibble reverse[k]
        q = torch.stack([(qweight >> (4 * reverse[k])) & mask for k in range(8)], 2).reshape(qweight.shape[0], -1)
        zeros = torch.stack([(qzeros >> (4 * reverse[k])) & mask for k in range(8)], 2).reshape(qzeros.shape[0], -1)
        g = torch.arange(q.shape[0]) // qc["group_size"]
    return ((q - zeros[g]) * scales[g]).t().contiguous()


def _dequantized_checkpoint(model_dir, out_dir, dense: dict) -> None:
    """The checkpoint with every quantized linear replaced by `dense[name]` (float32), for transformers."""
    tensors = {}
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    keep = {k: v for k, v in tensors.items() if not set(k.split(".")) & set(LINEARS) or k.endswith(".bias")}
    out_dir.mkdir()
    save_file(keep | dense, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config | {"torch_dtype": "float32"}))


def _nf4_dense(model_dir, tp: int, double: bool) -> dict:
    """Each rank's NF4 slices (as its ShardWorker quantizes them), dequantized by bitsandbytes and put back
    together: what the TP ranks compute with."""
    stages = []
    for r in range(tp):
        stage = Qwen2Stage(Qwen2Config.from_pretrained(model_dir), ParallelGroups(tp_rank=r, tp_size=tp),
                           quant=QuantConfig("bitsandbytes-nf4", double=double))
        loader.load_weights(stage.checkpoint_targets(), model_dir)
        stages.append(stage)
    dense = {}
    for i in range(len(stages[0].layers)):
        for name in LINEARS:
            module = "mlp" if name.endswith("_proj") and name[:-5] in ("gate", "up", "down") else "self_attn"
            fused = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                     "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}.get(name, (name, None))
            parts = []
            for stage in stages:
                [state] = getattr(getattr(stage.layers[i], module), fused[0]).nf4[fused[1]]
                parts.append(_bnb_dequantize(state, state["shape"]))
            dense[f"model.layers.{i}.{module}.{name}.weight"] = torch.cat(parts, 1 if name in ROW_PARALLEL else 0)
    return dense


def _bnb_saved(float_dir, out_dir, double: bool) -> dict:
    """The float checkpoint loaded by transformers with BitsAndBytesConfig(load_in_4bit, nf4) on CPU and saved
    by its save_pretrained (bitsandbytes' pre-quantized format); returns its linears dequantized by
    bitsandbytes (float32)."""
    hf = Qwen2ForCausalLM.from_pretrained(float_dir, dtype=torch.float32, device_map="cpu", quantization_config=(
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double,
                           bnb_4bit_compute_dtype=torch.float32)))
    hf.save_pretrained(out_dir)
    return _hf_nf4_dense(hf)


def _hf_nf4_dense(hf) -> dict:
    return {f"{name}.weight": bnb.dequantize_4bit(m.weight.data, m.weight.quant_state)
            for name, m in hf.named_modules() if name.rsplit(".", 1)[-1] in LINEARS}


CASES = [("nf4", 1, 1), ("nf4-double", 2, 1), ("nf4-saved", 1, 1), ("nf4-saved-double", 2, 1),
         ("gptq-int4", 2, 1), ("gptq-int4", 4, 1), ("gptq-int4", 1, 2), ("gptq-int8", 1, 1),
         ("gptq-int4-desc-act", 2, 1), ("awq", 1, 1), ("awq", 2, 1), ("awq", 1, 2)]


@pytest.mark.parametrize("fmt,tp,pp", CASES)
def test_quantized_logits_match_transformers_on_dequantized_weights(tmp_path, fmt, tp, pp):
    config = preset_config("tiny") | CONFIG
    if fmt.startswith("nf4-saved"):  # pre-quantized by transformers + bitsandbytes (TP 2: o_proj's rows split
        # mid-block, each rank keeping whole blocks)
        float_dir = write_random_checkpoint(tmp_path / "float", config, seed=7)
        model_dir = tmp_path / "model"
        dense = _bnb_saved(float_dir, model_dir, fmt.endswith("double"))
        worker_args = {}
    elif fmt.startswith("nf4"):
        model_dir = write_random_checkpoint(tmp_path / "model", config, seed=7, max_shard_bytes=300_000)
        worker_args = {"quantization": "bitsandbytes-nf4", "quant_double": fmt == "nf4-double"}
        dense = _nf4_dense(model_dir, tp, fmt == "nf4-double")
    else:
        qc = {"group_size": 16} | ({"desc_act": True} if fmt.endswith("desc-act") else {})
        name = fmt.removesuffix("-desc-act")
        model_dir = write_random_checkpoint(tmp_path / "model", config | {"quantization_config": qc}, seed=7,
                                            max_shard_bytes=300_000, quantization=name)
        qc = json.loads((model_dir / "config.json").read_text())["quantization_config"]
        tensors = {}
        for path in model_dir.glob("*.safetensors"):
            with safe_open(path, "pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
        dense = {k[: -len("qweight")] + "weight": _reference_dequantize(tensors, k[: -len("qweight")], qc)
                 for k in tensors if k.endswith(".qweight")}
        worker_args = {}
    _dequantized_checkpoint(model_dir, tmp_path / "dense", dense)
    prompts = [torch.randint(0, 1003, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                              for n in (11, 5, 9)]
    continuations = [torch.randint(0, 1003, (6,), generator=torch.Generator().manual_seed(i)).tolist()
                     for i in range(3)]
    results = run_ranks(quant_ranks.quantized_logits, tp * pp, str(model_dir), tp, pp, prompts, continuations,
                        worker_args)
    ours = results[(pp - 1) * tp]
    reference = Qwen2ForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    worst = 0.0
    for i, (prompt, cont) in enumerate(zip(prompts, continuations)):
        with torch.no_grad():
            expected = reference(torch.tensor([prompt + cont])).logits[0, len(prompt) - 1:]
        assert ours[i].shape == expected.shape
        worst = max(worst, (ours[i] - expected).abs().max().item())
    print(f"{fmt} tp={tp} pp={pp}: max |ours - transformers on dequantized weights| = {worst:.3g}")
    assert worst <= TOLERANCE


def test_nf4_weights_equal_transformers_bitsandbytes_load(tmp_path):
    """transformers' own BitsAndBytesConfig(load_in_4bit, nf4) load on CPU quantizes every linear exactly as our
    TP-1 rank does (dequantized weights bit for bit). Its CPU 4-bit matmul kernel is not float32-exact, so
    the logits are compared at 1e-2."""
    from shards.worker import ShardWorker

    model_dir = write_random_checkpoint(tmp_path, preset_config("tiny") | CONFIG, seed=7)
    dense = _nf4_dense(model_dir, 1, double=False)
    hf = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map="cpu",
                                          quantization_config=BitsAndBytesConfig(
                                              load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_compute_dtype=torch.float32))
    for name, weight in dense.items():
        linear = hf.get_submodule(name.removesuffix(".weight"))
        theirs = bnb.dequantize_4bit(linear.weight.data, linear.weight.quant_state)
        assert torch.equal(theirs, weight), name
    worker = ShardWorker(model_dir, ParallelGroups(), num_kv_blocks=16, block_size=4,
                         quantization="bitsandbytes-nf4")
    from shards.batch import SeqPlan
    from shards.sampling import SamplingParams

    prompt = [5, 9, 100, 7, 3]
    ours, _ = worker.forward([SeqPlan(0, prompt, 0, [0, 1], sampling=SamplingParams())])
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0, -1]
    print(f"nf4 vs transformers' bitsandbytes CPU kernel: {(ours[0] - expected).abs().max().item():.3g}")
    assert (ours[0] - expected).abs().max().item() < 1e-2


def test_our_nf4_checkpoint_loads_in_transformers_and_here_bit_for_bit(tmp_path):
    """`init-random --quantization nf4 [--quant-double]` writes what transformers' save_pretrained writes
    (tensor names, dtypes, shapes, quant_state JSON, quantization_config), so transformers loads it unchanged;
    each linear that bitsandbytes dequantizes from it equals what our TP-1 and TP-2 ranks dequantize, bit for
    bit."""
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps(CONFIG | {"num_hidden_layers": 2}))
    float_dir = write_random_checkpoint(tmp_path / "float", preset_config("tiny") | CONFIG | {"num_hidden_layers": 2})
    for double in (False, True):
        model_dir = tmp_path / f"nf4-{double}"
        subprocess.run([sys.executable, "-m", "router.cli", "init-random", "--preset", "tiny", "--config",
                        str(overrides), "--quantization", "nf4", "--out", str(model_dir), "--max-shard-gib", "0.0002"]
                       + ["--quant-double"] * double, check=True, capture_output=True, timeout=120)
        saved = tmp_path / f"saved-{double}"
        _bnb_saved(float_dir, saved, double)
        with safe_open(saved / "model.safetensors", "pt") as f:
            theirs = {k: (f.get_tensor(k).dtype, f.get_tensor(k).shape) for k in f.keys()}
            state = bytes(f.get_tensor("model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4").tolist())
        ours = {}
        for path in model_dir.glob("*.safetensors"):
            with safe_open(path, "pt") as f:
                ours |= {k: (f.get_tensor(k).dtype, f.get_tensor(k).shape) for k in f.keys()}
                if "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4" in f.keys():
                    our_state = bytes(f.get_slice(
                        "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4")[:].tolist())
        assert ours == theirs
        keys = lambda raw: list(json.loads(raw)) if raw else None  # noqa: E731
        assert keys(our_state) == keys(state)
        qc = lambda d: json.loads((d / "config.json").read_text())["quantization_config"]  # noqa: E731
        assert qc(model_dir) == qc(saved)
        raw = json.loads((model_dir / "config.json").read_text())
        assert QuantConfig.resolve(raw, None).name == "bitsandbytes-nf4" + "-double" * double  # what ModelInfo says
        with pytest.raises(ValueError, match="already quantized"):
            QuantConfig.resolve(raw, "bitsandbytes-nf4")
        dense = _hf_nf4_dense(Qwen2ForCausalLM.from_pretrained(model_dir, device_map="cpu"))
        assert len(dense) == 2 * len(LINEARS)
        for tp in (1, 2):
            stages = [Qwen2Stage(Qwen2Config.from_pretrained(model_dir), ParallelGroups(tp_rank=r, tp_size=tp),
                                 quant=QuantConfig.resolve(json.loads((model_dir / "config.json").read_text()), None))
                      for r in range(tp)]
            for stage in stages:
                loader.load_weights(stage.checkpoint_targets(), model_dir)
            for i in range(2):
                for module, name, parts in (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                                            ("self_attn", "o_proj", ("o_proj",)), ("mlp", "down_proj", ("down_proj",)),
                                            ("mlp", "gate_up_proj", ("gate_proj", "up_proj"))):
                    layers = [getattr(getattr(s.layers[i], module), name) for s in stages]
                    got = [layer.quant.dense(layer, torch.float32) for layer in layers]
                    full = [dense[f"model.layers.{i}.{module}.{p}.weight"] for p in parts]
                    if name in ROW_PARALLEL:
                        assert torch.equal(torch.cat(got, 1), full[0])
                    else:
                        for r in range(tp):
                            assert torch.equal(got[r], torch.cat([w.chunk(tp)[r] for w in full]))


@pytest.mark.parametrize("double", [False, True])
def test_prequantized_nf4_slices_keep_whole_blocks(double):
    """Rows of 40 (not whole blocks of 64): a column-parallel slice of rows [7, 18) starts and ends mid-block and
    keeps the blocks around it; a row-parallel slice of rows of 192 starting at column 96 keeps two blocks of
    each row; both dequantize to exactly bitsandbytes' weight's slice. A row-parallel split of rows of 40
    is refused."""
    from shards.layers import ColumnParallelLinear, RowParallelLinear
    from shards.quant import linear_method

    method = linear_method(QuantConfig("bitsandbytes-nf4", double=double, prequantized=True))

    def fill(layer, w):
        q, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=double, quant_type="nf4")
        parts = {k.removeprefix("weight."): v for k, v in state.as_dict(packed=True).items()} | {"weight": q}
        for param in layer.parameters():
            param.weight_loader(param, parts[param.checkpoint_name.removeprefix("weight.")],
                                "w" if hasattr(layer, "shards") else None)
        return bnb.dequantize_4bit(q, state)

    w = torch.randn(30, 40, generator=torch.Generator().manual_seed(1))
    column = ColumnParallelLinear(40, [("w", 30, [(7, 11)])], bias=False, quant=method)
    full = fill(column, w)
    assert column.nf4["w"][0]["skip"] == 7 * 40 % 64 and torch.equal(method.dense(column, torch.float32), full[7:18])
    w = torch.randn(24, 192, generator=torch.Generator().manual_seed(2))
    row = RowParallelLinear(192, 24, ParallelGroups(tp_rank=1, tp_size=2), quant=method)
    full = fill(row, w)
    assert row.nf4[None][0]["skip"] == 32 and torch.equal(method.dense(row, torch.float32), full[:, 96:])
    row = RowParallelLinear(40, 24, ParallelGroups(tp_rank=1, tp_size=2), quant=method)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2.*\[20, 40\) of 40.*whole blocks of 64"):
        fill(row, torch.randn(24, 40))


def test_a_row_split_inside_a_group_is_refused(tmp_path):
    """MLP 96 in groups of 32 at TP 2: down_proj's 48 input channels a rank would split a group (as Qwen2-72B's
    29,568 at TP 8 would; its quantized checkpoints pad to 29,696)."""
    config = preset_config("tiny") | CONFIG | {"intermediate_size": 96, "quantization_config": {"group_size": 32}}
    model_dir = write_random_checkpoint(tmp_path, config, quantization="gptq-int4")
    stage = Qwen2Stage(Qwen2Config.from_pretrained(model_dir), ParallelGroups(tp_rank=1, tp_size=2),
                       quant=QuantConfig.resolve(json.loads((model_dir / "config.json").read_text()), None))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj\.qweight'.*"
                                         r"tensor_parallel_size=2.*group_size=32"):
        loader.load_weights(stage.checkpoint_targets(), model_dir)


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    from shards import loader
    from shards.config import Qwen2Config
    from shards.model import Qwen2Stage
    from shards.parallel import ParallelGroups
    from shards.quant import QuantConfig

    def anon():
        return int(dict(line.split(":", 1) for line in open("/proc/self/status"))["RssAnon"].split()[0]) * 1024

    base = anon()
    peak = base
    def progress(done, total, read):
        global peak
        peak = max(peak, anon())
    stage = Qwen2Stage(Qwen2Config.from_pretrained(sys.argv[1]), ParallelGroups(),
                       quant=QuantConfig("bitsandbytes-nf4", double=True))
    read = loader.load_weights(stage.checkpoint_targets(), sys.argv[1], progress)
    tensors = [p for p in stage.parameters()] + [t for m in stage.modules() for ss in getattr(m, "nf4", {}).values()
                                                  for s in ss for t in s.values() if hasattr(t, "numel")]
    held = sum(t.numel() * t.element_size() for t in tensors)
    print(json.dumps(dict(anon=peak - base, held=held, read=read)))
""")


def test_nf4_load_peak_memory_stays_near_the_quantized_shard(tmp_path):
    """bench-cpu's body (96 MiB float32, vocabulary cut to 1,003): the rank holds 20 MiB (4-bit linears, float
    embeddings and norms) and its anonymous memory peaks near 30 MiB (the slice in flight and the quantizer's
    float32 temporaries), never near the float weights. The child runs with a fixed malloc mmap threshold, so
    freed large blocks go back to the OS and RssAnon is live memory: with glibc's sliding threshold the peak
    also counted allocator slack and ranged 36-73 MiB from run to run."""
    config = preset_config("bench-cpu") | {"vocab_size": 1003}
    model_dir = write_random_checkpoint(tmp_path, config, max_shard_bytes=50 * 2**20)
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(model_dir)], capture_output=True, text=True,
                         check=True, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 2**10)))
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print({k: f"{v / 2**20:.1f} MiB" for k, v in m.items()})
    assert m["held"] < m["read"] / 4  # 4-bit linears: ~1/7.5 of float32; the embeddings stay float
    assert m["anon"] < 0.5 * m["read"]


def test_served_quantized_checkpoints_report_their_format_and_generate_as_transformers(tmp_path):
    """Through the CLI and a real server: `init-random --quantization gptq-int4` writes a checkpoint the
    server recognises from its config.json (ModelInfo and /v1/models say so) and serves greedy tokens equal
    to transformers' on its dequantized weights; `--quantization bitsandbytes-nf4` is checked before any
    rank starts."""
    from cluster.engine import Engine
    from qwen2_client import Client
    from tests.engine_scenarios import engine_config
    from tests.server_process import InProcessServer

    model_dir = tmp_path / "gptq"
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps(CONFIG | {"quantization_config": {"group_size": 16}}))
    exe = [sys.executable, "-m", "router.cli", "init-random", "--preset", "tiny", "--config", str(overrides),
           "--quantization", "gptq-int4", "--out", str(model_dir), "--seed", "3"]
    subprocess.run(exe, check=True, capture_output=True, timeout=120)
    qc = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    tensors = {}
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    _dequantized_checkpoint(model_dir, tmp_path / "dense", {
        k[: -len("qweight")] + "weight": _reference_dequantize(tensors, k[: -len("qweight")], qc)
        for k in tensors if k.endswith(".qweight")})
    prompt = [5, 17, 300, 42, 9, 77]
    reference = Qwen2ForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    expected = reference.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(prompt):].tolist()

    assert Engine(engine_config(model_dir)).quantization == "gptq-int4"
    with pytest.raises(ValueError, match="already quantized"):
        Engine(engine_config(model_dir, quantization="bitsandbytes-nf4"))
    float_dir = write_random_checkpoint(tmp_path / "float", preset_config("tiny") | CONFIG, seed=3)
    assert Engine(engine_config(float_dir, quantization="bitsandbytes-nf4", quant_double=True)).quantization == \
        "bitsandbytes-nf4-double"

    server = InProcessServer(model_dir, tp=1, http=True)
    try:
        with Client(server.target) as client:
            assert client.model_info().quantization == "gptq-int4"
            got = client.generate(token_ids=prompt, max_new_tokens=6, temperature=0, ignore_eos=True)
        assert got.token_ids == expected
        import urllib.request
        with urllib.request.urlopen(server.http_url + "/v1/models", timeout=10) as r:
            assert json.loads(r.read())["data"][0]["quantization"] == "gptq-int4"
    finally:
        server.stop()
