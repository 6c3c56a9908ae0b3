"""The Ray actor that holds one rank: a `ShardWorker` plus what it needs to join the world."""

import ctypes
import os
import socket
import sys

import ray
import torch

from cluster.channel import rank_loop
from shards.parallel import init_distributed, init_groups
from shards.worker import ShardWorker


def keep_freed_memory() -> None:
    """Serve large blocks from the heap and keep freed memory (glibc). By default glibc maps every block
    over 32 MiB afresh and unmaps it on free, so each decode step's logits buffers (~40 MB apiece at batch
    64) come back as new pages the kernel faults in and zeroes: 16K page faults and ~7% of a batch-64
    step of bench-cpu on CPU (169 -> 158 ms without them). A rank's memory peaks at the same size every
    step, so nothing is lost by keeping it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


# Ray concurrency groups (options: CONCURRENCY_GROUPS), each its own thread: the liveness probe, and the step
# loop (cluster/channel.py), which runs as long as the engine. Loading and allocating run on the step loop's
# thread before it starts: on CPU, once one thread of a process has run an OpenMP parallel region, another
# thread's regions each took ~0.1 ms more (libgomp; a 3072 x 512 GEMV 0.10 -> 0.21 ms), and bench-cpu's
# batch-1 step 18 -> 24 ms, when the weights were loaded on Ray's default thread and the steps ran on this one.
PROBE_GROUP, STEP_GROUP = "probe", "steps"
CONCURRENCY_GROUPS = {PROBE_GROUP: 1, STEP_GROUP: 1}


class ShardActor:
    """One tensor-parallel rank of one pipeline stage (global rank = stage * tp + tp_rank)."""

    def __init__(self, rank: int, tp: int, pp: int, device: str, threads: int):
        self.rank, self.tp, self.pp = rank, tp, pp
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")  # Ray sets the GPU
        self.threads = max(1, threads)
        torch.set_num_threads(self.threads)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.worker = None

    @ray.method(concurrency_group=PROBE_GROUP)
    def node_id(self) -> str:
        """The liveness probe: answered on its own thread, beside a running step, so a long step is never
        taken for a dead rank."""
        return ray.get_runtime_context().get_node_id()

    def rendezvous_address(self, host: str | None) -> str:
        """tcp://HOST:PORT on this (rank 0's) node, a port free there; `host` defaults to the node's IP."""
        host = host or ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return f"tcp://{host}:{s.getsockname()[1]}"

    @ray.method(concurrency_group=STEP_GROUP)
    def load(self, init_method: str, dist_timeout_s: float, worker_args: dict, max_step: tuple[int, int]):
        """Join the torch.distributed world, build the TP groups, load this rank's weights (`worker_args`:
        ShardWorker's keyword arguments), and on a GPU measure what the largest step needs beside them
        (`max_step`: the scheduler's tokens and sequences per step at most).

        Returns the KV block size in bytes, and on a GPU the device's free and total bytes and that step's."""
        init_distributed(self.rank, self.tp * self.pp, init_method, self.device, dist_timeout_s)
        groups = init_groups(self.tp, self.pp)
        self.worker = ShardWorker(groups=groups, device=self.device, **worker_args)
        step_bytes = self.worker.measure_step_memory(*max_step)
        free, total = torch.cuda.mem_get_info(self.device) if self.device.type == "cuda" else (None, None)
        return {"kv_block_bytes": self.worker.kv_block_bytes, "free_bytes": free, "total_bytes": total,
                "step_bytes": step_bytes, "weight_bytes": self.worker.bytes_loaded, "pid": os.getpid()}

    @ray.method(concurrency_group=STEP_GROUP)
    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.worker.allocate_kv_cache(num_blocks)

    def execute(self, seqs, forget=()):
        """This rank's step: (sampled results on the driver rank else None, seconds spent in it, of which
        sampling; device time on a GPU). `forget`: sequences whose kept plans end first (ShardWorker.execute)."""
        results = self.worker.execute(seqs, forget)
        return results, self.worker.last_step_s, self.worker.last_sample_s

    @ray.method(concurrency_group=STEP_GROUP)
    def serve_steps(self, address: tuple[str, int], token: str) -> None:
        """Run steps from the router's step channel until it closes (cluster/channel.py)."""
        torch.set_num_threads(self.threads)  # per thread: this one would start with OpenMP's default
        rank_loop(address, token, self.rank, self.execute)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
