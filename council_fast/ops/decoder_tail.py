"""The decoder's tail as one per-pixel pass.

After the last AdaIN + ReLU the Council-GAN decoder runs, independently at every pixel:
1x1 conv dim->dim + ReLU, 1x1 conv dim->dim + ReLU, 1x1 conv dim -> O*M + M + tanh (t), then
masks = (tanh(10 * t[O*M:]) + 1) / 2 and the attention blend
``out = images; out = (1 - m_k) * out + m_k * t[O*k:O*k+O]`` for k = 0..M-1.
The fused kernels read ``h`` once and write ``out`` and ``masks`` once; the backward recomputes the
per-pixel forward instead of keeping any intermediate. The CPU backward reduces the weight gradients over
pixels per thread before one final sum; the CUDA and Triton backwards write each pixel's rows (r1, r2 and
the pre-activation gradients) chunk by chunk and get the weight gradients as GEMMs of them.

Back-ends: ``reference`` (plain PyTorch, autograd by torch), ``cpu`` (csrc/decoder_tail_cpu.cpp),
``triton`` (below; CPU only under TRITON_INTERPRET=1) and ``cuda`` (csrc/decoder_tail_cuda.cu).
The fused ones run behind the op registry's ``council_fast::decoder_tail`` / ``decoder_tail_backward``
(ops/registry.py: fake implementations, autograd, poisoned outputs in tests), so
``torch.compile(fullgraph=True)`` traces through them.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from . import extension
from .registry import BackendUnavailable, FusedOp, poisoning, triton_interpreted, triton_launch

__all__ = ["decoder_tail", "decoder_tail_reference"]


def decoder_tail_reference(h, w1, b1, w2, b2, w3, b3, images, num_masks):
    """The published computation with torch ops (weights may be 2-D or 1x1 conv weights)."""
    r1 = F.relu(F.conv2d(h, _as_conv(w1), b1))
    r2 = F.relu(F.conv2d(r1, _as_conv(w2), b2))
    raw = torch.tanh(F.conv2d(r2, _as_conv(w3), b3))
    n_out = (raw.shape[1] - num_masks) // num_masks
    masks = (torch.tanh(10 * raw[:, raw.shape[1] - num_masks:]) + 1) / 2
    out = images
    for k in range(num_masks):
        mask = masks[:, k:k + 1]
        out = (1 - mask) * out + mask * raw[:, n_out * k:n_out * (k + 1)]
    return out, masks


def _as_conv(w):
    return w if w.dim() == 4 else w[:, :, None, None]


def _as_matrix(w, name):
    if w.dim() == 4:
        if w.shape[2:] != (1, 1):
            raise ValueError(f"decoder_tail: {name} must be a 1x1 conv weight, got shape {tuple(w.shape)}")
        w = w.flatten(1)
    if w.dim() != 2:
        raise ValueError(f"decoder_tail: {name} must be 2-D (out, in) or (out, in, 1, 1), got {tuple(w.shape)}")
    return w.contiguous()


def _check_shapes(h, w1, b1, w2, b2, w3, b3, images, num_masks):
    if h.dim() != 4 or images.dim() != 4:
        raise ValueError(f"decoder_tail: h and images must be 4-D (B, C, H, W); got {tuple(h.shape)} "
                         f"and {tuple(images.shape)}")
    dim = h.shape[1]
    out_dim = images.shape[1]
    n_raw = (out_dim + 1) * num_masks
    expected = {"w1": ((dim, dim), w1), "w2": ((dim, dim), w2), "w3": ((n_raw, dim), w3),
                "b1": ((dim,), b1), "b2": ((dim,), b2), "b3": ((n_raw,), b3)}
    for name, (shape, t) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"decoder_tail: {name} has shape {tuple(t.shape)}, expected {shape} "
                             f"(dim {dim}, output_dim {out_dim}, num_masks {num_masks})")
    if images.shape[0] != h.shape[0] or images.shape[2:] != h.shape[2:]:
        raise ValueError(f"decoder_tail: images {tuple(images.shape)} do not match h {tuple(h.shape)}")
    devices = {t.device for t in (h, w1, b1, w2, b2, w3, b3, images)}
    if len(devices) != 1:
        raise ValueError(f"decoder_tail: all tensors must be on one device, got {sorted(map(str, devices))}")
    dtypes = {t.dtype for t in (h, w1, b1, w2, b2, w3, b3, images)}
    if len(dtypes) != 1:
        raise ValueError(f"decoder_tail: all tensors must share one dtype, got {sorted(map(str, dtypes))}")
    if num_masks < 1:
        raise ValueError(f"decoder_tail: num_masks must be >= 1, got {num_masks}")


def _pixels_flat(t):
    """t with H and W merged into one stride (NCHW and NHWC both qualify)."""
    if t.stride(2) != t.shape[3] * t.stride(3) and t.shape[2] > 1:
        t = t.contiguous()
    return t


def decoder_tail(h, w1, b1, w2, b2, w3, b3, images, num_masks, backend=None, strict=None):
    """Fused 1x1 convs + tanh + mask blend: returns (out (B, O, H, W), masks (B, M, H, W))."""
    w1, w2, w3 = _as_matrix(w1, "w1"), _as_matrix(w2, "w2"), _as_matrix(w3, "w3")
    _check_shapes(h, w1, b1, w2, b2, w3, b3, images, num_masks)
    backend = DECODER_TAIL.resolve(backend, h.device, strict)
    if backend == "reference":
        return decoder_tail_reference(h, w1, b1, w2, b2, w3, b3, images, num_masks)
    return DECODER_TAIL.forward(_pixels_flat(h), w1, b1.contiguous(), w2, b2.contiguous(), w3, b3.contiguous(),
                                _pixels_flat(images), num_masks, backend)


# --------------------------------------------------------------------------------------------
# The registered op (ops/registry.py): outputs, autograd, C++ back-ends

# Pixels per chunk of the CUDA and Triton backwards: their fp32 buffers hold 5 dim + raw channels values per
# pixel of a chunk (at dim 64 and 12 raw channels, 256 Ki pixels: 348 MB). Batch 32 at 256x256 takes 8
# chunks (Triton: whole images per chunk, at least one). The CPU backward ignores it (one pass, per-thread sums).
CUDA_BACKWARD_CHUNK = 1 << 18


def _forward_outputs(alloc, h, w1, b1, w2, b2, w3, b3, images, num_masks):
    """out (B, O, H, W) and masks (B, M, H, W), contiguous, h's dtype."""
    batch, _, height, width = h.shape
    return (alloc.new((batch, images.shape[1], height, width), h.dtype, h.device),
            alloc.new((batch, num_masks, height, width), h.dtype, h.device))


