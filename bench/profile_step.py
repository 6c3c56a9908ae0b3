"""Where a decode step's time goes: torch.profiler over one rank's steps (forward + sampling), in this
process, no Ray or server around it. The notes on missed targets in bench/RESULTS.md come from this.

Run: python -m bench.profile_step [--preset bench-cpu] [--batch 64] [--context 64] [--steps 5]
"""

import argparse
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from shards.batch import SeqPlan
from shards.checkpoint import preset_config, write_random_checkpoint
from shards.parallel import ParallelGroups
from shards.sampling import SamplingParams
from shards.worker import ShardWorker


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="bench-cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    model_dir = write_random_checkpoint(tempfile.mkdtemp(), preset_config(args.preset))
    blocks = -(-(args.context + args.steps + 1) // 16)
    worker = ShardWorker(model_dir, ParallelGroups(), num_kv_blocks=args.batch * blocks, block_size=16)
    greedy, tables = SamplingParams(temperature=0.0), [list(range(i * blocks, (i + 1) * blocks)) for i in range(args.batch)]
    worker.execute([SeqPlan(i, [1 + i] * args.context, 0, tables[i], sampling=greedy) for i in range(args.batch)])

    def decode(k):
        return worker.execute([SeqPlan(i, [7], args.context + k, tables[i], sampling=greedy) for i in range(args.batch)])

    decode(0)  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for k in range(1, args.steps + 1):
            decode(k)
    print(f"{args.preset}, batch {args.batch}, context {args.context}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps (times are totals over the steps)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
