"""Run a function on N ranks, one spawned process each, joined into a gloo world on 127.0.0.1."""

import multiprocessing as mp
import os
import pickle
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world, init_method, args, results):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch

    torch.set_num_threads(1)
    try:
        from shards.parallel import init_distributed

        init_distributed(rank, world, init_method, timeout_s=120)
        # Plain pickle: the queue's own pickler would pass tensors as shared memory owned by this process.
        results.put((rank, True, pickle.dumps(fn(rank, world, *args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world: int, *args, timeout: float = 180) -> list:
    """fn(rank, world, *args) on every rank (fn must be importable); returns the results in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_child, args=(fn, r, world, init_method, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        out = {}
        for _ in range(world):
            rank, ok, value = results.get(timeout=timeout)
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = pickle.loads(value)
        return [out[r] for r in range(world)]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
