"""Scheduler tests against a fake model that keeps a KV cache of prefix digests.

The fake model writes each planned token's "K/V" (a digest of its whole prefix) into the slot its block
table names and reads every position a sequence attends back through the block table: a lost, stale or
wrongly shared block changes what it reads. The next token is a hash of that context, so the right output of every
request is known in advance and a preempted or requeued sequence must reproduce it exactly.
"""

import collections
import copy
import dataclasses
from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.scheduler import BlockManager, QueueFullError, Scheduler, Sequence, SeqStatus
from shards.batch import KeptSequences
from shards.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def next_token(context: list[int]) -> int:
    return hash(tuple(context)) % 1000


def expected_output(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def prompt_of(seq_id: int, length: int) -> list[int]:
    return [(seq_id * 31 + i * 7) % 1000 for i in range(length)]


def kv(prev, token: int, rope_variant: int):
    """What the fake model caches at a position: a digest of every token up to it and the RoPE variant, as
    a real K/V depends on them. A block shared, evicted or reused wrongly shows up as a wrong digest."""
    return hash((prev, token, rope_variant))


class FakeModel:
    """Also a rank's KeptSequences: it reads each step's plans as a rank does, copies made whole."""

    def __init__(self, sched: Scheduler):
        self.sched, self.block_size = sched, sched.blocks.block_size
        self.cache = [[None] * self.block_size for _ in range(sched.blocks.num_total)]
        self.kept = KeptSequences()

    def rebuild(self):
        """The engine was rebuilt: its ranks keep nothing (the cache's contents are lost too)."""
        self.kept = KeptSequences()
        self.cache = [[None] * self.block_size for _ in range(self.sched.blocks.num_total)]

    def slot(self, table, pos):
        return self.cache[table[pos // self.block_size]], pos % self.block_size

    def read(self, table, pos):
        block, off = self.slot(table, pos)
        return block[off]

    def step(self, sent, forget=None):
        """`forget`: what went with these plans (None: the scheduler's now, for a step run as it is scheduled)."""
        forget = self.sched.pop_forgotten() if forget is None else forget
        plans = self.kept.resolve(copy.deepcopy(sent), forget)  # as a rank unpickles and resolves them
        for p in plans:  # all writes of a step land before any read, as in one forward
            prev = self.read(p.block_table, p.start - 1) if p.start else None
            for i, tok in enumerate(p.token_ids):
                prev = kv(prev, tok, p.rope_variant)
                block, off = self.slot(p.block_table, p.start + i)
                block[off] = prev
        results = []
        for p, original in zip(plans, sent):
            seq = self.sched._seqs.get(p.seq_id)
            if seq is None or self.sched._planned.get(p.seq_id) is not original:
                continue  # finished or requeued since: its results are dropped
            end = p.start + len(p.token_ids)
            context, expected = seq.all_token_ids[:end], None
            for pos, tok in enumerate(context):  # every position it attends holds its own prefix's K/V
                expected = kv(expected, tok, seq.rope_variant)
                assert self.read(p.block_table, pos) == expected, f"seq {p.seq_id}: wrong K/V at position {pos}"
            assert p.block_table == seq.block_table[: len(p.block_table)]  # the rank's table is the router's
            if p.sampling is None:
                assert not p.samples
                continue
            assert p.sampling is seq.sampling or p.sampling == seq.sampling
            assert p.output_token_ids == seq.output_token_ids  # all of them: their count seeds the RNG
            if p.sampling.repetition_penalty != 1.0:
                assert p.prompt_token_ids + p.output_token_ids == context
            else:
                assert p.prompt_token_ids == []
            results.append({"seq_id": p.seq_id, "token_id": next_token(context), "logprob": -1.0, "top": []})
        return results


def check_invariants(sched: Scheduler):
    blocks = sched.blocks
    tables = collections.Counter(b for s in sched.running for b in s.block_table)
    assert all(blocks._refs[b] == n for b, n in tables.items()), "a block's references are not its tables"
    assert sum(blocks._refs) == sum(tables.values()), "a block is referenced by no table"
    if not blocks.prefix_caching:
        assert max(tables.values(), default=1) == 1, "a block is in two tables"
    free = set(blocks._free) | set(blocks._cached_free)
    assert len(free) == blocks.num_free and not set(tables) & free, "a block is both free and owned"
    assert len(tables) + blocks.num_free == blocks.num_total
    assert blocks.usage == pytest.approx(len(tables) / blocks.num_total)
    assert set(blocks._cached_free) <= set(blocks._key_of) and set(blocks._free).isdisjoint(blocks._key_of)
    assert sched.num_running <= sched.max_num_seqs
    for s in sched.running:
        assert s.status is SeqStatus.RUNNING
        if s.in_flight:
            assert len(s.block_table) >= blocks.blocks_for(s.num_computed_tokens + 1)
        else:  # lazy: exactly the blocks its cached tokens use
            assert len(s.block_table) == blocks.blocks_for(s.num_computed_tokens)
    for s in sched.waiting:
        assert s.status is SeqStatus.WAITING and not s.in_flight
        assert s.block_table == [] and s.num_computed_tokens == 0
    # Tests number sequences in add() order, so age order is id order.
    assert [s.seq_id for s in sched.running] == sorted(s.seq_id for s in sched.running)
    assert [s.seq_id for s in sched.waiting] == sorted(s.seq_id for s in sched.waiting)


def check_step(sched: Scheduler, plans, in_flight_ids: set[int]):
    assert 1 <= sum(len(p.token_ids) for p in plans) <= sched.max_num_batched_tokens
    ids = [p.seq_id for p in plans]
    assert len(ids) == len(set(ids)) and not set(ids) & in_flight_ids, "steps in flight must be disjoint"
    for p in plans:
        seq = next(s for s in sched.running if s.seq_id == p.seq_id)
        end = p.start + len(p.token_ids)
        assert seq.in_flight and len(p.token_ids) >= 1
        assert p.token_ids == seq.all_token_ids[p.start : end]
        assert len(seq.block_table) * sched.blocks.block_size >= end
        # What crosses the wire: only the new blocks and outputs once the ranks hold the sequence.
        assert p.block_table == seq.block_table[len(seq.block_table) - len(p.block_table):]
        assert p.block_table is not seq.block_table and p.output_token_ids is not seq.output_token_ids
        if p.continues:
            assert len(p.block_table) <= -(-len(p.token_ids) // sched.blocks.block_size) + 1
        else:
            assert p.block_table == seq.block_table
        assert p.samples == (end == seq.num_tokens)
        if p.samples:
            assert p.output_token_ids == seq.output_token_ids[len(seq.output_token_ids) - len(p.output_token_ids):]
            assert (p.sampling is None) == p.keeps_sampling


class Driver:
    """A router loop in miniature: up to `depth` steps in flight, run by the model in submission order."""

    def __init__(self, num_blocks, block_size, max_num_seqs=8, budget=16, max_waiting=1000, depth=1,
                 prefix_caching=False):
        self.sched = Scheduler(BlockManager(num_blocks, block_size, prefix_caching), max_num_seqs, budget, max_waiting)
        self.model = FakeModel(self.sched)
        self.depth = depth
        self.pending: deque = deque()
        self.max_new: dict[int, int] = {}
        self.outputs: dict[int, list[int]] = {}
        self.steps: list[list] = []

    def add(self, seq_id, prompt_len, max_new, sampling=GREEDY, prompt=None, **seq_fields):
        self.max_new[seq_id] = max_new
        self.sched.add(Sequence(seq_id, prompt or prompt_of(seq_id, prompt_len), sampling, **seq_fields))

    def fill(self):
        while len(self.pending) < self.depth:
            plans = self.sched.schedule()
            check_invariants(self.sched)
            if not plans:
                break
            check_step(self.sched, plans, {p.seq_id for step, _ in self.pending for p in step})
            self.pending.append((plans, self.sched.pop_forgotten()))
            self.steps.append(plans)

    def retire(self):
        plans, forget = self.pending.popleft()
        for seq in self.sched.complete(plans, self.model.step(plans, forget)):
            assert not seq.in_flight
            if len(seq.output_token_ids) == self.max_new[seq.seq_id]:
                self.outputs[seq.seq_id] = list(seq.output_token_ids)
                self.sched.finish(seq.seq_id)
        check_invariants(self.sched)

    def tick(self):
        self.fill()
        if self.pending:
            self.retire()
        else:  # nothing in flight and nothing schedulable would be a deadlock
            assert not self.sched.has_work

    def run(self, max_ticks=100_000):
        for _ in range(max_ticks):
            if not self.sched.has_work and not self.pending:
                return self.outputs
            self.tick()
        raise AssertionError("scheduler made no progress")


# -- block manager -------------------------------------------------------------------------------------


def test_block_manager_accounting():
    bm = BlockManager(4, 16)
    assert (bm.num_total, bm.num_free, bm.usage) == (4, 4, 0.0)
    assert [bm.blocks_for(n) for n in (0, 1, 16, 17, 64)] == [0, 1, 1, 2, 4]
    got = bm.allocate(3)
    assert len(set(got)) == 3 and bm.num_free == 1 and bm.usage == 0.75
    with pytest.raises(RuntimeError, match="cannot allocate 2 KV blocks: 1 of 4 free"):
        bm.allocate(2)
    bm.free(got[:1])
    with pytest.raises(ValueError, match="not allocated"):
        bm.free(got[:1])
    bm.free(got[1:])
    assert bm.num_free == 4


# -- admission -----------------------------------------------------------------------------------------


def test_queue_full_error_names_the_limit():
    sched = Scheduler(BlockManager(8, 4), max_num_seqs=4, max_num_batched_tokens=16, max_waiting=2)
    sched.add(Sequence(0, [1, 2], GREEDY))
    sched.add(Sequence(1, [1, 2], GREEDY))
    with pytest.raises(QueueFullError, match=r"waiting queue is full \(max_waiting=2\)"):
        sched.add(Sequence(2, [1, 2], GREEDY))
    assert sched.num_waiting == 2


def test_prompt_longer_than_whole_cache_is_refused():
    sched = Scheduler(BlockManager(3, 4), max_num_seqs=4, max_num_batched_tokens=16, max_waiting=8)
    sched.add(Sequence(0, list(range(12)), GREEDY))  # exactly fills the cache: allowed
    with pytest.raises(ValueError, match=r"13 tokens needs 4 KV blocks of 4, the cache has 3 \(12 tokens\)"):
        sched.add(Sequence(1, list(range(13)), GREEDY))
    with pytest.raises(ValueError, match="empty prompt"):
        sched.add(Sequence(2, [], GREEDY))
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(Sequence(0, [1], GREEDY))


def test_fcfs_and_max_num_seqs():
    d = Driver(num_blocks=64, block_size=4, max_num_seqs=2, budget=64)
    for i in range(4):
        d.add(i, prompt_len=3, max_new=2 + i)
    d.fill()
    assert [p.seq_id for p in d.steps[0]] == [0, 1] and d.sched.num_waiting == 2  # cap of 2 running
    assert d.run() == {i: expected_output(prompt_of(i, 3), 2 + i) for i in range(4)}
    first_step = {i: next(n for n, step in enumerate(d.steps) if any(p.seq_id == i for p in step)) for i in range(4)}
    assert first_step[0] == first_step[1] < first_step[2] < first_step[3]  # 2 replaces 0, 3 replaces 1
    assert max(len(step) for step in d.steps) == 2


def test_fcfs_head_that_does_not_fit_blocks_later_ones():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=64, max_waiting=8)
    sched.add(Sequence(0, list(range(8)), GREEDY))  # 2 blocks
    sched.add(Sequence(1, list(range(12)), GREEDY))  # 3 blocks: does not fit next to seq 0
    sched.add(Sequence(2, [5], GREEDY))  # 1 block would fit, but must not overtake seq 1
    plans = sched.schedule()
    assert [p.seq_id for p in plans] == [0]
    assert [s.seq_id for s in sched.waiting] == [1, 2] and sched.blocks.num_free == 2
    sched.finish(0)
    assert [p.seq_id for p in sched.schedule()] == [1, 2]


def test_first_chunk_shrinks_to_remaining_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10, max_waiting=8)
    model = FakeModel(sched)
    for i in range(3):
        sched.add(Sequence(i, prompt_of(i, 2), GREEDY))
    plans = sched.schedule()
    sched.complete(plans, model.step(plans))  # three prompts of 2 tokens: all decoding now
    sched.add(Sequence(3, prompt_of(3, 30), GREEDY))
    plans = sched.schedule()
    assert [(p.seq_id, len(p.token_ids)) for p in plans] == [(0, 1), (1, 1), (2, 1), (3, 7)]
    assert plans[3].start == 0 and not plans[3].samples


# -- chunked prefill -----------------------------------------------------------------------------------


def test_chunked_prefill_interleaves_with_decodes():
    d = Driver(num_blocks=64, block_size=4, max_num_seqs=8, budget=8)
    d.add(0, prompt_len=3, max_new=10)
    d.tick()  # seq 0's prompt: now it decodes every step
    d.add(1, prompt_len=20, max_new=2)
    for _ in range(3):
        d.tick()
    assert [[(p.seq_id, p.start, len(p.token_ids), p.samples) for p in s] for s in d.steps[1:4]] == [
        [(0, 3, 1, True), (1, 0, 7, False)],
        [(0, 4, 1, True), (1, 7, 7, False)],
        [(0, 5, 1, True), (1, 14, 6, True)],  # the last chunk ends the prompt: it samples
    ]
    outputs = d.run()
    assert outputs == {i: expected_output(prompt_of(i, n), m) for i, n, m in [(0, 3, 10), (1, 20, 2)]}


def test_prompts_that_fit_one_step_are_admitted_whole_beside_decodes():
    """prefill_budget governs long prompts only: short ones join the batch at once (throughput)."""
    d = Driver(num_blocks=64, block_size=4, max_num_seqs=8, budget=8)
    d.sched.prefill_budget = 3
    d.add(0, prompt_len=2, max_new=10)
    d.tick()
    d.add(1, prompt_len=5, max_new=2)
    d.add(2, prompt_len=5, max_new=2)
    d.tick()
    assert [(p.seq_id, len(p.token_ids)) for p in d.steps[-1]] == [(0, 1), (1, 5), (2, 2)]  # the step's budget: 8
    assert d.run() == {i: expected_output(prompt_of(i, n), m) for i, n, m in [(0, 2, 10), (1, 5, 2), (2, 5, 2)]}


def test_prefill_budget_limits_prompt_chunks_only_beside_decodes():
    d = Driver(num_blocks=64, block_size=4, max_num_seqs=8, budget=8)
    d.sched.prefill_budget = 3
    d.add(0, prompt_len=6, max_new=10)
    d.tick()  # nobody decodes yet: the whole budget goes to the prompt
    assert [(p.seq_id, len(p.token_ids)) for p in d.steps[-1]] == [(0, 6)]
    d.add(1, prompt_len=20, max_new=2)
    d.tick()
    d.tick()
    assert [[(p.seq_id, len(p.token_ids)) for p in s] for s in d.steps[-2:]] == [[(0, 1), (1, 3)], [(0, 1), (1, 3)]]
    assert d.run() == {i: expected_output(prompt_of(i, n), m) for i, n, m in [(0, 6, 10), (1, 20, 2)]}


def test_sampling_plan_fields():
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=64, max_waiting=8)
    model = FakeModel(sched)
    rep = SamplingParams(repetition_penalty=1.3, seed=5)
    sched.add(Sequence(0, [1, 2, 3], rep, rope_variant=1))
    sched.add(Sequence(1, [4, 5], GREEDY))
    first = sched.schedule()  # whole plans: the ranks hold nothing of them yet
    assert [(p.continues, p.sampling, p.prompt_token_ids, p.block_table) for p in first] == [
        (False, rep, [1, 2, 3], [0]), (False, GREEDY, [], [1])]
    sched.complete(first, model.step(first))
    seen = model.kept.seen(0)  # made from the context when first asked, then grown by each step's outputs
    assert set(seen.ids.tolist()) == {1, 2, 3} and model.kept.seen(1) is None  # seq 1 has no penalty
    for _ in range(2):
        plans = sched.schedule()
        sched.complete(plans, model.step(plans))
    # All but the newest output, which reaches the ranks with the next plan.
    assert model.kept.seen(0) is seen and seen.ids.tolist() == list(dict.fromkeys(sched.running[0].all_token_ids[:-1]))
    p0, p1 = sent = sched.schedule()
    last = sched.running[0].output_token_ids[-1]
    # Continuing plans: the new token and what is new since the previous plan only.
    assert (p0.token_ids, p0.start, p0.rope_variant, p0.continues, p0.keeps_sampling) == ([last], 5, 1, True, True)
    assert (p0.sampling, p0.prompt_token_ids, p0.output_token_ids, p0.block_table) == (None, [], [last], [])
    assert p1.output_token_ids == [sched.running[1].output_token_ids[-1]] and p1.block_table == [3]  # position 4
    r0, r1 = model.kept.resolve(copy.deepcopy(sent))  # what the ranks make of them
    assert (r0.sampling, r0.prompt_token_ids, r0.block_table) == (rep, [1, 2, 3], [0, 2])
    assert r0.output_token_ids == sched.running[0].output_token_ids and len(r0.output_token_ids) == 3  # RNG counter
    assert (r1.sampling, r1.prompt_token_ids, r1.block_table) == (GREEDY, [], [1, 3])
    assert r1.output_token_ids == sched.running[1].output_token_ids
    assert sched.running[0].first_scheduled_time is not None
    assert sched.pop_forgotten() == []


def test_ranks_forget_released_sequences_and_start_them_afresh():
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=64, max_waiting=8)
    model = FakeModel(sched)
    for i in range(3):
        sched.add(Sequence(i, prompt_of(i, 5), SamplingParams(repetition_penalty=1.1)))
    for _ in range(2):
        plans = sched.schedule()
        sched.complete(plans, model.step(plans, sched.pop_forgotten()))
    assert len(model.kept) == 3
    sched.finish(1)
    sched._preempt(sched.running[-1])  # seq 2: recomputed later, from a whole plan
    assert sched.pop_forgotten() == [1, 2] and sched.pop_forgotten() == []
    model.kept.resolve([], [1, 2])
    assert len(model.kept) == 1
    plans = sched.schedule()
    assert [(p.seq_id, p.continues, len(p.prompt_token_ids), len(p.output_token_ids)) for p in plans] == [
        (0, True, 0, 1), (2, False, 5, 2)]  # seq 2 recomputes its prompt and first output, then samples
    sched.complete(plans, model.step(plans, []))  # the fake model checks the resolved plans against the router's
    with pytest.raises(ValueError, match="sequence 7: a continuing plan"):
        model.kept.resolve([dataclasses.replace(plans[0], seq_id=7)])


