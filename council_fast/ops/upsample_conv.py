"""Nearest 2x upsampling followed by a 3x3 convolution, computed on the small image.

Every output pixel of ``conv3x3(upsample2x(x))`` sees a 2x2 window of ``x``, and which weights
fall on which of those four pixels depends only on the output pixel's phase (row and column
parity). So the pair equals four 2x2 convolutions on ``x`` (one per phase, with summed 3x3
weights), interleaved: 16 instead of 36 multiply-adds per output per input channel (2.25x fewer
FLOPs) and no upsampled intermediate. The results agree to fp32 rounding (the summed weights
round once). Rows, phase a = 0: taps [w0, w1 + w2] on input rows (i - 1, i);
phase a = 1: [w0 + w1, w2] on rows (i, i + 1); columns likewise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["upsample2x_conv3x3", "upsample2x_conv3x3_reference", "phase_weights"]


def upsample2x_conv3x3_reference(x, weight, bias=None):
    return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)


def _two_taps(w, dim):
    """The two 2-tap kernels (phase 0, phase 1) along ``dim`` (size 3) of a 3x3 kernel."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def phase_weights(weight):
    """(C_out, C_in, 3, 3) -> (4 * C_out, C_in, 2, 2): phases (0,0), (0,1), (1,0), (1,1), each C_out."""
    if weight.dim() != 4 or weight.shape[2:] != (3, 3):
        raise ValueError(f"upsample2x_conv3x3: weight must be (C_out, C_in, 3, 3), got {tuple(weight.shape)}")
    phases = []
    for rows in _two_taps(weight, 2):
        phases.extend(_two_taps(rows, 3))
    return torch.cat(phases, 0)


def upsample2x_conv3x3(x, weight, bias=None):
    """``conv2d(interpolate(x, scale_factor=2, mode='nearest'), weight, bias, padding=1)``, 2.25x cheaper."""
    batch, _, height, width = x.shape
    c_out = weight.shape[0]
    big_bias = None if bias is None else bias.repeat(4)
    y = F.conv2d(x, phase_weights(weight), big_bias, padding=1).contiguous()
    y = y.view(batch, 2, 2, c_out, height + 1, width + 1)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = torch.empty((batch, c_out, 2 * height, 2 * width), dtype=y.dtype, device=x.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    grid = out.view(batch, c_out, height, 2, width, 2)
    for a in (0, 1):
        for b in (0, 1):
            grid[:, :, :, a, :, b] = y[:, a, b, :, a:a + height, b:b + width]
    return out
