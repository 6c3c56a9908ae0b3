"""Process groups and the collectives the model issues.

Rank layout: tensor parallelism innermost (the TP ranks of a stage are contiguous global ranks),
pipeline stages outermost: global rank = stage * tp_size + tp_rank. Every collective goes through
this module so that one place counts calls and bytes (the benchmark reports them).
"""

from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

# (kind -> calls, kind + ".bytes" -> bytes), reset by whoever measures.
COMM_STATS: Counter = Counter()


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@dataclass
class ParallelGroups:
    """Where this rank sits. `tp_group` is None when tp_size == 1 (no collectives are issued)."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: object = None

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_driver(self) -> bool:
        """The rank that samples and returns results: TP rank 0 of the last stage."""
        return self.is_last_stage and self.tp_rank == 0

    @property
    def prev_rank(self) -> int:
        return self.rank - self.tp_size

    @property
    def next_rank(self) -> int:
        return self.rank + self.tp_size

    @property
    def tp_root(self) -> int:
        """Global rank of TP rank 0 in this stage."""
        return self.pp_rank * self.tp_size


def init_groups(tp_size: int, pp_size: int) -> ParallelGroups:
    """Build the TP groups of an initialised world of tp_size * pp_size ranks.

    Every rank creates every group, in the same order, as torch.distributed requires.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != tp_size * pp_size:
        raise ValueError(f"world size {world} != tensor_parallel_size {tp_size} * pipeline_parallel_size {pp_size}")
    groups = ParallelGroups(tp_rank=rank % tp_size, tp_size=tp_size, pp_rank=rank // tp_size, pp_size=pp_size)
    if tp_size > 1:
        for stage in range(pp_size):
            group = dist.new_group(list(range(stage * tp_size, (stage + 1) * tp_size)))
            if stage == groups.pp_rank:
                groups.tp_group = group
    return groups


def _count(kind: str, tensor: torch.Tensor) -> None:
    COMM_STATS[kind] += 1
    COMM_STATS[kind + ".bytes"] += tensor.numel() * tensor.element_size()


def all_reduce(x: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    if groups.tp_size == 1:
        return x
    _count("all_reduce", x)
    dist.all_reduce(x, group=groups.tp_group)
    return x


def gather_last_dim(x: torch.Tensor, groups: ParallelGroups) -> torch.Tensor | None:
    """Concatenate each TP rank's slice of the last dim on TP rank 0; other ranks get None."""
    if groups.tp_size == 1:
        return x
    _count("gather", x)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(groups.tp_size)] if groups.tp_rank == 0 else None
    # dst is a global rank: torch 2.5 (pyproject's floor) has no group_dst.
    dist.gather(x, parts, dst=groups.tp_root, group=groups.tp_group)
    return torch.cat(parts, dim=-1) if parts is not None else None


def send_to_next_stage(x: torch.Tensor, groups: ParallelGroups) -> None:
    _count("send", x)
    dist.send(x.contiguous(), dst=groups.next_rank)


def recv_from_prev_stage(shape, dtype, device, groups: ParallelGroups) -> torch.Tensor:
    x = torch.empty(shape, dtype=dtype, device=device)
    _count("recv", x)
    dist.recv(x, src=groups.prev_rank)
    return x


def init_distributed(rank: int, world_size: int, init_method: str, device="cpu", timeout_s: float = 300) -> None:
    """Join the world: NCCL on CUDA, gloo on CPU. `init_method` is e.g. tcp://HOST:PORT of rank 0."""
    from datetime import timedelta

    dist.init_process_group(
        backend_for(device), init_method=init_method, rank=rank, world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