# -- preemption ----------------------------------------------------------------------------------------


def test_preemption_requeues_newest_first_and_reproduces_tokens():
    requests = [(0, 6, 14), (1, 5, 14), (2, 7, 14)]  # (id, prompt, new): 20, 19, 21 tokens, 6 blocks each
    roomy = Driver(num_blocks=64, block_size=4, budget=32)
    tight = Driver(num_blocks=10, block_size=4, budget=32)
    for d in (roomy, tight):
        for r in requests:
            d.add(*r)

    # Drive the tight run until the first preemption and look at who went.
    while tight.sched.num_preemptions == 0:
        tight.tick()
    assert [s.seq_id for s in tight.sched.waiting] == [2]  # the newest, at the front of waiting
    victim = tight.sched.waiting[0]
    assert victim.num_preemptions == 1 and victim.block_table == [] and victim.num_computed_tokens == 0
    assert victim.output_token_ids  # it had generated: those tokens are recomputed, not lost

    assert tight.run() == roomy.run() == {i: expected_output(prompt_of(i, n), m) for i, n, m in requests}
    assert roomy.sched.num_preemptions == 0 and tight.sched.num_preemptions >= 1
    assert tight.sched.blocks.num_free == 10


def test_preemption_never_touches_in_flight_sequences():
    d = Driver(num_blocks=6, block_size=2, max_num_seqs=4, budget=8, depth=3)
    for i in range(4):
        d.add(i, prompt_len=2, max_new=9)
    seen_in_flight = []

    original = d.sched._preempt

    def preempt(seq):
        seen_in_flight.append(seq.in_flight)
        original(seq)

    d.sched._preempt = preempt
    outputs = d.run()
    assert outputs == {i: expected_output(prompt_of(i, 2), 9) for i in range(4)}
    assert seen_in_flight and not any(seen_in_flight)
    assert d.sched.blocks.num_free == 6