def _backward_outputs(alloc, grad_out, grad_masks, h, w1, b1, w2, b2, w3, b3, images, num_masks):
    """The gradients of h, w1, b1, w2, b2, w3, b3 and images, each like its input (memory format too)."""
    return [alloc.like(t) for t in (h, w1, b1, w2, b2, w3, b3, images)]


def _setup_context(ctx, inputs, output):
    h, w1, b1, w2, b2, w3, b3, images, num_masks, backend = inputs
    ctx.save_for_backward(h, w1, b1, w2, b2, w3, b3, images)
    ctx.num_masks, ctx.backend = num_masks, backend


def _backward(ctx, grad_out, grad_masks):
    h, w1, b1, w2, b2, w3, b3, images = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros((h.shape[0], images.shape[1], *h.shape[2:]), dtype=h.dtype, device=h.device)
    grad_masks = None if grad_masks is None else grad_masks.contiguous()
    grads = DECODER_TAIL.backward(grad_out.contiguous(), grad_masks, h, w1, b1, w2, b2, w3, b3, images,
                                  ctx.num_masks, ctx.backend)
    return (*grads, None, None)


def _kernel_forward(kind, h, w1, b1, w2, b2, w3, b3, images, num_masks, out, masks):
    extension.kernels(kind).decoder_tail_forward_out(h, w1, b1, w2, b2, w3, b3, images, num_masks, out, masks)


