"""The one set of op benchmark cases: the generator's fusable ops at its real shapes.

``council-fast bench ops`` times them and the pytest-benchmark suite (benchmarks/bench_ops.py)
times and checks them. Each case has the reference computation (the published modules), its inputs
(leaf tensors that require grad), a builder of the fused op for a kernel back-end and the tolerance
the fused result is held to (``OpCase.check``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..ops import resolve_backend
from ..ops.adain import adain, instance_norm
from ..ops.decoder_tail import decoder_tail
from ..ops.winograd import conv3x3
from ..reference import networks as N
from ..runtime import autocast_context

__all__ = ["OpCase", "NotApplicable", "op_cases", "op_backend", "op_call", "KINDS"]

KINDS = ("fwd", "fwd+bwd")
# (rtol, atol) of torch.allclose per kind: the fused output (fwd) or the first input's gradient (fwd+bwd)
# against the reference's.
ALLCLOSE = {"fwd": (1e-4, 1e-5), "fwd+bwd": (1e-3, 1e-6)}


class NotApplicable(Exception):
    """The fused op does not exist for this back-end, device or precision (the message says why)."""


@dataclass
class OpCase:
    """One op: a reference callable, its inputs and a builder ``fused(backend) -> callable`` of the
    fused op taking the same inputs (raising NotApplicable where it does not exist)."""
    name: str
    reference: Callable
    inputs: tuple
    fused: Callable[[str], Callable]
    # kind -> ("allclose", rtol, atol) or ("max", rel): max|out - ref| <= rel * max|ref|
    tolerance: dict = field(default_factory=lambda: {k: ("allclose", *v) for k, v in ALLCLOSE.items()})

    def check(self, kind: str, out: torch.Tensor, ref: torch.Tensor) -> str | None:
        """None when ``out`` matches ``ref`` within the case's tolerance for ``kind``, else why not."""
        rule, *bounds = self.tolerance[kind]
        out, ref = out.detach().float(), ref.detach().float()
        if rule == "max":
            err, limit = (out - ref).abs().max().item(), bounds[0] * ref.abs().max().item()
            return None if err <= limit else f"{self.name} {kind}: max |diff| {err:.3e} > {limit:.3e}"
        rtol, atol = bounds
        if torch.allclose(out, ref, rtol=rtol, atol=atol):
            return None
        return f"{self.name} {kind}: not allclose (rtol {rtol}, atol {atol}): max |diff| " \
               f"{(out - ref).abs().max().item():.3e}"


def op_backend(backend: str, device: torch.device) -> str:
    """The kernel back-end ``backend`` ('auto' or a name) resolves to on ``device``."""
    return resolve_backend(None if backend == "auto" else backend, device)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def op_call(fn: Callable, inputs: tuple, kind: str, device: torch.device, precision: str = "fp32") -> Callable:
    """A no-argument call of ``fn(*inputs)`` for ``kind``: 'fwd' returns the output (no grad), 'fwd+bwd'
    back-propagates mean(out**2) and returns the first input's gradient."""
    def forward():
        with torch.no_grad(), autocast_context(device, precision):
            return _first(fn(*inputs))

    def forward_backward():
        for t in inputs:
            t.grad = None
        with autocast_context(device, precision):
            out = _first(fn(*inputs))
        out.float().square().mean().backward()
        return inputs[0].grad
    return forward if kind == "fwd" else forward_backward


def _leaf(*shape, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).requires_grad_(True)


def _adain_cases(deep: int, low: int, batch: int, dim: int, size: int, device) -> list[OpCase]:
    norm = N.AdaptiveInstanceNorm2d(deep).to(device)

    def reference(x, weight, bias, residual=None, relu=False):
        norm.weight, norm.bias = weight.reshape(-1), bias.reshape(-1)
        y = norm(x)
        y = torch.relu(y) if relu else y
        return y + residual if residual is not None else y

    x, w, b = _leaf(batch, deep, low, low, device=device), _leaf(batch, deep, device=device, scale=0.5), \
        _leaf(batch, deep, device=device)
    return [
        OpCase("AdaIN + ReLU", lambda x, w, b: reference(x, w, b, relu=True), (x, w, b),
               lambda be: lambda x, w, b: adain(x, w, b, relu=True, backend=be)),
        OpCase("AdaIN + residual", lambda x, w, b, r: reference(x, w, b, residual=r),
               (x, w, b, _leaf(batch, deep, low, low, device=device)),
               lambda be: lambda x, w, b, r: adain(x, w, b, residual=r, backend=be)),
        OpCase("instance norm + ReLU", lambda x: torch.relu(F.instance_norm(x)),
               (_leaf(batch, dim, size, size, device=device),),
               lambda be: lambda x: instance_norm(x, relu=True, backend=be)),
    ]


def _tail_case(dim: int, masks: int, activ: str, batch: int, size: int, device) -> OpCase:
    head = torch.nn.Sequential(
        N.Conv2dBlock(dim, dim, 1, 1, 0, norm="none", activation=activ),
        N.Conv2dBlock(dim, dim, 1, 1, 0, norm="none", activation=activ),
        N.Conv2dBlock(dim, 3 * masks + masks, 1, 1, 0, norm="none", activation="tanh")).to(device)
    weights = [t for block in head for t in (block.conv.weight, block.conv.bias)]
    return OpCase("decoder tail (1x1 convs + mask blend)",
                  lambda h, images: N.blend_with_masks(head(h), images, masks)[0],
                  (_leaf(batch, dim, size, size, device=device), _leaf(batch, 3, size, size, device=device)),
                  lambda be: lambda h, images: decoder_tail(h, *weights, images, masks, backend=be)[0])


def _winograd_case(channels: int, low: int, batch: int, device, precision: str) -> OpCase:
    def fused(be):
        if op_backend(be, device) != "cpu" or precision != "fp32":
            raise NotApplicable("Winograd convs belong to the cpu back-end, in fp32 (on GPUs cuDNN picks its own)")
        return conv3x3
    tolerance = {"fwd": ("max", 1e-5), "fwd+bwd": ("allclose", *ALLCLOSE["fwd+bwd"])}
    return OpCase("residual 3x3 conv (Winograd)", lambda x, w, b: F.conv2d(x, w, b, padding=1),
                  (_leaf(batch, channels, low, low, device=device),
                   _leaf(channels, channels, 3, 3, device=device, scale=(9 * channels) ** -0.5),
                   _leaf(channels, device=device)),
                  fused, tolerance)


def op_cases(config: dict, batch: int, size: int, device: torch.device, precision: str = "fp32",
             winograd_channels: int | None = None) -> list[OpCase]:
    """The generator's fusable ops at its real shapes for ``size`` x ``size`` inputs (the Winograd
    conv at ``winograd_channels``, default the residual blocks' width)."""
    g = config["gen"]
    dim, nd = g["dim"], g["n_downsample"]
    deep, low = dim * 2 ** nd, size // 2 ** nd
    return (_adain_cases(deep, low, batch, dim, size, device)
            + [_tail_case(dim, g["num_of_mask_dim_to_add"], g["activ"], batch, size, device),
               _winograd_case(winograd_channels or deep, low, batch, device, precision)])