def test_sequence_outgrowing_the_whole_cache_is_aborted_not_deadlocked():
    d = Driver(num_blocks=2, block_size=4, budget=8)
    d.add(0, prompt_len=6, max_new=100)  # can hold 8 tokens: samples tokens 7, 8 and 9, then cannot go on
    d.add(1, prompt_len=2, max_new=3)
    for _ in range(50):
        if not d.sched.has_work:
            break
        d.tick()
    aborted = d.sched.pop_aborted()
    assert [s.seq_id for s in aborted] == [0] and aborted[0].status is SeqStatus.FINISHED
    assert aborted[0].output_token_ids == expected_output(prompt_of(0, 6), 3)
    assert d.outputs == {1: expected_output(prompt_of(1, 2), 3)}
    assert d.sched.pop_aborted() == [] and d.sched.blocks.num_free == 2


# -- in flight -----------------------------------------------------------------------------------------


def test_steps_in_flight_are_disjoint():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64, max_waiting=8)
    model = FakeModel(sched)
    for i in range(3):
        sched.add(Sequence(i, prompt_of(i, 3), GREEDY))
    first = sched.schedule()
    assert [p.seq_id for p in first] == [0, 1, 2]
    assert sched.schedule() == []  # everyone is in flight
    sched.complete(first, model.step(first))
    sched.add(Sequence(3, prompt_of(3, 3), GREEDY))
    a = sched.schedule()
    b = sched.schedule()
    assert [p.seq_id for p in a] == [0, 1, 2, 3] and b == []
    done = sched.complete(a, model.step(a))
    assert [s.seq_id for s in done] == [0, 1, 2, 3]
    assert all(not s.in_flight for s in sched.running)


