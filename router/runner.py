"""The engine loop: schedule a step, run it on the cluster, turn sampled tokens into per-request events.

The router owns every sequence's tokens (the scheduler's `Sequence`); the engine only computes, so when a
rank dies or a step times out nothing is lost: the engine is rebuilt, every sequence is recomputed from its
tokens and its stream goes on after a pause. Up to
`pipeline_parallel_size` steps are in flight at once, each over sequences the others do not hold, so
pipeline stages overlap. Each request reads its events from its own queue; a request whose reader goes
away is cancelled and its KV blocks are freed at once.
"""

import asyncio
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from cluster.engine import Engine, EngineError
from router import pooling
from router.detokenizer import IncrementalDetokenizer
from router.metrics import Metrics
from router.scheduler import BlockManager, Scheduler, Sequence
from router.structured import Matcher, fill_masks
from router.tokenizer import Tokenizer
from router.validation import ValidRequest

log = logging.getLogger(__name__)


@dataclass
class Event:
    """What a request's stream gets: new tokens and text, and on the last event how it ended."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict] = field(default_factory=list)
    # On the first event of a request that asked them: a row per prompt token, None for the first
    # ({"token_id", "logprob", "top": [(id, logprob), ...]}, as `logprobs`).
    prompt_logprobs: list[dict | None] | None = None
    pooled: torch.Tensor | None = None  # a pooling request's answer, on its last event (router/pooling.py join)
    finish_reason: str | None = None  # "length", "stop", "eos", "cancelled"
    matched_stop: str | None = None
    error: Exception | None = None


@dataclass(eq=False)
class Request:
    seq: Sequence
    valid: ValidRequest
    detokenizer: IncrementalDetokenizer
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished: bool = False
    api: str = "grpc"  # the front door it came through (a metrics label)
    matcher: Matcher | None = None  # a structured-output request's grammar state

    @property
    def queue_seconds(self) -> float:
        started = self.seq.first_scheduled_time or time.monotonic()
        return started - self.seq.arrival_time

    @property
    def ttft_seconds(self) -> float:
        return (self.first_token_time or time.monotonic()) - self.seq.arrival_time


class EngineUnavailable(RuntimeError):
    pass


class Runner:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, max_waiting: int = 256, metrics: Metrics | None = None,
                 prefill_latency_factor: float = 1.5, max_restarts: int = 3, restart_backoff_s: float = 1.0,
                 probe_interval_s: float = 5.0, max_model_len: int | None = None, prefix_caching: bool = True):
        self.engine, self.tokenizer = engine, tokenizer
        self.prefix_caching = prefix_caching
        # Prompt + generated tokens at most: the asked cap (default the model's), lowered to the KV capacity
        # once the engine is up.
        self.max_model_len = min(max_model_len or engine.max_model_len, engine.max_model_len)
        # Engine failures in a row (a completed step resets it) after which in-flight requests end UNAVAILABLE.
        self.max_restarts, self.restart_backoff_s = max_restarts, restart_backoff_s
        self.probe_interval_s = probe_interval_s  # while idle, an empty step this often finds a dead rank
        self._failures_in_row = 0
        self.recovering = False
        # A step that carries long-prompt chunks beside decodes aims at this many times a decode-only step
        # (0: off): the budget is cut when a step overshoots and grows by a quarter after each under it, so
        # the slowest such steps land about a quarter above the aim (8K prompt beside 16 streams: decodes'
        # p99 inter-token latency 2.42x the quiet p99 at 2, 1.84x at 1.5, the benchmark's target being 2x, docs/performance.md).
        self.prefill_latency_factor = prefill_latency_factor
        self._decode_step_s: float | None = None
        self.metrics = metrics or Metrics()
        self.limits = dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                           max_waiting=max_waiting)
        self.scheduler: Scheduler | None = None
        self.requests: dict[int, Request] = {}
        self.ids = itertools.count()
        self.ready = False
        self.failure: Exception | None = None
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._stopping = False
        # Events of the step just completed, handed to the streams once the next step is submitted, so the
        # streams' work (gRPC writes) overlaps the next forward instead of delaying it. None: hand at once.
        self._outbox: list[tuple[Request, Event]] | None = None
        self._constrained = 0  # live requests with a matcher: 0 means no per-step grammar work at all

    async def start(self) -> None:
        await self.engine.start()
        self._fit_max_model_len()
        self.scheduler = Scheduler(self._blocks(), **self.limits)
        if self.prefill_latency_factor > 0:  # start cautious beside decodes; it grows while steps stay fast
            self.scheduler.prefill_budget = min(256, self.scheduler.max_num_batched_tokens)
        self._loop_task = asyncio.create_task(self._loop())
        self._loop_task.add_done_callback(self._loop_ended)
        self.metrics.engine_loop_running.set(1)
        self.ready = True
        c = self.engine.config
        self.metrics.healthy_shards.set(c.tensor_parallel_size * c.pipeline_parallel_size)
        self.metrics.on_scheduler(self.scheduler)

    def _blocks(self) -> BlockManager:
        return BlockManager(self.engine.num_kv_blocks, self.engine.block_size, self.prefix_caching)

    def _fit_max_model_len(self) -> None:
        """Serve no longer a sequence than the KV cache holds whole: one that outgrew it could never finish
        (preemption recomputes a sequence; it cannot shrink one)."""
        capacity = self.engine.num_kv_blocks * self.engine.block_size
        if self.max_model_len > capacity:
            log.warning("max_model_len %d -> %d: the KV cache holds %d blocks of %d tokens", self.max_model_len,
                        capacity, self.engine.num_kv_blocks, self.engine.block_size)
            self.max_model_len = capacity
        log.info("serving sequences of up to %d tokens (prompt + generated)", self.max_model_len)

    def _loop_ended(self, task: asyncio.Task) -> None:
        """However the engine loop ends, it shows: in health, in a metric, and in every open request."""
        self.metrics.engine_loop_running.set(0)
        if self._stopping:
            return
        error = RuntimeError("the engine loop was cancelled") if task.cancelled() else task.exception()
        if error is not None:
            log.error("the engine loop died", exc_info=error)
        if self.failure is None:  # not after _fail: that already ended every request
            self._fail(error or RuntimeError("the engine loop ended"))

    async def shutdown(self) -> None:
        self.ready = False
        self._stopping = True
        if self._loop_task:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):
                pass
        self._flush()
        for request in list(self.requests.values()):
            self._end(request, Event(error=EngineUnavailable("server is shutting down")))
        await self.engine.shutdown()

    @property
    def idle(self) -> bool:
        return not self.requests

    @property
    def serving(self) -> bool:
        """What health reports: admitting and the engine up (not failed, not being rebuilt)."""
        return self.ready and self.failure is None and not self.recovering

    def submit(self, prompt_ids: list[int], valid: ValidRequest, rope_variant: int = 0, api: str = "grpc",
               matcher: Matcher | None = None) -> Request:
        """Admit a request (QueueFullError when the waiting queue is full); `matcher` constrains its tokens."""
        if not self.ready or self.failure is not None:
            raise EngineUnavailable("the engine is not serving" + (f": {self.failure}" if self.failure else ""))
        sampling = valid.sampling
        if sampling.min_tokens:  # what would end it is masked until min_tokens were generated
            eos = () if valid.ignore_eos else self.engine.eos_token_ids
            ends = tuple(dict.fromkeys((*valid.stop_token_ids, *eos)))
            if matcher is None:
                sampling = dataclasses.replace(sampling, stop_token_ids=ends)
            else:  # in its mask, where the grammar's end can win (router/structured.py)
                matcher.min_tokens, matcher.stop_token_ids = sampling.min_tokens, ends
        seq = Sequence(next(self.ids), list(prompt_ids), sampling, rope_variant, samples=valid.max_new_tokens > 0,
                       cache_salt=valid.cache_salt)
        if valid.pooling is not None:
            seq.pooling, seq.pool_position = pooling.plan(valid.pooling, seq.prompt_token_ids,
                                                          self.engine.model.pad_token_id)
        detokenizer = IncrementalDetokenizer(self.tokenizer, valid.stop, valid.skip_special_tokens,
                                             valid.include_stop_str_in_output, sampling.min_tokens)
        self.scheduler.add(seq)
        request = Request(seq, valid, detokenizer, api=api, matcher=matcher)
        self.requests[seq.seq_id] = request
        self._constrained += matcher is not None
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        self.metrics.request_prompt_tokens.observe(len(prompt_ids))
        self._wake.set()
        return request

    def cancel(self, request: Request, kind: str = "cancelled") -> None:
        """The client went away or gave up (`kind`: cancelled or deadline): free its blocks now."""
        if not request.finished:
            self.metrics.failed.labels(kind, request.api).inc()
            self._end(request, Event(finish_reason="cancelled"))

    def _end(self, request: Request, event: Event) -> None:
        if event.finish_reason in ("length", "stop", "eos"):
            seq = request.seq
            self.metrics.on_finish(seq.arrival_time, seq.first_scheduled_time, request.first_token_time,
                                   len(seq.output_token_ids), event.finish_reason, request.api)
        request.finished = True
        if self.requests.pop(request.seq.seq_id, None) is not None:
            self._constrained -= request.matcher is not None
        if self.scheduler is not None:
            self.scheduler.finish(request.seq.seq_id)
        self._hand(request, event)

    def _hand(self, request: Request, event: Event) -> None:
        if self._outbox is None:
            request.events.put_nowait(event)
        else:
            self._outbox.append((request, event))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox or [], None
        for request, event in outbox:
            request.events.put_nowait(event)

    async def _loop(self) -> None:
        """Steps until shutdown. Any exception, the engine's or a bug's, rebuilds the engine and requeues every
        sequence (to be recomputed from its tokens); past max_restarts in a row every request ends."""
        in_flight: list[asyncio.Task] = []
        while True:
            try:
                await self._iteration(in_flight)
            except Exception as e:
                if not isinstance(e, EngineError):
                    log.exception("engine loop failed")
                self.metrics.engine_failures.labels("engine" if isinstance(e, EngineError) else "internal").inc()
                if not await self._recover(e, in_flight):
                    return
                in_flight.clear()

    async def _iteration(self, in_flight: list[asyncio.Task]) -> None:
        """Fill the pipeline with steps, then wait for the oldest and apply its results."""
        depth = max(1, self.engine.config.pipeline_parallel_size)
        while len(in_flight) < depth:
            began = time.perf_counter()
            plans = self.scheduler.schedule()
            self.metrics.step_phase.labels("schedule").observe(time.perf_counter() - began)
            if self._constrained:
                self._constrain(plans)
            for seq in self.scheduler.pop_aborted():  # outgrew the whole KV cache
                if seq.seq_id in self.requests:
                    self._end(self.requests[seq.seq_id], Event(finish_reason="length"))
            if not plans:
                break
            in_flight.append(asyncio.create_task(self._step(plans, self.scheduler.pop_forgotten())))
        if self._outbox is not None:
            try:
                await asyncio.sleep(0)  # the new step's task runs up to its submission first
            finally:
                self._flush()
        if not in_flight:
            await self._idle()
            return
        plans, results = await in_flight[0]  # steps finish in the order they were submitted
        in_flight.pop(0)
        began = time.perf_counter()
        self._outbox = []
        rows = {r["seq_id"]: r for r in results}
        for seq in self.scheduler.complete(plans, results):
            request = self.requests.get(seq.seq_id)
            if request is not None:
                self._on_token(request, seq, rows)
        self._failures_in_row = 0  # a step went through whole
        self.metrics.step_phase.labels("detokenize").observe(time.perf_counter() - began)
        self.metrics.step_phase.labels("sample").observe(self.engine.last_sample_seconds)
        self.metrics.on_step(len(plans), sum(len(p.token_ids) for p in plans), self.engine.last_rank_seconds,
                             self.engine.config.tensor_parallel_size)
        self.metrics.on_scheduler(self.scheduler)

    def _constrain(self, plans) -> None:
        """Token masks for the constrained plans that sample. At plan time: a sequence is never planned while in
        flight, so its matcher has seen (sync) every token it has, the one of the step just completed too."""
        began = time.perf_counter()
        rows = []
        for plan in plans:
            request = self.requests.get(plan.seq_id)
            if plan.samples and request is not None and request.matcher is not None:
                request.matcher.sync(request.seq.output_token_ids)
                rows.append((plan, request.matcher))
        if rows:
            for (plan, _), mask in zip(rows, fill_masks([m for _, m in rows])):
                plan.token_mask = mask
            self.metrics.step_phase.labels("mask").observe(time.perf_counter() - began)

    async def _step(self, plans, forget: list[int]):
        began = time.perf_counter()
        results = await self.engine.step(plans, forget)
        seconds = time.perf_counter() - began
        self.metrics.step_phase.labels("execute").observe(seconds)
        self._adapt_prefill_budget(plans, seconds)
        return plans, results

    def _adapt_prefill_budget(self, plans, seconds: float) -> None:
        """Keep steps that mix long-prompt chunks with decodes near `prefill_latency_factor` x a decode step."""
        if self.prefill_latency_factor <= 0:
            return
        prefills = sum(1 for p in plans if len(p.token_ids) > 1)
        if not prefills:
            self._decode_step_s = seconds if self._decode_step_s is None else 0.8 * self._decode_step_s + 0.2 * seconds
            return
        s = self.scheduler
        long_tokens = s.long_prefill_tokens(plans)
        if not long_tokens or prefills == len(plans) or self._decode_step_s is None:
            return  # only short prompts (admitted whole), or nobody decoding: nothing to adapt
        target = self.prefill_latency_factor * self._decode_step_s
        if seconds > target:  # cut in proportion to the overshoot, with a margin
            s.prefill_budget = max(16, int(min(s.prefill_budget, long_tokens) * 0.8 * target / seconds))
        else:
            s.prefill_budget = min(s.max_num_batched_tokens, s.prefill_budget + max(16, s.prefill_budget // 4))

    async def _idle(self) -> None:
        """Wait for work; probe the ranks every probe_interval_s meanwhile (EngineError if one is dead)."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), self.probe_interval_s)
        except asyncio.TimeoutError:
            await self.engine.probe()

    async def _recover(self, error: Exception, in_flight: list[asyncio.Task]) -> bool:
        """Rebuild the engine and requeue every sequence, to be recomputed from its tokens; its stream
        pauses. False once max_restarts failures came in a row: then every request ends UNAVAILABLE."""
        log.error("engine failed: %s; rebuilding it", error)
        self._flush()  # events of a step applied in part go out before the pause
        began = time.perf_counter()
        self.recovering = True
        self.metrics.healthy_shards.set(0)
        for task in in_flight:
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
        self.scheduler.requeue_all()  # their steps' results, if any still come, are dropped
        while True:
            self._failures_in_row += 1
            if self._failures_in_row > self.max_restarts:
                self._fail(error)
                return False
            try:
                await self.engine.restart()
                break
            except Exception as e:
                error = e
                log.error("engine rebuild %d of %d failed: %s", self._failures_in_row, self.max_restarts, e)
                await asyncio.sleep(self.restart_backoff_s * 2 ** (self._failures_in_row - 1))
        c = self.engine.config
        if self.engine.num_kv_blocks != self.scheduler.blocks.num_total:  # nothing holds a block now
            self.scheduler.blocks = self._blocks()
            self._fit_max_model_len()
        self.metrics.restarts.inc(c.tensor_parallel_size * c.pipeline_parallel_size)
        self.metrics.healthy_shards.set(c.tensor_parallel_size * c.pipeline_parallel_size)
        self.recovering = False
        log.warning("engine rebuilt %.1fs after the failure; %d sequences requeued", time.perf_counter() - began,
                    self.scheduler.num_waiting)
        return True

    def _fail(self, error: Exception) -> None:
        """Recovery gave up: every request ends UNAVAILABLE and health stays NOT_SERVING."""
        log.error("engine failed for good: %s", error)
        self._flush()  # events of a step applied in part go out first
        self.failure = error
        self.recovering = False
        self.metrics.healthy_shards.set(0)
        for request in list(self.requests.values()):
            self.metrics.failed.labels("unavailable", request.api).inc()
            self._end(request, Event(error=EngineUnavailable(f"the engine failed: {error}")))

    def _on_token(self, request: Request, seq: Sequence, rows: dict[int, dict]) -> None:
        asked_prompt_logprobs = seq.sampling.prompt_logprobs is not None
        if not seq.samples:  # only the prompt's logprobs or pooled outputs were asked: done once it is computed
            spec = request.valid.pooling
            if spec is not None:
                self.metrics.pooling.labels(spec.task, request.api).inc()
            self._end(request, Event(prompt_logprobs=seq.prompt_logprobs if asked_prompt_logprobs else None,
                                     pooled=None if spec is None else pooling.join(spec, seq.pooled, seq.num_tokens),
                                     finish_reason="length"))
            return
        token = seq.output_token_ids[-1]
        row = rows[seq.seq_id]
        now = time.monotonic()
        if request.first_token_time is None:
            request.first_token_time = now
            self.metrics.ttft.labels(request.api).observe(now - seq.arrival_time)
            self.metrics.queue.observe(request.queue_seconds)
        else:
            self.metrics.itl.labels(request.api).observe(now - request.last_token_time)
        request.last_token_time = now
        self.metrics.generation_tokens.inc()
        valid, event = request.valid, Event(token_ids=[token], logprobs=[row])
        if asked_prompt_logprobs and len(seq.output_token_ids) == 1:
            event.prompt_logprobs = seq.prompt_logprobs
        if request.matcher is not None:
            request.matcher.sync(seq.output_token_ids)
        if token in valid.stop_token_ids or (token in self.engine.eos_token_ids and not valid.ignore_eos):
            event.finish_reason = "stop" if token in valid.stop_token_ids else "eos"
            if valid.include_stop_str_in_output:
                event.text = request.detokenizer.add(token)
        else:
            event.text = request.detokenizer.add(token)
            if request.detokenizer.stopped:
                event.finish_reason, event.matched_stop = "stop", request.detokenizer.matched_stop
        if event.finish_reason is None and request.matcher is not None and (request.matcher.terminated
                                                                            or request.matcher.rejected):
            event.finish_reason = "stop"  # the grammar is done (its end token was taken under ignore_eos)
        if event.finish_reason is None and (len(seq.output_token_ids) >= valid.max_new_tokens
                                            or seq.num_tokens >= self.max_model_len):
            event.finish_reason = "length"
        if event.finish_reason is None:
            self._hand(request, event)
            return
        if event.finish_reason != "stop" or event.matched_stop is None:
            event.text += request.detokenizer.finish()
        self._end(request, event)
