"""3x3 convolutions (stride 1, zero padding 1) by Winograd F(4x4, 3x3) on the CPU.

Each 4x4 output tile of a 3x3 convolution needs 6x6 input pixels. Winograd's algorithm computes it
as ``A^T [(G w G^T) . (B^T d B)] A``: the channel sums become 36 independent GEMMs of
(C_out x C_in) by (C_in x tiles), 4x fewer multiply-adds than the direct convolution. That is where
the fp32 CPU engine gains most: the twenty 256-channel 3x3 convolutions at 64x64 are ~2/3 of a
256x256 translation, and the direct ones already run at the core's peak.

Interpolation points 0, -1, 1, 1/2, -2 (and infinity): with these the error is ~2e-6 relative
per 256-channel layer, ~9x a direct convolution's rounding (the common 0, +-1, +-2 give ~8e-6),
well inside the fp32 tolerance; B^T and A^T hold exact binary fractions, G is
applied in float64 once per weight.

The transformed weights are cached per weight tensor, views included (see ``clear_cache``).

Back-ends: ``cpu`` (csrc/winograd_cpu.cpp: the transforms and a register-tiled GEMM kernel, ~20%
faster than MKL's sgemm on the AMD test machine) and the
reference twin :func:`conv3x3_reference` (``F.conv2d``). Gradients are those of the exact
convolution (ATen's ``convolution_backward``), which Winograd equals up to rounding.
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from . import extension
from .registry import FusedOp

__all__ = ["conv3x3", "conv3x3_reference", "clear_cache", "winograd_applies", "transform_weight", "WINOGRAD_MIN_CHANNELS",
           "MAX_TILES_PER_CHUNK"]

# Below this many input or output channels the GEMMs are too thin to beat oneDNN's direct convolution.
WINOGRAD_MIN_CHANNELS = 128
# Samples are transformed in chunks of at most this many tiles (whole samples: one larger sample is
# one chunk), bounding the per-thread scratch buffers to 36 x C x tiles floats each (a 64x64 plane is
# 256 tiles: 9.4 MB at 256 channels; 1024 tiles: 38 MB).
MAX_TILES_PER_CHUNK = 1024
# Register tile of the GEMM kernel (csrc/winograd_cpu.cpp): output channels x tiles.
GEMM_ROWS, GEMM_COLUMNS = 8, 32

_F = 1.0 / 3.0
# Rows of B^T / A^T / G for the points (0, -1, 1, 1/2, -2, infinity); tests check the identity in float64.
_BT = ((1, -1.5, -2, 1.5, 1, 0), (0, 1, -2.5, 0.5, 1, 0), (0, -1, 0.5, 2.5, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 0.5, -1, -0.5, 1, 0), (0, 1, -1.5, -2, 1.5, 1))
_AT = ((1, 1, 1, 1, 1, 0), (0, -1, 1, 0.5, -2, 0), (0, 1, 1, 0.25, 4, 0), (0, -1, 1, 0.125, -8, 1))
_G = ((1, 0, 0), (-_F, _F, -_F), (_F, _F, _F), (-16 / 15, -8 / 15, -4 / 15), (1 / 15, -2 / 15, 4 / 15), (0, 0, 1))


def matrices(dtype=torch.float64):
    """(B^T 6x6, A^T 4x6, G 6x3) of F(4x4, 3x3)."""
    return (torch.tensor(_BT, dtype=dtype), torch.tensor(_AT, dtype=dtype), torch.tensor(_G, dtype=dtype))


def conv3x3_reference(x, weight, bias=None):
    return F.conv2d(x, weight, bias, padding=1)


def winograd_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`conv3x3` takes the Winograd path for these operands (else it calls F.conv2d)."""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.dim() == 4 and weight.dim() == 4 and tuple(weight.shape[2:]) == (3, 3)
            and weight.shape[1] == x.shape[1] and min(weight.shape[0], weight.shape[1]) >= WINOGRAD_MIN_CHANNELS
            and x.shape[0] > 0 and x.shape[2] > 0 and x.shape[3] > 0)


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 weight; Winograd on fp32 CPU tensors with
    at least WINOGRAD_MIN_CHANNELS channels in and out, F.conv2d otherwise."""
    if not winograd_applies(x, weight) or (bias is not None and (bias.device.type != "cpu"
                                                                   or tuple(bias.shape) != (weight.shape[0],))):
        return conv3x3_reference(x, weight, bias)  # which also raises the errors of bad operands
    transformed = transform_weight(weight) if torch.compiler.is_compiling() else _cached_transform(weight)
    return CONV3X3_WINOGRAD.forward(x.contiguous(), weight, bias, transformed, "cpu")


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (36, C_out / 8, C_in, 8): G w G^T per filter, computed in float64 and rounded
    once, packed for the GEMM kernel: 8 output channels side by side per input channel, C_out padded
    with zero filters to a multiple of 8."""
    _, _, g = matrices()
    c_out, c_in = weight.shape[:2]
    u = torch.einsum("ji,ocil,kl->jkoc", g, weight.detach().to(torch.float64), g).reshape(36, c_out, c_in)
    rows = _round_up(c_out, GEMM_ROWS)
    u = F.pad(u, (0, 0, 0, rows - c_out))
    return u.view(36, rows // GEMM_ROWS, GEMM_ROWS, c_in).transpose(2, 3).to(torch.float32).contiguous()


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


# id(root tensor) -> (weakref to it, {view key: (stamp, transformed)})
_weight_cache: dict[int, tuple] = {}


def _cached_transform(weight: torch.Tensor) -> torch.Tensor:
    # Keyed by the tensor the weight views (its ``_base``; itself when it is no view), because
    # the lowered generators pass a fresh view of each parameter on every call, plus where in that
    # tensor the view sits. Checked against the version counter (shared by every view, it moves on
    # every in-place update: optimizer steps, load_state_dict) and the storage, dtype and device
    # (which change when .data is assigned). Writes through .data in place (w.data.mul_()) move
    # neither: call clear_cache() after those.
    if weight.is_inference():  # inference tensors have no version counter: no caching
        return transform_weight(weight)
    root = weight if weight._base is None else weight._base
    view = (weight.storage_offset(), tuple(weight.shape), tuple(weight.stride()))
    stamp = (weight._version, root.data_ptr(), weight.dtype, weight.device)
    entry = _weight_cache.get(id(root))
    if entry is None or entry[0]() is not root:
        entry = (weakref.ref(root), {})
        _weight_cache[id(root)] = entry
        weakref.finalize(root, _forget, id(root), entry[1])
    hit = entry[1].get(view)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    transformed = transform_weight(weight)
    entry[1][view] = (stamp, transformed)
    return transformed


def _forget(key: int, views: dict) -> None:
    if key in _weight_cache and _weight_cache[key][1] is views:
        del _weight_cache[key]


def clear_cache() -> None:
    """Forget every transformed weight (needed only after in-place writes through ``.data``)."""
    _weight_cache.clear()


# ----------------------------------------------------------------------------------------------
# The registered op (ops/registry.py): cpu back-end only; its backward is the exact convolution's


def _tiles(size: int) -> int:
    return (size + 3) // 4


def _outputs(alloc, x, weight, bias, transformed):
    return alloc.new((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]), x.dtype, x.device)


