"""The decoder's tail as one per-pixel pass.

After the last AdaIN + ReLU the Council-GAN decoder runs, independently at every pixel:
1x1 conv dim->dim + ReLU, 1x1 conv dim->dim + ReLU, 1x1 conv dim -> O*M + M + tanh (t), then
masks = (tanh(10 * t[O*M:]) + 1) / 2 and the attention blend
``out = images; out = (1 - m_k) * out + m_k * t[O*k:O*k+O]`` for k = 0..M-1.
The fused kernels read ``h`` once and write ``out`` and ``masks`` once; the backward recomputes the
per-pixel forward instead of keeping any intermediate, and reduces the weight gradients over
pixels per program (per thread on the CPU) before one final sum.

Back-ends: ``reference`` (plain PyTorch, autograd by torch), ``cpu`` (csrc/decoder_tail_cpu.cpp),
``triton`` (below; CPU only under TRITON_INTERPRET=1) and ``cuda`` (csrc/decoder_tail_cuda.cu).
The fused ones are torch custom operators (``council_fast::decoder_tail_fwd`` / ``_bwd``) with fake
implementations and autograd, so ``torch.compile(fullgraph=True)`` traces through them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import BackendUnavailable, load_extension, resolve_backend, triton_interpreted, triton_launch

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


@torch.compiler.assume_constant_result
def _resolve(backend, device_type, device_index, strict):
    # A constant for torch.compile: the choice reads the environment and may build an extension.
    return resolve_backend(backend, torch.device(device_type, device_index), strict)


def _pixels_flat(t):
    """t with H and W merged into one stride (NCHW and NHWC both qualify)."""
    if t.stride(2) != t.shape[3] * t.stride(3) and t.shape[2] > 1:
        t = t.contiguous()
    return t


def decoder_tail(h, w1, b1, w2, b2, w3, b3, images, num_masks, backend=None, strict=None):
    """Fused 1x1 convs + tanh + mask blend: returns (out (B, O, H, W), masks (B, M, H, W))."""
    w1, w2, w3 = _as_matrix(w1, "w1"), _as_matrix(w2, "w2"), _as_matrix(w3, "w3")
    _check_shapes(h, w1, b1, w2, b2, w3, b3, images, num_masks)
    backend = _resolve(backend, h.device.type, h.device.index, strict)
    if backend == "reference":
        return decoder_tail_reference(h, w1, b1, w2, b2, w3, b3, images, num_masks)
    return torch.ops.council_fast.decoder_tail_fwd(_pixels_flat(h), w1, b1.contiguous(), w2, b2.contiguous(),
                                                   w3, b3.contiguous(), _pixels_flat(images), num_masks, backend)


# --------------------------------------------------------------------------------------------
# Custom operators: one entry point for every fused back-end.

@torch.library.custom_op("council_fast::decoder_tail_fwd", mutates_args=())
def _decoder_tail_fwd(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                      w3: torch.Tensor, b3: torch.Tensor, images: torch.Tensor, num_masks: int,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    batch, _, height, width = h.shape
    out = _new_output((batch, images.shape[1], height, width), h)
    masks = _new_output((batch, num_masks, height, width), h)
    if backend == "triton":
        _triton_forward(h, w1, b1, w2, b2, w3, b3, images, num_masks, out, masks)
    else:
        _extension_ops(backend).decoder_tail_forward(h, w1, b1, w2, b2, w3, b3, images, num_masks, out, masks)
    return out, masks


@_decoder_tail_fwd.register_fake
def _(h, w1, b1, w2, b2, w3, b3, images, num_masks, backend):
    b, _, hh, ww = h.shape
    out = h.new_empty((b, images.shape[1], hh, ww))
    return out, h.new_empty((b, num_masks, hh, ww))


@torch.library.custom_op("council_fast::decoder_tail_bwd", mutates_args=())
def _decoder_tail_bwd(grad_out: torch.Tensor, grad_masks: torch.Tensor | None, h: torch.Tensor, w1: torch.Tensor,
                      b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor,
                      images: torch.Tensor, num_masks: int, backend: str) -> list[torch.Tensor]:
    grad_out = grad_out.contiguous()
    grad_masks = None if grad_masks is None else grad_masks.contiguous()
    grad_h, grad_img = _new_output_like(h), _new_output_like(images)
    if backend == "triton":
        weights = _triton_backward(grad_out, grad_masks, h, w1, b1, w2, b2, w3, b3, images, num_masks,
                                   grad_h, grad_img)
    else:
        chunk = [CUDA_BACKWARD_CHUNK] if backend == "cuda" else []  # the CUDA op works through pixel chunks
        weights = _extension_ops(backend).decoder_tail_backward(grad_out, grad_masks, h, w1, b1, w2, b2, w3, b3,
                                                                images, num_masks, *chunk, grad_h, grad_img)
    return [grad_h, *weights, grad_img]


@_decoder_tail_bwd.register_fake
def _(grad_out, grad_masks, h, w1, b1, w2, b2, w3, b3, images, num_masks, backend):
    return [torch.empty_like(t) for t in (h, w1, b1, w2, b2, w3, b3, images)]


def _setup_context(ctx, inputs, output):
    h, w1, b1, w2, b2, w3, b3, images, num_masks, backend = inputs
    ctx.save_for_backward(h, w1, b1, w2, b2, w3, b3, images)
    ctx.num_masks, ctx.backend = num_masks, backend


def _backward(ctx, grad_out, grad_masks):
    h, w1, b1, w2, b2, w3, b3, images = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros((h.shape[0], images.shape[1], *h.shape[2:]), dtype=h.dtype, device=h.device)
    grads = torch.ops.council_fast.decoder_tail_bwd(grad_out, grad_masks, h, w1, b1, w2, b2, w3, b3, images,
                                                    ctx.num_masks, ctx.backend)
    return (*grads, None, None)


_decoder_tail_fwd.register_autograd(_backward, setup_context=_setup_context)


# Tests set this: fused outputs start as NaN, so an element a kernel forgets to write shows up.
POISON_OUTPUTS = False
# Pixels per chunk of the CUDA backward: its fp32 buffers hold 5 dim + raw channels values per pixel of
# a chunk (at dim 64 and 12 raw channels, 256 Ki pixels: 348 MB). Batch 32 at 256x256 takes 8 chunks.
CUDA_BACKWARD_CHUNK = 1 << 18


def _new_output(shape, like):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _new_output_like(t):
    out = torch.empty_like(t)  # keeps NCHW / channels_last
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def _extension_ops(backend):
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"decoder_tail: unknown fused back-end {backend!r}")
    load_extension(backend)
    return getattr(torch.ops, f"council_fast_{backend}")


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
                        gh_ptr, gimg_ptr, pw1_ptr, pb1_ptr, pw2_ptr, pb2_ptr, pw3_ptr, pb3_ptr,
                        HW, D, N, blocks_per_image, total_blocks,
                        sh_b, sh_c, sh_p, si_b, si_c, si_p, sgh_b, sgh_c, sgh_p, sgi_b, sgi_c, sgi_p,
                        O: tl.constexpr, M: tl.constexpr, HAS_GMASK: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
                        LOWP: tl.constexpr):
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        n = tl.arange(0, BLOCK_N)
        nm = n < N
        o = tl.arange(0, BLOCK_O)
        om = o < O
        wmask = dm[:, None] & dm[None, :]
        w1 = tl.load(w1_ptr + d[:, None] * D + d[None, :], mask=wmask, other=0.0)
        w2 = tl.load(w2_ptr + d[:, None] * D + d[None, :], mask=wmask, other=0.0)
        w3 = tl.load(w3_ptr + n[:, None] * D + d[None, :], mask=nm[:, None] & dm[None, :], other=0.0)
        acc_w1 = tl.zeros((BLOCK_D, BLOCK_D), tl.float32)
        acc_w2 = tl.zeros((BLOCK_D, BLOCK_D), tl.float32)
        acc_w3 = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        acc_b1 = tl.zeros((BLOCK_D,), tl.float32)
        acc_b2 = tl.zeros((BLOCK_D,), tl.float32)
        acc_b3 = tl.zeros((BLOCK_N,), tl.float32)
        for blk in range(pid, total_blocks, programs):
            b = (blk // blocks_per_image).to(tl.int64)
            p = (blk % blocks_per_image) * BLOCK_P + tl.arange(0, BLOCK_P)
            pm = p < HW
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
            acc_w3 += _mm(tl.trans(g_a3), r2, LOWP)
            acc_b3 += tl.sum(g_a3, axis=0)
            g_a2 = tl.where(a2 > 0.0, _mm(g_a3, w3, LOWP), 0.0)
            acc_w2 += _mm(tl.trans(g_a2), r1, LOWP)
            acc_b2 += tl.sum(g_a2, axis=0)
            g_a1 = tl.where(a1 > 0.0, _mm(g_a2, w2, LOWP), 0.0)
            acc_w1 += _mm(tl.trans(g_a1), x, LOWP)
            acc_b1 += tl.sum(g_a1, axis=0)
            g_x = _mm(g_a1, w1, LOWP)
            tl.store(gh_ptr + b * sgh_b + p[:, None] * sgh_p + d[None, :] * sgh_c, g_x.to(gh_ptr.dtype.element_ty),
                     mask=pm[:, None] & dm[None, :])
        # Per-program partial sums; the host adds them up (deterministic, no atomics).
        tl.store(pw1_ptr + pid * D * D + d[:, None] * D + d[None, :], acc_w1, mask=wmask)
        tl.store(pw2_ptr + pid * D * D + d[:, None] * D + d[None, :], acc_w2, mask=wmask)
        tl.store(pw3_ptr + pid * N * D + n[:, None] * D + d[None, :], acc_w3, mask=nm[:, None] & dm[None, :])
        tl.store(pb1_ptr + pid * D + d, acc_b1, mask=dm)
        tl.store(pb2_ptr + pid * D + d, acc_b2, mask=dm)
        tl.store(pb3_ptr + pid * N + n, acc_b3, mask=nm)


def _pixel_strides(t):
    return t.stride(0), t.stride(1), t.stride(3)


def _triton_sizes(h, images, w3, num_masks):
    dim, out_dim = h.shape[1], images.shape[1]
    return dict(O=out_dim, M=num_masks, BLOCK_D=max(16, triton.next_power_of_2(dim)),
                BLOCK_N=max(16, triton.next_power_of_2(w3.shape[0])), BLOCK_O=triton.next_power_of_2(out_dim),
                LOWP=h.dtype != torch.float32 and not triton_interpreted())


def _block_p(h):
    return 16 if triton_interpreted() else 64


def _backward_block_p(h):
    # Pixels per step of the backward on a GPU. Compiled for sm_90 (`python -m council_fast.devtools.triton_check`),
    # fp32 at 32 pixels: Triton 3.9 gives 255 registers and a 0.9 KB stack, Triton 3.6 (the GPU machine's)
    # 32 registers and a 4.3 KB stack, both spilling; at 16 pixels 255 registers, 130 KB of shared memory
    # and no spill stores under either. bf16 at 32: 78 KB. The fp32 weight tiles dominate: even 16 pixels need
    # 127 KB, over the 99 KB of sm_86/89.
    if triton_interpreted():
        return 16
    return 16 if h.dtype == torch.float32 else 32


def backward_shared_floor(block_d, dtype):
    """Shared memory the Triton backward needs at least, in bytes: the w1 and w2 tiles (BLOCK_D x BLOCK_D, in
    the weights' dtype) and their fp32 gradient sums, which the kernel keeps through its pixel loop, staged for
    its dots. A floor, checked against every compile of `council_fast.devtools.triton_check` (fp32 at dim 64:
    64 KB of 130 KB); at dim 65-128 in fp32 it is 256 KB, over every GPU's limit (489 KB compiled)."""
    return 2 * block_d * block_d * (torch.finfo(dtype).bits // 8 + 4)


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
    block_p = _block_p(h)
    grid = (triton.cdiv(hw, block_p), batch)
    _forward_kernel[grid](h, w1, b1, w2, b2, w3, b3, images, out, masks, hw, dim, w3.shape[0],
                       *_pixel_strides(h), *_pixel_strides(images), BLOCK_P=block_p,
                       **_triton_sizes(h, images, w3, num_masks), num_warps=4)


@triton_launch
def _triton_backward(grad_out, grad_masks, h, w1, b1, w2, b2, w3, b3, images, num_masks, grad_h, grad_img):
    batch, dim, height, width = h.shape
    hw = height * width
    n_raw = w3.shape[0]
    block_p = _backward_block_p(h)
    sizes = _triton_sizes(h, images, w3, num_masks)
    _check_backward_fits(h, sizes["BLOCK_D"])
    blocks_per_image = triton.cdiv(hw, block_p)
    total = blocks_per_image * batch
    programs = min(total, 4 * torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 4)
    f32 = dict(dtype=torch.float32, device=h.device)
    partials = [torch.empty((programs, *t.shape), **f32) for t in (w1, b1, w2, b2, w3, b3)]
    gmask = grad_masks if grad_masks is not None else grad_out  # never read when HAS_GMASK is False
    try:
        _backward_kernel[(programs,)](
            grad_out, gmask, h, w1, b1, w2, b2, w3, b3, images, grad_h, grad_img, *partials,
            hw, dim, n_raw, blocks_per_image, total, *_pixel_strides(h), *_pixel_strides(images),
            *_pixel_strides(grad_h), *_pixel_strides(grad_img), HAS_GMASK=grad_masks is not None,
            BLOCK_P=block_p, **sizes, num_warps=4 if triton_interpreted() else 8)
    except OutOfResources as e:  # e.g. fp32 on sm_86/89: see _backward_block_p
        raise BackendUnavailable(f"decoder_tail triton backward ({h.dtype}, dim {dim}) does not fit this GPU ({e}); "
                                 "use the cuda back-end or bf16") from e
    return [part.sum(0).to(ref.dtype) for part, ref in zip(partials, (w1, b1, w2, b2, w3, b3))]
