"""The results as docs/performance.md asks: every figure with its target, the machine, versions and date, printed as
a Markdown table (pasted into bench/RESULTS.md as is) and written as JSON."""

import json
import os
import platform
import time
from importlib.metadata import version


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    memory = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"cpu": model, "arch": platform.machine(), "cores": os.cpu_count(), "memory_gib": round(memory / 2**20, 1)}


def versions() -> dict:
    return {"python": platform.python_version(),
            **{name: version(name) for name in ("torch", "transformers", "ray", "grpcio")}}


def header() -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "versions": versions()}


def targets(r: dict) -> list[tuple[str, float, str, bool]]:
    """(figure, value, target, met) for every target that this run measured."""
    rows = []
    best = r.get("baseline", {}).get("best", {}).get("tokens_per_s")
    for tp, layout in r.get("tp", {}).items():
        rows += _layout_targets(f"TP={tp}", layout, best)
    quantized = r.get("quantized") or {}
    for tp, layout in quantized.get("tp", {}).items():  # against their own floors (4-bit weight bytes)
        rows += _layout_targets(f"TP={tp}, {quantized['quantization']}", layout, None)
    runs = r.get("prefix", {})
    if all(runs.get(m, {}).get("shared") for m in ("on", "off")):
        ratio = float(runs["off"]["shared"]["ttft"]["p50_ms"] / runs["on"]["shared"]["ttft"]["p50_ms"])
        rows.append(("prefix: shared-prompt TTFT p50 without / with prefix caching", ratio, ">= 5x", ratio >= 5))
    if all(runs.get(m, {}).get("offline") for m in ("on", "off")):
        ratio = runs["on"]["offline"]["tokens_per_s"] / runs["off"]["offline"]["tokens_per_s"]
        rows.append(("prefix: offline throughput (nothing shared) with / without prefix caching", ratio, ">= 0.97x",
                     ratio >= 0.97))
    runs = r.get("structured", {})
    if runs.get("0.00") and runs.get("1.00"):
        slowdown = 1 - runs["1.00"]["tokens_per_s"] / runs["0.00"]["tokens_per_s"]
        rows.append(("structured: offline throughput loss, 100% JSON-schema constrained vs none", slowdown,
                     "< 10%", slowdown < 0.10))
        full, free = runs["1.00"], runs["0.00"]
        if "sample_ms_per_step" in full:  # the same loss from its parts, free of the forward's run-to-run noise
            cost = (full["mask_ms_per_step"] * full["masked_steps"] / full["steps"] + full["sample_ms_per_step"]
                    - free["sample_ms_per_step"]) / free["execute_ms_per_step"]
            rows.append(("structured: per-step cost of 100% constrained (mask fill + extra sampling) / unconstrained "
                         "execute", cost, "< 10%", cost < 0.10))
    if "long" in r:
        ratio = r["long"]["ratio"]
        rows.append(("long: short streams' ITL p99 during / without the long prefill", ratio, "<= 2x", ratio <= 2))
    return rows


def _layout_targets(label: str, layout: dict, best: float | None) -> list:
    rows = []
    if best and "offline" in layout:
        ratio = layout["offline"]["tokens_per_s"] / best
        rows.append((f"offline throughput / best baseline, {label}", ratio, ">= 2x", ratio >= 2))
    for probe in layout.get("decode", []):
        ratio = probe["step_s"] / probe["floor"]["floor_s"]
        rows.append((f"decode step / floor, batch {probe['batch']}, {label}", ratio, "<= 1.5x", ratio <= 1.5))
    if layout.get("decode"):
        share = layout["decode"][-1]["overhead_share"]
        rows.append((f"control overhead share of step, batch {layout['decode'][-1]['batch']}, {label}",
                     share, "<= 5%", share <= 0.05))
    if "collectives" in layout:
        per_layer = layout["collectives"]["all_reduce_per_layer"]
        rows.append((f"all-reduces of the hidden states per layer (beside the embedding's one per step), "
                     f"{label}", per_layer, "= 2", per_layer == 2))
    return rows


