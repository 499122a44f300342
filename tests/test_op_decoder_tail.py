"""The fused decoder tail (council_fast.ops.decoder_tail) against its reference twin, on every back-end here.

The CPU extension must build and, under TRITON_INTERPRET=1, the Triton kernels must run: those back-ends fail
rather than skip. The cuda back-end (and Triton without the interpreter) needs a GPU and is skipped without one.
Fused outputs start as NaN (the registry's poisoning, on for every test: conftest.py), so an element a kernel never writes fails the comparison.
"""
from __future__ import annotations

import pytest
import torch

from council_fast.ops import decoder_tail as tail_mod
from council_fast.ops.registry import BackendUnavailable
from council_fast.ops.decoder_tail import decoder_tail, decoder_tail_reference
from council_fast.reference.networks import blend_with_masks
from _backends import FUSED, device_for, require_backend

# (batch, dim, H, W, output_dim, num_masks, channels_last): odd sizes, dim 19 (no block multiple).
# (batch, dim, H, W, output_dim, num_masks, channels_last); the last: more masks than channels
CASES = [(1, 19, 5, 7, 3, 3, False), (5, 19, 3, 5, 3, 1, True), (2, 16, 7, 3, 1, 3, False), (1, 2, 5, 7, 3, 5, False)]



@pytest.fixture(params=FUSED)
def backend(request, monkeypatch):
    return require_backend(request.param, monkeypatch)


