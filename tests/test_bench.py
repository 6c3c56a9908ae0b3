"""The benchmark harness end to end at toy sizes (`tiny`, --quick, TP=2): every figure is present and the
counts agree with what was asked. Timings are reported by the harness, never asserted here."""

import json

from bench.__main__ import main

HIDDEN, LAYERS = 64, 4  # the tiny preset


def test_bench_quick_runs_end_to_end_and_counts_agree(tmp_path):
    out = tmp_path / "results.json"
    main(["--quick", "--preset", "tiny", "--tp", "2", "--workloads", "floors,baseline,offline,online,overhead",
          "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["errors"] == []
    assert r["limits"]["matmul_flops"] > 0 and r["limits"]["bandwidth_bytes"] > 0 and r["threads"] >= 1

    for row in r["baseline"]["rows"]:  # every row of a static batch runs to the batch's longest request
        assert row["generated_tokens"] == row["expected_generated_tokens"] >= row["requested_tokens"] > 0
    assert r["baseline"]["best"]["tokens_per_s"] == max(row["tokens_per_s"] for row in r["baseline"]["rows"])

    layout = r["tp"]["2"]
    for workload in ("offline", "online"):  # ignore_eos: exactly max_new_tokens each
        assert layout[workload]["generated_tokens"] == layout[workload]["requested_tokens"] > 0
    assert layout["online"]["ttft"]["p50_ms"] <= layout["online"]["ttft"]["p99_ms"]

    for probe, batch in zip(layout["decode"], r["settings"]["probe_batches"]):
        assert probe["batch"] == batch and probe["mean_batch"] == batch  # steady decode only in the window
        assert probe["floor"]["floor_s"] > 0 and probe["step_s"] > 0 and probe["forward_s"] > 0
        assert abs(probe["overhead_s"] - (probe["step_s"] - probe["forward_s"])) < 1e-9
    assert layout["prefill"]["floor"]["floor_s"] > 0 and layout["prefill"]["steps"] >= 1

    comm, batch = layout["collectives"], r["settings"]["probe_batches"][-1]
    assert comm["ranks_agree"] and comm["all_reduce_per_layer"] == 2
    per_step = comm["rank0_per_step"]
    assert per_step["all_reduce"] == 2 * LAYERS + 1 and per_step["gather"] == 1  # + embedding; logits
    assert per_step["all_reduce.bytes"] == per_step["all_reduce"] * batch * HIDDEN * 4

    figures = {t["figure"] for t in r["targets"]}
    assert any(f.startswith("offline throughput") for f in figures)
    assert any(f.startswith("control overhead") for f in figures)
