"""Fused adaptive instance norm (AdaIN): normalise, per-(sample, channel) affine, ReLU, residual add.

``y = relu?((x - mean_bc) * rsqrt(var_bc + eps) * weight[b, c] + bias[b, c]) (+ residual)``, with the
biased variance of each (b, c) plane and statistics in fp32 whatever the input dtype.

Back-ends: ``reference`` (plain PyTorch, :func:`adain_reference`), ``cpu`` (csrc/adain_cpu.cpp),
``triton`` (kernels below) and ``cuda`` (csrc/adain_cuda.cu). The fused ones run behind the op
registry's ``council_fast::adain`` and ``council_fast::adain_backward`` (ops/registry.py: fake
implementations, autograd, poisoned outputs in tests), so ``torch.compile(fullgraph=True)`` traces
through. The forward saves the per-plane mean and rstd; the backward recomputes xhat (and the ReLU
mask) from them instead of keeping the output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import extension
from .registry import BackendUnavailable, FusedOp, triton_launch

__all__ = ["adain", "adain_reference", "instance_norm", "instance_norm_reference", "TritonTuning",
           "TRITON_TUNING", "BackendUnavailable"]


@dataclass
class TritonTuning:
    """Work split of the Triton kernels (tests shrink these to reach every path at tiny sizes)."""
    single_pass_max: int = 4096  # planes up to this many elements: one program does it all
    tile: int = 2048  # elements per loop step / per normalise program on the split path (power of 2)
    chunk: int = 8192  # elements reduced by one statistics program on the split path


TRITON_TUNING = TritonTuning()
# The CUDA kernels split a plane over several blocks above this many elements.
CUDA_SPLIT_THRESHOLD = 8192


# ----------------------------------------------------------------------------------------------
# Reference twin


def adain_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    residual: Optional[torch.Tensor] = None, relu: bool = False,
                    eps: float = 1e-5) -> torch.Tensor:
    """AdaIN exactly as the reference AdaptiveInstanceNorm2d computes it, then ReLU and residual."""
    b, c = _check_inputs(x, weight, bias, residual)
    planes = x.contiguous().view(1, b * c, *x.shape[2:])
    y = F.batch_norm(planes, None, None, weight.reshape(-1), bias.reshape(-1), True, 0.1, eps).view_as(x)
    if relu:
        y = F.relu(y)
    if residual is not None:
        y = y + residual
    return y


def instance_norm_reference(x: torch.Tensor, relu: bool = False, eps: float = 1e-5,
                            residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Instance norm without affine or running statistics (the content encoder's norm), then ReLU and residual."""
    _check_x(x)
    y = F.instance_norm(x, eps=eps)
    y = F.relu(y) if relu else y
    return y if residual is None else y + residual


# ----------------------------------------------------------------------------------------------
# Public entry points


def adain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
          residual: Optional[torch.Tensor] = None, relu: bool = False, eps: float = 1e-5,
          backend: Optional[str] = None) -> torch.Tensor:
    """Fused AdaIN. ``weight``/``bias`` hold B*C values ((B, C) or (B*C,)); output dtype = x dtype.

    ``backend``: None / "auto" (COUNCIL_FAST_BACKEND or the fastest available), "reference",
    "cpu", "triton" or "cuda". Inputs are used as NCHW-contiguous (channels_last is copied).
    """
    b, c = _check_inputs(x, weight, bias, residual)
    name = ADAIN.resolve(backend, x.device)
    if name == "reference":
        return adain_reference(x, weight, bias, residual, relu, eps)
    if residual is not None:
        residual = residual.to(x.dtype).contiguous()
    weight32 = weight.reshape(b, c).to(torch.float32).contiguous()
    bias32 = bias.reshape(b, c).to(torch.float32).contiguous()
    y, _, _ = ADAIN.forward(x.contiguous(), weight32, bias32, residual, bool(relu), float(eps), name)
    return y