def _cpu_forward(x, weight, bias, transformed, y):
    kernels = extension.kernels("cpu")
    batch, _, height, width = x.shape
    bias32 = None if bias is None else bias.detach().to(torch.float32).contiguous()
    per_sample = _tiles(height) * _tiles(width)
    step = max(1, MAX_TILES_PER_CHUNK // per_sample)
    rows = transformed.shape[1] * GEMM_ROWS
    for start in range(0, batch, step):
        chunk = x[start:start + step]
        columns = _round_up(chunk.shape[0] * per_sample, GEMM_COLUMNS)  # the padding columns are never read
        v = _scratch("v", 36 * x.shape[1] * columns).view(36, x.shape[1], columns)
        m = _scratch("m", 36 * rows * columns).view(36, rows, columns)
        kernels.winograd_input_transform(chunk, v)
        kernels.winograd_gemm(transformed, v, m)
        kernels.winograd_output_transform(m, bias32, y[start:start + step])


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    dx, dw, db = torch.ops.aten.convolution_backward(
        grad_y.contiguous(), x, weight, [weight.shape[0]] if ctx.has_bias else None,
        [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)
    return dx, dw, db if ctx.has_bias else None, None, None


CONV3X3_WINOGRAD = FusedOp(
    "conv3x3_winograd", conv3x3_reference,
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor transformed) -> Tensor",
    outputs=_outputs)
CONV3X3_WINOGRAD.register("cpu", _cpu_forward)
CONV3X3_WINOGRAD.autograd(_backward, _setup_context)


_scratch_buffers = threading.local()


def _scratch(name: str, numel: int) -> torch.Tensor:
    """A per-thread buffer of at least ``numel`` floats, kept between calls: fresh multi-MB allocations
    cost page faults that would eat a third of the gain."""
    buffers = _scratch_buffers.__dict__
    buf = buffers.get(name)
    if buf is None or buf.numel() < numel:
        buf = torch.zeros(numel, dtype=torch.float32)  # zeros: padding columns hold finite values
        buffers[name] = buf
    return buf[:numel]
