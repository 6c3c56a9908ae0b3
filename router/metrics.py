"""Prometheus metrics: one `qwen2_` prefix, base units (seconds, tokens), low-cardinality labels only.

The Grafana dashboard and the alert rules in helm/ query exactly these names; tests/test_observability.py
runs every one of their expressions against a real Prometheus scraping a real server. The request metrics
carry `api` (grpc, http): which front door the request came through.
"""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# From a millisecond to ten minutes: decode steps and 100K-token prefills on one scale.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 131072)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
APIS = ("grpc", "http")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.received = Counter("qwen2_requests_received", "Requests received (a sequence each: an HTTP request "
                                "with n choices counts n)", ["api"], registry=r)
        self.finished = Counter("qwen2_requests_finished", "Requests that completed, by finish reason",
                                ["finish_reason", "api"], registry=r)
        self.failed = Counter("qwen2_requests_failed", "Requests that did not complete, by error kind "
                              "(validation, overloaded, cancelled, deadline, unavailable, internal)", ["kind", "api"],
                              registry=r)

        self.pooling = Counter("qwen2_pooling_requests", "Pooling requests completed (a sequence each), by task "
                               "(embed, classify, token_classify, qa)", ["task", "api"], registry=r)

        def latency(name, doc, labels=()):
            return Histogram(name, doc, labels, buckets=LATENCY_BUCKETS, registry=r)

        self.ttft = latency("qwen2_time_to_first_token_seconds", "Arrival to first generated token", ["api"])
        self.itl = latency("qwen2_inter_token_latency_seconds", "Time between consecutive generated tokens", ["api"])
        self.e2e = latency("qwen2_e2e_request_latency_seconds", "Arrival to the last token", ["api"])
        self.queue = latency("qwen2_queue_time_seconds", "Arrival to first scheduled step")
        self.prefill = latency("qwen2_prefill_time_seconds", "First scheduled step to first token")
        self.decode = latency("qwen2_decode_time_seconds", "First token to the last token")
        self.prompt_tokens = Counter("qwen2_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("qwen2_generation_tokens", "Generated tokens", registry=r)
        self.request_prompt_tokens = Histogram("qwen2_request_prompt_tokens", "Prompt length per request",
                                               buckets=TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram("qwen2_request_generation_tokens", "Generated length per "
                                                   "finished request", buckets=TOKEN_BUCKETS, registry=r)
        self.running = Gauge("qwen2_running_requests", "Sequences holding KV blocks (running)", registry=r)
        self.waiting = Gauge("qwen2_waiting_requests", "Sequences waiting to be scheduled", registry=r)
        self.batch_size = Histogram("qwen2_batch_size", "Sequences per engine step", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_tokens = Histogram("qwen2_batch_tokens", "Tokens per engine step", buckets=TOKEN_BUCKETS,
                                      registry=r)
        self.preemptions = Counter("qwen2_preemptions", "Sequences preempted (recomputed later) for KV blocks",
                                   registry=r)
        self.prefix_queries = Counter("qwen2_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix "
                                      "cache (at each admission)", registry=r)
        self.prefix_hits = Counter("qwen2_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache (their "
                                   "KV reused, not computed)", registry=r)
        self.kv_used = Gauge("qwen2_kv_cache_blocks_used", "KV cache blocks in use", registry=r)
        # Not *_total: promtool reserves that suffix for counters.
        self.kv_total = Gauge("qwen2_kv_cache_blocks_capacity", "KV cache blocks", registry=r)
        self.kv_usage = Gauge("qwen2_kv_cache_usage_ratio", "KV cache blocks in use / total", registry=r)
        self.step_phase = Histogram("qwen2_step_phase_seconds", "Engine loop time by phase (schedule, execute, "
                                    "detokenize, mask; sample: the driver rank's sampling, inside execute)", ["phase"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_forward = Histogram("qwen2_stage_forward_seconds", "Time a pipeline stage's TP rank 0 spent "
                                       "in its step (forward, collectives, sampling)", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.healthy_shards = Gauge("qwen2_healthy_shards", "Shard actors serving (0 when the engine failed)",
                                    registry=r)
        self.restarts = Counter("qwen2_actor_restarts", "Shard actors restarted after a failure", registry=r)
        self.engine_failures = Counter("qwen2_engine_failures", "Engine loop failures, each followed by a rebuild "
                                       "(cause: engine = a rank died, timed out or raised; internal = a bug in the "
                                       "router's loop)", ["cause"], registry=r)
        self.engine_loop_running = Gauge("qwen2_engine_loop_running", "1 while the engine loop runs (0 before the "
                                         "engine is up, after shutdown, or if the loop died)", registry=r)
        self.info = Gauge("qwen2_model_info", "The served model and layout (value 1)",
                          ["model", "tensor_parallel_size", "pipeline_parallel_size", "dtype", "device", "version",
                           "quantization"],
                          registry=r)
        self._preemptions_seen = 0
        self._prefix_seen = (0, 0)  # the scheduler's (queried, hit) tokens already counted
        for api in APIS:  # present from the start, so rate() counts each one's first event
            self.received.labels(api)
            for kind in ("validation", "overloaded", "cancelled", "deadline", "unavailable", "internal"):
                self.failed.labels(kind, api)
            for reason in ("length", "stop", "eos"):
                self.finished.labels(reason, api)
        for cause in ("engine", "internal"):
            self.engine_failures.labels(cause)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def set_model(self, model: str, tp: int, pp: int, dtype: str, device: str, version: str,
                  quantization: str) -> None:
        self.info.labels(model, str(tp), str(pp), dtype, device, version, quantization).set(1)

    def on_step(self, num_seqs: int, num_tokens: int, rank_seconds: list[float], tp: int) -> None:
        self.batch_size.observe(num_seqs)
        self.batch_tokens.observe(num_tokens)
        for stage, seconds in enumerate(rank_seconds[::tp]):
            self.stage_forward.labels(str(stage)).observe(seconds)

    def on_scheduler(self, scheduler) -> None:
        blocks = scheduler.blocks
        self.running.set(scheduler.num_running)
        self.waiting.set(scheduler.num_waiting)
        self.kv_total.set(blocks.num_total)
        self.kv_used.set(blocks.num_total - blocks.num_free)
        self.kv_usage.set(blocks.usage)
        self.preemptions.inc(scheduler.num_preemptions - self._preemptions_seen)
        self._preemptions_seen = scheduler.num_preemptions
        self.prefix_queries.inc(scheduler.prefix_queried_tokens - self._prefix_seen[0])
        self.prefix_hits.inc(scheduler.prefix_hit_tokens - self._prefix_seen[1])
        self._prefix_seen = (scheduler.prefix_queried_tokens, scheduler.prefix_hit_tokens)

    def on_finish(self, arrival: float, first_scheduled: float | None, first_token: float | None,
                  generated: int, finish_reason: str, api: str = "grpc") -> None:
        now = time.monotonic()
        self.finished.labels(finish_reason, api).inc()
        self.e2e.labels(api).observe(now - arrival)
        self.request_generation_tokens.observe(generated)
        if first_scheduled is not None and first_token is not None:
            self.prefill.observe(first_token - first_scheduled)
        if first_token is not None:
            self.decode.observe(now - first_token)
