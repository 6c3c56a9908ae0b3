"""Where the ranks run: one Ray placement group per pipeline stage, its TP bundles packed on one node.

Stages are separate groups, so Ray puts them on one node when it can and spreads them across nodes when
one node cannot hold them, while the TP ranks of a stage (which all-reduce twice per layer) always share a
node. Ray's own wait for an unsatisfiable group never ends; this one gives up after a bounded time and says
what was asked for and what the cluster has.
"""

import asyncio

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group


class PlacementError(RuntimeError):
    pass


def rank_bundle(device: str, cpus_per_rank: float) -> dict:
    return {"GPU": 1, "CPU": cpus_per_rank} if device == "cuda" else {"CPU": cpus_per_rank}


def describe_cluster() -> str:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = "; ".join(
        f"{n['NodeManagerAddress']}: {', '.join(f'{k}={v:g}' for k, v in sorted(n['Resources'].items()) if k in ('CPU', 'GPU'))}"
        for n in nodes
    )
    return f"{len(nodes)} node(s) [{per_node}], available now {_cpu_gpu(ray.available_resources())}"


def _cpu_gpu(resources: dict) -> dict:
    return {k: resources[k] for k in ("CPU", "GPU") if k in resources}


async def all_of(awaitables) -> list:
    """asyncio.gather inside a coroutine, for wait_for: cancelled around a bare gather, wait_for leaves the
    gather's CancelledError unretrieved and asyncio logs it as an error with a traceback (a SIGTERM while the
    engine started did); a task retrieves it."""
    return await asyncio.gather(*awaitables)


async def place_stages(tp: int, pp: int, device: str, cpus_per_rank: float, timeout_s: float) -> list[PlacementGroup]:
    """One ready placement group per stage, or PlacementError within `timeout_s`."""
    bundle = rank_bundle(device, cpus_per_rank)
    groups = [placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK") for _ in range(pp)]
    try:
        await asyncio.wait_for(all_of(g.ready() for g in groups), timeout_s)
    except asyncio.TimeoutError:
        for g in groups:
            remove_placement_group(g)
        raise PlacementError(
            f"cannot place tensor_parallel_size={tp} x pipeline_parallel_size={pp}: asked for {pp} stage(s) of "
            f"{tp} x {bundle} on one node each, not satisfied within {timeout_s:g}s; the cluster has "
            f"{describe_cluster()}"
        ) from None
    return groups


def release(groups: list[PlacementGroup]) -> None:
    for g in groups:
        try:
            remove_placement_group(g)
        except Exception:  # already gone with its cluster
            pass