def instance_norm(x: torch.Tensor, relu: bool = False, eps: float = 1e-5,
                  backend: Optional[str] = None, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Instance norm (no affine), optionally with ReLU and a residual add: adain with weight 1 and bias 0."""
    _check_x(x)
    name = ADAIN.resolve(backend, x.device)
    if name == "reference":
        return instance_norm_reference(x, relu, eps, residual)
    ones = torch.ones(x.shape[:2], device=x.device, dtype=torch.float32)
    return adain(x, ones, torch.zeros_like(ones), residual=residual, relu=relu, eps=eps, backend=name)


def _check_x(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"adain: x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"adain: x must be float32, bfloat16 or float16, not {x.dtype}")
    if x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"adain: empty planes in x of shape {tuple(x.shape)}")


def _check_inputs(x, weight, bias, residual) -> tuple[int, int]:
    _check_x(x)
    b, c = x.shape[:2]
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or t.numel() != b * c:
            raise ValueError(f"adain: {name} must hold B*C = {b * c} values for x of shape {tuple(x.shape)}, "
                             f"got {getattr(t, 'shape', type(t))}")
        if t.device != x.device:
            raise ValueError(f"adain: {name} is on {t.device} but x is on {x.device}")
    if residual is not None and (residual.shape != x.shape or residual.device != x.device):
        raise ValueError(f"adain: residual must match x ({tuple(x.shape)} on {x.device}), "
                         f"got {tuple(residual.shape)} on {residual.device}")
    return b, c


# ----------------------------------------------------------------------------------------------
# The registered op (ops/registry.py): outputs, autograd, C++ back-ends


def _forward_outputs(alloc, x, weight, bias, residual, relu, eps):
    """y (x's shape and dtype, contiguous) and the per-plane fp32 mean and rstd."""
    return (alloc.new(x.shape, x.dtype, x.device), alloc.new(weight.shape, torch.float32, x.device),
            alloc.new(weight.shape, torch.float32, x.device))


def _backward_outputs(alloc, grad_y, x, weight, bias, mean, rstd, relu):
    """dx (x's shape and dtype, contiguous), dweight and dbias (fp32, weight's shape)."""
    return (alloc.new(x.shape, x.dtype, x.device), alloc.new(weight.shape, torch.float32, x.device),
            alloc.new(weight.shape, torch.float32, x.device))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, relu, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.relu, ctx.backend, ctx.has_residual = relu, backend, residual is not None
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = ADAIN.backward(grad_y.to(x.dtype).contiguous(), x, weight, bias, mean, rstd, ctx.relu,
                                        ctx.backend)
    dresidual = grad_y if ctx.has_residual else None
    return dx, dweight, dbias, dresidual, None, None, None


def _kernel_forward(kind, x, weight, bias, residual, relu, eps, y, mean, rstd):
    extension.kernels(kind).adain_forward_out(x, weight, bias, residual, relu, eps, CUDA_SPLIT_THRESHOLD,
                                              y, mean, rstd)


def _kernel_backward(kind, grad_y, x, weight, bias, mean, rstd, relu, dx, dweight, dbias):
    extension.kernels(kind).adain_backward_out(grad_y, x, weight, bias, mean, rstd, relu, CUDA_SPLIT_THRESHOLD,
                                               dx, dweight, dbias)


# ----------------------------------------------------------------------------------------------
# Triton back-end. Planes are rows of a (P = B*C, N = H*W) matrix.

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - resolve_backend reports why triton is unavailable
    triton = None

if triton is not None:

    @triton.jit
    def _fwd_small_kernel(x_ptr, w_ptr, b_ptr, res_ptr, y_ptr, mean_ptr, rstd_ptr, P, N, eps,
                          HAS_RES: tl.constexpr, RELU: tl.constexpr, ROWS: tl.constexpr,
                          BLOCK_N: tl.constexpr):
        # ROWS whole planes per program; exact two-pass statistics in registers.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < P
        mask = row_ok[:, None] & (cols[None, :] < N)
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
        scale = rstd * tl.load(w_ptr + rows, mask=row_ok, other=0.0)
        y = xc * scale[:, None] + tl.load(b_ptr + rows, mask=row_ok, other=0.0)[:, None]
        if RELU:
            y = tl.maximum(y, 0.0)
        if HAS_RES:
            y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    @triton.jit
    def _fwd_stats_kernel(x_ptr, pmean_ptr, pm2_ptr, N, CHUNK, S, TILE: tl.constexpr):
        # Program (plane, split): mean and M2 of one chunk, per-lane Welford then Chan's merge.
        plane = tl.program_id(0)
        split = tl.program_id(1)
        base = x_ptr + plane.to(tl.int64) * N
        start = split * CHUNK
        end = tl.minimum(start + CHUNK, N)
        lanes = tl.arange(0, TILE)
        cnt = tl.zeros([TILE], dtype=tl.float32)
        mean = tl.zeros([TILE], dtype=tl.float32)
        m2 = tl.zeros([TILE], dtype=tl.float32)
        for t in range(start, end, TILE):
            m = t + lanes < end
            v = tl.load(base + t + lanes, mask=m, other=0.0).to(tl.float32)
            cnt += m.to(tl.float32)
            delta = tl.where(m, v - mean, 0.0)
            mean += delta / tl.maximum(cnt, 1.0)
            m2 += delta * tl.where(m, v - mean, 0.0)
        n = tl.sum(cnt, axis=0)
        chunk_mean = tl.sum(cnt * mean, axis=0) / n
        dm = mean - chunk_mean
        chunk_m2 = tl.sum(m2 + cnt * dm * dm, axis=0)
        tl.store(pmean_ptr + plane * S + split, chunk_mean)
        tl.store(pm2_ptr + plane * S + split, chunk_m2)

    @triton.jit
    def _merge_stats(pmean_ptr, pm2_ptr, plane, N, CHUNK, S, eps, BLOCK_S: tl.constexpr):
        s = tl.arange(0, BLOCK_S)
        ok = s < S
        pmean = tl.load(pmean_ptr + plane * S + s, mask=ok, other=0.0)
        pm2 = tl.load(pm2_ptr + plane * S + s, mask=ok, other=0.0)
        cnt = tl.where(ok, tl.minimum(N - s * CHUNK, CHUNK), 0).to(tl.float32)
        mean = tl.sum(cnt * pmean, axis=0) / N
        dm = pmean - mean
        var = tl.sum(pm2 + cnt * dm * dm, axis=0) / N
        return mean, tl.math.rsqrt(var + eps)

    @triton.jit
    def _fwd_normalize_kernel(x_ptr, w_ptr, b_ptr, res_ptr, y_ptr, mean_ptr, rstd_ptr, pmean_ptr, pm2_ptr,
                              N, CHUNK, S, eps, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                              TILE: tl.constexpr, BLOCK_S: tl.constexpr):
        plane = tl.program_id(0)
        tile = tl.program_id(1)
        mean, rstd = _merge_stats(pmean_ptr, pm2_ptr, plane, N, CHUNK, S, eps, BLOCK_S)
        scale = rstd * tl.load(w_ptr + plane)
        shift = tl.load(b_ptr + plane)
        idx = tile * TILE + tl.arange(0, TILE)
        m = idx < N
        offs = plane.to(tl.int64) * N + idx
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        y = (x - mean) * scale + shift
        if RELU:
            y = tl.maximum(y, 0.0)
        if HAS_RES:
            y += tl.load(res_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)
        tl.store(mean_ptr + plane, mean, mask=tile == 0)
        tl.store(rstd_ptr + plane, rstd, mask=tile == 0)

    @triton.jit
    def _bwd_small_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, P, N,
                          RELU: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < P
        mask = row_ok[:, None] & (cols[None, :] < N)
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        w = tl.load(w_ptr + rows, mask=row_ok, other=0.0)
        xc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean[:, None]
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            z = xc * (rstd * w)[:, None] + tl.load(b_ptr + rows, mask=row_ok, other=0.0)[:, None]
            g = tl.where(z > 0.0, g, 0.0)
        xhat = xc * rstd[:, None]
        sum_g = tl.sum(g, axis=1)
        sum_gxhat = tl.sum(g * xhat, axis=1)
        dx = (w * rstd)[:, None] * (g - (sum_g / N)[:, None] - xhat * (sum_gxhat / N)[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_ptr + rows, sum_gxhat, mask=row_ok)
        tl.store(db_ptr + rows, sum_g, mask=row_ok)

    @triton.jit
    def _bwd_reduce_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, psg_ptr, psgx_ptr, N, CHUNK, S,
                           RELU: tl.constexpr, TILE: tl.constexpr):
        plane = tl.program_id(0)
        split = tl.program_id(1)
        offs0 = plane.to(tl.int64) * N
        start = split * CHUNK
        end = tl.minimum(start + CHUNK, N)
        mean = tl.load(mean_ptr + plane)
        rstd = tl.load(rstd_ptr + plane)
        scale = rstd * tl.load(w_ptr + plane)
        shift = tl.load(b_ptr + plane)
        lanes = tl.arange(0, TILE)
        acc_g = tl.zeros([TILE], dtype=tl.float32)
        acc_gx = tl.zeros([TILE], dtype=tl.float32)
        for t in range(start, end, TILE):
            m = t + lanes < end
            xc = tl.load(x_ptr + offs0 + t + lanes, mask=m, other=0.0).to(tl.float32) - mean
            g = tl.load(dy_ptr + offs0 + t + lanes, mask=m, other=0.0).to(tl.float32)
            if RELU:
                g = tl.where(xc * scale + shift > 0.0, g, 0.0)
            acc_g += g
            acc_gx += g * xc
        tl.store(psg_ptr + plane * S + split, tl.sum(acc_g, axis=0))
        tl.store(psgx_ptr + plane * S + split, tl.sum(acc_gx, axis=0) * rstd)

    @triton.jit
    def _bwd_dx_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, psg_ptr, psgx_ptr, dx_ptr, dw_ptr, db_ptr,
                       N, S, RELU: tl.constexpr, TILE: tl.constexpr, BLOCK_S: tl.constexpr):
        plane = tl.program_id(0)
        tile = tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        sum_g = tl.sum(tl.load(psg_ptr + plane * S + s, mask=s < S, other=0.0), axis=0)
        sum_gxhat = tl.sum(tl.load(psgx_ptr + plane * S + s, mask=s < S, other=0.0), axis=0)
        mean = tl.load(mean_ptr + plane)
        rstd = tl.load(rstd_ptr + plane)
        w = tl.load(w_ptr + plane)
        idx = tile * TILE + tl.arange(0, TILE)
        m = idx < N
        offs = plane.to(tl.int64) * N + idx
        xc = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) - mean
        g = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if RELU:
            g = tl.where(xc * (rstd * w) + tl.load(b_ptr + plane) > 0.0, g, 0.0)
        dx = (w * rstd) * (g - sum_g / N - xc * rstd * (sum_gxhat / N))
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
        tl.store(dw_ptr + plane, sum_gxhat, mask=tile == 0)
        tl.store(db_ptr + plane, sum_g, mask=tile == 0)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _small_launch(p: int, n: int, cfg: TritonTuning) -> tuple[int, int, int, int]:
    block_n = _next_pow2(n)
    rows = max(1, min(cfg.single_pass_max // block_n, _next_pow2(p)))
    warps = 4 if rows * block_n <= 2048 else 8
    return triton.cdiv(p, rows), rows, block_n, warps


def _split_launch(n: int, cfg: TritonTuning) -> tuple[int, int, int]:
    tile = _next_pow2(cfg.tile)
    chunk = max(tile, cfg.chunk // tile * tile)
    return tile, chunk, triton.cdiv(n, chunk)


@triton_launch
def _triton_forward(x, weight, bias, residual, relu, eps, y, mean, rstd):
    if x.numel() == 0:
        return
    p, n = weight.numel(), x.numel() // weight.numel()
    cfg = TRITON_TUNING
    res = residual if residual is not None else x  # never read without HAS_RES
    if n <= cfg.single_pass_max:
        grid, rows, block_n, warps = _small_launch(p, n, cfg)
        _fwd_small_kernel[(grid,)](x, weight, bias, res, y, mean, rstd, p, n, eps, HAS_RES=residual is not None,
                                   RELU=relu, ROWS=rows, BLOCK_N=block_n, num_warps=warps)
        return
    tile, chunk, splits = _split_launch(n, cfg)
    pmean = torch.empty((p, splits), dtype=torch.float32, device=x.device)
    pm2 = torch.empty_like(pmean)
    _fwd_stats_kernel[(p, splits)](x, pmean, pm2, n, chunk, splits, TILE=tile, num_warps=8)
    _fwd_normalize_kernel[(p, triton.cdiv(n, tile))](
        x, weight, bias, res, y, mean, rstd, pmean, pm2, n, chunk, splits, eps, HAS_RES=residual is not None,
        RELU=relu, TILE=tile, BLOCK_S=_next_pow2(splits), num_warps=8)


@triton_launch
def _triton_backward(grad_y, x, weight, bias, mean, rstd, relu, dx, dweight, dbias):
    if x.numel() == 0:
        return
    p, n = weight.numel(), x.numel() // weight.numel()
    cfg = TRITON_TUNING
    if n <= cfg.single_pass_max:
        grid, rows, block_n, warps = _small_launch(p, n, cfg)
        _bwd_small_kernel[(grid,)](grad_y, x, weight, bias, mean, rstd, dx, dweight, dbias, p, n, RELU=relu,
                                   ROWS=rows, BLOCK_N=block_n, num_warps=warps)
        return
    tile, chunk, splits = _split_launch(n, cfg)
    psg = torch.empty((p, splits), dtype=torch.float32, device=x.device)
    psgx = torch.empty_like(psg)
    _bwd_reduce_kernel[(p, splits)](grad_y, x, weight, bias, mean, rstd, psg, psgx, n, chunk, splits, RELU=relu,
                                    TILE=tile, num_warps=8)
    _bwd_dx_kernel[(p, triton.cdiv(n, tile))](grad_y, x, weight, bias, mean, rstd, psg, psgx, dx, dweight, dbias,
                                              n, splits, RELU=relu, TILE=tile, BLOCK_S=_next_pow2(splits),
                                              num_warps=8)



ADAIN = FusedOp(
    "adain", adain_reference,
    schema="(Tensor x, Tensor weight, Tensor bias, Tensor? residual, bool relu, float eps) -> (Tensor, Tensor, Tensor)",
    outputs=_forward_outputs,
    backward_schema="(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor rstd, bool relu) "
                    "-> (Tensor, Tensor, Tensor)",
    backward_outputs=_backward_outputs)
ADAIN.register_extension(_kernel_forward, _kernel_backward)
ADAIN.register("triton", _triton_forward, _triton_backward)
ADAIN.autograd(_backward, _setup_context)