def _kernel_backward(kind, grad_out, grad_masks, h, w1, b1, w2, b2, w3, b3, images, num_masks, grad_h, *grads):
    *weight_grads, grad_img = grads
    computed = extension.kernels(kind).decoder_tail_backward_out(
        grad_out, grad_masks, h, w1, b1, w2, b2, w3, b3, images, num_masks, CUDA_BACKWARD_CHUNK, grad_h, grad_img)
    for out, value in zip(weight_grads, computed):
        out.copy_(value)


# --------------------------------------------------------------------------------------------
# Triton kernels. Tiles are (pixels x channels); the 1x1 convs are tl.dot on those tiles.

try:  # Triton is optional: without it the triton back-end reports itself unavailable.
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except Exception:  # noqa: BLE001
    triton = None

if triton is not None:
    @triton.jit
    def _mm(a, b, LOWP: tl.constexpr):
        # fp32 stays exact fp32 ("ieee", no TF32); half types run on the tensor cores with fp32
        # accumulation. The interpreter computes half-precision dots wrongly, so it always upcasts.
        if LOWP:
            return tl.dot(a.to(b.dtype), b)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")

    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _column(t, n, j):
        """t[:, j] of a (P, BLOCK_N) tile as a (P,) vector."""
        return tl.sum(tl.where(n[None, :] == j, t, 0.0), axis=1)

    @triton.jit
    def _columns(t, n, first, o):
        """t[:, first:first+O] as a (P, BLOCK_O) tile (columns past O are 0)."""
        pick = n[None, :, None] == (first + o)[None, None, :]
        return tl.sum(tl.where(pick, t[:, :, None], 0.0), axis=1)

    @triton.jit
    def _spread(g, n, first, o):
        """The (P, BLOCK_N) tile holding g (P, BLOCK_O) in columns first..first+O-1."""
        pick = n[None, :, None] == (first + o)[None, None, :]
        return tl.sum(tl.where(pick, g[:, None, :], 0.0), axis=2)

    @triton.jit
    def _per_pixel_forward(h_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, b, p, pm, d, dm, n, nm,
                          D, N, sh_b, sh_c, sh_p, LOWP: tl.constexpr):
        x = tl.load(h_ptr + b * sh_b + p[:, None] * sh_p + d[None, :] * sh_c, mask=pm[:, None] & dm[None, :],
                    other=0.0)
        wmask = dm[:, None] & dm[None, :]
        # Transposed loads: w1t[i, o] = w1[o, i].
        w1t = tl.load(w1_ptr + d[None, :] * D + d[:, None], mask=wmask, other=0.0)
        w2t = tl.load(w2_ptr + d[None, :] * D + d[:, None], mask=wmask, other=0.0)
        w3t = tl.load(w3_ptr + n[None, :] * D + d[:, None], mask=dm[:, None] & nm[None, :], other=0.0)
        a1 = _mm(x, w1t, LOWP) + tl.load(b1_ptr + d, mask=dm, other=0.0).to(tl.float32)[None, :]
        r1 = tl.maximum(a1, 0.0)
        a2 = _mm(r1, w2t, LOWP) + tl.load(b2_ptr + d, mask=dm, other=0.0).to(tl.float32)[None, :]
        r2 = tl.maximum(a2, 0.0)
        a3 = _mm(r2, w3t, LOWP) + tl.load(b3_ptr + n, mask=nm, other=0.0).to(tl.float32)[None, :]
        return x, a1, r1, a2, r2, _tanh(a3)

    @triton.jit
    def _forward_kernel(h_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, img_ptr, out_ptr, mask_ptr,
                       HW, D, N, sh_b, sh_c, sh_p, si_b, si_c, si_p,
                       O: tl.constexpr, M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, LOWP: tl.constexpr):
        b = tl.program_id(1).to(tl.int64)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = p < HW
        d = tl.arange(0, BLOCK_D)
        n = tl.arange(0, BLOCK_N)
        o = tl.arange(0, BLOCK_O)
        om = o < O
        x, a1, r1, a2, r2, t = _per_pixel_forward(h_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, b, p, pm,
                                                 d, d < D, n, n < N, D, N, sh_b, sh_c, sh_p, LOWP)
        io_mask = pm[:, None] & om[None, :]
        out = tl.load(img_ptr + b * si_b + p[:, None] * si_p + o[None, :] * si_c, mask=io_mask,
                      other=0.0).to(tl.float32)
        for k in tl.static_range(M):
            m = (_tanh(10.0 * _column(t, n, O * M + k)) + 1.0) * 0.5
            out = (1.0 - m[:, None]) * out + m[:, None] * _columns(t, n, O * k, o)
            tl.store(mask_ptr + (b * M + k) * HW + p, m.to(mask_ptr.dtype.element_ty), mask=pm)
        tl.store(out_ptr + b * O * HW + o[None, :] * HW + p[:, None], out.to(out_ptr.dtype.element_ty),
                 mask=io_mask)

    @triton.jit
    def _backward_kernel(gout_ptr, gmask_ptr, h_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, img_ptr,
                        gh_ptr, gimg_ptr, r1_ptr, r2_ptr, ga1_ptr, ga2_ptr, ga3_ptr, HW, D, N,
                        sh_b, sh_c, sh_p, si_b, si_c, si_p, sgh_b, sgh_c, sgh_p, sgi_b, sgi_c, sgi_p,
                        O: tl.constexpr, M: tl.constexpr, HAS_GMASK: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
                        LOWP: tl.constexpr):
        """Per pixel: the gradients of h and images, and the rows the weight gradients are GEMMs of
        (r1, r2 and the pre-activation gradients g_a1, g_a2, g_a3, fp32, one row per pixel of the chunk).
        Every image operand is the chunk's slice."""
        b = tl.program_id(1).to(tl.int64)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = p < HW
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        n = tl.arange(0, BLOCK_N)
        nm = n < N
        o = tl.arange(0, BLOCK_O)
        om = o < O
        x, a1, r1, a2, r2, t = _per_pixel_forward(h_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, b, p,
                                                 pm, d, dm, n, nm, D, N, sh_b, sh_c, sh_p, LOWP)
        io_mask = pm[:, None] & om[None, :]
        img = tl.load(img_ptr + b * si_b + p[:, None] * si_p + o[None, :] * si_c, mask=io_mask,
                      other=0.0).to(tl.float32)
        g = tl.load(gout_ptr + b * O * HW + o[None, :] * HW + p[:, None], mask=io_mask, other=0.0).to(tl.float32)
        g_t = tl.zeros((BLOCK_P, BLOCK_N), tl.float32)
        for k in tl.static_range(M - 1, -1, -1):
            before = img  # the blend's state before step k, recomputed
            for j in tl.static_range(k):
                mj = (_tanh(10.0 * _column(t, n, O * M + j)) + 1.0) * 0.5
                before = (1.0 - mj[:, None]) * before + mj[:, None] * _columns(t, n, O * j, o)
            th = _tanh(10.0 * _column(t, n, O * M + k))
            m = (th + 1.0) * 0.5
            cand = _columns(t, n, O * k, o)
            g_m = tl.sum(g * (cand - before), axis=1)
            if HAS_GMASK:
                g_m += tl.load(gmask_ptr + (b * M + k) * HW + p, mask=pm, other=0.0).to(tl.float32)
            g_t += _spread(m[:, None] * g, n, O * k, o)
            g_t += tl.where(n[None, :] == O * M + k, (g_m * 5.0 * (1.0 - th * th))[:, None], 0.0)
            g = (1.0 - m[:, None]) * g
        tl.store(gimg_ptr + b * sgi_b + p[:, None] * sgi_p + o[None, :] * sgi_c,
                 g.to(gimg_ptr.dtype.element_ty), mask=io_mask)
        g_a3 = g_t * (1.0 - t * t)
        w3 = tl.load(w3_ptr + n[:, None] * D + d[None, :], mask=nm[:, None] & dm[None, :], other=0.0)
        g_a2 = tl.where(a2 > 0.0, _mm(g_a3, w3, LOWP), 0.0)
        wmask = dm[:, None] & dm[None, :]
        w2 = tl.load(w2_ptr + d[:, None] * D + d[None, :], mask=wmask, other=0.0)
        g_a1 = tl.where(a1 > 0.0, _mm(g_a2, w2, LOWP), 0.0)
        w1 = tl.load(w1_ptr + d[:, None] * D + d[None, :], mask=wmask, other=0.0)
        g_x = _mm(g_a1, w1, LOWP)
        tl.store(gh_ptr + b * sgh_b + p[:, None] * sgh_p + d[None, :] * sgh_c, g_x.to(gh_ptr.dtype.element_ty),
                 mask=pm[:, None] & dm[None, :])
        row = b * HW + p
        rows_d = row[:, None] * D + d[None, :]
        row_mask = pm[:, None] & dm[None, :]
        tl.store(r1_ptr + rows_d, r1, mask=row_mask)
        tl.store(r2_ptr + rows_d, r2, mask=row_mask)
        tl.store(ga1_ptr + rows_d, g_a1, mask=row_mask)
        tl.store(ga2_ptr + rows_d, g_a2, mask=row_mask)
        tl.store(ga3_ptr + row[:, None] * N + n[None, :], g_a3, mask=pm[:, None] & nm[None, :])


