"""Continuous batching with chunked prefill over a paged KV cache.

The router owns every token of every sequence, so the scheduler never needs the model's state back:
a sequence is just "tokens known" and "tokens whose K/V is cached". Each step gives every scheduled
sequence a chunk of its not-yet-cached tokens; the chunk samples when it reaches the end of the known
tokens. A decode is a 1-token chunk, a prompt is one or more chunks, and preemption, recovery after an
engine failure and resuming a long prompt are all the same thing: cache fewer tokens, compute the rest.

Age is the order of add(). Both queues stay sorted by age, so "oldest first" and FCFS are list order,
and a preempted sequence goes back to the front of waiting by plain sorted insertion (every sequence
never admitted is younger than every sequence ever admitted).
"""

import bisect
import enum
import hashlib
import struct
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from shards.batch import SeqPlan
from shards.sampling import SamplingParams


class QueueFullError(Exception):
    """The waiting queue is at max_waiting: refuse now (RESOURCE_EXHAUSTED) rather than queue forever."""


class BlockManager:
    """Fixed-size KV blocks handed out by id. The shards hold the memory; this only does the accounting.

    With prefix caching, a full block is also content-addressed: its key (block_key) names everything its
    K/V depends on, so a sequence whose leading blocks have keys already cached takes those blocks (shared,
    reference-counted) instead of computing them. A block nobody holds stays cached, and is reused on a hit,
    until an allocation needs it: blocks never cached go first, then cached ones least recently freed first.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_total = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free = deque(range(num_blocks))  # held by nobody, content unknown: FIFO
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # held by nobody, content known: LRU first
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take (cached ones included: they are evicted as needed)."""
        return len(self._free) + len(self._cached_free)

    @property
    def usage(self) -> float:
        return 1 - self.num_free / self.num_total

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise RuntimeError(f"cannot allocate {count} KV blocks: {self.num_free} of {self.num_total} free")
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.popleft()
            else:  # evict the least recently freed cached block: its key goes with it
                block, _ = self._cached_free.popitem(last=False)
                del self._block_of[self._key_of.pop(block)]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            if self._refs[block] < 1:  # a double free would hand one block to two sequences
                raise ValueError(f"KV block {block} is not allocated")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._cached_free[block] = None
                else:
                    self._free.append(block)

    def cached(self, keys: list[bytes]) -> list[int]:
        """Take (one more reference to) the blocks of the longest cached run of these leading keys."""
        hits = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._cached_free[block]
            self._refs[block] += 1
            hits.append(block)
        return hits

    def remember(self, block: int, key: bytes) -> None:
        """`block` (held) will hold the K/V `key` names once the step that writes it runs: later steps may
        share it. A key cached already keeps its block; a block keeps its first key."""
        if self.prefix_caching and key not in self._block_of and block not in self._key_of:
            self._key_of[block], self._block_of[key] = key, block

    def forget_all(self) -> None:
        """Nothing is cached any more (the engine was rebuilt: its KV memory is new)."""
        self._free.extend(self._cached_free)
        self._cached_free.clear()
        self._key_of.clear()
        self._block_of.clear()


