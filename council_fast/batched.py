"""The council's N members as one stacked network: members on a group dimension.

Every parameter of the official network is stored once with a leading member dimension
(``(N, *official_shape)``), so member ``i``'s official state dict is ``{key: stacked[key][i]}``.
Activations of all members travel together in the grouped layout ``(B, N * C, H, W)``: channel
block ``i`` belongs to member ``i``. In that layout

- a convolution of every member is one convolution with the stacked weight and ``groups=N``
  (with ``groups=1`` when the input is shared by all members, as the source image is);
- instance norm and AdaIN work per (sample, channel) plane, so they need nothing special: they run
  as the fused kernels of :mod:`council_fast.ops.adain` (with the following ReLU or the residual
  add of a residual block folded in), on the back-end ``kernel_backend`` names (None: the
  COUNCIL_FAST_BACKEND variable, else the automatic choice of the device);
- the style MLP is one batched matrix multiply over the member dimension;
- the decoder tail (three 1x1 convs, tanh, mask blend) runs per member as the fused op of
  :mod:`council_fast.ops.decoder_tail` on that member's channel block (no copy).

Tensors of a dtype the kernels lack (float64) take the plain PyTorch path throughout.

The forward passes interpret a reference module tree (built on the ``meta`` device, it holds no
data) so the stacked networks compute exactly what the reference modules compute, member by
member, and any layer kind the interpreter does not know raises :class:`UnsupportedForFusion`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ops import resolve_backend
from .ops.adain import adain as adain_op
from .ops.adain import instance_norm
from .ops.decoder_tail import decoder_tail
from .reference.networks import (AdaINGen, AdaptiveInstanceNorm2d, Conv2dBlock, MsImageDis,
                                 MsImageDisCouncil, ResBlock, ResBlocks, blend_with_masks)

__all__ = ["UnsupportedForFusion", "StackedNetwork", "StackedAdaINGen", "StackedMsImageDis",
           "StackedMsImageDisCouncil", "lsgan_dis_loss_per_member", "lsgan_gen_loss_per_member",
           "to_grouped", "from_grouped", "normalised_bias_keys"]


class UnsupportedForFusion(NotImplementedError):
    """A layer or setting the stacked networks do not implement (the caller falls back)."""


def to_grouped(x: torch.Tensor) -> torch.Tensor:
    """(B, N, C, H, W) -> grouped layout (B, N * C, H, W)."""
    b, n, c = x.shape[:3]
    return x.reshape(b, n * c, *x.shape[3:])


def from_grouped(x: torch.Tensor, n: int) -> torch.Tensor:
    """Grouped layout (B, N * C, H, W) -> (B, N, C, H, W)."""
    return x.view(x.shape[0], n, x.shape[1] // n, *x.shape[2:])


def _attr_name(key: str) -> str:
    return key.replace(".", "__")


def _relu_residual(y: torch.Tensor, relu: bool, residual: torch.Tensor | None) -> torch.Tensor:
    y = F.relu(y) if relu else y
    return y if residual is None else y + residual


def _activation(module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    if module is None:
        return x
    if isinstance(module, nn.ReLU):
        return F.relu(x)
    if isinstance(module, nn.LeakyReLU):
        return F.leaky_relu(x, module.negative_slope)
    if isinstance(module, nn.Tanh):
        return torch.tanh(x)
    if isinstance(module, nn.SELU):
        return F.selu(x)
    raise UnsupportedForFusion(f"activation {type(module).__name__} is not supported by the stacked networks")


class StackedNetwork(nn.Module):
    """N copies of ``template``'s parameters and buffers, stacked on a leading member dimension."""

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

    # ------------------------------------------------------------------ interpreter
    def _conv(self, key: str, conv: nn.Conv2d, pad: nn.Module | None, x: torch.Tensor, shared: bool):
        weight = self.stacked(key + ".weight")
        weight = weight.reshape(self.n * weight.shape[1], *weight.shape[2:])
        bias = self.stacked(key + ".bias").reshape(-1) if conv.bias is not None else None
        padding = 0
        if isinstance(pad, nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right == top == bottom:
                padding = left
            else:
                x = F.pad(x, pad.padding)
        elif isinstance(pad, (nn.ReflectionPad2d, nn.ReplicationPad2d)):
            mode = "reflect" if isinstance(pad, nn.ReflectionPad2d) else "replicate"
            x = F.pad(x, pad.padding, mode=mode)
        elif pad is not None:
            raise UnsupportedForFusion(f"padding {type(pad).__name__} is not supported by the stacked networks")
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding not in ((0, 0), 0):
            raise UnsupportedForFusion(f"{key}: only plain convolutions are stacked")
        return F.conv2d(x, weight, bias, conv.stride, padding, 1, 1 if shared else self.n)

    def _norm(self, key: str, norm: nn.Module | None, x: torch.Tensor, adain: Mapping | None,
              relu: bool = False, residual: torch.Tensor | None = None):
        """Instance norm / AdaIN of every plane, then (fused) ReLU and residual add, on the kernel back-end."""
        if norm is None:
            return _relu_residual(x, relu, residual)
        backend = self._backend(x)
        if isinstance(norm, nn.InstanceNorm2d) and not norm.affine and not norm.track_running_stats:
            if backend == "reference":
                return _relu_residual(F.instance_norm(x, eps=norm.eps), relu, residual)
            return instance_norm(x, relu=relu, eps=norm.eps, residual=residual, backend=backend)
        if isinstance(norm, AdaptiveInstanceNorm2d):
            if adain is None or key not in adain:
                raise RuntimeError(f"{key}: AdaIN parameters were not supplied")
            weight, bias = adain[key]
            if backend == "reference":
                b, c = x.shape[:2]
                y = F.batch_norm(x.reshape(1, b * c, *x.shape[2:]), None, None, weight.reshape(-1),
                                 bias.reshape(-1), True, 0.0, norm.eps).view_as(x)
                return _relu_residual(y, relu, residual)
            return adain_op(x, weight, bias, residual=residual, relu=relu, eps=norm.eps, backend=backend)
        raise UnsupportedForFusion(f"{key}: norm {type(norm).__name__} is not supported by the stacked networks")

    def _backend(self, x: torch.Tensor) -> str:
        """The kernel back-end for x; plain PyTorch ("reference") for dtypes the kernels lack (float64)."""
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return "reference"
        return resolve_backend(self.kernel_backend, x.device)

    def _conv_block(self, prefix: str, block: Conv2dBlock, x: torch.Tensor, shared: bool, adain: Mapping | None,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
        x = self._conv(f"{prefix}.conv", block.conv, block.pad, x, shared)
        relu = isinstance(block.activation, nn.ReLU)
        x = self._norm(f"{prefix}.norm", block.norm, x, adain, relu=relu, residual=residual)
        return x if relu else _activation(block.activation, x)

    def _run(self, module: nn.Module, prefix: str, x: torch.Tensor, shared: bool,
             adain: Mapping | None = None) -> tuple[torch.Tensor, bool]:
        """Apply the stacked version of ``module``; ``shared``: x is one input for every member."""
        if isinstance(module, nn.Sequential):
            for name, child in module.named_children():
                x, shared = self._run(child, f"{prefix}.{name}", x, shared, adain)
            return x, shared
        if isinstance(module, ResBlocks):
            return self._run(module.model, f"{prefix}.model", x, shared, adain)
        if isinstance(module, ResBlock):
            skip = x.repeat(1, self.n, 1, 1) if shared else x
            *body, last = module.model.named_children()
            y = x
            for name, child in body:
                y, shared = self._run(child, f"{prefix}.model.{name}", y, shared, adain)
            if isinstance(last[1], Conv2dBlock) and last[1].activation is None:  # residual add fused into the norm
                return self._conv_block(f"{prefix}.model.{last[0]}", last[1], y, shared, adain, skip), False
            y, _ = self._run(last[1], f"{prefix}.model.{last[0]}", y, shared, adain)
            return y + skip, False
        if isinstance(module, Conv2dBlock):
            return self._conv_block(prefix, module, x, shared, adain), False
        if isinstance(module, nn.Conv2d):
            return self._conv(prefix, module, None, x, shared), False
        if isinstance(module, nn.Upsample):
            if module.mode != "nearest" or module.size is not None:
                raise UnsupportedForFusion(f"{prefix}: only nearest upsampling by a scale factor is stacked")
            return F.interpolate(x, scale_factor=module.scale_factor, mode="nearest"), shared
        raise UnsupportedForFusion(f"{prefix}: layer {type(module).__name__} is not supported by the stacked networks")


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


def _meta_template(factory):
    with torch.device("meta"):
        return factory()


class StackedAdaINGen(StackedNetwork):
    """N Council-GAN generators (AdaINGen) in one network.

    ``translate(images, z)``: images (B, C, H, W) shared by all members, z (B, style_dim, 1, 1)
    shared; returns the blended outputs in the grouped layout (B, N * C, H, W). The style encoder's
    parameters are stored (they are in the official state dict) but never run: translation does
    not use its output.
    """

    def __init__(self, input_dim: int, gen_params: Mapping, n: int, kernel_backend: str | None = None):
        super().__init__(_meta_template(lambda: AdaINGen(input_dim, dict(gen_params))), n, kernel_backend)
        self.input_dim = input_dim
        self.num_masks = self.template.dec.num_of_mask_dim_to_add
        self.adain_layers = [(f"dec.{name}", m.num_features) for name, m in self.template.dec.named_modules()
                             if isinstance(m, AdaptiveInstanceNorm2d)]
        for block in self.template.mlp.model:
            if block.norm is not None:
                raise UnsupportedForFusion("gen MLP with a norm is not supported by the stacked networks")

    def training_parameters(self) -> list[nn.Parameter]:
        """Parameters that receive gradients in training (all but the unused style encoder)."""
        return [self.stacked(k) for k in self.parameter_keys if not k.startswith("enc_style.")]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Content codes of every member, grouped layout."""
        x, shared = self._run(self.template.enc_content.model, "enc_content.model", images, True)
        return x.repeat(1, self.n, 1, 1) if shared else x

    def style_mlp(self, z: torch.Tensor) -> torch.Tensor:
        """(B, style_dim, 1, 1) shared style -> (N, B, P) AdaIN parameters of every member."""
        h = z.reshape(z.shape[0], -1)
        for idx, block in enumerate(self.template.mlp.model):
            weight = self.stacked(f"mlp.model.{idx}.fc.weight")
            bias = self.stacked(f"mlp.model.{idx}.fc.bias")
            if idx == 0:  # shared input: one linear layer with every member's outputs side by side
                h = F.linear(h, weight.reshape(-1, weight.shape[-1]), bias.reshape(-1))
                h = h.view(h.shape[0], self.n, -1).transpose(0, 1)
            else:
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            h = _activation(block.activation, h)
        return h

    def adain_parameters(self, mlp_out: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Slice (N, B, P) like the reference: per layer C biases then C weights -> (B, N*C) each."""
        params, start = {}, 0
        batch = mlp_out.shape[1]
        for key, c in self.adain_layers:
            bias = mlp_out[:, :, start:start + c].transpose(0, 1).reshape(batch, self.n * c)
            weight = mlp_out[:, :, start + c:start + 2 * c].transpose(0, 1).reshape(batch, self.n * c)
            params[key] = (weight, bias)
            start += 2 * c
        return params

    def decode(self, content: torch.Tensor, z: torch.Tensor, images: torch.Tensor,
               return_mask: bool = False):
        adain = self.adain_parameters(self.style_mlp(z))
        layers = list(self.template.dec.model.named_children())
        backend = self._backend(content)
        if not self._tail_fusable(layers) or backend == "reference":
            raw, _ = self._run(self.template.dec.model, "dec.model", content, False, adain)
            return self.blend(raw, images, return_mask)
        x, shared = content, False
        for name, child in layers[:-3]:
            x, shared = self._run(child, f"dec.model.{name}", x, shared, adain)
        return self._fused_tail([name for name, _ in layers[-3:]], x, images, return_mask, backend)

    @staticmethod
    def _tail_fusable(layers) -> bool:
        """The published tail: 1x1 conv + ReLU, 1x1 conv + ReLU, 1x1 conv + tanh, then the mask blend."""
        tail = [m for _, m in layers[-3:]]
        acts = (nn.ReLU, nn.ReLU, nn.Tanh)
        return len(tail) == 3 and all(
            isinstance(m, Conv2dBlock) and m.norm is None and isinstance(m.activation, a)
            and m.conv.kernel_size == (1, 1) and m.conv.stride == (1, 1) and m.conv.bias is not None
            and (m.pad is None or sum(getattr(m.pad, "padding", (0,))) == 0)
            for m, a in zip(tail, acts))

    def _fused_tail(self, names: list[str], x: torch.Tensor, images: torch.Tensor, return_mask: bool,
                    backend: str):
        """Each member's tail as one fused op (:mod:`council_fast.ops.decoder_tail`) on its channel block."""
        dim = x.shape[1] // self.n
        images_x = images.to(x.dtype)  # bf16 under autocast, like the convs
        outs, masks = [], []
        for i in range(self.n):
            params = []
            for name in names:
                weight = self.stacked(f"dec.model.{name}.conv.weight")[i]
                bias = self.stacked(f"dec.model.{name}.conv.bias")[i]
                params += [weight.to(x.dtype), bias.to(x.dtype)]
            out, mask = decoder_tail(x[:, i * dim:(i + 1) * dim], *params, images_x, self.num_masks, backend=backend)
            outs.append(out)
            masks.append(mask)
        # The reference blends in the images' dtype (fp32 under autocast): hand on that dtype too.
        out = torch.cat(outs, 1).to(images.dtype)
        return (out, torch.stack(masks, 1).to(images.dtype)) if return_mask else out

    def blend(self, raw: torch.Tensor, images: torch.Tensor, return_mask: bool = False):
        b, _, h, w = raw.shape
        per_member = raw.reshape(b * self.n, -1, h, w)
        expanded = images.unsqueeze(1).expand(b, self.n, *images.shape[1:]).reshape(b * self.n, *images.shape[1:])
        out, masks = blend_with_masks(per_member, expanded, self.num_masks)
        out = out.reshape(b, -1, h, w)
        if not return_mask:
            return out
        return out, masks.reshape(b, self.n, self.num_masks, h, w)

    def translate(self, images: torch.Tensor, z: torch.Tensor, return_mask: bool = False):
        return self.decode(self.encode(images), z, images, return_mask)

    forward = translate


class StackedMsImageDis(StackedNetwork):
    """N multi-scale discriminators. ``forward(x)``: x grouped (B, N*C, H, W) -> per scale (B, N, h, w)."""

    def __init__(self, input_dim: int, dis_params: Mapping, n: int):
        super().__init__(_meta_template(lambda: MsImageDis(input_dim, dict(dis_params))), n)
        self._check_supported()

    def _check_supported(self):
        if self.template.norm != "none":
            raise UnsupportedForFusion(f"dis.norm {self.template.norm!r} is not stacked (only 'none')")
        if self.template.gan_type != "lsgan":
            raise UnsupportedForFusion(f"dis.gan_type {self.template.gan_type!r} is not stacked (only 'lsgan')")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for s, cnn in enumerate(self.template.cnns):
            out, _ = self._run(cnn, f"cnns.{s}", x, False)
            outputs.append(out)
            if s + 1 < len(self.template.cnns):
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
        return outputs


class StackedMsImageDisCouncil(StackedMsImageDis):
    """N council discriminators on (image, source) pairs; ``forward(images, sources)`` -> per scale (B, N, h, w).

    images: grouped (B, N*C, H, W); sources: (B, C, H, W) shared or grouped (B, N*C, H, W).
    """

    def __init__(self, input_dim: int, dis_params: Mapping, n: int):
        StackedNetwork.__init__(self, _meta_template(lambda: MsImageDisCouncil(input_dim, dict(dis_params))), n)
        self._check_supported()

    def forward(self, images: torch.Tensor, sources: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = images.shape
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