def _pixel_strides(t):
    return t.stride(0), t.stride(1), t.stride(3)


def _triton_sizes(h, images, w3, num_masks):
    dim, out_dim = h.shape[1], images.shape[1]
    return dict(O=out_dim, M=num_masks, BLOCK_D=max(16, triton.next_power_of_2(dim)),
                BLOCK_N=max(16, triton.next_power_of_2(w3.shape[0])), BLOCK_O=triton.next_power_of_2(out_dim),
                LOWP=h.dtype != torch.float32 and not triton_interpreted())


def _forward_launch(h):
    """(pixels per program, warps) of the forward: on a GPU 64 pixels; fp32 with 8 warps, which keeps it free
    of spills under Triton 3.6 and 3.9 for sm_90 (4 warps: 164 and 952 B of spill stores)."""
    if triton_interpreted():
        return 16, 4
    return 64, 8 if h.dtype == torch.float32 else 4


def _backward_launch(h):
    """(pixels per program, warps) of the backward. On a GPU these keep it free of spills under Triton 3.6 (the
    GPU machine's) and 3.9, compiled for sm_90 (`python -m council_fast.devtools.triton_check`): fp32 at 16
    pixels and 8 warps 0 B of stack (4 warps: ~700 B of spills; 32 pixels: ~500 B), bf16 at 32 and 4 warps."""
    if triton_interpreted():
        return 16, 4
    return (16, 8) if h.dtype == torch.float32 else (32, 4)