def test_finish_mid_flight_frees_blocks_at_once():
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=64, max_waiting=8)
    model = FakeModel(sched)
    sched.add(Sequence(0, prompt_of(0, 9), GREEDY))  # 3 blocks
    sched.add(Sequence(1, prompt_of(1, 3), GREEDY))  # 1 block
    plans = sched.schedule()
    assert sched.blocks.num_free == 12
    sched.finish(0)
    assert sched.blocks.num_free == 15 and sched.num_running == 1
    done = sched.complete(plans, model.step(plans))  # seq 0's plan and result are ignored
    assert [s.seq_id for s in done] == [1]
    sched.finish(0)  # idempotent
    sched.finish(1)
    assert sched.blocks.num_free == 16 and not sched.has_work


def test_finish_waiting_sequence():
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=1, max_num_batched_tokens=64, max_waiting=8)
    sched.add(Sequence(0, [1], GREEDY))
    sched.add(Sequence(1, [2], GREEDY))
    sched.schedule()
    sched.finish(1)
    assert sched.num_waiting == 0 and sched.num_running == 1


def test_requeue_all_recomputes_everything():
    requests = [(i, 3 + 4 * i, 6 + i) for i in range(5)]
    d = Driver(num_blocks=40, block_size=4, max_num_seqs=3, budget=10, depth=2)
    for r in requests:
        d.add(*r)
    for _ in range(4):
        d.tick()
    d.fill()
    assert d.pending and any(s.in_flight for s in d.sched.running)
    running = [s.seq_id for s in d.sched.running]
    d.sched.requeue_all()  # the engine died: its steps in flight are lost
    d.pending.clear()
    d.model.rebuild()
    assert d.sched.num_running == 0 and d.sched.blocks.num_free == 40
    assert [s.seq_id for s in d.sched.waiting][: len(running)] == running  # in front, in arrival order
    assert all(s.num_computed_tokens == 0 and not s.in_flight for s in d.sched.waiting)
    assert d.run() == {i: expected_output(prompt_of(i, n), m) for i, n, m in requests}
    assert d.sched.blocks.num_free == 40


