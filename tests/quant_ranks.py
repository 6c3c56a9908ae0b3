"""The per-rank scenario of tests/test_quant.py, in a module light enough for spawned ranks to import."""

import torch

from shards.batch import SeqPlan
from shards.parallel import init_groups
from shards.sampling import SamplingParams
from shards.worker import ShardWorker
from tests.ranks import BLOCK_SIZE, block_tables


def quantized_logits(rank, world, model_dir, tp, pp, prompts, continuations, worker_args):
    """On each rank: prefill the prompts, then decode the continuations one step at a time; the driver returns
    each sequence's logits (the prefill's last row, then one per step)."""
    worker = ShardWorker(model_dir, init_groups(tp, pp), num_kv_blocks=64, block_size=BLOCK_SIZE,
                         **worker_args)
    tables, greedy = block_tables(len(prompts), 8), SamplingParams(temperature=0.0)
    rows = [[] for _ in prompts]
    plan = [SeqPlan(i, p, 0, tables[i], 0, greedy) for i, p in enumerate(prompts)]
    for k in range(len(continuations[0]) + 1):
        out, batch = worker.forward(plan)
        for seq, row in zip(batch.sampling_seqs, out if out is not None else []):
            rows[seq.seq_id].append(row)
        plan = [SeqPlan(i, [c[k]], len(p) + k, tables[i], 0, greedy)
                for i, (p, c) in enumerate(zip(prompts, continuations)) if k < len(c)]
    return [torch.stack(r)[: len(c) + 1] for r, c in zip(rows, continuations)] if worker.groups.is_driver else None
