"""Decode steps padded to a CUDA graph's batch size (shards/graphs.py), run on CPU over the graphs' static
batches: padding rows and the static copies must leave every real row's logits as transformers gives them."""

import json

import pytest
import torch

from shards.batch import Padding, SeqPlan, StepBatch
from shards.graphs import batch_ladder
from shards.parallel import ParallelGroups
from shards.rope import ORIGINAL, SCALED
from shards.sampling import SamplingParams
from shards.worker import ShardWorker
from tests import ranks
from tests.multiproc import run_ranks
from tests.test_parallel_numerics import TOLERANCE, reference, random_tokens


def test_ladder():
    assert batch_ladder(1) == [1]
    assert batch_ladder(4) == [1, 2, 4]
    assert batch_ladder(40) == [1, 2, 4, 8, 16, 32, 40]
    assert batch_ladder(64)[-3:] == [32, 48, 64]


def test_which_steps_replay(checkpoints):
    worker = ShardWorker(checkpoints["gqa-untied"], ParallelGroups(), num_kv_blocks=12, block_size=4,
                         cuda_graphs=True, max_graph_batch=8)
    graphs = worker.graphs
    assert sorted(graphs.graphs) == [1, 2, 4, 8]
    decode = [SeqPlan(i, [5], 6, [i, 4 + i]) for i in range(3)]
    assert graphs.padding_for(decode) == Padding(4, 12, 12)  # the spare block is block num_kv_blocks
    assert graphs.padding_for(decode[:1]).size == 1
    assert graphs.padding_for([SeqPlan(0, [5, 6], 0, [0])] + decode) is None  # a prefill: eager
    assert graphs.padding_for([SeqPlan(i, [5], 0, [i]) for i in range(9)]) is None  # past the ladder
    assert graphs.padding_for([]) is None
    batch = StepBatch.build(decode, 4, "cpu", padding=graphs.padding_for(decode))
    assert batch.num_tokens == 4 and batch.slot_mapping[3] == 12 * 4  # the padding row writes the spare block
    assert batch.block_tables.tolist() == [[0, 4], [1, 5], [2, 6], [12, 12]]  # as wide as the step needs
    assert graphs.graphs[4][1].block_tables.shape == (4, 12)  # the static batch it is copied into: whole width
    assert batch.seq_lens.tolist() == [7, 7, 7, 1] and batch.sample_rows.numel() == 0


def test_padding_rows_write_only_the_spare_block(checkpoints):
    worker = ShardWorker(checkpoints["gqa-untied"], ParallelGroups(), num_kv_blocks=8, block_size=4,
                         cuda_graphs=True, max_graph_batch=4)
    greedy = SamplingParams(temperature=0.0)
    worker.execute([SeqPlan(0, [3, 4, 5], 0, [2], sampling=greedy)])
    before = worker.kv_cache.clone()
    worker.execute([SeqPlan(0, [6], 3, [2], sampling=greedy)])  # padded to 1: no padding row
    worker.execute([SeqPlan(i, [6], 0, [5 + i], sampling=greedy) for i in range(3)])  # padded to 4
    changed = (worker.kv_cache != before).flatten(0, 2).any(-1).any(-1).any(0)  # per block
    assert changed.nonzero().flatten().tolist() == [2, 5, 6, 7, 8]  # seq 0's, the three new ones', the spare


