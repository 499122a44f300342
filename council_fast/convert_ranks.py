"""Folder conversion across processes, GPUs and machines: ``torchrun ... -m council_fast convert ...``.

Every rank finds the same inputs (sorted) and plans the same output names; rank r converts inputs
r, r + W, r + 2W, ... (W ranks), so every input is converted exactly once. The seed is rank 0's
(drawn there when --seed is not given) and an input's style codes depend only on the seed and its
output name, so the outputs equal those of one process. At the end the ranks' reports are gathered
and rank 0 prints one report; every rank exits with the same status. NCCL with one GPU per process
(LOCAL_RANK) on CUDA, gloo on the CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from .runtime import join_process_group, launched_by_torchrun

__all__ = ["Ranks", "join", "launched_by_torchrun"]


@dataclass
class Ranks:
    rank: int
    world: int
    device: torch.device

    def shard(self, items: Sequence) -> list:
        return list(items[self.rank::self.world])

    def common_seed(self, seed: int | None) -> int:
        """Rank 0's seed (its --seed, or a random one drawn there) on every rank."""
        box = [seed if seed is not None else int.from_bytes(os.urandom(4), "little")]
        dist.broadcast_object_list(box, src=0)
        return int(box[0])

    def gather(self, report):
        """Rank 0: one ConversionReport of every rank's inputs; other ranks: their own, with the totals."""
        parts = [None] * self.world
        dist.all_gather_object(parts, (report.total, report.converted, report.failed, report.outputs, report.seconds))
        report.total = sum(p[0] for p in parts)
        report.converted = sum(p[1] for p in parts)
        report.failed = sorted(f for p in parts for f in p[2])
        report.outputs = sorted(o for p in parts for o in p[3])
        report.seconds = max(p[4] for p in parts)
        return report

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def join(device: str | None) -> Ranks:
    """Join the torchrun process group; the device is this rank's (cuda:LOCAL_RANK or the CPU)."""
    wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
    group = join_process_group("cuda" if wanted.startswith("cuda") else "cpu", command="convert")
    return Ranks(group.rank, group.world, group.device)