def _value(value: float, target: str) -> str:
    """In the target's own unit: a share, a ratio or a count."""
    return f"{value:.1%}" if target.endswith("%") else f"{value:.2f}x" if target.endswith("x") else f"{value:g}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def figures(r: dict) -> list[tuple[str, str]]:
    """(figure, value) for everything measured, in docs/performance.md's order."""
    rows = []
    if "limits" in r:
        lim = r["limits"]
        rows += [("float32 matmul rate (torch.mm)", f"{lim['matmul_flops'] / 1e9:,.1f} GFLOP/s"),
                 ("memory bandwidth (copy, read + write)", f"{lim['bandwidth_bytes'] / 1e9:,.1f} GB/s"),
                 ("weight matrices read per decode step", f"{lim['weight_bytes'] / 2**20:,.0f} MiB")]
    if "baseline" in r:
        for row in r["baseline"]["rows"]:
            rows.append((f"baseline generate(), batch {row['batch_size']} ({row['requests']} requests)",
                         f"{row['tokens_per_s']:,.1f} tok/s"))
    for tp, layout in r.get("tp", {}).items():
        rows += _layout_figures(f"TP={tp}", layout)
    quantized = r.get("quantized") or {}
    if quantized:
        fmt = quantized["quantization"]
        rows.append((f"weight matrices read per decode step, {fmt}", f"{quantized['weight_bytes'] / 2**20:,.1f} MiB"))
    for tp, layout in quantized.get("tp", {}).items():
        rows += _layout_figures(f"TP={tp}, {fmt}", layout)
    prefix_runs = r.get("prefix", {})
    for mode in ("on", "off"):
        for name, w in prefix_runs.get(mode, {}).items():
            if not w:
                continue
            what = {"offline": "offline mix", "shared": f"{w.get('requests')} requests sharing a system prompt",
                    "chat": f"{w.get('clients')} clients x {w.get('turns')} chat turns"}[name]
            value = f"{w['tokens_per_s']:,.1f} tok/s"
            if "ttft" in w:
                value += f"; TTFT {_ms(w['ttft']['p50_ms'] / 1e3)} / {_ms(w['ttft']['p99_ms'] / 1e3)}; hit ratio " \
                         f"{w['hit_ratio']:.0%}"
            rows.append((f"prefix caching {mode}, TP={prefix_runs['tp']}: {what}: throughput"
                         + ("; TTFT p50 / p99; hits" if "ttft" in w else ""), value))
    runs = r.get("structured", {})
    for share in ("0.00", "0.25", "1.00"):
        if runs.get(share):
            w = runs[share]
            rows.append((f"structured outputs, TP={runs['tp']}: offline mix, {float(share):.0%} constrained: "
                         f"throughput; mask fill per masked step; execute / driver sampling per step",
                         f"{w['tokens_per_s']:,.1f} tok/s; {w['mask_ms_per_step']:.2f} ms; "
                         f"{w.get('execute_ms_per_step', float('nan')):.1f} / {w.get('sample_ms_per_step', float('nan')):.1f} ms"))
    if "long" in r:
        lg = r["long"]
        rows.append((f"long: {lg['long_prompt_tokens']:,}-token prompt ({lg['long_rope_variant']}), {lg['streams']} "
                     f"streams: ITL p99 without / during; TTFT",
                     f"{lg['itl_p99_ms_without']:,.1f} ms / {lg['itl_p99_ms_during']:,.1f} ms; {lg['long_ttft_s']} s"))
    return rows


def _layout_figures(label: str, layout: dict) -> list[tuple[str, str]]:
    """One server's figures; `label` names its TP size (and quantization)."""
    rows = []
    if "offline" in layout:
        o = layout["offline"]
        rows.append((f"offline, {label} ({o['requests']} requests, {o['generated_tokens']:,} tokens); host steal",
                     f"{o['tokens_per_s']:,.1f} tok/s; {o.get('steal_share', float('nan')):.1%}"))
    if "online" in layout:
        o = layout["online"]
        for name in ("ttft", "itl", "e2e"):
            rows.append((f"online, {label}, {o['rate_per_s']:.2f} req/s: {name.upper()} p50 / p99",
                         f"{_ms(o[name]['p50_ms'] / 1e3)} / {_ms(o[name]['p99_ms'] / 1e3)}"))
    for p in layout.get("decode", []):
        rows.append((f"decode step, batch {p['batch']}, {label}: step / forward / floor ({p['floor']['bound']}); "
                     f"host steal", f"{_ms(p['step_s'])} / {_ms(p['forward_s'])} / {_ms(p['floor']['floor_s'])}; "
                                    f"{p.get('steal_share', float('nan')):.1%}"))
        rows.append(("  outside the forward: schedule / execute - forward / detokenize / rest",
                     " / ".join(_ms(s) for s in (p["schedule_s"], p["execute_s"] - p["forward_s"],
                                                  p["detokenize_s"], p["step_s"] - p["schedule_s"]
                                                  - p["execute_s"] - p["detokenize_s"]))))
        rows.append(("  inside the forward: sampling (share of the step)",
                     f"{_ms(p['sample_s'])} ({p['sample_s'] / p['step_s']:.0%})"))
    if "prefill" in layout:
        p = layout["prefill"]
        rows.append((f"prefill {p['tokens']} tokens, {label}: TTFT / forward / floor",
                     f"{_ms(p['ttft_s'])} / {_ms(p['forward_s'])} / {_ms(p['floor']['floor_s'])}"))
    if "collectives" in layout:
        c = layout["collectives"]
        calls = ", ".join(f"{k} {v:g}" for k, v in sorted(c["rank0_per_step"].items()) if not k.endswith(".bytes"))
        sizes = ", ".join(f"{k[:-6]} {v / 2**10:,.0f} KiB" for k, v in sorted(c["rank0_per_step"].items())
                          if k.endswith(".bytes"))
        rows.append((f"collectives per decode step, batch {c['batch']}, {label}, rank 0", f"{calls}; {sizes}"))
    return rows


def table(r: dict) -> str:
    m, v = r["machine"], r["versions"]
    lines = [f"{r['date']}; {m['cpu']} ({m['arch']}, {m['cores']} cores, {m['memory_gib']} GiB); "
             f"{r['threads']} torch threads for the baseline and ours; "
             + ", ".join(f"{k} {val}" for k, val in v.items()) + f"; model `{r['preset']}`",
             "", "| figure | value |", "|---|---:|"]
    lines += [f"| {name} | {value} |" for name, value in figures(r)]
    lines += ["", "| target | measured | target | met |", "|---|---:|---:|:---:|"]
    lines += [f"| {name} | {_value(value, target)} | {target} | {'yes' if met else 'no'} |"
              for name, value, target, met in targets(r)]
    lines += [f"\nFailed: {e}" for e in r.get("errors", [])]
    return "\n".join(lines)


def write(r: dict, path: str) -> None:
    r = r | {"targets": [{"figure": n, "value": v, "target": t, "met": met} for n, v, t, met in targets(r)]}
    with open(path, "w") as f:
        json.dump(r, f, indent=2)
