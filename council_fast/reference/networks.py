"""Reference Council-GAN networks: the published model, computed the published way.

Class names, constructor signatures, module trees (and so state-dict keys) follow the
official Council-GAN / MUNIT code, so official checkpoints load with ``strict=True``.
Unlike the official code nothing is pinned to CUDA: tensors stay on the module's device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AdaINGen", "MsImageDis", "MsImageDisCouncil", "StyleEncoder", "ContentEncoder",
    "Decoder_V2_atten", "ResBlocks", "ResBlock", "MLP", "Conv2dBlock", "LinearBlock",
    "AdaptiveInstanceNorm2d", "LayerNorm", "blend_with_masks", "lsgan_dis_loss", "lsgan_gen_loss",
]


def _unsupported(what: str, value, choices) -> ValueError:
    return ValueError(f"unsupported {what} {value!r}; choose one of {', '.join(map(repr, choices))}")


def make_activation(name: str) -> nn.Module | None:
    factories = {
        "relu": lambda: nn.ReLU(),
        "lrelu": lambda: nn.LeakyReLU(0.2),
        "prelu": lambda: nn.PReLU(),
        "selu": lambda: nn.SELU(),
        "tanh": lambda: nn.Tanh(),
        "none": lambda: None,
    }
    if name not in factories:
        raise _unsupported("activation", name, factories)
    return factories[name]()


def make_pad(pad_type: str, padding: int) -> nn.Module:
    factories = {"zero": nn.ZeroPad2d, "reflect": nn.ReflectionPad2d, "replicate": nn.ReplicationPad2d}
    if pad_type not in factories:
        raise _unsupported("pad_type", pad_type, factories)
    return factories[pad_type](padding)


def make_norm2d(norm: str, dim: int) -> nn.Module | None:
    factories = {
        "bn": lambda: nn.BatchNorm2d(dim),
        "in": lambda: nn.InstanceNorm2d(dim),
        "ln": lambda: LayerNorm(dim),
        "adain": lambda: AdaptiveInstanceNorm2d(dim),
        "none": lambda: None,
    }
    if norm == "sn":
        raise ValueError("norm 'sn' (spectral norm) is not supported by council-fast; use 'none'")
    if norm not in factories:
        raise _unsupported("norm", norm, factories)
    return factories[norm]()


class AdaptiveInstanceNorm2d(nn.Module):
    """Instance norm whose per-(sample, channel) affine is assigned from the style MLP."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight: torch.Tensor | None = None  # (B * C,), assigned by AdaINGen.assign_adain_params
        self.bias: torch.Tensor | None = None
        # Unused, kept so official state dicts load unchanged.
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.bias is None:
            raise RuntimeError("AdaIN weight and bias must be assigned (AdaINGen.decode does it) before use")
        b, c = x.shape[:2]
        # Batch norm over a (1, B*C, H, W) view is instance norm with biased variance.
        out = F.batch_norm(x.contiguous().view(1, b * c, *x.shape[2:]), None, None,
                           self.weight, self.bias, True, self.momentum, self.eps)
        return out.view_as(x)

    def extra_repr(self) -> str:
        return str(self.num_features)


