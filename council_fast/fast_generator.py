"""The Council-GAN generator built from fused kernels.

``FastGenerator`` has exactly the module tree (so the state-dict keys and shapes) of
:class:`council_fast.reference.AdaINGen`, so official checkpoints load with ``strict=True``,
and computes the same function with fewer memory passes:

* every "zero pad + conv" is one convolution with built-in padding;
* instance norm (+ ReLU) and AdaIN (+ ReLU, + the residual add of a residual block) are one fused
  kernel each (:mod:`council_fast.ops.adain`);
* each nearest-upsample + 3x3 conv runs as four 2x2 convs on the small image
  (:mod:`council_fast.ops.upsample_conv`, 2.25x fewer FLOPs, equal to fp32 rounding);
* on the cpu back-end in fp32, the wide 3x3 convs (the residual blocks') run as Winograd F(4x4, 3x3)
  (:mod:`council_fast.ops.winograd`, 4x fewer multiply-adds; ~2e-6 relative error per layer, ~9x
  a direct convolution's rounding; ``winograd=False`` turns it off);
* the decoder's 1x1 convs, tanh and mask blending are one per-pixel pass
  (:mod:`council_fast.ops.decoder_tail`);
* ``translate`` skips the style encoder, whose output a translation never uses.

Other convolutions and the style MLP stay torch ops (cuDNN / oneDNN). It runs in the dtype of its
parameters (fp32, bf16 or fp16; the kernels keep statistics in fp32). The kernel back-end
(``reference`` | ``cpu`` | ``triton`` | ``cuda`` | ``auto``) is resolved per device at call time.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .ops import registry
from .ops.adain import adain, instance_norm
from .ops.decoder_tail import decoder_tail
from .ops.upsample_conv import upsample2x_conv3x3
from .ops.winograd import conv3x3 as winograd_conv3x3
from .ops.winograd import winograd_applies
from .reference.networks import AdaINGen, AdaptiveInstanceNorm2d, Conv2dBlock, ResBlock, blend_with_masks

__all__ = ["FastGenerator"]


class FastGenerator(nn.Module):
    """AdaINGen's function and parameters, computed with fused kernels."""

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
        self.winograd = winograd  # None or True: Winograd 3x3 convs where they pay (cpu back-end, fp32)

    # ----------------------------------------------------------------------------------------
    # Construction helpers

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

    # ----------------------------------------------------------------------------------------
    # The AdaINGen interface

    def forward(self, images, style, return_mask=False):
        content, _ = self.encode(images)
        return self.decode(content, style, images, return_mask=return_mask)

    def encode(self, images):
        """(content code, style code), as AdaINGen.encode (the style encoder runs in torch)."""
        return self.encode_content(images), self.enc_style(self._cast(images))

    def encode_content(self, images):
        images = self._cast(images)
        backend = self._backend_for(images)
        layers = list(self.enc_content.model)
        x = images.contiguous(memory_format=torch.channels_last) if self._use_channels_last() else images
        for block in layers[:-1]:
            x = self._conv_block(block, x, backend)
        for res in layers[-1].model:
            x = self._encoder_res_block(res, x, backend)
        return x

    def decode(self, content, style, images, return_mask=False):
        content, images = self._cast(content), self._cast(images)
        backend = self._backend_for(content)
        adain_params = self.mlp(self._cast(style))
        params = iter(self._split_adain_params(adain_params))
        layers = list(self.dec.model)
        x = content
        if self._use_channels_last():
            x = content.contiguous(memory_format=torch.channels_last)
        for res in layers[0].model:
            x = self._decoder_res_block(res, x, params, backend)
        tail = layers[-3:]
        i = 1
        while i < len(layers) - 3:
            layer = layers[i]
            if isinstance(layer, nn.Upsample) and self._upsample_conv_applies(layers[i + 1]):
                block = layers[i + 1]
                y = upsample2x_conv3x3(x, block.conv.weight, block.conv.bias)
                weight, bias = next(params)
                x = self._finish_activation(block, self._norm(y, weight, bias, self._fused_relu(block), None, backend))
                i += 2
                continue
            if isinstance(layer, nn.Upsample):
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            else:
                x = self._adain_conv_block(layer, x, next(params), backend)
            i += 1
        out, masks = self._tail(tail, x, images, backend)
        self.dec.mask_s = masks  # where the official trainer reads the masks for its focus losses
        if not return_mask:
            return out
        if masks.shape[1] != 3:
            masks = masks.mean(1, keepdim=True).repeat(1, 3, 1, 1)
        return out, masks

    def translate(self, images, style, return_mask=False):
        """decode(encode_content(images), style, images): the style encoder is skipped."""
        return self.decode(self.encode_content(images), style, images, return_mask=return_mask)

    @staticmethod
    def assign_adain_params(adain_params, model):
        AdaINGen.assign_adain_params(adain_params, model)

    @staticmethod
    def get_num_adain_params(model):
        return AdaINGen.get_num_adain_params(model)

    # ----------------------------------------------------------------------------------------
    # Pieces

    def _backend_for(self, t):
        requested = self.backend if self.backend is not None else os.environ.get("COUNCIL_FAST_BACKEND")
        return registry.resolve(requested, t.device, self.strict)

    def _cast(self, t):
        dtype = self.mlp.model[0].fc.weight.dtype
        return t if t.dtype == dtype else t.to(dtype)

    def _split_adain_params(self, adain_params):
        """Per AdaIN layer in module order: (weight (B, C), bias (B, C)); C biases come first."""
        out, start = [], 0
        for m in self.dec.modules():
            if isinstance(m, AdaptiveInstanceNorm2d):
                n = m.num_features
                out.append((adain_params[:, start + n:start + 2 * n], adain_params[:, start:start + n]))
                start += 2 * n
        return out

    def _conv(self, block: Conv2dBlock, x, backend):
        pad = block.pad.padding
        conv = block.conv
        if isinstance(block.pad, nn.ZeroPad2d) and len(set(pad)) == 1:
            if self._winograd_applies(block, x, backend):
                return winograd_conv3x3(x, conv.weight, conv.bias)
            return F.conv2d(x, conv.weight, conv.bias, conv.stride, pad[0])
        return conv(block.pad(x))

    def _winograd_applies(self, block: Conv2dBlock, x, backend) -> bool:
        """Zero-padded 3x3 stride-1 convs on the cpu back-end in fp32 run as Winograd F(4x4, 3x3)."""
        return (backend == "cpu" and self.winograd is not False and _is_plain_padded_3x3(block)
                and not self._use_channels_last() and winograd_applies(x, block.conv.weight))

    def _fused_relu(self, block: Conv2dBlock) -> bool:
        return isinstance(block.activation, nn.ReLU)

    def _finish_activation(self, block: Conv2dBlock, y):
        if block.activation is None or self._fused_relu(block):
            return y
        return block.activation(y)

    def _upsample_conv_applies(self, block) -> bool:
        """Upsample + zero-padded 3x3 conv runs as four 2x2 convs on the small image (2.25x fewer FLOPs)."""
        return self.upsample_conv and _is_plain_padded_3x3(block)

    def _use_channels_last(self) -> bool:
        """NHWC activations (opt-in, CPU or GPU). Convolutions run natively in NHWC (oneDNN 10-60% faster;
        cuDNN's bf16 tensor-core kernels are NHWC), but the fused norm kernels are NCHW-only, so in this
        mode the norms run as a few ATen kernels on NHWC (:func:`_channels_last_norm`). On the 2-core test
        machine the net gain was within noise, so the default (None) is NCHW; on a GPU it is unmeasured
        (``bench convert --device cuda`` has a ``+channels_last`` row to decide it)."""
        return bool(self.channels_last)

    def _norm(self, y, weight, bias, relu, residual, backend):
        """Instance norm (weight None) or AdaIN ((B, C) weight / bias), then ReLU, then + residual."""
        if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
            return _channels_last_norm(y, weight, bias, relu, residual)
        if weight is None:
            return instance_norm(y, relu=relu, residual=residual, backend=backend)
        return adain(y, weight, bias, residual=residual, relu=relu, backend=backend)

    def _conv_block(self, block: Conv2dBlock, x, backend):
        """conv + instance norm + activation (the content encoder's down-sampling blocks)."""
        y = self._norm(self._conv(block, x, backend), None, None, self._fused_relu(block), None, backend)
        return self._finish_activation(block, y)

    def _encoder_res_block(self, res: ResBlock, x, backend):
        first, second = res.model
        y = self._conv_block(first, x, backend)
        return self._norm(self._conv(second, y, backend), None, None, False, x, backend)

    def _adain_conv_block(self, block: Conv2dBlock, x, weight_bias, backend):
        weight, bias = weight_bias
        y = self._norm(self._conv(block, x, backend), weight, bias, self._fused_relu(block), None, backend)
        return self._finish_activation(block, y)

    def _decoder_res_block(self, res: ResBlock, x, params, backend):
        first, second = res.model
        y = self._adain_conv_block(first, x, next(params), backend)
        weight, bias = next(params)
        return self._norm(self._conv(second, y, backend), weight, bias, False, x, backend)

    def _tail(self, tail, x, images, backend):
        fusable = (all(isinstance(b.activation, nn.ReLU) for b in tail[:2]) and isinstance(tail[2].activation, nn.Tanh)
                   and x.shape[2:] == images.shape[2:])
        if not fusable:  # another activation than the published ReLU: the module path
            raw = x
            for block in tail:
                raw = block(raw)
            return blend_with_masks(raw, images, self.num_masks)
        convs = [b.conv for b in tail]
        return decoder_tail(x, convs[0].weight, convs[0].bias, convs[1].weight, convs[1].bias, convs[2].weight,
                            convs[2].bias, images, self.num_masks, backend=backend)


def _channels_last_norm(y, weight, bias, relu, residual, eps=1e-5):
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


def _is_plain_padded_3x3(block: Conv2dBlock) -> bool:
    """A zero pad of 1 then a 3x3 stride-1 convolution without dilation or groups."""
    conv = block.conv
    return (isinstance(block.pad, nn.ZeroPad2d) and set(block.pad.padding) == {1} and conv.kernel_size == (3, 3)
            and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1)


def _pad_type_of(gen: AdaINGen) -> str:
    pad = gen.enc_content.model[0].pad
    return {nn.ZeroPad2d: "zero", nn.ReflectionPad2d: "reflect", nn.ReplicationPad2d: "replicate"}[type(pad)]