def test_stale_results_after_requeue_are_ignored():
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=64, max_waiting=8)
    model = FakeModel(sched)
    sched.add(Sequence(0, prompt_of(0, 5), GREEDY))
    stale = sched.schedule()
    stale_results = model.step(stale)
    sched.requeue_all()
    model.rebuild()
    fresh = sched.schedule()
    assert sched.complete(stale, stale_results) == []  # from before the failure: dropped
    assert sched.running[0].in_flight and sched.running[0].output_token_ids == []
    [seq] = sched.complete(fresh, model.step(fresh))
    assert seq.output_token_ids == expected_output(prompt_of(0, 5), 1)


def test_missing_result_is_an_error_and_changes_nothing():
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=64, max_waiting=8)
    sched.add(Sequence(7, [1, 2], GREEDY))
    plans = sched.schedule()
    with pytest.raises(ValueError, match=r"no token for sampling sequences \[7\]"):
        sched.complete(plans, [])
    assert sched.running[0].in_flight and sched.running[0].num_computed_tokens == 0


# -- randomized ----------------------------------------------------------------------------------------


@st.composite
def scenarios(draw):
    block_size = draw(st.integers(1, 6))
    num_blocks = draw(st.integers(2, 24))
    capacity = num_blocks * block_size
    n = draw(st.integers(1, 8))
    requests = []
    for i in range(n):
        prompt = draw(st.integers(1, max(1, capacity - 1)))
        new = draw(st.integers(1, max(1, min(12, capacity - prompt))))
        arrival = draw(st.integers(0, 15))
        requests.append((i, prompt, new, arrival))
    cancels = draw(st.lists(st.tuples(st.integers(0, 40), st.integers(0, n - 1)), max_size=3))
    return dict(
        block_size=block_size,
        num_blocks=num_blocks,
        max_num_seqs=draw(st.integers(1, 6)),
        budget=draw(st.integers(1, 24)),
        depth=draw(st.integers(1, 3)),
        requests=requests,
        cancels=cancels,
        requeue_at=draw(st.none() | st.integers(0, 30)),
        prefix_caching=draw(st.booleans()),
        shared=draw(st.integers(0, capacity)),  # leading tokens every prompt has in common
        variants=draw(st.sampled_from([1, 2])),  # RoPE variants in use (every other request when 2)
    )