class LayerNorm(nn.Module):
    """MUNIT's layer norm: per-sample mean and unbiased std over (C, H, W), then a channel affine."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.num_features = num_features
        self.affine = affine
        self.eps = eps
        if affine:
            self.gamma = nn.Parameter(torch.empty(num_features).uniform_())
            self.beta = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [-1] + [1] * (x.dim() - 1)
        if x.size(0) == 1:
            mean, std = x.reshape(-1).mean().view(*shape), x.reshape(-1).std().view(*shape)
        else:
            flat = x.reshape(x.size(0), -1)
            mean, std = flat.mean(1).view(*shape), flat.std(1).view(*shape)
        x = (x - mean) / (std + self.eps)
        if self.affine:
            shape = [1, -1] + [1] * (x.dim() - 2)
            x = x * self.gamma.view(*shape) + self.beta.view(*shape)
        return x


class Conv2dBlock(nn.Module):
    """pad -> conv (bias) -> norm -> activation."""

    def __init__(self, input_dim, output_dim, kernel_size, stride, padding=0,
                 norm="none", activation="relu", pad_type="zero"):
        super().__init__()
        self.use_bias = True
        self.pad = make_pad(pad_type, padding)
        self.norm = make_norm2d(norm, output_dim)
        self.activation = make_activation(activation)
        self.conv = nn.Conv2d(input_dim, output_dim, kernel_size, stride, bias=self.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.pad(x))
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class LinearBlock(nn.Module):
    def __init__(self, input_dim, output_dim, norm="none", activation="relu"):
        super().__init__()
        self.fc = nn.Linear(input_dim, output_dim, bias=True)
        norms = {"bn": lambda: nn.BatchNorm1d(output_dim), "in": lambda: nn.InstanceNorm1d(output_dim),
                 "ln": lambda: LayerNorm(output_dim), "none": lambda: None}
        if norm not in norms:
            raise _unsupported("norm", norm, norms)
        self.norm = norms[norm]()
        self.activation = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x)
        if self.norm is not None:
            out = self.norm(out)
        if self.activation is not None:
            out = self.activation(out)
        return out


class ResBlock(nn.Module):
    def __init__(self, dim, norm="in", activation="relu", pad_type="zero"):
        super().__init__()
        self.model = nn.Sequential(
            Conv2dBlock(dim, dim, 3, 1, 1, norm=norm, activation=activation, pad_type=pad_type),
            Conv2dBlock(dim, dim, 3, 1, 1, norm=norm, activation="none", pad_type=pad_type),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + x


class ResBlocks(nn.Module):
    def __init__(self, num_blocks, dim, norm="in", activation="relu", pad_type="zero"):
        super().__init__()
        self.model = nn.Sequential(*[ResBlock(dim, norm=norm, activation=activation, pad_type=pad_type)
                                     for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MLP(nn.Module):
    def __init__(self, input_dim, output_dim, dim, n_blk, norm="none", activ="relu"):
        super().__init__()
        blocks = [LinearBlock(input_dim, dim, norm=norm, activation=activ)]
        blocks += [LinearBlock(dim, dim, norm=norm, activation=activ) for _ in range(n_blk - 2)]
        blocks += [LinearBlock(dim, output_dim, norm="none", activation="none")]
        self.model = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.view(x.size(0), -1))


class StyleEncoder(nn.Module):
    def __init__(self, n_downsample, input_dim, dim, style_dim, norm, activ, pad_type):
        super().__init__()
        layers = [Conv2dBlock(input_dim, dim, 7, 1, 3, norm=norm, activation=activ, pad_type=pad_type)]
        for _ in range(2):
            layers += [Conv2dBlock(dim, 2 * dim, 4, 2, 1, norm=norm, activation=activ, pad_type=pad_type)]
            dim *= 2
        for _ in range(n_downsample - 2):
            layers += [Conv2dBlock(dim, dim, 4, 2, 1, norm=norm, activation=activ, pad_type=pad_type)]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, style_dim, 1, 1, 0)]
        self.model = nn.Sequential(*layers)
        self.output_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class ContentEncoder(nn.Module):
    def __init__(self, n_downsample, n_res, input_dim, dim, norm, activ, pad_type):
        super().__init__()
        layers = [Conv2dBlock(input_dim, dim, 7, 1, 3, norm=norm, activation=activ, pad_type=pad_type)]
        for _ in range(n_downsample):
            layers += [Conv2dBlock(dim, 2 * dim, 4, 2, 1, norm=norm, activation=activ, pad_type=pad_type)]
            dim *= 2
        layers += [ResBlocks(n_res, dim, norm=norm, activation=activ, pad_type=pad_type)]
        self.model = nn.Sequential(*layers)
        self.output_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def blend_with_masks(raw: torch.Tensor, images: torch.Tensor, num_masks: int):
    """Council-GAN's attention blend of the decoder's tanh output with the input image.

    raw has ``output_dim * num_masks + num_masks`` channels: ``num_masks`` candidate images, then
    ``num_masks`` mask logits. Returns (blended image, masks in [0, 1]).
    """
    out_dim = (raw.shape[1] - num_masks) // num_masks
    masks = (torch.tanh(10 * raw[:, raw.shape[1] - num_masks:]) + 1) / 2
    out = images
    for k in range(num_masks):
        mask = masks[:, k:k + 1]
        out = (1 - mask) * out + mask * raw[:, out_dim * k:out_dim * (k + 1)]
    return out, masks


class Decoder_V2_atten(nn.Module):
    def __init__(self, n_upsample, n_res, dim, output_dim, res_norm="adain", activ="relu",
                 pad_type="zero", num_of_mask_dim_to_add=1):
        super().__init__()
        self.num_of_mask_dim_to_add = num_of_mask_dim_to_add
        self.output_dim = output_dim
        self.mask_s = None
        layers = [ResBlocks(n_res, dim, res_norm, activ, pad_type=pad_type)]
        for _ in range(n_upsample):
            layers += [nn.Upsample(scale_factor=2),
                       Conv2dBlock(dim, dim // 2, 3, 1, 1, norm="adain", activation=activ, pad_type=pad_type)]
            dim //= 2
            layers += [Conv2dBlock(dim, dim, 3, 1, 1, norm="adain", activation=activ, pad_type=pad_type)]
        n_out = output_dim * num_of_mask_dim_to_add + num_of_mask_dim_to_add
        layers += [Conv2dBlock(dim, dim, 1, 1, 0, norm="none", activation=activ, pad_type=pad_type),
                   Conv2dBlock(dim, dim, 1, 1, 0, norm="none", activation=activ, pad_type=pad_type),
                   Conv2dBlock(dim, n_out, 1, 1, 0, norm="none", activation="tanh", pad_type=pad_type)]
        self.model = nn.Sequential(*layers)

    def forward(self, x, im_in, return_mask=False):
        out, masks = blend_with_masks(self.model(x), im_in, self.num_of_mask_dim_to_add)
        self.mask_s = masks  # the official trainer reads the masks from here for its focus losses
        if not return_mask:
            return out
        if masks.shape[1] != 3:  # official display convention: grey mask = mean over the masks
            masks = masks.mean(1, keepdim=True).repeat(1, 3, 1, 1)
        return out, masks


class AdaINGen(nn.Module):
    """Council-GAN generator: content encoder, style MLP, AdaIN decoder with mask blending."""

    def __init__(self, input_dim, params, cuda_device=None):
        super().__init__()
        if params.get("do_my_style", False):
            raise ValueError("gen.do_my_style: true is not supported (the official decoder's upsampling "
                             "AdaIN layers never receive parameters in that mode)")
        dim, style_dim = params["dim"], params["style_dim"]
        self.n_downsample = params["n_downsample"]
        self.activ = params["activ"]
        self.do_my_style = False
        self.style_dim = style_dim
        pad_type = params["pad_type"]
        self.enc_style = StyleEncoder(4, input_dim, dim, style_dim, norm="none", activ=self.activ,
                                      pad_type=pad_type)
        self.enc_content = ContentEncoder(self.n_downsample, params["n_res"], input_dim, dim, "in",
                                          self.activ, pad_type=pad_type)
        self.dec = Decoder_V2_atten(self.n_downsample, params["n_res"], self.enc_content.output_dim,
                                    input_dim, res_norm="adain", activ=self.activ, pad_type=pad_type,
                                    num_of_mask_dim_to_add=params["num_of_mask_dim_to_add"])
        self.mlp = MLP(style_dim, self.get_num_adain_params(self.dec), params["mlp_dim"], n_blk=3,
                       norm="none", activ=self.activ)

    def forward(self, images, style, return_mask=False):
        content, _ = self.encode(images)
        return self.decode(content, style, images, return_mask=return_mask)

    def encode(self, images):
        return self.enc_content(images), self.enc_style(images)

    def encode_content(self, images):
        """The content code alone: translation never uses the style encoder's output."""
        return self.enc_content(images)

    def decode(self, content, style, images, return_mask=False):
        self.assign_adain_params(self.mlp(style), self.dec)
        return self.dec(content, images, return_mask)

    def translate(self, images, style, return_mask=False):
        return self.decode(self.encode_content(images), style, images, return_mask=return_mask)

    @staticmethod
    def assign_adain_params(adain_params, model):
        """Slice the MLP output layer by layer in module order: C biases, then C weights."""
        start = 0
        for m in model.modules():
            if isinstance(m, AdaptiveInstanceNorm2d):
                n = m.num_features
                m.bias = adain_params[:, start:start + n].contiguous().view(-1)
                m.weight = adain_params[:, start + n:start + 2 * n].contiguous().view(-1)
                start += 2 * n

    @staticmethod
    def get_num_adain_params(model):
        return sum(2 * m.num_features for m in model.modules() if isinstance(m, AdaptiveInstanceNorm2d))


