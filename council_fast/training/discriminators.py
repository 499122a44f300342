"""The council's N discriminators and N council discriminators as stacked networks, and their losses.

Parameters are stored as in :class:`council_fast.lowering.StackedNetwork` (``(N, *official shape)``);
each scale's conv stack is lowered once (:func:`council_fast.lowering.lower`) and runs on all
members at once in the grouped layout (B, N * C, H, W). Only what the fused step stacks is
accepted: ``dis.norm`` 'none' and ``dis.gan_type`` 'lsgan' (else :class:`UnsupportedForFusion`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..lowering import Execution, StackedNetwork, UnsupportedForFusion, from_grouped, lower, meta_template, to_grouped
from ..reference.networks import MsImageDis, MsImageDisCouncil

__all__ = ["StackedMsImageDis", "StackedMsImageDisCouncil", "lsgan_dis_loss_per_member", "lsgan_gen_loss_per_member"]


class StackedMsImageDis(StackedNetwork):
    """N multi-scale discriminators. ``forward(x)``: x grouped (B, N*C, H, W) -> per scale (B, N, h, w)."""

    def __init__(self, input_dim: int, dis_params: Mapping, n: int):
        super().__init__(meta_template(lambda: MsImageDis(input_dim, dict(dis_params))), n)
        self._lower()

    def _lower(self) -> None:
        if self.template.norm != "none":
            raise UnsupportedForFusion(f"dis.norm {self.template.norm!r} is not stacked (only 'none')")
        if self.template.gan_type != "lsgan":
            raise UnsupportedForFusion(f"dis.gan_type {self.template.gan_type!r} is not stacked (only 'lsgan')")
        self.scales = [lower(cnn, f"cnns.{s}") for s, cnn in enumerate(self.template.cnns)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        run = Execution(self.n, self.stacked, "reference")  # no norms: the back-end is never asked
        outputs = []
        for s, steps in enumerate(self.scales):
            out, _ = run.run(steps, x)
            outputs.append(out)
            if s + 1 < len(self.scales):
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
        return outputs


class StackedMsImageDisCouncil(StackedMsImageDis):
    """N council discriminators on (image, source) pairs; ``forward(images, sources)`` -> per scale (B, N, h, w).

    images: grouped (B, N*C, H, W); sources: (B, C, H, W) shared or grouped (B, N*C, H, W).
    """

    def __init__(self, input_dim: int, dis_params: Mapping, n: int):
        StackedNetwork.__init__(self, meta_template(lambda: MsImageDisCouncil(input_dim, dict(dis_params))), n)
        self._lower()

    def forward(self, images: torch.Tensor, sources: torch.Tensor) -> list[torch.Tensor]:
        b = images.shape[0]
        per_member = from_grouped(images, self.n)
        if sources.shape[1] == per_member.shape[2]:
            src = sources.unsqueeze(1).expand(b, self.n, *sources.shape[1:])
        else:
            src = from_grouped(sources, self.n)
        # Pooling the concatenation pools image and source separately, as the reference does.
        return super().forward(to_grouped(torch.cat((per_member, src), dim=2)))


def _per_member_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, N, h, w) -> (N,) mean over batch and positions."""
    return x.mean(dim=(0, 2, 3))


def lsgan_dis_loss_per_member(outs_fake: Sequence[torch.Tensor], outs_real: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N,) LSGAN discriminator losses, summed over scales like the reference."""
    total = None
    for f, r in zip(outs_fake, outs_real):
        term = _per_member_mean(f ** 2) + _per_member_mean((r - 1) ** 2)
        total = term if total is None else total + term
    return total


def lsgan_gen_loss_per_member(outs_fake: Sequence[torch.Tensor]) -> torch.Tensor:
    total = None
    for f in outs_fake:
        term = _per_member_mean((f - 1) ** 2)
        total = term if total is None else total + term
    return total