def test_rows_narrower_than_the_last_step_leave_its_blocks_unread(checkpoints):
    """A step's block tables go into the left of the static ones: after a step with a long sequence, a step of
    short ones leaves its blocks in the static table past their lengths. Their logits stay an eager step's."""
    greedy = SamplingParams(temperature=0.0)
    vocab = json.loads((checkpoints["gqa-untied"] / "config.json").read_text())["vocab_size"]
    prompts = random_tokens(vocab, [21, 3, 5], seed=3)
    tables = [list(range(6)), [6, 7], [8, 9]]
    logits = []
    for graphs in (True, False):
        worker = ShardWorker(checkpoints["gqa-untied"], ParallelGroups(), num_kv_blocks=12, block_size=4,
                             cuda_graphs=graphs, max_graph_batch=2)
        worker.forward([SeqPlan(i, p, 0, tables[i], sampling=greedy) for i, p in enumerate(prompts)])
        worker.forward([SeqPlan(i, [7], len(prompts[i]), tables[i], sampling=greedy) for i in (0, 1)])
        logits.append(worker.forward([SeqPlan(i, [8], len(prompts[i]) + (i == 1), tables[i], sampling=greedy)
                                      for i in (1, 2)])[0])
        if graphs:  # row 0 held sequence 0: its blocks 2..5 are still there, past sequence 1's two
            assert worker.graphs.graphs[2][1].block_tables[0].tolist()[:6] == [6, 7, 2, 3, 4, 5]
    assert (logits[0] - logits[1]).abs().max().item() <= TOLERANCE


def test_greedy_steps_take_their_rows_of_the_static_reduction(checkpoints):
    """A padded greedy step takes its tokens and logprobs from the greedy reduction of every static row (a graph
    of its own on a GPU), picked by sample_rows: here one-token plans that sample on either side of one that does
    not (a prompt's 1-token chunk), padded to 4 rows. They are what an eager step gives."""
    greedy = SamplingParams(temperature=0.0)
    vocab = json.loads((checkpoints["gqa-untied"] / "config.json").read_text())["vocab_size"]
    prompts = random_tokens(vocab, [9, 4, 6], seed=4)
    tables = [[0, 1, 2], [3, 4], [5, 6]]
    results = []
    for graphs in (True, False):
        worker = ShardWorker(checkpoints["gqa-untied"], ParallelGroups(), num_kv_blocks=12, block_size=4,
                             cuda_graphs=graphs, max_graph_batch=4)
        worker.execute([SeqPlan(0, prompts[0], 0, tables[0], sampling=greedy),
                        SeqPlan(1, prompts[1][:3], 0, tables[1]),
                        SeqPlan(2, prompts[2], 0, tables[2], sampling=greedy)])
        results.append(worker.execute([SeqPlan(0, [7], 9, tables[0], sampling=greedy),
                                       SeqPlan(1, prompts[1][3:], 3, tables[1]),
                                       SeqPlan(2, [7], 6, tables[2], sampling=greedy)]))
    replayed, eager = results
    assert [r["seq_id"] for r in replayed] == [r["seq_id"] for r in eager] == [0, 2]
    assert [r["token_id"] for r in replayed] == [r["token_id"] for r in eager]
    assert all(abs(a["logprob"] - b["logprob"]) <= 1e-5 for a, b in zip(replayed, eager))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_padded_decode_matches_transformers(checkpoints, tp, pp):
    """Decode steps of 2 and 3 sequences padded to 2 and 4 rows, with YaRN and original RoPE and a sliding
    window in one batch, teacher-forced against transformers."""
    model_dir = checkpoints["tied-yarn-sliding"]
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = random_tokens(vocab, [11, 5, 20], seed=1)
    continuations = random_tokens(vocab, [9, 9, 9], seed=2)
    variants = [SCALED, ORIGINAL, SCALED]
    results = run_ranks(ranks.teacher_forced_logits, tp * pp, str(model_dir), tp, pp, prompts, continuations,
                        variants, True)
    ours = results[(pp - 1) * tp]
    refs = {True: reference(model_dir, scaled=True), False: reference(model_dir, scaled=False)}
    for i, (prompt, cont) in enumerate(zip(prompts, continuations)):
        with torch.no_grad():
            expected = refs[variants[i] == SCALED](torch.tensor([prompt + cont])).logits[0, len(prompt) - 1 :]
        assert (ours[i] - expected).abs().max().item() <= TOLERANCE