def block_key(parent: bytes, tokens: list[int], rope_variant: int, cache_salt: str) -> bytes:
    """The content key of a full block: its tokens, chained to every token before them through the parent
    block's key, and everything else its K/V depends on (the RoPE variant) or that must not share it (the
    tenant's salt). A cryptographic digest, so two different prefixes never share a key."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(struct.pack(f"<i{len(tokens)}q", rope_variant, *tokens))
    digest.update(cache_salt.encode())
    return digest.digest()


class SeqStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    sampling: SamplingParams
    rope_variant: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V is in the cache
    status: SeqStatus = SeqStatus.WAITING
    in_flight: bool = False  # part of a step that has not returned yet
    first_scheduled_time: float | None = None
    num_preemptions: int = 0
    cache_salt: str = ""  # sequences with different salts never share cached blocks (tenants)
    num_cached_tokens: int = 0  # prompt tokens its first admission found in the prefix cache
    block_keys: list[bytes] = field(default_factory=list)  # content keys of its full blocks, computed lazily
    samples: bool = True  # False: only its prompt is computed (for its prompt logprobs), nothing sampled
    # With sampling.prompt_logprobs: a row per prompt token computed so far, None for the first (no context).
    prompt_logprobs: list[dict | None] = field(default_factory=lambda: [None])
    # A pooling sequence (samples False): SeqPlan.pooling and pool_position of its chunks, and each computed
    # chunk's part of the answer, in prompt order (router/pooling.py joins them).
    pooling: str | None = None
    pool_position: int | None = None
    pooled: list = field(default_factory=list)
    # What the ranks keep of its plans since its admission (shards/batch.py KeptSequences): blocks of its table
    # (None: nothing, the next plan is whole), outputs, and whether its sampling parameters (and prompt) were sent.
    sent_blocks: int | None = None
    sent_outputs: int = 0
    sent_sampling: bool = False

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without copying a long prompt for every decode."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]


class Scheduler:
    """Builds one step at a time: running sequences first (oldest first), then FCFS admission.

    A sequence is in at most one step at a time (`in_flight`), so with pipeline parallelism several
    steps can be outstanding and are disjoint. complete() must get back the very plan objects that
    schedule() returned: plans from before a finish() or requeue_all() are recognised and dropped.
    """

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_waiting: int):
        if min(max_num_seqs, max_num_batched_tokens, max_waiting) < 1:
            raise ValueError(
                f"max_num_seqs, max_num_batched_tokens and max_waiting must be >= 1, got "
                f"{max_num_seqs}, {max_num_batched_tokens} and {max_waiting}"
            )
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Tokens of long prompts (more than max_num_batched_tokens, so chunked anyway) one step may carry
        # beside decodes. The runner adapts it, so a long prefill cannot stretch everyone's inter-token
        # latency; prompts that fit one step are admitted whole, which keeps batches large.
        self.prefill_budget = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.waiting: list[Sequence] = []  # sorted by age: FCFS order
        self.running: list[Sequence] = []  # sorted by age: holds blocks, possibly in flight
        self.num_preemptions = 0
        self.prefix_queried_tokens = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_hit_tokens = 0  # of them, found there
        self._seqs: dict[int, Sequence] = {}
        self._age: dict[int, int] = {}  # seq_id -> add() order
        self._next_age = 0
        self._planned: dict[int, SeqPlan] = {}  # seq_id -> its plan in flight
        self._aborted: list[Sequence] = []
        self._forgotten: list[int] = []  # sequences whose kept plans the ranks may drop (pop_forgotten)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if not seq.prompt_token_ids:
            raise ValueError(f"sequence {seq.seq_id}: empty prompt")
        if seq.seq_id in self._seqs:
            raise ValueError(f"sequence {seq.seq_id} is already scheduled")
        need = self.blocks.blocks_for(len(seq.prompt_token_ids))
        if need > self.blocks.num_total:  # it could never be admitted, and would block FCFS forever
            raise ValueError(
                f"prompt of {len(seq.prompt_token_ids)} tokens needs {need} KV blocks of "
                f"{self.blocks.block_size}, the cache has {self.blocks.num_total} "
                f"({self.blocks.num_total * self.blocks.block_size} tokens)"
            )
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"waiting queue is full (max_waiting={self.max_waiting})")
        seq.status, seq.in_flight = SeqStatus.WAITING, False
        seq.num_computed_tokens, seq.block_table = 0, []
        self._seqs[seq.seq_id] = seq
        self._age[seq.seq_id] = self._next_age
        self._next_age += 1
        self.waiting.append(seq)  # youngest: the end of the queue is its sorted place

    def schedule(self) -> list[SeqPlan]:
        """The next step's plans ([] when nothing can run now); marks each planned sequence in flight."""
        budget = self.max_num_batched_tokens
        decoding = any(s.num_tokens - s.num_computed_tokens == 1 and not s.in_flight for s in self.running)
        prefill_budget = self.prefill_budget if decoding else budget  # nobody to keep waiting: go full speed
        plans: list[SeqPlan] = []
        preempted = False
        for seq in list(self.running):  # a snapshot: preemption removes from self.running
            if budget == 0:
                break
            if seq.in_flight or seq.status is not SeqStatus.RUNNING or self._drop_if_unfittable(seq):
                continue
            while self._room(seq) == 0:  # no free block: preempt the newest idle sequence, seq at worst
                victim = next(s for s in reversed(self.running) if not s.in_flight)
                if victim is seq and self.running[-1] is not seq:
                    break  # younger ones are in flight: wait for them to return rather than yield to them
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING or self._room(seq) == 0:
                continue
            # A prefill chunk shrinks to the free blocks rather than preempting anyone.
            left = seq.num_tokens - seq.num_computed_tokens
            chunk = min(left, budget, self._room(seq), prefill_budget if self.is_long(seq) else left)
            if chunk == 0:
                continue
            self._grow(seq, chunk)
            plans.append(self._plan(seq, chunk))
            budget -= chunk
            prefill_budget -= chunk if self.is_long(seq) else 0

        # Admission. Not in a step that had to preempt: the cache is full and the preempted would thrash.
        while not preempted and self.waiting and budget and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._drop_if_unfittable(seq):
                continue
            self._take_cached_prefix(seq)
            # A smaller first chunk rather than waiting for budget.
            left = seq.num_tokens - seq.num_computed_tokens
            chunk = min(left, budget, prefill_budget if self.is_long(seq) else left)
            if chunk == 0 or self.blocks.blocks_for(seq.num_computed_tokens + chunk) - len(seq.block_table) \
                    > self.blocks.num_free:
                self._release(seq)  # its cached blocks stay cached
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.pop(0)
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=self._key)
            self._grow(seq, chunk)
            plans.append(self._plan(seq, chunk))
            budget -= chunk
            prefill_budget -= chunk if self.is_long(seq) else 0
        return plans

    def is_long(self, seq: Sequence) -> bool:
        """Too many tokens to compute in one step: its prefill is chunked, at prefill_budget beside decodes."""
        return seq.num_tokens > self.max_num_batched_tokens

    def long_prefill_tokens(self, plans: list[SeqPlan]) -> int:
        """Tokens of long sequences' prompt chunks in these plans (what prefill_budget governs)."""
        return sum(len(p.token_ids) for p in plans
                   if len(p.token_ids) > 1 and p.seq_id in self._seqs and self.is_long(self._seqs[p.seq_id]))

    def complete(self, plans: list[SeqPlan], results: list[dict]) -> list[Sequence]:
        """Apply a finished step; returns the sequences that got a new token (or, not sampling, whose prompt
        is now computed), in plan order. Prompt logprob rows are kept on their sequence.

        Plans of sequences finished or requeued since schedule() are ignored, with their results.
        """
        by_id = {r["seq_id"]: r for r in results}
        live = [p for p in plans if self._planned.get(p.seq_id) is p]
        missing = [p.seq_id for p in live
                   if (p.samples or p.prompt_logprobs is not None or p.pooling is not None)
                   and p.seq_id not in by_id]
        if missing:  # checked before changing anything, so the caller can still requeue_all()
            raise ValueError(f"step results have no token for sampling sequences {missing} (or no prompt rows)")
        sampled = []
        for plan in live:
            seq = self._seqs[plan.seq_id]
            del self._planned[plan.seq_id]
            seq.in_flight = False
            seq.num_computed_tokens = plan.start + len(plan.token_ids)
            if plan.prompt_logprobs is not None:  # rows of positions start + 1...; a recompute overwrites them
                seq.prompt_logprobs[plan.start + 1:] = by_id[plan.seq_id]["prompt_logprobs"]
            if plan.pooling is not None:  # a recompute (after a preemption) starts the parts over
                seq.pooled = seq.pooled if plan.start else []
                seq.pooled.append(by_id[plan.seq_id]["pooled"])
            if plan.samples:
                seq.output_token_ids.append(by_id[plan.seq_id]["token_id"])
                sampled.append(seq)
            elif not seq.samples and seq.num_computed_tokens == seq.num_tokens:
                sampled.append(seq)
        return sampled

    def finish(self, seq_id: int) -> None:
        """Finished, cancelled or failed: free its blocks now and forget it (no-op for unknown ids).

        Freeing blocks of a sequence still in flight is safe: ranks run steps in submission order, so
        the old step's K/V writes land before any later step's owner of those blocks writes its own.
        """
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        (self.running if seq.status is SeqStatus.RUNNING else self.waiting).remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        del self._age[seq_id]

    def requeue_all(self) -> None:
        """After an engine failure: every running sequence (in flight or not) is recomputed from its tokens,
        and nothing is cached (the rebuilt engine's KV memory holds nothing; dropped steps wrote nothing)."""
        for seq in self.running:
            self._release(seq)
            seq.status = SeqStatus.WAITING
        self.blocks.forget_all()
        self._forgotten.clear()  # the rebuilt engine's ranks keep nothing
        self.waiting = sorted(self.running + self.waiting, key=self._key)  # they all go before never-admitted
        self.running = []

    def pop_forgotten(self) -> list[int]:
        """Ids of sequences released since the last call whose plans the ranks keep: the next step tells them to
        drop those (before its own plans, which may start one of them afresh)."""
        forgotten, self._forgotten = self._forgotten, []
        return forgotten

    def pop_aborted(self) -> list[Sequence]:
        """Sequences dropped because they outgrew the whole KV cache (status FINISHED, blocks freed).

        The router should end them (finish reason "length"); capping prompt + max_new_tokens at
        num_total * block_size keeps this list empty.
        """
        aborted, self._aborted = self._aborted, []
        return aborted

    # -- internals -----------------------------------------------------------------------------------

    def _key(self, seq: Sequence) -> int:
        return self._age[seq.seq_id]

    def _room(self, seq: Sequence) -> int:
        """How many more tokens seq can cache with the blocks it has plus every free one."""
        return (len(seq.block_table) + self.blocks.num_free) * self.blocks.block_size - seq.num_computed_tokens

    def _grow(self, seq: Sequence, chunk: int) -> None:
        """Allocate lazily: the table must cover positions < num_computed_tokens + chunk."""
        need = self.blocks.blocks_for(seq.num_computed_tokens + chunk) - len(seq.block_table)
        if need > 0:
            seq.block_table += self.blocks.allocate(need)

    def _take_cached_prefix(self, seq: Sequence) -> None:
        """Start a sequence from the cached blocks of its longest cached prefix: full blocks only, and never
        its last token (it must compute something to sample). Prompt logprobs and pooling need the whole prompt."""
        if not self.blocks.prefix_caching or seq.sampling.prompt_logprobs is not None or seq.pooling is not None:
            return
        seq.block_table = self.blocks.cached(self._block_keys(seq, (seq.num_tokens - 1) // self.blocks.block_size))
        seq.num_computed_tokens = len(seq.block_table) * self.blocks.block_size
        self.prefix_queried_tokens += seq.num_tokens
        self.prefix_hit_tokens += seq.num_computed_tokens
        if seq.first_scheduled_time is None:  # what its usage reports: the first admission's hit
            seq.num_cached_tokens = seq.num_computed_tokens

    def _block_keys(self, seq: Sequence, count: int) -> list[bytes]:
        """The content keys of the sequence's first `count` full blocks (computed once per sequence)."""
        size, keys = self.blocks.block_size, seq.block_keys
        while len(keys) < count:
            i = len(keys)
            keys.append(block_key(keys[-1] if keys else b"", seq.tokens(i * size, (i + 1) * size), seq.rope_variant,
                                  seq.cache_salt))
        return keys[:count]

    def _plan(self, seq: Sequence, chunk: int) -> SeqPlan:
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + chunk
        # Blocks this step fills: later steps, and this one, may share them (not a pooling sequence's: it neither
        # takes cached blocks nor gives its own).
        if self.blocks.prefix_caching and seq.pooling is None:
            size = self.blocks.block_size
            for i, key in enumerate(self._block_keys(seq, end // size)[start // size:], start // size):
                self.blocks.remember(seq.block_table[i], key)
        samples = end == seq.num_tokens and seq.samples
        send_sampling = samples and not seq.sent_sampling  # else the ranks keep the parameters (and prompt)
        penalised = seq.sampling.repetition_penalty != 1.0
        # Prompt logprobs until they are delivered (with the first token), recomputed after a preemption.
        scores = seq.sampling.prompt_logprobs is not None and not seq.output_token_ids
        plan = SeqPlan(
            seq_id=seq.seq_id,
            token_ids=seq.tokens(start, end),
            start=start,
            block_table=seq.block_table[seq.sent_blocks or 0:],
            rope_variant=seq.rope_variant,
            sampling=seq.sampling if send_sampling else None,
            prompt_token_ids=list(seq.prompt_token_ids) if send_sampling and penalised else [],
            # Its length seeds the RNG counter: the ranks have the first sent_outputs.
            output_token_ids=seq.output_token_ids[seq.sent_outputs:] if samples else [],
            prompt_logprobs=seq.sampling.prompt_logprobs if scores else None,
            next_token_id=seq.prompt_token_ids[end] if scores and end < len(seq.prompt_token_ids) else None,
            pooling=seq.pooling,
            pool_position=seq.pool_position,
            continues=seq.sent_blocks is not None,
            keeps_sampling=samples and not send_sampling,
        )
        seq.sent_blocks = len(seq.block_table)
        if samples:
            seq.sent_outputs, seq.sent_sampling = len(seq.output_token_ids), True
        seq.in_flight = True
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.monotonic()
        self._planned[seq.seq_id] = plan
        return plan

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: drop its cache, back to the front of waiting (its age puts it there)."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=self._key)

    def _release(self, seq: Sequence) -> None:
        if seq.sent_blocks is not None:
            self._forgotten.append(seq.seq_id)
        seq.sent_blocks, seq.sent_outputs, seq.sent_sampling = None, 0, False
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.in_flight = False
        self._planned.pop(seq.seq_id, None)

    def _drop_if_unfittable(self, seq: Sequence) -> bool:
        """A sequence whose known tokens need more blocks than exist can never sample again: drop it
        instead of letting it preempt itself forever."""
        if self.blocks.blocks_for(seq.num_tokens) <= self.blocks.num_total:
            return False
        (self.running if seq.status is SeqStatus.RUNNING else self.waiting).remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        del self._seqs[seq.seq_id], self._age[seq.seq_id]
        self._aborted.append(seq)
        return True
