"""One lowering of the council's generators: N AdaINGen members -> the fused network.

:func:`lower` walks a reference module tree (AdaINGen, or a discriminator's conv stack) once and
returns a plan: a list of steps (conv + norm + activation, residual blocks, upsampling) with every
decision taken in one place:

* fusability: which pads fold into the convolution, which activation (ReLU) folds into the norm
  kernel, whether a residual block's add folds into its second norm, whether an upsample + 3x3 conv
  can run as four 2x2 phase convs, whether the decoder tail (three 1x1 convs, tanh, mask blend) is
  the published one that :mod:`council_fast.ops.decoder_tail` fuses; anything else raises
  :class:`UnsupportedForFusion`;
* AdaIN parameter slicing: the MLP output is consumed layer by layer in module order, C biases then
  C weights (:meth:`LoweredGenerator.adain_parameters`);
* norm routing: instance norm / AdaIN (+ ReLU, + residual) as the fused kernels of
  :mod:`council_fast.ops.adain` on the resolved back-end, NHWC tensors as a few ATen ops;
* phase-decomposed upsampling convs (:mod:`council_fast.ops.upsample_conv`: 2.25x fewer FLOPs,
  equal to fp32 rounding) and, on the cpu back-end in fp32, Winograd F(4x4, 3x3) for the wide 3x3
  convs (:mod:`council_fast.ops.winograd`: ~2e-6 relative error per layer, ~9x a direct
  convolution's rounding).

The plan runs on N members at once in the grouped layout (B, N * C, H, W) (channel block i belongs
to member i; a convolution of every member is one convolution with ``groups=N``, or ``groups=1``
on an input all members share, like the source image). Two networks execute it:

* :class:`FastGenerator` (N = 1, conversion): AdaINGen's own module tree, so official generator
  checkpoints load with ``strict=True``; upsample convs as phase convs and CPU Winograd on by default;
* :class:`StackedAdaINGen` (N members, training): every parameter stored once as ``(N, *shape)``
  (:class:`StackedNetwork`); phase convs and Winograd are opt-in there (``upsample_conv=True``,
  ``winograd=True``): they change the rounding of every step, see the training engine's docs.

Tensors of a dtype the kernels lack (float64) take the kernels' reference twins throughout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ops import registry
from .ops.adain import adain, instance_norm
from .ops.decoder_tail import decoder_tail
from .ops.upsample_conv import phase_weights, upsample2x_conv3x3
from .ops.winograd import conv3x3 as winograd_conv3x3
from .ops.winograd import winograd_applies
from .reference.networks import (AdaINGen, AdaptiveInstanceNorm2d, Conv2dBlock, ResBlock, ResBlocks,
                                 blend_with_masks)

__all__ = ["UnsupportedForFusion", "ConvStep", "ResStep", "UpsampleStep", "GeneratorPlan", "lower", "lower_generator",
           "LoweredGenerator", "FastGenerator", "StackedNetwork", "StackedAdaINGen", "normalised_bias_keys",
           "to_grouped", "from_grouped", "KERNEL_DTYPES"]

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class UnsupportedForFusion(NotImplementedError):
    """A layer or setting the lowering does not implement (the caller falls back or refuses)."""


# ---------------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class ConvStep:
    """pad -> conv -> norm (None | 'in' | 'adain') -> activation, as one conv and one fused norm kernel."""
    key: str  # the conv's state-dict prefix (``<block>.conv``, or the bare conv's name)
    padding: int  # a symmetric zero pad folded into the convolution
    pad: tuple | None  # an explicit F.pad (asymmetric zero pad: mode 'constant'), or None
    pad_mode: str
    stride: tuple
    kernel: tuple
    bias: bool
    norm: str | None
    eps: float
    activation: nn.Module | None  # applied after the norm unless ``relu`` (then fused into it)
    relu: bool

    @property
    def plain3x3(self) -> bool:
        """A zero pad of 1 then a 3x3 stride-1 convolution: the Winograd / phase-conv candidates."""
        return self.padding == 1 and self.pad is None and self.kernel == (3, 3) and self.stride == (1, 1)


@dataclass(frozen=True)
class ResStep:
    """A residual block: ``body`` then ``last``, plus the block input (fused into last's norm if it has no act)."""
    body: tuple
    last: ConvStep


@dataclass(frozen=True)
class UpsampleStep:
    """Nearest 2x upsampling; ``conv``: the following plain 3x3 conv block, runnable as four phase convs."""
    scale: float
    conv: ConvStep | None = None


@dataclass
class GeneratorPlan:
    encoder: list
    decoder: list  # up to the tail
    tail: list  # the last three conv steps
    tail_fusable: bool
    adain_channels: list  # per AdaIN layer in module order
    mlp: list = field(default_factory=list)  # (key prefix, activation module | None)
    num_masks: int = 1


def lower(module: nn.Module, prefix: str) -> list:
    """The steps of a Sequential / ResBlocks / ResBlock / Conv2dBlock / Conv2d / Upsample tree."""
    if isinstance(module, nn.Sequential):
        steps = []
        for name, child in module.named_children():
            steps += lower(child, f"{prefix}.{name}")
        return _fuse_upsampling(steps)
    if isinstance(module, ResBlocks):
        return lower(module.model, f"{prefix}.model")
    if isinstance(module, ResBlock):
        steps = lower(module.model, f"{prefix}.model")
        if not steps or not all(isinstance(s, ConvStep) for s in steps):
            raise UnsupportedForFusion(f"{prefix}: a residual block of conv blocks only")
        return [ResStep(tuple(steps[:-1]), steps[-1])]
    if isinstance(module, Conv2dBlock):
        return [_conv_step(f"{prefix}.conv", module.conv, module.pad, module.norm, module.activation)]
    if isinstance(module, nn.Conv2d):
        return [_conv_step(prefix, module, None, None, None)]
    if isinstance(module, nn.Upsample):
        if module.mode != "nearest" or module.size is not None:
            raise UnsupportedForFusion(f"{prefix}: only nearest upsampling by a scale factor is lowered")
        return [UpsampleStep(float(module.scale_factor))]
    raise UnsupportedForFusion(f"{prefix}: layer {type(module).__name__} is not supported by the lowering")


def _fuse_upsampling(steps: list) -> list:
    """Upsample x2 + plain 3x3 conv -> one UpsampleStep carrying the conv (phase-conv candidate)."""
    out = []
    for step in steps:
        prev = out[-1] if out else None
        if (isinstance(step, ConvStep) and isinstance(prev, UpsampleStep) and prev.conv is None
                and prev.scale == 2.0 and step.plain3x3):
            out[-1] = UpsampleStep(2.0, step)
        else:
            out.append(step)
    return out


def _conv_step(key: str, conv: nn.Conv2d, pad: nn.Module | None, norm: nn.Module | None,
               activation: nn.Module | None) -> ConvStep:
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding not in ((0, 0), 0):
        raise UnsupportedForFusion(f"{key}: only plain convolutions are lowered")
    padding, explicit, mode = _pad_of(key, pad)
    kind, eps = _norm_kind(key, norm)
    relu = isinstance(activation, nn.ReLU) and kind is not None
    return ConvStep(key, padding, explicit, mode, tuple(conv.stride), tuple(conv.kernel_size), conv.bias is not None,
                    kind, eps, activation, relu)


def _pad_of(key: str, pad: nn.Module | None) -> tuple:
    if pad is None:
        return 0, None, "constant"
    if isinstance(pad, nn.ZeroPad2d):
        if len(set(pad.padding)) == 1:
            return pad.padding[0], None, "constant"
        return 0, tuple(pad.padding), "constant"
    if isinstance(pad, (nn.ReflectionPad2d, nn.ReplicationPad2d)):
        return 0, tuple(pad.padding), "reflect" if isinstance(pad, nn.ReflectionPad2d) else "replicate"
    raise UnsupportedForFusion(f"{key}: padding {type(pad).__name__} is not supported by the lowering")


def _norm_kind(key: str, norm: nn.Module | None) -> tuple:
    if norm is None:
        return None, 0.0
    if isinstance(norm, nn.InstanceNorm2d) and not norm.affine and not norm.track_running_stats:
        return "in", float(norm.eps)
    if isinstance(norm, AdaptiveInstanceNorm2d):
        return "adain", float(norm.eps)
    raise UnsupportedForFusion(f"{key}: norm {type(norm).__name__} is not supported by the lowering")


def lower_generator(gen: AdaINGen) -> GeneratorPlan:
    """AdaINGen -> its plan (the style encoder is not lowered: translation never uses its output)."""
    layers = list(gen.dec.model.named_children())
    decoder = []
    for name, child in layers[:-3]:
        decoder += lower(child, f"dec.model.{name}")
    tail = []
    for name, child in layers[-3:]:
        tail += lower(child, f"dec.model.{name}")
    for idx, block in enumerate(gen.mlp.model):
        if block.norm is not None:
            raise UnsupportedForFusion("gen MLP with a norm is not supported by the lowering")
    return GeneratorPlan(
        encoder=lower(gen.enc_content.model, "enc_content.model"), decoder=_fuse_upsampling(decoder), tail=tail,
        tail_fusable=_tail_fusable(layers), mlp=[(f"mlp.model.{i}.fc", b.activation) for i, b in enumerate(gen.mlp.model)],
        adain_channels=[m.num_features for m in gen.dec.modules() if isinstance(m, AdaptiveInstanceNorm2d)],
        num_masks=gen.dec.num_of_mask_dim_to_add)


def _tail_fusable(layers) -> bool:
    """The published tail: 1x1 conv + ReLU, 1x1 conv + ReLU, 1x1 conv + tanh, then the mask blend."""
    tail = [m for _, m in layers[-3:]]
    acts = (nn.ReLU, nn.ReLU, nn.Tanh)
    return len(tail) == 3 and all(
        isinstance(m, Conv2dBlock) and m.norm is None and isinstance(m.activation, a)
        and m.conv.kernel_size == (1, 1) and m.conv.stride == (1, 1) and m.conv.bias is not None
        and (m.pad is None or sum(getattr(m.pad, "padding", (0,))) == 0)
        for m, a in zip(tail, acts))


def normalised_bias_keys(module: nn.Module) -> list[str]:
    """Keys of conv biases directly followed by a per-plane normalisation (instance norm, AdaIN).

    The normalisation subtracts the per-(sample, channel) mean, so these biases never change any
    output and their gradient is zero up to rounding; Adam then turns that rounding noise into
    steps of up to ``lr``, differently in any two implementations.
    """
    keys = []
    for name, m in module.named_modules():
        if isinstance(m, Conv2dBlock) and m.conv.bias is not None and isinstance(
                m.norm, (nn.InstanceNorm2d, AdaptiveInstanceNorm2d)):
            keys.append(f"{name}.conv.bias")
    return keys


# ---------------------------------------------------------------------------------------------- execution

def to_grouped(x: torch.Tensor) -> torch.Tensor:
    """(B, N, C, H, W) -> grouped layout (B, N * C, H, W)."""
    b, n, c = x.shape[:3]
    return x.reshape(b, n * c, *x.shape[3:])


def from_grouped(x: torch.Tensor, n: int) -> torch.Tensor:
    """Grouped layout (B, N * C, H, W) -> (B, N, C, H, W)."""
    return x.view(x.shape[0], n, x.shape[1] // n, *x.shape[2:])


def _flat(w: torch.Tensor) -> torch.Tensor:
    """(N, C_out, ...) -> (N * C_out, ...): every member's weights as one grouped weight."""
    return w.reshape(w.shape[0] * w.shape[1], *w.shape[2:])


def _is_nhwc(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@dataclass
class Execution:
    """One pass of a plan: N members, where the parameters come from, the back-end and the lowering switches."""
    n: int
    param: Callable[[str], torch.Tensor]  # state-dict key -> (N, *official shape)
    backend: str
    upsample_conv: bool = False
    winograd: bool = False
    adain: Iterator | None = None  # (weight (B, N*C), bias (B, N*C)) per AdaIN layer, in order

    def run(self, steps: Sequence, x: torch.Tensor, shared: bool = False) -> tuple[torch.Tensor, bool]:
        """Apply ``steps``; ``shared``: x is one input for every member (returned: whether it still is)."""
        for step in steps:
            x, shared = self._step(step, x, shared)
        return x, shared

    def _step(self, step, x, shared):
        if isinstance(step, ConvStep):
            return self.conv_block(step, x, shared), False
        if isinstance(step, ResStep):
            return self._residual(step, x, shared), False
        if step.conv is not None and self.upsample_conv:
            return self._finish(step.conv, self._upsample_conv(step.conv, x, shared), None), False
        x = F.interpolate(x, scale_factor=step.scale, mode="nearest")
        return (x, shared) if step.conv is None else (self.conv_block(step.conv, x, shared), False)

    def _residual(self, step: ResStep, x, shared):
        skip = x.repeat(1, self.n, 1, 1) if shared and self.n > 1 else x
        y, body_shared = self.run(step.body, x, shared)
        if step.last.activation is None:  # the add fused into the norm kernel
            return self.conv_block(step.last, y, body_shared, skip)
        return self.conv_block(step.last, y, body_shared) + skip

    def conv_block(self, step: ConvStep, x, shared, residual=None):
        return self._finish(step, self.conv(step, x, shared), residual)

    def _finish(self, step: ConvStep, y, residual):
        """The norm (+ fused ReLU, + residual), then any other activation."""
        if step.norm is None:
            y = y if step.activation is None else step.activation(y)
            return y if residual is None else y + residual
        weight = bias = None
        if step.norm == "adain":
            if self.adain is None:
                raise RuntimeError(f"{step.key}: AdaIN parameters were not supplied")
            weight, bias = next(self.adain)
        y = route_norm(y, weight, bias, step.relu, residual, self.backend, step.eps)
        return y if step.relu or step.activation is None else step.activation(y)

    def conv(self, step: ConvStep, x, shared):
        weight = _flat(self.param(step.key + ".weight"))
        bias = _flat(self.param(step.key + ".bias")) if step.bias else None
        if step.pad is not None:
            x = F.pad(x, step.pad, mode=step.pad_mode)
        groups = 1 if shared else self.n
        if self.winograd and step.plain3x3 and self.backend == "cpu" and not _is_nhwc(x):
            return _winograd_grouped(x, weight, bias, groups)
        return F.conv2d(x, weight, bias, step.stride, step.padding, 1, groups)

    def _upsample_conv(self, step: ConvStep, x, shared):
        weight = _flat(self.param(step.key + ".weight"))
        bias = _flat(self.param(step.key + ".bias")) if step.bias else None
        return grouped_upsample2x_conv3x3(x, weight, bias, 1 if shared else self.n)


def _winograd_grouped(x, weight, bias, groups):
    """A zero-padded 3x3 conv as Winograd on each member's channel block where it pays, else one grouped conv."""
    cin, cout = x.shape[1] // groups, weight.shape[0] // groups
    if not winograd_applies(x[:, :cin], weight[:cout]):
        return F.conv2d(x, weight, bias, 1, 1, 1, groups)
    if groups == 1:
        return winograd_conv3x3(x, weight, bias)
    outs = [winograd_conv3x3(x[:, g * cin:(g + 1) * cin], weight[g * cout:(g + 1) * cout],
               None if bias is None else bias[g * cout:(g + 1) * cout]) for g in range(groups)]
    return torch.cat(outs, 1)


def grouped_upsample2x_conv3x3(x, weight, bias, groups: int):
    """``conv2d(upsample2x(x), weight, bias, padding=1, groups=groups)`` as four 2x2 phase convs per group."""
    if groups == 1:
        return upsample2x_conv3x3(x, weight, bias)
    batch, _, height, width = x.shape
    c_out = weight.shape[0] // groups
    phases = phase_weights(weight)  # phase-major: (4 * N * C_out, C_in, 2, 2)
    phases = phases.view(4, groups, c_out, *phases.shape[1:]).transpose(0, 1).reshape(-1, *phases.shape[1:])
    big_bias = None if bias is None else bias.view(groups, 1, c_out).expand(groups, 4, c_out).reshape(-1)
    y = F.conv2d(x, phases, big_bias, padding=1, groups=groups)
    y = y.view(batch, groups, 2, 2, c_out, height + 1, width + 1)
    out = torch.empty((batch, groups, c_out, 2 * height, 2 * width), dtype=y.dtype, device=x.device)
    grid = out.view(batch, groups, c_out, height, 2, width, 2)
    for a in (0, 1):
        for b in (0, 1):
            grid[:, :, :, :, a, :, b] = y[:, :, a, b, :, a:a + height, b:b + width]
    return out.view(batch, groups * c_out, 2 * height, 2 * width)


def route_norm(y, weight, bias, relu, residual, backend, eps=1e-5):
    """Instance norm (weight None) or AdaIN ((B, C) weight / bias), then ReLU, then + residual."""
    if _is_nhwc(y):
        return channels_last_norm(y, weight, bias, relu, residual, eps)
    if y.dtype not in KERNEL_DTYPES:  # float64 (exactness checks): the torch ops the reference runs
        return _torch_norm(y, weight, bias, relu, residual, eps)
    if weight is None:
        return instance_norm(y, relu=relu, eps=eps, residual=residual, backend=backend)
    return adain(y, weight, bias, residual=residual, relu=relu, eps=eps, backend=backend)


def _torch_norm(y, weight, bias, relu, residual, eps):
    if weight is None:
        y = F.instance_norm(y, eps=eps)
    else:
        b, c = y.shape[:2]
        y = F.batch_norm(y.reshape(1, b * c, *y.shape[2:]), None, None, weight.reshape(-1), bias.reshape(-1), True,
                         0.0, eps).view_as(y)
    y = F.relu(y) if relu else y
    return y if residual is None else y + residual


def channels_last_norm(y, weight, bias, relu, residual, eps=1e-5):
    """Instance norm / AdaIN (then ReLU, then + residual) on an NHWC tensor without leaving the layout:
    the statistics with one var_mean in fp32, then one scale-and-shift per (sample, channel); no
    per-sample loop (on a GPU each sample would be its own launches)."""
    var, mean = torch.var_mean(y.float(), dim=(2, 3), keepdim=True, correction=0)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.float()[:, :, None, None]
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.float()[:, :, None, None]
    out = torch.addcmul(shift.to(y.dtype), y, scale.to(y.dtype))
    if relu:
        out = torch.relu_(out) if not out.requires_grad else torch.relu(out)
    if residual is not None:
        out = out + residual
    return out


# ---------------------------------------------------------------------------------------------- networks

class LoweredGenerator(nn.Module):
    """What both generator networks share: the plan and its execution on N members.

    Subclasses supply ``n``, ``plan`` and :meth:`member_parameter` (key -> ``(N, *shape)``), and the
    switches ``backend``, ``strict``, ``upsample_conv``, ``winograd``.
    """

    n: int
    plan: GeneratorPlan
    backend: str | None = None
    strict: bool | None = None
    upsample_conv: bool = False
    winograd: bool | None = False

    def member_parameter(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def kernel_backend_for(self, t: torch.Tensor) -> str:
        """The kernel back-end for t; the reference twins for dtypes the kernels lack (float64)."""
        if t.dtype not in KERNEL_DTYPES:
            return "reference"
        requested = self.backend if self.backend is not None else os.environ.get("COUNCIL_FAST_BACKEND")
        return registry.resolve(requested, t.device, self.strict)

    def _execution(self, backend: str, adain_params=None) -> Execution:
        return Execution(self.n, self.member_parameter, backend, bool(self.upsample_conv), self._winograd_on(),
                         None if adain_params is None else iter(adain_params))

    def _winograd_on(self) -> bool:
        return bool(self.winograd)

    def content_codes(self, images: torch.Tensor) -> torch.Tensor:
        """Content codes of every member, grouped layout (B, N * C, h, w)."""
        x, shared = self._execution(self.kernel_backend_for(images)).run(self.plan.encoder, images, True)
        return x.repeat(1, self.n, 1, 1) if shared and self.n > 1 else x

    def style_mlp(self, z: torch.Tensor) -> torch.Tensor:
        """(B, style_dim, 1, 1) shared style -> (N, B, P) AdaIN parameters of every member."""
        h = z.reshape(z.shape[0], -1)
        for idx, (key, activation) in enumerate(self.plan.mlp):
            weight, bias = self.member_parameter(key + ".weight"), self.member_parameter(key + ".bias")
            if idx == 0:  # shared input: one linear layer with every member's outputs side by side
                h = F.linear(h, weight.reshape(-1, weight.shape[-1]), bias.reshape(-1))
                h = h.view(h.shape[0], self.n, -1).transpose(0, 1)
            elif self.n == 1:
                h = F.linear(h[0], weight[0], bias[0]).unsqueeze(0)
            else:
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            h = h if activation is None else activation(h)
        return h

    def adain_parameters(self, mlp_out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Slice (N, B, P) like the reference: per layer C biases then C weights -> (weight, bias), (B, N*C) each."""
        params, start = [], 0
        batch = mlp_out.shape[1]
        for c in self.plan.adain_channels:
            bias = mlp_out[:, :, start:start + c].transpose(0, 1).reshape(batch, self.n * c)
            weight = mlp_out[:, :, start + c:start + 2 * c].transpose(0, 1).reshape(batch, self.n * c)
            params.append((weight, bias))
            start += 2 * c
        return params

    def decode_grouped(self, content: torch.Tensor, z: torch.Tensor, images: torch.Tensor):
        """(blended outputs (B, N * C, H, W), masks (B, N, M, H, W)), in the images' dtype."""
        backend = self.kernel_backend_for(content)
        run = self._execution(backend, self.adain_parameters(self.style_mlp(z)))
        x, _ = run.run(self.plan.decoder, content)
        if self.plan.tail_fusable and x.shape[2:] == images.shape[2:] and x.dtype in KERNEL_DTYPES:
            return self._fused_tail(x, images, backend)
        raw, _ = run.run(self.plan.tail, x)
        return self._blend(raw, images)

    def _fused_tail(self, x: torch.Tensor, images: torch.Tensor, backend: str):
        """Each member's tail as one fused op (:mod:`council_fast.ops.decoder_tail`) on its channel block."""
        dim = x.shape[1] // self.n
        images_x = images.to(x.dtype)  # bf16 under autocast, like the convs
        outs, masks = [], []
        for i in range(self.n):
            params = []
            for step in self.plan.tail:
                params += [self.member_parameter(step.key + ".weight")[i].to(x.dtype),
                           self.member_parameter(step.key + ".bias")[i].to(x.dtype)]
            member = x if self.n == 1 else x[:, i * dim:(i + 1) * dim]
            out, mask = decoder_tail(member, *params, images_x, self.plan.num_masks, backend=backend,
                                     strict=self.strict)
            outs.append(out)
            masks.append(mask)
        # The reference blends in the images' dtype (fp32 under autocast): hand on that dtype too.
        if self.n == 1:
            return outs[0].to(images.dtype), masks[0].unsqueeze(1).to(images.dtype)
        return torch.cat(outs, 1).to(images.dtype), torch.stack(masks, 1).to(images.dtype)

    def _blend(self, raw: torch.Tensor, images: torch.Tensor):
        b, _, h, w = raw.shape
        per_member = raw.reshape(b * self.n, -1, h, w)
        expanded = images.unsqueeze(1).expand(b, self.n, *images.shape[1:]).reshape(b * self.n, *images.shape[1:])
        out, masks = blend_with_masks(per_member, expanded, self.plan.num_masks)
        return out.reshape(b, -1, h, w), masks.reshape(b, self.n, self.plan.num_masks, h, w)


class FastGenerator(LoweredGenerator):
    """AdaINGen's function and parameters (its module tree: official checkpoints load ``strict=True``),
    computed by the lowering on one member.

    ``backend``: ``reference`` | ``cpu`` | ``triton`` | ``cuda`` | ``auto`` (None: COUNCIL_FAST_BACKEND or
    the device's automatic choice), resolved per device at call time; ``strict``: no fallback.
    ``channels_last``: NHWC activations (opt-in; the norms then run as a few ATen ops).
    ``upsample_conv`` (default on): upsample + 3x3 conv as four 2x2 phase convs (equal to fp32 rounding).
    ``winograd`` (None or True: on; False: off): Winograd F(4x4, 3x3) for the wide 3x3 convs on the cpu
    back-end in fp32. ``translate`` skips the style encoder. It runs in its parameters' dtype.
    """

    n = 1

    def __init__(self, input_dim, params, backend=None, strict=None, channels_last=None, upsample_conv=True,
                 winograd=None):
        super().__init__()
        reference = AdaINGen(input_dim, params)
        self.enc_style = reference.enc_style
        self.enc_content = reference.enc_content
        self.dec = reference.dec
        self.mlp = reference.mlp
        self.style_dim = reference.style_dim
        self.n_downsample = reference.n_downsample
        self.activ = reference.activ
        self.pad_type = params["pad_type"]
        self.num_masks = params["num_of_mask_dim_to_add"]
        self.backend = backend
        self.strict = strict
        self.channels_last = channels_last
        self.upsample_conv = upsample_conv
        self.winograd = winograd
        self.plan = lower_generator(self)

    @classmethod
    def from_reference(cls, gen: AdaINGen, backend=None, strict=None, channels_last=None) -> "FastGenerator":
        """A FastGenerator with ``gen``'s configuration and a copy of its weights (same device/dtype)."""
        params = dict(dim=gen.enc_style.model[0].conv.out_channels, style_dim=gen.style_dim,
                      n_downsample=gen.n_downsample, n_res=len(gen.enc_content.model[-1].model),
                      activ=gen.activ, pad_type=_pad_type_of(gen), mlp_dim=gen.mlp.model[0].fc.out_features,
                      num_of_mask_dim_to_add=gen.dec.num_of_mask_dim_to_add)
        input_dim = gen.enc_style.model[0].conv.in_channels
        param = next(gen.parameters())
        fast = cls(input_dim, params, backend=backend, strict=strict, channels_last=channels_last)
        fast = fast.to(device=param.device, dtype=param.dtype)
        fast.load_state_dict(gen.state_dict(), strict=True)
        return fast

    def member_parameter(self, key: str) -> torch.Tensor:
        return self.get_parameter(key).unsqueeze(0)

    def _winograd_on(self) -> bool:
        return self.winograd is not False  # None (the default) or True

    # ------------------------------------------------------------------------------ the AdaINGen interface

    def forward(self, images, style, return_mask=False):
        content, _ = self.encode(images)
        return self.decode(content, style, images, return_mask=return_mask)

    def encode(self, images):
        """(content code, style code), as AdaINGen.encode (the style encoder runs in torch)."""
        return self.encode_content(images), self.enc_style(self._cast(images))

    def encode_content(self, images):
        images = self._cast(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.content_codes(images)

    def decode(self, content, style, images, return_mask=False):
        content, images = self._cast(content), self._cast(images)
        if self.channels_last:
            content = content.contiguous(memory_format=torch.channels_last)
        out, masks = self.decode_grouped(content, self._cast(style), images)
        masks = masks[:, 0]
        self.dec.mask_s = masks  # where the official trainer reads the masks for its focus losses
        if not return_mask:
            return out
        if masks.shape[1] != 3:
            masks = masks.mean(1, keepdim=True).repeat(1, 3, 1, 1)
        return out, masks

    def translate(self, images, style, return_mask=False):
        """decode(encode_content(images), style, images): the style encoder is skipped."""
        return self.decode(self.encode_content(images), style, images, return_mask=return_mask)

    def _cast(self, t):
        dtype = self.mlp.model[0].fc.weight.dtype
        return t if t.dtype == dtype else t.to(dtype)


def _pad_type_of(gen: AdaINGen) -> str:
    pad = gen.enc_content.model[0].pad
    return {nn.ZeroPad2d: "zero", nn.ReflectionPad2d: "reflect", nn.ReplicationPad2d: "replicate"}[type(pad)]


# ---------------------------------------------------------------------------------------------- stacked storage

def _attr_name(key: str) -> str:
    return key.replace(".", "__")


def meta_template(factory):
    """A reference module built on the meta device: its structure, no data."""
    with torch.device("meta"):
        return factory()


class StackedNetwork(nn.Module):
    """N copies of ``template``'s parameters and buffers, stacked on a leading member dimension.

    Member ``i``'s official state dict is ``{key: stacked[key][i]}``.
    """

    def __init__(self, template: nn.Module, n: int, kernel_backend: str | None = None):
        super().__init__()
        self.n = n
        self.kernel_backend = kernel_backend  # of the norm kernels; None: COUNCIL_FAST_BACKEND or automatic
        object.__setattr__(self, "template", template)  # not a submodule: it holds no data
        self.state_keys = list(template.state_dict().keys())
        self.parameter_keys = [k for k, _ in template.named_parameters()]
        for key, p in template.named_parameters():
            self.register_parameter(_attr_name(key), nn.Parameter(torch.zeros(n, *p.shape)))
        for key, b in template.named_buffers():
            self.register_buffer(_attr_name(key), torch.zeros(n, *b.shape, dtype=b.dtype))

    def stacked(self, key: str) -> torch.Tensor:
        return getattr(self, _attr_name(key))

    member_parameter = stacked

    def stacked_parameters(self) -> list[nn.Parameter]:
        """The stacked parameters in the official module order (the optimizer's order)."""
        return [self.stacked(k) for k in self.parameter_keys]

    @torch.no_grad()
    def load_members(self, states: Sequence[Mapping[str, torch.Tensor]], source: str = "<states>") -> None:
        """Copy per-member official state dicts in (strict: every key, every shape)."""
        if len(states) != self.n:
            raise ValueError(f"{source}: {len(states)} member state dicts for a council of {self.n}")
        for i, state in enumerate(states):
            missing = [k for k in self.state_keys if k not in state]
            unexpected = [k for k in state if k not in self.state_keys]
            if missing or unexpected:
                raise ValueError(f"{source}: member {i} state dict does not fit {type(self.template).__name__}: "
                                 f"missing {missing[:5]}, unexpected {unexpected[:5]}")
            for key in self.state_keys:
                target = self.stacked(key)
                if tuple(state[key].shape) != tuple(target.shape[1:]):
                    raise ValueError(f"{source}: member {i} key {key!r} has shape {tuple(state[key].shape)}, "
                                     f"expected {tuple(target.shape[1:])}")
                target[i].copy_(state[key])

    @torch.no_grad()
    def member_state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Member ``i``'s state dict in the official key layout (copies, on the stacked device)."""
        return {key: self.stacked(key)[i].detach().clone() for key in self.state_keys}

    def member_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        return [self.member_state_dict(i) for i in range(self.n)]

    def normalised_bias_keys(self) -> list[str]:
        """Conv biases an instance norm / AdaIN subtracts again: mathematically they get no gradient."""
        return normalised_bias_keys(self.template)

    def kernel_backend_for(self, t: torch.Tensor) -> str:
        """The kernel back-end for t; the reference twins for dtypes the kernels lack (float64)."""
        if t.dtype not in KERNEL_DTYPES:
            return "reference"
        return registry.resolve(self.kernel_backend, t.device)


class StackedAdaINGen(StackedNetwork, LoweredGenerator):
    """N Council-GAN generators (AdaINGen) in one network (the lowering on N members).

    ``translate(images, z)``: images (B, C, H, W) shared by all members, z (B, style_dim, 1, 1)
    shared; returns the blended outputs in the grouped layout (B, N * C, H, W). The style encoder's
    parameters are stored (they are in the official state dict) but never run.
    ``upsample_conv`` / ``winograd``: the phase-conv and CPU-Winograd lowerings (opt-in here).
    """

    def __init__(self, input_dim: int, gen_params: Mapping, n: int, kernel_backend: str | None = None,
                 upsample_conv: bool = False, winograd: bool = False):
        StackedNetwork.__init__(self, meta_template(lambda: AdaINGen(input_dim, dict(gen_params))), n, kernel_backend)
        self.input_dim = input_dim
        self.plan = lower_generator(self.template)
        self.num_masks = self.plan.num_masks
        self.upsample_conv = upsample_conv
        self.winograd = winograd

    kernel_backend_for = StackedNetwork.kernel_backend_for
    member_parameter = StackedNetwork.stacked

    def training_parameters(self) -> list[nn.Parameter]:
        """Parameters that receive gradients in training (all but the unused style encoder)."""
        return [self.stacked(k) for k in self.parameter_keys if not k.startswith("enc_style.")]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Content codes of every member, grouped layout."""
        return self.content_codes(images)

    def decode(self, content: torch.Tensor, z: torch.Tensor, images: torch.Tensor, return_mask: bool = False):
        out, masks = self.decode_grouped(content, z, images)
        return (out, masks) if return_mask else out

    def translate(self, images: torch.Tensor, z: torch.Tensor, return_mask: bool = False):
        return self.decode(self.encode(images), z, images, return_mask)

    forward = translate