def backward_shared_floor(block_d, dtype):
    """Shared memory the Triton backward needs at least, in bytes: one BLOCK_D x BLOCK_D weight tile in the
    weights' dtype, staged for its dots. A floor, checked against every compile of
    `council_fast.devtools.triton_check`."""
    return block_d * block_d * (torch.finfo(dtype).bits // 8)


def _shared_limit(device):
    """Shared memory a block may opt in to on ``device`` (bytes); None when the kernels are not compiled for it."""
    if triton_interpreted() or device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)


def _check_backward_fits(h, block_d):
    """Refuses, before a long compile that would fail, a backward whose tiles cannot fit this GPU."""
    limit = _shared_limit(h.device)
    floor = backward_shared_floor(block_d, h.dtype)
    if limit is not None and floor > limit:
        raise BackendUnavailable(f"decoder_tail triton backward ({h.dtype}, dim {h.shape[1]}) does not fit this GPU "
                                 f"(its {block_d}-channel tiles need at least {floor // 1024} KB of shared memory, "
                                 f"a block gets {limit // 1024} KB); use the cuda back-end or bf16")


@triton_launch
def _triton_forward(h, w1, b1, w2, b2, w3, b3, images, num_masks, out, masks):
    batch, dim, height, width = h.shape
    hw = height * width
    block_p, warps = _forward_launch(h)
    grid = (triton.cdiv(hw, block_p), batch)
    _forward_kernel[grid](h, w1, b1, w2, b2, w3, b3, images, out, masks, hw, dim, w3.shape[0],
                       *_pixel_strides(h), *_pixel_strides(images), BLOCK_P=block_p,
                       **_triton_sizes(h, images, w3, num_masks), num_warps=warps)