def shared_prompt(seq_id: int, length: int, shared: int) -> list[int]:
    """A prompt whose first `shared` tokens are every prompt's, the rest its own."""
    return [(k * 13 + 5) % 1000 for k in range(min(shared, length))] + prompt_of(seq_id, length)[shared:]


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_randomized_invariants_and_exact_tokens(sc):
    d = Driver(sc["num_blocks"], sc["block_size"], sc["max_num_seqs"], sc["budget"], depth=sc["depth"],
               prefix_caching=sc["prefix_caching"])
    requests = sorted(sc["requests"], key=lambda r: r[3])  # ids in add() order
    requests = [(i, prompt, new, arrival) for i, (_, prompt, new, arrival) in enumerate(requests)]
    cancelled = {}
    for tick in range(20_000):
        for i, prompt, new, arrival in requests:
            if arrival == tick:
                d.add(i, prompt, new, prompt=shared_prompt(i, prompt, sc["shared"]), rope_variant=i % sc["variants"])
        for at, i in sc["cancels"]:
            seq = d.sched._seqs.get(i)
            if at == tick and seq is not None:
                cancelled[i] = list(seq.output_token_ids)
                free_before = d.sched.blocks.num_free
                held = sum(d.sched.blocks._refs[b] == 1 for b in seq.block_table)  # the ones no one else holds
                d.sched.finish(i)
                assert d.sched.blocks.num_free == free_before + held
        if tick == sc["requeue_at"]:
            d.fill()
            d.sched.requeue_all()
            d.pending.clear()
            d.model.rebuild()
            check_invariants(d.sched)
        if tick > 15 and not d.sched.has_work and not d.pending:
            break
        if d.sched.has_work or d.pending:
            d.tick()
    else:
        raise AssertionError("scheduler made no progress")
    for i, prompt, new, _ in requests:
        want = expected_output(shared_prompt(i, prompt, sc["shared"]), new)
        if i in cancelled:
            assert want[: len(cancelled[i])] == cancelled[i]
        else:
            assert d.outputs[i] == want
    assert d.sched.blocks.num_free == d.sched.blocks.num_total and d.sched.pop_aborted() == []