def lsgan_dis_loss(outs_fake, outs_real):
    return sum(torch.mean(f ** 2) + torch.mean((r - 1) ** 2) for f, r in zip(outs_fake, outs_real))


def lsgan_gen_loss(outs_fake):
    return sum(torch.mean((f - 1) ** 2) for f in outs_fake)


def _nsgan_dis_loss(outs_fake, outs_real):
    return sum(torch.mean(F.binary_cross_entropy(torch.sigmoid(f), torch.zeros_like(f))
                          + F.binary_cross_entropy(torch.sigmoid(r), torch.ones_like(r)))
               for f, r in zip(outs_fake, outs_real))


def _nsgan_gen_loss(outs_fake):
    return sum(torch.mean(F.binary_cross_entropy(torch.sigmoid(f), torch.ones_like(f))) for f in outs_fake)


_GAN_LOSSES = {"lsgan": (lsgan_dis_loss, lsgan_gen_loss), "nsgan": (_nsgan_dis_loss, _nsgan_gen_loss)}


class _MultiScaleDis(nn.Module):
    def __init__(self, input_dim, params):
        super().__init__()
        if params["gan_type"] not in _GAN_LOSSES:
            raise _unsupported("dis.gan_type", params["gan_type"], _GAN_LOSSES)
        self.n_layer = params["n_layer"]
        self.gan_type = params["gan_type"]
        self.dim = params["dim"]
        self.norm = params["norm"]
        self.activ = params["activ"]
        self.num_scales = params["num_scales"]
        self.pad_type = params["pad_type"]
        self.input_dim = input_dim
        self.downsample = nn.AvgPool2d(3, stride=2, padding=[1, 1], count_include_pad=False)
        self.cnns = nn.ModuleList([self._make_net() for _ in range(self.num_scales)])

    def _downsampling_blocks(self, dim):
        blocks = []
        for _ in range(self.n_layer - 1):
            blocks += [Conv2dBlock(dim, dim * 2, 4, 2, 1, norm=self.norm, activation=self.activ,
                                   pad_type=self.pad_type)]
            dim *= 2
        return blocks, dim

    def _dis_loss(self, outs_fake, outs_real):
        return _GAN_LOSSES[self.gan_type][0](outs_fake, outs_real)

    def _gen_loss(self, outs_fake):
        return _GAN_LOSSES[self.gan_type][1](outs_fake)