def _rows(rows, columns, device):
    """A backward row buffer: NaN-filled while outputs are poisoned, so a row the kernel skips fails the tests."""
    buffer = torch.empty((rows, columns), dtype=torch.float32, device=device)
    return buffer.fill_(float("nan")) if poisoning() else buffer


@triton_launch
def _triton_backward(grad_out, grad_masks, h, w1, b1, w2, b2, w3, b3, images, num_masks, grad_h, *grads):
    """The per-pixel kernel, chunk by chunk of whole images, then the weight gradients as fp32 GEMMs of its
    rows (the CUDA back-end's split): no per-program weight sums held through a pixel loop."""
    *weight_grads, grad_img = grads
    batch, dim, height, width = h.shape
    hw = height * width
    n_raw = w3.shape[0]
    block_p, warps = _backward_launch(h)
    sizes = _triton_sizes(h, images, w3, num_masks)
    _check_backward_fits(h, sizes["BLOCK_D"])
    f32 = dict(dtype=torch.float32, device=h.device)
    sums = [torch.zeros(t.shape, **f32) for t in (w1, b1, w2, b2, w3, b3)]
    gmask = grad_masks if grad_masks is not None else grad_out  # never read when HAS_GMASK is False
    per_chunk = min(batch, max(1, CUDA_BACKWARD_CHUNK // hw))
    buffers = [_rows(per_chunk * hw, columns, h.device) for columns in (dim, dim, dim, dim, n_raw)]
    for first in range(0, batch, per_chunk):
        count = min(per_chunk, batch - first)
        r1, r2, g_a1, g_a2, g_a3 = (b[:count * hw] for b in buffers)
        g_o, g_m, h_c, img_c, gh_c, gi_c = (t[first:first + count] for t in (grad_out, gmask, h, images, grad_h,
                                                                           grad_img))
        try:
            _backward_kernel[(triton.cdiv(hw, block_p), count)](
                g_o, g_m, h_c, w1, b1, w2, b2, w3, b3, img_c, gh_c, gi_c, r1, r2, g_a1, g_a2, g_a3, hw, dim, n_raw,
                *_pixel_strides(h), *_pixel_strides(images), *_pixel_strides(grad_h), *_pixel_strides(grad_img),
                HAS_GMASK=grad_masks is not None, BLOCK_P=block_p, **sizes, num_warps=warps)
        except OutOfResources as e:
            raise BackendUnavailable(f"decoder_tail triton backward ({h.dtype}, dim {dim}) does not fit this GPU "
                                     f"({e}); use the cuda back-end or bf16") from e
        x = h_c.flatten(2).float()  # (count, dim, hw): a view for NCHW and NHWC alike
        sums[0] += torch.bmm(x, g_a1.view(count, hw, dim)).sum(0).t()
        sums[2].addmm_(g_a2.t(), r1)
        sums[4].addmm_(g_a3.t(), r2)
        for total, rows in ((sums[1], g_a1), (sums[3], g_a2), (sums[5], g_a3)):
            total += rows.sum(0)
    for out, total in zip(weight_grads, sums):
        out.copy_(total)


DECODER_TAIL = FusedOp(
    "decoder_tail", decoder_tail_reference,
    schema="(Tensor h, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor w3, Tensor b3, Tensor images, "
           "int num_masks) -> (Tensor, Tensor)",
    outputs=_forward_outputs,
    backward_schema="(Tensor grad_out, Tensor? grad_masks, Tensor h, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
                    "Tensor w3, Tensor b3, Tensor images, int num_masks) -> Tensor[]",
    backward_outputs=_backward_outputs)
DECODER_TAIL.register_extension(_kernel_forward, _kernel_backward)
DECODER_TAIL.register("triton", _triton_forward, _triton_backward)
DECODER_TAIL.autograd(_backward, _setup_context)
