"""Per-rank scenarios for the multi-process tests (importable by spawned children; torch + shards only)."""

import torch
import torch.distributed as dist

from shards import parallel
from shards.batch import SeqPlan
from shards.layers import VocabParallelEmbedding
from shards.parallel import init_groups
from shards.sampling import SamplingParams
from shards.worker import ShardWorker

BLOCK_SIZE = 4


def block_tables(num_seqs: int, blocks_each: int) -> list[list[int]]:
    """Interleaved, non-contiguous block ids so that paging bugs show."""
    return [[seq + num_seqs * i for i in range(blocks_each)][::-1] for seq in range(num_seqs)]


def teacher_forced_logits(rank, world, model_dir, tp, pp, prompts, continuations, variants, cuda_graphs=False):
    """With cuda_graphs, decode steps run padded over the graphs' static batches (eagerly on CPU)."""
    worker = ShardWorker(model_dir, init_groups(tp, pp), num_kv_blocks=64, block_size=BLOCK_SIZE,
                         cuda_graphs=cuda_graphs, max_graph_batch=4)
    return teacher_forced(worker, prompts, continuations, variants)


def teacher_forced(worker, prompts, continuations, variants):
    """Prefill (one prompt split into two chunks, the second beside decodes), then decode the given
    continuation tokens one step at a time. Returns, on the driver, every sampled row's logits per sequence.
    The worker's cache has 64 blocks of BLOCK_SIZE."""
    tables = block_tables(len(prompts), 16)
    greedy = SamplingParams(temperature=0.0)
    logits = [[] for _ in prompts]

    def step(plans):
        out, batch = worker.forward(plans)
        if out is not None:
            for seq, row in zip(batch.sampling_seqs, out):
                logits[seq.seq_id].append(row)

    half = len(prompts[0]) // 2
    plan = [SeqPlan(0, prompts[0][:half], 0, tables[0], variants[0])]
    plan += [SeqPlan(i, p, 0, tables[i], variants[i], greedy) for i, p in enumerate(prompts) if i]
    step(plan)
    plan = [SeqPlan(0, prompts[0][half:], half, tables[0], variants[0], greedy)]
    plan += [SeqPlan(i, [continuations[i][0]], len(p), tables[i], variants[i], greedy)
             for i, p in enumerate(prompts) if i]
    step(plan)
    for k in range(len(continuations[0])):
        plan = []
        for i, p in enumerate(prompts):
            done = k + (i != 0)  # seq 0 decodes one step behind the others
            if done < len(continuations[i]):
                plan.append(SeqPlan(i, [continuations[i][done]], len(p) + done, tables[i], variants[i], greedy))
        step(plan)
    return [torch.stack(rows) for rows in logits] if worker.groups.is_driver else None


def greedy_generate(rank, world, model_dir, tp, pp, prompts, new_tokens):
    """Batched greedy generation through `execute` (sampling on the driver, tokens fed back to all ranks):
    (tokens, their logprobs) per prompt on the driver."""
    groups = init_groups(tp, pp)
    worker = ShardWorker(model_dir, groups, num_kv_blocks=128, block_size=BLOCK_SIZE)
    tables = block_tables(len(prompts), 32)
    greedy = SamplingParams(temperature=0.0)
    outputs, logprobs = [[] for _ in prompts], [[] for _ in prompts]
    plan = [SeqPlan(i, p, 0, tables[i], 0, greedy) for i, p in enumerate(prompts)]
    for _ in range(new_tokens):
        results = worker.execute(plan)
        tokens = torch.zeros(len(prompts), dtype=torch.long)
        if groups.is_driver:
            tokens = torch.tensor([r["token_id"] for r in results])
            for i, r in enumerate(results):
                logprobs[i].append(r["logprob"])
        dist.broadcast(tokens, src=groups.pp_size * groups.tp_size - groups.tp_size)  # the driver's global rank
        for i, t in enumerate(tokens.tolist()):
            outputs[i].append(t)
        plan = [SeqPlan(i, [outputs[i][-1]], len(prompts[i]) + len(outputs[i]) - 1, tables[i], 0, greedy,
                        output_token_ids=list(outputs[i])) for i in range(len(prompts))]
    return list(zip(outputs, logprobs)) if groups.is_driver else None


def count_collectives(rank, world, model_dir, tp, pp, prompts):
    """Every torch.distributed call one forward step makes on this rank: {name: calls}, plus our own tally."""
    worker = ShardWorker(model_dir, init_groups(tp, pp), num_kv_blocks=64, block_size=BLOCK_SIZE)
    calls = {}
    names = ["all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "broadcast", "gather",
             "scatter", "reduce", "send", "recv", "isend", "irecv", "all_to_all", "batch_isend_irecv"]
    for name in names:
        real = getattr(dist, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **k)

        setattr(dist, name, counted)
    parallel.COMM_STATS.clear()
    tables = block_tables(len(prompts), 16)
    worker.forward([SeqPlan(i, p, 0, tables[i], 0, SamplingParams()) for i, p in enumerate(prompts)])
    return {"calls": calls, "stats": dict(parallel.COMM_STATS), "layers": len(worker.model.layers),
            "first": worker.groups.is_first_stage, "last": worker.groups.is_last_stage}


def pooled_parts(rank, world, model_dirs, tp, pp, steps):
    """Run the same pooling steps (lists of SeqPlans) on each checkpoint; on the driver, per checkpoint, each
    sequence's pooled parts in step order ({seq_id: [tensor, ...]})."""
    groups = init_groups(tp, pp)
    out = []
    for model_dir in model_dirs:
        worker = ShardWorker(model_dir, groups, num_kv_blocks=64, block_size=BLOCK_SIZE)
        parts = {}
        for step in steps:
            for row in worker.execute(step) or []:
                parts.setdefault(row["seq_id"], []).append(row["pooled"])
        out.append(parts)
    return out if groups.is_driver else None


def lm_head_greedy(rank, world, vocab, hidden, rows, group_elements, pack_rows):
    """The vocab-parallel LM head over `world` TP ranks on one seeded weight: its greedy reduction and its full
    logits, on rank 0 (None elsewhere). `pack_rows`: oneDNN panels of that many tokens; None: the block layout."""
    generator = torch.Generator().manual_seed(5)
    weight, x = torch.randn(vocab, hidden, generator=generator), torch.randn(rows, hidden, generator=generator)
    x[1] = 0  # every logit 0: a tie across the whole vocabulary and every rank
    head = VocabParallelEmbedding(vocab, hidden, init_groups(world, 1), lm_head=pack_rows is not None)
    head.PACK_ROWS, head.GREEDY_ELEMENTS = pack_rows, group_elements
    head._load(head.weight, weight)
    assert bool(head.panels) == (pack_rows is not None)
    greedy, logits = head.greedy(x), head.logits(x)
    return None if logits is None else (*greedy, logits)