# -- prefix caching ------------------------------------------------------------------------------------

SYSTEM = [(k * 13 + 5) % 1000 for k in range(20)]  # 5 full blocks of 4


def first_plan(d: Driver, seq_id: int):
    return next(p for step in d.steps for p in step if p.seq_id == seq_id)


def test_a_shared_prefix_is_computed_once_and_later_requests_start_after_it():
    d = Driver(num_blocks=64, block_size=4, budget=64, prefix_caching=True)
    d.add(0, 0, 3, prompt=SYSTEM + [1, 2, 3])
    d.run()
    d.add(1, 0, 3, prompt=SYSTEM + [7, 8])
    d.add(2, 0, 3, prompt=SYSTEM[:10] + [9])  # ends mid-block: the 2 full blocks it shares
    outputs = d.run()
    assert (first_plan(d, 1).start, first_plan(d, 2).start) == (20, 8)
    assert outputs[1] == expected_output(SYSTEM + [7, 8], 3) and outputs[2] == expected_output(SYSTEM[:10] + [9], 3)
    assert (d.sched.prefix_queried_tokens, d.sched.prefix_hit_tokens) == (23 + 22 + 11, 20 + 8)
    assert d.sched._seqs == {} and d.sched.blocks.num_free == 64  # cached blocks count as free


