"""The benchmark harness end to end at toy sizes (`tiny`, --quick, TP=2): every figure is present, the
counts agree with what was asked, and the floors read what the checkpoint holds. Timings are reported by
the harness, never asserted here."""

import json

import pytest
from safetensors.torch import load_file

from bench import floors
from bench.__main__ import main
from shards.checkpoint import preset_config, write_random_checkpoint

HIDDEN, LAYERS = 64, 4  # the tiny preset


def nbytes(t) -> int:
    return t.numel() * t.element_size()


def decode_bytes(model_dir) -> tuple[int, int]:
    """From the checkpoint's files: (bytes of the matrices a decode step multiplies by, K + V bytes a token
    adds to the cache over all layers). The embedding table is only looked up, unless it is the LM head."""
    tensors = {}
    for f in model_dir.glob("*.safetensors"):
        tensors |= load_file(f)
    head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    body = sum(nbytes(t) for name, t in tensors.items()
               if t.dim() == 2 and name not in ("model.embed_tokens.weight", "lm_head.weight"))
    layers = {name.split(".")[2] for name in tensors if name.startswith("model.layers.")}
    k = tensors["model.layers.0.self_attn.k_proj.weight"]  # [kv_heads * head_dim, hidden]
    return body + nbytes(head), len(layers) * 2 * k.shape[0] * k.element_size()


def test_bench_quick_runs_end_to_end_and_counts_agree(tmp_path):
    weight_bytes, kv_bytes_per_token = decode_bytes(write_random_checkpoint(tmp_path / "tiny", preset_config("tiny")))
    out = tmp_path / "results.json"
    main(["--quick", "--preset", "tiny", "--tp", "2", "--workloads", "floors,baseline,offline,online,overhead",
          "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["errors"] == []
    assert r["limits"]["matmul_flops"] > 0 and r["limits"]["bandwidth_bytes"] > 0 and r["threads"] >= 1

    assert r["limits"]["weight_bytes"] == weight_bytes

    for row in r["baseline"]["rows"]:  # every row of a static batch runs to the batch's longest request
        assert row["generated_tokens"] == row["expected_generated_tokens"] >= row["requested_tokens"] > 0

    layout = r["tp"]["2"]
    for workload in ("offline", "online"):  # ignore_eos: exactly max_new_tokens each
        assert layout[workload]["generated_tokens"] == layout[workload]["requested_tokens"] > 0
    assert layout["online"]["ttft"]["p50_ms"] <= layout["online"]["ttft"]["p99_ms"]

    for probe, batch in zip(layout["decode"], r["settings"]["probe_batches"]):
        assert probe["batch"] == batch and probe["mean_batch"] == batch  # steady decode only in the window
        assert probe["floor"]["floor_s"] > 0 and probe["step_s"] > 0 and probe["forward_s"] > 0
        # The floor streams every weight matrix and the batch's whole KV cache at the probed context.
        assert probe["floor"]["bytes"] == weight_bytes + batch * probe["context"] * kv_bytes_per_token
    assert layout["prefill"]["floor"]["floor_s"] > 0 and layout["prefill"]["steps"] >= 1

    comm, batch = layout["collectives"], r["settings"]["probe_batches"][-1]
    assert comm["ranks_agree"] and comm["all_reduce_per_layer"] == 2
    per_step = comm["rank0_per_step"]
    assert per_step["all_reduce"] == 2 * LAYERS + 1 and per_step["gather"] == 1  # + embedding; logits
    assert per_step["all_reduce.bytes"] == per_step["all_reduce"] * batch * HIDDEN * 4

    figures = {t["figure"] for t in r["targets"]}
    assert any(f.startswith("offline throughput") for f in figures)
    assert any(f.startswith("control overhead") for f in figures)


def test_bench_prefix_workloads_counts_and_hits(tmp_path):
    """The prefix workloads with caching on and off: same work asked of both, hits only with the cache."""
    out = tmp_path / "results.json"
    main(["--quick", "--preset", "tiny", "--tp", "1", "--workloads", "prefix", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["errors"] == []
    s = r["settings"]
    for mode in ("on", "off"):
        runs = r["prefix"][mode]
        assert runs["shared"]["generated_tokens"] == s["prefix_requests"] * s["prefix_new_tokens"]
        assert runs["chat"]["generated_tokens"] == s["chat_clients"] * s["chat_turns"] * s["prefix_new_tokens"]
        assert runs["offline"]["generated_tokens"] == runs["offline"]["requested_tokens"] > 0
    # Every request but the first finds the system prompt's full blocks (16 tokens each); every chat turn
    # after the first finds the conversation so far.
    assert r["prefix"]["on"]["shared"]["hit_ratio"] > 0.5 and r["prefix"]["on"]["chat"]["hit_ratio"] > 0.3
    assert r["prefix"]["off"]["shared"]["hit_ratio"] == r["prefix"]["off"]["chat"]["hit_ratio"] == 0
    assert any(t["figure"].startswith("prefix: shared-prompt TTFT") for t in r["targets"])


@pytest.mark.parametrize("fmt", ["gptq-int4", "gptq-int8", "awq", "nf4"])
def test_quantized_floors_read_the_quantized_weight_bytes(tmp_path, fmt):
    """`--quantization`'s floors: ModelCost of a quantized checkpoint's config.json counts exactly the bytes a
    rank holds of its files' decoder linears (codes, scales and zero points, or NF4 codes and absmax; GPTQ's g_idx
    is not read without desc_act) plus the float LM head. (`python -m bench --quantization` itself is run by hand:
    another server per TP size is too slow for the suite.)"""
    config = preset_config("tiny") | ({} if fmt == "nf4" else {"quantization_config": {"group_size": 32}})
    model_dir = write_random_checkpoint(tmp_path, config, quantization=fmt)
    tensors = {}
    for f in model_dir.glob("*.safetensors"):
        tensors |= load_file(f)
    skipped = (".g_idx", ".bias", "norm.weight", ".quant_map", ".quant_state.bitsandbytes__nf4")
    held = sum(nbytes(t) for name, t in tensors.items() if name.startswith("model.layers.")
               and not name.endswith(skipped))
    head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    assert floors.ModelCost(json.loads((model_dir / "config.json").read_text())).weight_bytes == held + nbytes(head)
