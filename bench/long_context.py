"""The **long** workload (docs/performance.md) and the peak memory of a long prefill.

1. Peak memory: one rank (in this process) prefills an N-token prompt in 2,048-token chunks; reported as
   the growth of the process's peak RSS over its size with weights and KV cache already allocated.
2. Interference: 16 short streams decode through the real server; their inter-token latency p99 while an
   N-token prompt (YaRN) is prefilled, over their p99 without it. Target: <= 2x.

Run: python -m bench.long_context [--prompt-tokens 32768] [--preset bench-cpu]
"""

import argparse
import json
import os
import statistics
import tempfile
import threading
import time

import torch

from shards.batch import SeqPlan
from shards.checkpoint import preset_config, write_random_checkpoint
from shards.parallel import ParallelGroups
from shards.rope import SCALED
from shards.sampling import SamplingParams
from shards.worker import ShardWorker


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


class PeakRSS:
    """Samples this process's RSS every 5 ms while the block runs."""

    def __enter__(self):
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def prefill_memory(model_dir, n: int, chunk: int = 2048) -> dict:
    block = 16
    worker = ShardWorker(model_dir, ParallelGroups(), num_kv_blocks=-(-n // block) + 1, block_size=block)
    ids = torch.randint(0, 150_000, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    table = list(range(-(-n // block) + 1))
    worker.kv_cache.fill_(0)  # touch the cache so its pages count in the baseline
    greedy, began = SamplingParams(temperature=0.0), time.perf_counter()
    with PeakRSS() as memory:
        for start in range(0, n, chunk):
            part = ids[start : start + chunk]
            worker.forward([SeqPlan(0, part, start, table, SCALED, greedy if start + chunk >= n else None)])
    return {"prompt_tokens": n, "chunk": chunk, "prefill_s": round(time.perf_counter() - began, 1),
            "kv_cache_mib": round(worker.kv_cache.numel() * worker.kv_cache.element_size() / 2**20),
            "rss_before_mib": round(memory.base / 2**20), "peak_rss_growth_mib": round((memory.peak - memory.base) / 2**20)}


def p99(values):
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else float("nan")


def yarn_config(preset: str, n: int) -> dict:
    """The preset with YaRN on and its original window at half of `n`, so an n-token prompt needs YaRN."""
    window = n // 2
    return preset_config(preset) | {"max_position_embeddings": window, "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": window}}


def interference(model_dir, n: int, budget: int, streams: int = 16, warmup_s: float = 15.0) -> dict:
    """The short streams decode for `warmup_s` (its last two thirds are the quiet window), then the long prompt."""
    from qwen2_client import Client
    from tests.server_process import InProcessServer

    server = InProcessServer(model_dir, tp=1, max_num_seqs=streams + 1, max_num_batched_tokens=budget,
                             max_waiting=64, engine_options={"block_size": 16, "kv_cache_bytes": 2 * 2**30,
                                                             "cpus_per_rank": 1.0})
    gaps: list[tuple[float, float]] = []  # (arrival time, gap to the previous token of the same stream)
    stop = threading.Event()
    try:
        with Client(server.target) as client:
            def short(i):
                while not stop.is_set():
                    last = None
                    for delta in client.generate_stream(f"stream {i}", max_new_tokens=500, ignore_eos=True):
                        now = time.monotonic()
                        if last is not None:
                            gaps.append((now, now - last))
                        last = now
                        if stop.is_set():
                            return

            readers = [threading.Thread(target=short, args=(i,), daemon=True) for i in range(streams)]
            for r in readers:
                r.start()
            time.sleep(warmup_s)
            quiet_from, quiet_to = time.monotonic() - warmup_s * 2 / 3, time.monotonic()
            ids = torch.randint(0, 150_000, (n,), generator=torch.Generator().manual_seed(1)).tolist()
            sent = time.monotonic()
            result = client.generate(token_ids=ids, max_new_tokens=1, ignore_eos=True)
            done = time.monotonic()
            stop.set()
            for r in readers:  # each returns at its next token, before the channel closes under it
                r.join()
    finally:
        server.stop()
    quiet = [g for t, g in gaps if quiet_from <= t <= quiet_to]
    during = [g for t, g in gaps if sent <= t <= done]
    return {"streams": streams, "max_num_batched_tokens": budget, "long_prompt_tokens": n, "long_rope_variant": result.rope_variant,
            "long_ttft_s": round(done - sent, 1), "itl_p99_ms_without": round(p99(quiet) * 1e3, 1),
            "itl_p99_ms_during": round(p99(during) * 1e3, 1), "ratio": round(p99(during) / p99(quiet), 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt-tokens", type=int, default=32768)
    parser.add_argument("--preset", default="bench-cpu")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="the server's per-step budget")
    parser.add_argument("--json", default="bench/long_context.json")
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    model_dir = write_random_checkpoint(tempfile.mkdtemp(), yarn_config(args.preset, args.prompt_tokens))
    report = {"date": time.strftime("%Y-%m-%d"), "preset": args.preset, "threads": torch.get_num_threads(),
              "memory": prefill_memory(model_dir, args.prompt_tokens),
              "interference": interference(model_dir, args.prompt_tokens, args.max_num_batched_tokens)}
    print(json.dumps(report, indent=2))
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
