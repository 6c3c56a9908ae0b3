"""Loading one rank's slice of a checkpoint: files opened, peak memory, and clear errors."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from shards import loader
from shards.checkpoint import preset_config, write_random_checkpoint
from shards.config import Qwen2Config
from shards.model import Qwen2Stage
from shards.parallel import ParallelGroups


def stage(model_dir, **groups) -> Qwen2Stage:
    return Qwen2Stage(Qwen2Config.from_pretrained(model_dir), ParallelGroups(**groups))


def test_rank_opens_only_the_files_holding_its_layers(checkpoints, monkeypatch):
    model_dir = checkpoints["gqa-untied"]
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    opened = []
    real_open = loader.safe_open
    monkeypatch.setattr(loader, "safe_open", lambda path, *a, **k: opened.append(path.name) or real_open(path, *a, **k))
    last = stage(model_dir, tp_size=2, tp_rank=1, pp_size=2, pp_rank=1)
    loader.load_weights(last.checkpoint_targets(), model_dir)
    needed = {weight_map[name] for name in last.checkpoint_targets()}
    assert sorted(opened) == sorted(needed)  # each needed file once, nothing else
    assert len(needed) < len(set(weight_map.values()))


def test_tp_slices_reassemble_the_checkpoint_tensors(checkpoints):
    """Every rank's slice, concatenated over ranks, is the checkpoint tensor (uneven MLP split included)."""
    model_dir = checkpoints["gqa-untied"]
    full = {}
    for path in model_dir.glob("*.safetensors"):
        full.update(load_file(path))
    ranks = [stage(model_dir, tp_size=4, tp_rank=r) for r in range(4)]
    for r in ranks:
        loader.load_weights(r.checkpoint_targets(), model_dir)
    down = torch.cat([r.layers[1].mlp.down_proj.weight for r in ranks], dim=1)
    assert torch.equal(down, full["model.layers.1.mlp.down_proj.weight"])
    up = torch.cat([r.layers[1].mlp.gate_up_proj.weight.chunk(2)[1] for r in ranks])
    assert torch.equal(up, full["model.layers.1.mlp.up_proj.weight"])
    # Stored as column blocks [blocks, hidden, VOCAB_BLOCK]: back to [vocab, hidden] rows per rank.
    lm_head = torch.cat([r.lm_head.weight.transpose(1, 2).flatten(0, 1)[: r.lm_head.local] for r in ranks])
    assert torch.equal(lm_head[:1003], full["lm_head.weight"]) and not lm_head[1003:].any()


def test_single_file_checkpoint_loads(tmp_path):
    config = preset_config("tiny") | {"vocab_size": 512}
    model_dir = write_random_checkpoint(tmp_path, config)
    assert (model_dir / "model.safetensors").is_file()
    s = stage(model_dir)
    loader.load_weights(s.checkpoint_targets(), model_dir)
    assert torch.equal(s.norm.weight, load_file(model_dir / "model.safetensors")["model.norm.weight"])


def _rewrite(model_dir, name, replace):
    """Rewrite the shard holding `name` with `replace(tensors)` applied."""
    file = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(model_dir / file)
    replace(tensors)
    save_file(tensors, model_dir / file, metadata={"format": "pt"})


@pytest.fixture
def broken(tmp_path):
    return write_random_checkpoint(tmp_path, preset_config("tiny") | {"vocab_size": 512}, max_shard_bytes=100_000)


def test_mis_shaped_tensor_names_tensor_and_both_shapes(broken):
    name = "model.layers.2.self_attn.k_proj.weight"
    _rewrite(broken, name, lambda t: t.update({name: torch.zeros(16, 64)}))
    with pytest.raises(ValueError, match=rf"'{name}'.*\[16, 64\].*\[32, 64\]"):
        s = stage(broken)
        loader.load_weights(s.checkpoint_targets(), broken)


def test_missing_tensor_is_named(broken):
    name = "model.layers.3.mlp.down_proj.weight"
    _rewrite(broken, name, lambda t: t.pop(name))
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=name):
        s = stage(broken)
        loader.load_weights(s.checkpoint_targets(), broken)


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Qwen2Config.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        loader.weight_map(tmp_path)


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    from shards import loader
    from shards.config import Qwen2Config
    from shards.layers import VocabParallelEmbedding
    from shards.model import Qwen2Stage
    from shards.parallel import ParallelGroups

    def rss():
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}

    model_dir, tp, tp_rank, pp, pp_rank = sys.argv[1], *map(int, sys.argv[2:])
    base = rss()
    peak = dict(base)
    def progress(done, total, read):
        for k, v in rss().items():
            peak[k] = max(peak[k], v)
    stage = Qwen2Stage(Qwen2Config.from_pretrained(model_dir), ParallelGroups(tp_rank, tp, pp_rank, pp))
    read = loader.load_weights(stage.checkpoint_targets(), model_dir, progress)
    params = [p for p in stage.parameters()]
    # The vocabulary's last block is zero padding, not read from the checkpoint.
    padding = sum((m.weight.numel() - m.local * m.hidden) * m.weight.element_size()
                  for m in stage.modules() if isinstance(m, VocabParallelEmbedding))
    shard = sum(p.numel() * p.element_size() for p in params) - padding
    largest = max(p.numel() * p.element_size() for p in params)
    print(json.dumps(dict(anon=peak["RssAnon"] - base["RssAnon"], file=peak["RssFile"] - base["RssFile"],
                          shard=shard, largest=largest, read=read)))
""")


def test_loader_peak_memory_stays_near_the_shard(tmp_path):
    """bench-cpu (0.7 GB float32) at TP 2 x PP 2: a rank's anonymous memory grows by its shard plus at most
    one tensor slice in flight; file pages are the mmap of what it reads."""
    model_dir = write_random_checkpoint(tmp_path, preset_config("bench-cpu"), max_shard_bytes=200 * 2**20)
    total = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(model_dir), "2", "1", "2", "0"],
                         capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    mb = {k: round(v / 2**20) for k, v in m.items()}
    print(f"checkpoint {total / 2**20:.0f} MiB; rank tp1/pp0: {mb}")
    assert m["read"] == m["shard"]  # every byte of this rank's parameters read once, nothing more
    assert m["anon"] <= m["shard"] + m["largest"] + 32 * 2**20
    assert m["shard"] < total / 3  # the rank holds about a quarter of the model
