"""Drive an engine (or anything with an async `step`) through greedy generation, as the router will."""

from cluster.engine import EngineConfig
from shards.batch import SeqPlan
from shards.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, logprobs=3)
PROMPTS = [[5, 17, 300, 42, 9, 77, 1000], [3, 3, 3], [250, 600, 12, 8, 990, 4, 61, 200, 7, 1]]
NEW_TOKENS = 12


def engine_config(model_dir, tp=1, pp=1, **kw) -> EngineConfig:
    """Rendezvous on loopback, small blocks so that sequences span several."""
    return EngineConfig(str(model_dir), tp, pp, **({"rendezvous_host": "127.0.0.1", "block_size": 4,
                                                    "max_num_blocks": 64} | kw))


def tables(num_seqs: int, blocks_each: int) -> list[list[int]]:
    """Interleaved block ids, so sequences' blocks are not contiguous."""
    return [[seq + num_seqs * i for i in range(blocks_each)] for seq in range(num_seqs)]


async def greedy(step, prompts, new_tokens: int, block_tables, first_id: int = 0) -> list[list[dict]]:
    """Prefill all prompts in one step, then decode them together; every sampled row per sequence."""
    rows = [[] for _ in prompts]
    plan = [SeqPlan(first_id + i, p, 0, block_tables[i], sampling=GREEDY) for i, p in enumerate(prompts)]
    for _ in range(new_tokens):
        for r in await step(plan):
            rows[r["seq_id"] - first_id].append(r)
        plan = [
            SeqPlan(first_id + i, [rows[i][-1]["token_id"]], len(p) + len(rows[i]) - 1, block_tables[i],
                    sampling=GREEDY, output_token_ids=[r["token_id"] for r in rows[i]])
            for i, p in enumerate(prompts)
        ]
    return rows
