"""The FID Inception-v3 network (the TF "2015-12-05" Inception used by FID), implemented here.

Architecture and state-dict key names follow the weights file the common FID tools use,
``pt_inception-2015-12-05-6726825d.pth`` from pytorch-fid's releases
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth):
Inception-v3 with 1008 classes and no auxiliary classifier, whose "Mixed" blocks differ from the
usual ones the way the TF graph does: the average-pool branches of Mixed_5b-5d, 6b-6e and 7b leave
the zero padding out of the average (``count_include_pad=False``), and Mixed_7c pools with a max, not
an average. Every conv is conv (no bias) + batch norm (eps 1e-3) + ReLU, evaluated with running stats.

Features are the 2048-d pool3 output (global average pool after Mixed_7c). Input handling is
pytorch-fid's: images in [0, 1] are resized to 299x299 bilinearly (``align_corners=False``, no
antialiasing) and then mapped to [-1, 1]. :meth:`FIDInceptionV3.features` takes the project's [-1, 1]
images and maps them to [0, 1] first, so the same order of operations applies.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FIDInceptionV3", "InceptionWeightsError", "load_inception", "FID_WEIGHTS_URL", "FID_WEIGHTS_NAME",
           "FEATURE_DIM"]

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
FEATURE_DIM = 2048
INPUT_SIZE = 299


class InceptionWeightsError(ValueError):
    """The Inception weights file is missing, unreadable or does not fit the network."""


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_no_pad(x):
    """TF's 3x3 average pool, stride 1, SAME padding: the padding is not counted."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_no_pad(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_no_pad(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (average pool without padding) and Mixed_7c (``max_pool=True``: the FID graph's max pool)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_no_pad(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3; ``features(images)`` gives the (N, 2048) pool3 features.

    ``fc`` (2048 -> 1008 logits) is kept so the state dict matches the weights file; features do not use it.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, c7=128)
        self.Mixed_6c = FIDInceptionC(768, c7=160)
        self.Mixed_6d = FIDInceptionC(768, c7=160)
        self.Mixed_6e = FIDInceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, 1008)
        self.eval()
        self.requires_grad_(False)

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 299, 299) input already in the network's [-1, 1] range -> (N, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pool3 features of (N, 3, H, W) images in [-1, 1] (the project's range), as pytorch-fid computes
        them from [0, 1] images: bilinear resize to 299x299 (align_corners=False), then 2x - 1."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (N, 3, H, W) images, got shape {tuple(images.shape)}")
        x = (images.to(self.fc.weight.dtype) + 1) / 2
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return self.pool3((2 * x - 1).contiguous(memory_format=torch.channels_last))


def _is_optional(key: str) -> bool:
    """BatchNorm's num_batches_tracked: absent from state dicts older than torch 0.4.1, unused in eval."""
    return key.endswith(".num_batches_tracked")


def _check_keys(model: nn.Module, state: dict, source: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not _is_optional(k)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing key(s) {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")] if missing
                 else []) + ([f"unexpected key(s) {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5
                                                                                  else "")] if unexpected else [])
        raise InceptionWeightsError(f"{source}: not the FID Inception weights ({FID_WEIGHTS_NAME}): "
                                    + "; ".join(parts))
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise InceptionWeightsError(f"{source}: key {key!r} holds a {type(value).__name__}, not a tensor")
        if value.shape != expected[key].shape:
            raise InceptionWeightsError(f"{source}: key {key!r} has shape {tuple(value.shape)}, the network "
                                        f"needs {tuple(expected[key].shape)}")


def _read_state(path: str) -> dict:
    if not os.path.isfile(path):
        raise InceptionWeightsError(f"{path}: no such file (download {FID_WEIGHTS_URL})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors all mean "unreadable"
        raise InceptionWeightsError(f"{path}: cannot be read as a PyTorch state dict: {e}") from None
    if not isinstance(state, dict):
        raise InceptionWeightsError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def load_inception(path: str | os.PathLike | None, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, option: str = "--inception-weights") -> FIDInceptionV3:
    """The FID Inception-v3 with the weights of ``path`` (loaded with weights_only=True, every key and
    shape checked), in eval mode on ``device``. ``option`` names the command-line option in the error
    raised when no path is given."""
    if path is None:
        raise InceptionWeightsError(f"FID/KID need the FID Inception weights: pass {option} FILE "
                                    f"(the file {FID_WEIGHTS_NAME}, from {FID_WEIGHTS_URL})")
    path = os.fspath(path)
    state = _read_state(path)
    model = FIDInceptionV3()
    _check_keys(model, state, path)
    model.load_state_dict(state, strict=False)  # the keys were checked above; num_batches_tracked may be absent
    # channels_last: ~1.6x faster convolutions on the CPU (same results to rounding)
    return model.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