class MsImageDis(_MultiScaleDis):
    """Multi-scale real/fake discriminator D_i."""

    def __init__(self, input_dim, params, cuda_device=None):
        super().__init__(input_dim, params)

    def _make_net(self):
        first = Conv2dBlock(self.input_dim, self.dim, 4, 2, 1, norm="none", activation=self.activ,
                            pad_type=self.pad_type)
        blocks, dim = self._downsampling_blocks(self.dim)
        return nn.Sequential(first, *blocks, nn.Conv2d(dim, 1, 1, 1, 0))

    def forward(self, x):
        outputs = []
        for model in self.cnns:
            outputs.append(model(x))
            x = self.downsample(x)
        return outputs

    def calc_dis_loss(self, input_fake, input_real):
        return self._dis_loss(self.forward(input_fake), self.forward(input_real))

    def calc_gen_loss(self, input_fake, input_real=None):
        return self._gen_loss(self.forward(input_fake))


class MsImageDisCouncil(_MultiScaleDis):
    """Multi-scale council discriminator D^_i on (image, source image) pairs."""

    def __init__(self, input_dim, params, cuda_device=None):
        super().__init__(input_dim, params)

    def _make_net(self):
        first = Conv2dBlock(2 * self.input_dim, self.dim, 3, 1, 1, norm="none", activation=self.activ,
                            pad_type=self.pad_type)
        blocks, dim = self._downsampling_blocks(self.dim)
        return nn.Sequential(first, *blocks, nn.Conv2d(dim, dim, 1, 1, 0), nn.Conv2d(dim, 1, 1, 1, 0))

    def forward(self, x, x_input):
        outputs = []
        for model in self.cnns:
            outputs.append(model(torch.cat((x, x_input), 1)))
            x = self.downsample(x)
            x_input = self.downsample(x_input)
        return outputs

    def calc_dis_loss(self, input_fake, input_real, input):
        return self._dis_loss(self.forward(input_fake, input), self.forward(input_real, input))

    def calc_gen_loss(self, input_fake, input, input_real=None):
        return self._gen_loss(self.forward(input_fake, input))
