"""A self-contained quality number for the demo: how far translated images' colours are from the target's.

The colour distance of two image sets is the mean over the R, G and B channels of the 1-D Wasserstein
(earth mover's) distance between the two sets' distributions of that channel's pixel values, measured
in units of the full intensity range: 0 when every channel's values are distributed alike, 1 when one
set is all black and the other all white. It moves smoothly as colours come closer (a histogram
distance jumps only when a colour crosses a bin edge), needs no network weights (unlike FID) and suits
the demo's shapes set, whose two domains differ in colour scheme only. It says nothing about shapes:
the demo's contact sheet shows those.
"""
from __future__ import annotations

import torch

__all__ = ["channel_quantiles", "colour_distance"]

QUANTILES = 1024


def channel_quantiles(images: torch.Tensor, count: int = QUANTILES) -> torch.Tensor:
    """(3, count) float64: per channel, the pixel values of images (N, 3, H, W) in [-1, 1] (as [0, 1])
    at the quantile levels (k + 0.5) / count, k = 0..count-1 (lower order statistic, no interpolation)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"colour_distance needs (N, 3, H, W) images, got shape {tuple(images.shape)}")
    values = ((images.detach().double().cpu().clamp(-1, 1) + 1) / 2).transpose(0, 1).reshape(3, -1)
    ordered = values.sort(dim=1).values
    n = ordered.shape[1]
    index = ((torch.arange(count, dtype=torch.float64) + 0.5) / count * n).long().clamp(max=n - 1)
    return ordered[:, index]


def colour_distance(images: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over RGB of the Wasserstein-1 distance between two image sets' pixel-value distributions, in [0, 1]."""
    return float((channel_quantiles(images) - channel_quantiles(target)).abs().mean())
