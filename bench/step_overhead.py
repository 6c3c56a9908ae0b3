"""Control overhead per engine step: wall time of `Engine.step` minus the time the driver rank spends
inside its own step (forward + sampling, including waiting on collectives and the previous stage).

What is left is plan delivery to every rank, result return and the event loop: the cost the cluster layer
adds per step. Run: python -m bench.step_overhead [--model DIR] [--steps N] [--batch B]
"""

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time

import ray
import torch

from cluster.engine import Engine, EngineConfig
from shards.batch import SeqPlan
from shards.checkpoint import preset_config, write_random_checkpoint
from shards.sampling import SamplingParams

LAYOUTS = [(1, 1, True), (1, 1, False), (2, 1, True), (2, 1, False), (2, 2, True), (2, 2, False)]


async def measure(model_dir, tp, pp, compiled, steps, batch):
    engine = Engine(EngineConfig(model_dir, tp, pp, rendezvous_host="127.0.0.1", compiled_graph=compiled,
                                 max_num_blocks=batch * 4))
    await engine.start()
    try:
        greedy = SamplingParams(temperature=0.0)
        tables = [[4 * i + j for j in range(4)] for i in range(batch)]
        await engine.step([SeqPlan(i, [1 + i] * 8, 0, tables[i], sampling=greedy) for i in range(batch)])
        walls, inside = [], []
        for k in range(steps):
            plan = [SeqPlan(i, [7], 8 + k % 40, tables[i], sampling=greedy) for i in range(batch)]
            began = time.perf_counter()
            await engine.step(plan)
            walls.append(time.perf_counter() - began)
            inside.append(engine.last_rank_seconds[engine.driver])
        return {
            "tp": tp, "pp": pp, "mechanism": "compiled graph" if compiled else "step channel",
            "startup_s": round(engine.startup_s, 2),
            "step_ms_p50": round(statistics.median(walls) * 1e3, 3),
            "driver_step_ms_p50": round(statistics.median(inside) * 1e3, 3),
            "overhead_ms_p50": round(statistics.median(w - i for w, i in zip(walls, inside)) * 1e3, 3),
        }
    finally:
        await engine.shutdown()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="checkpoint (default: a fresh `tiny` one)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", default="bench/step_overhead.json")
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    model_dir = args.model or str(write_random_checkpoint(tempfile.mkdtemp(), preset_config("tiny")))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        rows = [asyncio.run(measure(model_dir, tp, pp, c, args.steps, args.batch)) for tp, pp, c in LAYOUTS]
    finally:
        ray.shutdown()
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "ray": ray.__version__, "batch": args.batch, "steps": args.steps,
              "rows": rows}
    print(f"{'tp':>3} {'pp':>3} {'mechanism':<15} {'startup s':>9} {'step ms':>8} {'in driver ms':>12} {'overhead ms':>11}")
    for r in rows:
        print(f"{r['tp']:>3} {r['pp']:>3} {r['mechanism']:<15} {r['startup_s']:>9} {r['step_ms_p50']:>8} "
              f"{r['driver_step_ms_p50']:>12} {r['overhead_ms_p50']:>11}")
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