def test_identical_prompts_in_one_step_share_what_the_first_computes():
    d = Driver(num_blocks=64, block_size=4, budget=64, prefix_caching=True)
    for i in range(3):
        d.add(i, 0, 4, prompt=SYSTEM[:17])
    d.fill()
    assert [(p.seq_id, p.start, len(p.token_ids)) for p in d.steps[0]] == [(0, 0, 17), (1, 16, 1), (2, 16, 1)]
    assert d.run() == {i: expected_output(SYSTEM[:17], 4) for i in range(3)}


def test_a_whole_cached_prompt_still_computes_its_last_block():
    """At least the last token is computed, in a block of its own: a shared block is never written."""
    d = Driver(num_blocks=64, block_size=4, budget=64, prefix_caching=True)
    d.add(0, 0, 2, prompt=SYSTEM[:16])
    d.run()
    d.add(1, 0, 2, prompt=SYSTEM[:16])
    assert d.run()[1] == expected_output(SYSTEM[:16], 2) and first_plan(d, 1).start == 12


@pytest.mark.parametrize("other", [dict(rope_variant=1), dict(cache_salt="tenant-b")])
def test_other_rope_variants_and_salts_never_share(other):
    d = Driver(num_blocks=64, block_size=4, budget=64, prefix_caching=True)
    d.add(0, 0, 2, prompt=SYSTEM, cache_salt="tenant-a")
    d.run()
    d.add(1, 0, 2, prompt=SYSTEM, **({"cache_salt": "tenant-a"} | other))
    d.add(2, 0, 2, prompt=SYSTEM, cache_salt="tenant-a")
    d.run()
    assert first_plan(d, 1).start == 0 and first_plan(d, 2).start == 16


def test_prompt_logprobs_compute_the_whole_prompt():
    d = Driver(num_blocks=64, block_size=4, budget=64, prefix_caching=True)
    d.add(0, 0, 2, prompt=SYSTEM)
    d.run()
    d.add(1, 0, 2, prompt=SYSTEM, sampling=SamplingParams(temperature=0.0, prompt_logprobs=0))
    d.fill()
    assert first_plan(d, 1).start == 0


def test_cached_blocks_are_evicted_least_recently_freed_first_and_forgotten_after_a_failure():
    d = Driver(num_blocks=10, block_size=4, budget=64, prefix_caching=True)
    a, b = SYSTEM[:12], [500 + k for k in range(12)]
    d.add(0, 0, 1, prompt=a)  # 12 tokens: 3 full blocks, cached once it is done
    d.run()
    d.add(1, 0, 1, prompt=b)
    d.run()
    assert d.sched.blocks.num_free == 10 and len(d.sched.blocks._cached_free) == 6
    d.add(2, 0, 1, prompt=[900 + k for k in range(20)])  # 5 blocks: the 4 never cached, then a's first
    d.run()
    d.add(3, 0, 1, prompt=b)
    d.add(4, 0, 1, prompt=a)
    d.run()
    assert first_plan(d, 3).start == 8 and first_plan(d, 4).start == 0  # a's chain lost its head; b's holds
    d.add(5, 0, 1, prompt=b)
    d.fill()
    d.sched.requeue_all()  # an engine failure: the rebuilt engine's memory holds nothing
    d.pending.clear()
    d.model.rebuild()
    d.steps.clear()
    assert d.run()[5] == expected_output(b, 1) and first_plan(d, 5).start == 0
