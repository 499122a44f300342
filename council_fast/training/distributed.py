"""Data-parallel hooks of the fused engine with torch.distributed (launched by torchrun), and the identity hooks of one process.

Every process holds the whole council and trains on its own slice of the global batch. Before each
optimizer step the gradients are averaged over processes; the loss values that feed the
loss-matching histories (and the logs) are averaged too, so every process keeps the same
histories. Each process draws the z of the whole global batch from the shared noise generator and
keeps its slice, and the council pairs come from the same seeded ``random.Random`` everywhere.
LSGAN losses are means over the batch and instance norm / AdaIN work per sample, so P processes
with batch b compute the iteration of one process with batch P * b, to fp32 rounding.

Only rank 0 writes checkpoints and images (:func:`is_writer`).

Launch: ``torchrun --nproc_per_node=G -m council_fast train --engine fused ...`` (NCCL on GPUs,
one GPU per process chosen by LOCAL_RANK; gloo on CPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..runtime import join_process_group, launched_by_torchrun, shutdown_process_group as shutdown

__all__ = ["DataParallelHooks", "TorchDistributedHooks", "DistributedContext", "launched_by_torchrun", "setup", "shutdown",
           "shard", "is_writer"]


class DataParallelHooks:
    """What data-parallel training changes in an iteration (identity for a single process).

    ``world``/``rank``: this process's place; ``mean(t)``: the mean of ``t`` over processes;
    ``average_gradients(params)``: every parameter's gradient averaged over processes.
    """

    world = 1
    rank = 0

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def average_gradients(self, params) -> None:
        return None


class TorchDistributedHooks(DataParallelHooks):
    """The averages data-parallel training needs, over the default process group."""

    def __init__(self, group=None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out.div_(self.world)

    def average_gradients(self, params) -> None:
        """One all-reduce over every gradient of ``params`` (flattened), then divide by the world size."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat.div_(self.world)
            offset = 0
            for g in group:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


@dataclass
class DistributedContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    hooks: TorchDistributedHooks


def setup(device_type: str | None = None, timeout_s: float = 1800.0) -> DistributedContext:
    """Join the process group torchrun describes (:func:`council_fast.runtime.join_process_group`) and
    return this process's place in it with the data-parallel hooks."""
    group = join_process_group(device_type, timeout_s, "train")
    hooks = TorchDistributedHooks()
    return DistributedContext(group.rank, group.world, group.local_rank, group.device, hooks)


def shard(x: torch.Tensor, hooks: DataParallelHooks) -> torch.Tensor:
    """This process's slice of a global batch (the batch size must divide evenly)."""
    if hooks.world == 1:
        return x
    if x.shape[0] % hooks.world:
        raise ValueError(f"global batch of {x.shape[0]} does not split over {hooks.world} processes")
    per = x.shape[0] // hooks.world
    return x[hooks.rank * per:(hooks.rank + 1) * per]


def is_writer(hooks: DataParallelHooks | None) -> bool:
    """Whether this process writes checkpoints, images and logs (rank 0 only)."""
    return hooks is None or hooks.rank == 0