def _inputs(batch, dim, height, width, out_dim, num_masks, channels_last, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_raw = (out_dim + 1) * num_masks

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    h = torch.relu(randn(batch, dim, height, width, scale=1.5))
    # Weights scaled so pre-activations straddle 0 and tanh / the masks are neither saturated nor linear.
    tensors = [h, randn(dim, dim, scale=dim ** -0.5), randn(dim, scale=0.2), randn(dim, dim, scale=dim ** -0.5),
               randn(dim, scale=0.2), randn(n_raw, dim, scale=0.5 * dim ** -0.5), randn(n_raw, scale=0.1),
               torch.rand(batch, out_dim, height, width, generator=gen) * 2 - 1]
    tensors = [t.to(device=device, dtype=dtype) for t in tensors]
    if channels_last:
        tensors[0] = tensors[0].contiguous(memory_format=torch.channels_last)
    grads = (randn(batch, out_dim, height, width).to(device), randn(batch, num_masks, height, width).to(device))
    return tensors, grads


def _assert_close(actual, expected, tol, what):
    expected = expected.float()
    scale = max(expected.abs().max().item(), 1e-6)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an element was never written?)"
    err = (actual.float() - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x {scale:.3g}"


def _compare(backend, case, dtype=torch.float32, fwd_tol=1e-5, grad_tol=1e-4, with_mask_grad=True):
    *sizes, num_masks, channels_last = case
    tensors, (g_out, g_masks) = _inputs(*sizes, num_masks, channels_last, dtype, device_for(backend))
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out, masks = decoder_tail(*leaves, num_masks, backend=backend)
    assert out.dtype == dtype and masks.dtype == dtype
    assert out.shape == tensors[7].shape and masks.shape == (sizes[0], num_masks, *sizes[2:4])

    ref_leaves = [t.detach().float().requires_grad_() for t in tensors]  # the truth: fp32 on the same inputs
    ref_out, ref_masks = decoder_tail_reference(*ref_leaves, num_masks)
    _assert_close(out, ref_out, fwd_tol, f"{backend} out")
    _assert_close(masks, ref_masks, fwd_tol, f"{backend} masks")

    outputs, ref_outputs, cotangents = [out], [ref_out], [g_out.to(dtype)]
    if with_mask_grad:
        outputs.append(masks)
        ref_outputs.append(ref_masks)
        cotangents.append(g_masks.to(dtype))
    grads = torch.autograd.grad(outputs, leaves, cotangents)
    ref_grads = torch.autograd.grad(ref_outputs, ref_leaves, [c.float() for c in cotangents])
    names = ["h", "w1", "b1", "w2", "b2", "w3", "b3", "images"]
    for name, g, rg, leaf in zip(names, grads, ref_grads, leaves):
        assert g.shape == leaf.shape and g.dtype == dtype, name
        _assert_close(g, rg, grad_tol, f"{backend} grad {name}")


@pytest.mark.parametrize("name", [pytest.param("cuda", marks=pytest.mark.gpu), "cuda-emulated"])
def test_cuda_backward_in_several_chunks(name, monkeypatch):
    """The CUDA backward accumulates the weight gradients chunk by chunk (256 Ki pixels each; here 37)."""
    backend = require_backend(name, monkeypatch)
    monkeypatch.setattr(tail_mod, "CUDA_BACKWARD_CHUNK", 37)
    _compare(backend, (2, 19, 9, 11, 3, 3, True))


def test_triton_backward_too_big_for_the_gpu_says_what_to_use(monkeypatch):
    """A GPU with less shared memory than the backward needs (Triton raises OutOfResources at launch, as
    sm_86/89 would for fp32 at 128-channel tiles): the error names the back-end and precision that fit."""
    from triton.runtime.errors import OutOfResources

    require_backend("triton")

    class SmallGpu:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(147456, 101376, "shared memory")
            return launch

    monkeypatch.setattr(tail_mod, "_backward_kernel", SmallGpu())
    tensors, (g_out, _) = _inputs(1, 19, 5, 7, 3, 3, False, torch.float32, device_for("triton"))
    leaves = [t.clone().requires_grad_() for t in tensors]
    out, _ = decoder_tail(*leaves, 3, backend="triton")
    with pytest.raises(BackendUnavailable, match=r"does not fit this GPU .*use the cuda back-end or bf16"):
        out.backward(g_out)


def test_wide_tail(backend):
    """dim 97: on CUDA the fp32 weights (75 KB) take more than the 48 KB of shared memory a kernel gets
    without opting in (cudaFuncSetAttribute). Triton tiles it as 128 channels: its fp32 backward then needs
    144 KB of shared memory compiled for sm_90, inside an H100/H200's 227 KB."""
    _compare(backend, (1, 97, 3, 5, 3, 2, False))


def test_triton_backward_in_several_chunks(monkeypatch):
    """The Triton backward runs whole images chunk by chunk (at least one image each) and sums their weight
    gradients: 37 pixels per chunk here, so each of the 3 images of 9x11 is its own chunk."""
    backend = require_backend("triton", monkeypatch)
    monkeypatch.setattr(tail_mod, "CUDA_BACKWARD_CHUNK", 37)
    _compare(backend, (3, 19, 9, 11, 3, 3, True))


def test_triton_backward_refuses_tiles_over_the_gpu_limit_before_compiling(monkeypatch):
    """The floor of the backward's shared memory (one weight tile) against a GPU's limit (48 KB here: a
    block that does not opt in to more)."""
    require_backend("triton")
    monkeypatch.setattr(tail_mod, "_shared_limit", lambda device: 48 * 1024)
    assert tail_mod.backward_shared_floor(64, torch.float32) <= 48 * 1024 < tail_mod.backward_shared_floor(
        128, torch.float32)

    class NoCompile:
        def __getitem__(self, grid):
            raise AssertionError("the kernel must not be compiled or launched")

    monkeypatch.setattr(tail_mod, "_backward_kernel", NoCompile())
    tensors, (g_out, _) = _inputs(1, 97, 3, 5, 3, 2, False, torch.float32, device_for("triton"))
    leaves = [t.clone().requires_grad_() for t in tensors]
    out, _ = decoder_tail(*leaves, 2, backend="triton")
    with pytest.raises(BackendUnavailable, match=r"dim 97\) does not fit this GPU \(its 128-channel tiles need at "
                                                 r"least 64 KB of shared memory, a block gets 48 KB\)"):
        out.backward(g_out)


@pytest.mark.parametrize("name", [pytest.param("cuda", marks=pytest.mark.gpu), "cuda-emulated"])
def test_cuda_tail_too_wide_for_shared_memory_says_so(name, monkeypatch):
    backend = require_backend(name, monkeypatch)
    tensors, _ = _inputs(1, 200, 2, 3, 3, 1, False, torch.float32, device_for(backend))
    with pytest.raises(RuntimeError, match="do not fit in this GPU's shared memory.*use the triton back-end"):
        decoder_tail(*tensors, 1, backend=backend)


def test_reference_matches_published_blend():
    """decoder_tail_reference == 1x1 conv modules + blend_with_masks (the reference network's code)."""
    (h, w1, b1, w2, b2, w3, b3, images), _ = _inputs(2, 8, 5, 6, 3, 3, False, torch.float32, "cpu")
    r = torch.relu(torch.nn.functional.conv2d(h, w1[:, :, None, None], b1))
    r = torch.relu(torch.nn.functional.conv2d(r, w2[:, :, None, None], b2))
    raw = torch.tanh(torch.nn.functional.conv2d(r, w3[:, :, None, None], b3))
    expected_out, expected_masks = blend_with_masks(raw, images, 3)
    out, masks = decoder_tail_reference(h, w1, b1, w2, b2, w3, b3, images, 3)
    assert torch.equal(out, expected_out) and torch.equal(masks, expected_masks)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_d{}_{}x{}_o{}_m{}{}".format(*c[:6], "_cl" * c[6]))
def test_fp32_forward_and_gradients(backend, case):
    _compare(backend, case)


def test_gradient_without_mask_cotangent(backend):
    """Only `out` feeds the loss (the usual case): grad_masks arrives as None."""
    _compare(backend, CASES[0], with_mask_grad=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision(backend, dtype):
    _compare(backend, (3, 19, 5, 7, 3, 3, False), dtype=dtype, fwd_tol=2e-2, grad_tol=2e-2)


def test_anime_size_block(backend):
    """dim 64 and 12 raw channels: the specialised kernels (CUDA) and full tiles; on the CPU two pixel
    blocks of 256, the second partial."""
    height, width = (17, 19) if device_for(backend) == "cpu" else (67, 45)
    _compare(backend, (2, 64, height, width, 3, 3, True))


def test_conv_weights_and_reference_backend_agree():
    """1x1 conv weights (out, in, 1, 1) are accepted; backend='reference' is the reference."""
    tensors, _ = _inputs(1, 8, 4, 4, 3, 3, False, torch.float32, "cpu")
    conv = [t[:, :, None, None] if i in (1, 3, 5) else t for i, t in enumerate(tensors)]
    out, masks = decoder_tail(*conv, 3, backend="reference")
    ref_out, ref_masks = decoder_tail_reference(*tensors, 3)
    assert torch.equal(out, ref_out) and torch.equal(masks, ref_masks)


def test_bad_shapes_are_named():
    tensors, _ = _inputs(1, 8, 4, 4, 3, 3, False, torch.float32, "cpu")
    bad = list(tensors)
    bad[5] = bad[5][:-1]
    with pytest.raises(ValueError, match="w3"):
        decoder_tail(*bad, 3, backend="reference")
    bad = list(tensors)
    bad[7] = bad[7][:, :, :3]
    with pytest.raises(ValueError, match="images"):
        decoder_tail(*bad, 3, backend="reference")
    with pytest.raises(ValueError, match="dtype"):
        decoder_tail(*tensors[:7], tensors[7].double(), 3, backend="reference")
    with pytest.raises(ValueError, match=r"one device, got \['cpu', 'meta'\]"):
        decoder_tail(*tensors[:2], tensors[2].to("meta"), *tensors[3:], 3, backend="reference")


def test_torch_compile_fullgraph():
    """The custom ops trace without graph breaks (aot_eager: no C++ compiler round trip), forward and backward."""
    tensors, (g_out, _) = _inputs(1, 8, 3, 5, 3, 3, False, torch.float32, "cpu")
    leaves = [t.detach().clone().requires_grad_() for t in tensors]

    def loss(*args):
        out, masks = decoder_tail(*args, 3, backend="cpu")
        return (out * g_out).sum() + masks.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(*leaves)
    grads = torch.autograd.grad(value, leaves)
    ref_leaves = [t.detach().clone().requires_grad_() for t in tensors]
    ref_out, ref_masks = decoder_tail_reference(*ref_leaves, 3)
    ref_value = (ref_out * g_out).sum() + ref_masks.sum()
    ref_grads = torch.autograd.grad(ref_value, ref_leaves)
    _assert_close(value.detach(), ref_value.detach(), 1e-5, "compiled loss")
    for g, rg in zip(grads, ref_grads):
        _assert_close(g, rg, 1e-4, "compiled grad")
