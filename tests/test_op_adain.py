"""Fused AdaIN / instance norm (council_fast.ops.adain) against its reference twin, on every back-end here.

The CPU extension must build and, under TRITON_INTERPRET=1, the Triton kernels must run: those back-ends fail
rather than skip. The cuda back-end (and Triton without the interpreter) needs a GPU and is skipped without one.
Fused outputs start as NaN (the registry's poisoning, on for every test: conftest.py), so an element a kernel never writes fails the comparison.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from council_fast.ops import registry
from council_fast.ops import adain as adain_mod
from council_fast.ops.registry import BackendUnavailable
from council_fast.ops.adain import adain, adain_reference, instance_norm, instance_norm_reference
from _backends import FUSED, HAS_CUDA, device_for, require_backend

# (B, C, H, W): odd planes, batch 1 and 5, channel counts that are not multiples of any block size.
SMALL_SHAPES = [(1, 3, 7, 9), (5, 19, 7, 9), (5, 19, 4, 5)]
# With the shrunk tuning below these planes (561 elements) take the split-reduction path.
SPLIT_SHAPES = [(1, 3, 33, 17), (5, 3, 33, 17)]
SHRUNK_TRITON = adain_mod.TritonTuning(single_pass_max=128, tile=64, chunk=128)



@pytest.fixture(params=FUSED)
def backend(request, monkeypatch):
    name = require_backend(request.param, monkeypatch)
    monkeypatch.setattr(adain_mod, "TRITON_TUNING", SHRUNK_TRITON)
    monkeypatch.setattr(adain_mod, "CUDA_SPLIT_THRESHOLD", 256)
    return name


def _inputs(shape, dtype, device, residual, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, c = shape[:2]
    # An offset mean and uneven scales per plane, so normalisation errors cannot hide.
    x = torch.randn(shape, generator=gen) * (0.5 + torch.rand(b, c, 1, 1, generator=gen) * 3) + 2.0
    w = torch.randn(b, c, generator=gen)
    bias = torch.randn(b, c, generator=gen)
    r = torch.randn(shape, generator=gen) if residual else None
    dy = torch.randn(shape, generator=gen)
    to = dict(device=device)
    return (x.to(dtype=dtype, **to), w.to(**to), bias.to(**to), None if r is None else r.to(dtype=dtype, **to),
            dy.to(dtype=dtype, **to))


def _assert_close(actual, expected, rel, what):
    expected = expected.float()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected, rtol=rel, atol=rel * max(scale, 1e-6),
                               msg=lambda m: f"{what}: {m}")


def _run_and_compare(backend, shape, relu, residual, dtype=torch.float32, fwd_tol=1e-5, grad_tol=1e-4):
    device = device_for(backend)
    x, w, b, r, dy = _inputs(shape, dtype, device, residual)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)] + (
        [r.detach().clone().requires_grad_()] if residual else [])
    y = adain(*leaves[:3], leaves[3] if residual else None, relu=relu, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape
    grads = torch.autograd.grad(y, leaves, dy)

    # The truth: the reference twin in fp32 on the same (possibly rounded) inputs.
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    y_ref = adain_reference(*ref_leaves[:3], ref_leaves[3] if residual else None, relu=relu)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy.float())

    _assert_close(y, y_ref, fwd_tol, f"{backend} forward")
    for name, g, g_ref in zip(("x", "weight", "bias", "residual"), grads, ref_grads):
        assert g.dtype == leaves[["x", "weight", "bias", "residual"].index(name)].dtype
        _assert_close(g, g_ref, grad_tol, f"{backend} grad {name}")


@pytest.mark.parametrize("shape", SMALL_SHAPES + SPLIT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_fp32_matches_reference(backend, shape, relu, residual):
    _run_and_compare(backend, shape, relu, residual)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(5, 19, 7, 9), (1, 3, 33, 17)], ids=lambda s: "x".join(map(str, s)))
def test_half_precision_matches_reference(backend, shape, dtype):
    _run_and_compare(backend, shape, relu=True, residual=True, dtype=dtype, fwd_tol=2e-2, grad_tol=2e-2)


def test_large_plane_with_several_chunks(backend, monkeypatch):
    # Default tuning: planes bigger than one CUDA chunk (8192) and one Triton chunk, split several ways.
    if backend == "triton" and not HAS_CUDA:
        monkeypatch.setattr(adain_mod, "TRITON_TUNING", adain_mod.TritonTuning(single_pass_max=512, tile=512,
                                                                               chunk=2048))
    else:
        monkeypatch.setattr(adain_mod, "TRITON_TUNING", adain_mod.TritonTuning())
    monkeypatch.setattr(adain_mod, "CUDA_SPLIT_THRESHOLD", 8192)
    _run_and_compare(backend, (1, 2, 131, 67), relu=True, residual=False)


def test_instance_norm_matches_torch(backend):
    x, *_ = _inputs((5, 19, 7, 9), torch.float32, device_for(backend), residual=False)
    for relu in (False, True):
        expected = F.instance_norm(x.float(), eps=1e-5)
        expected = F.relu(expected) if relu else expected
        _assert_close(instance_norm(x, relu=relu, backend=backend), expected, 1e-5, "instance_norm")
    leaf = x.clone().requires_grad_()
    dy = torch.randn_like(x)
    (g,) = torch.autograd.grad(instance_norm(leaf, relu=True, backend=backend), leaf, dy)
    ref_leaf = x.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(F.relu(F.instance_norm(ref_leaf, eps=1e-5)), ref_leaf, dy)
    _assert_close(g, g_ref, 1e-4, "instance_norm grad")


def test_instance_norm_with_residual(backend):
    """The encoder's residual blocks: instance norm, then + residual, forward and both gradients."""
    x, _, _, r, dy = _inputs((2, 19, 7, 9), torch.float32, device_for(backend), residual=True)
    leaf, res = x.clone().requires_grad_(), r.clone().requires_grad_()
    y = instance_norm(leaf, residual=res, backend=backend)
    ref_leaf, ref_res = x.clone().requires_grad_(), r.clone().requires_grad_()
    y_ref = F.instance_norm(ref_leaf, eps=1e-5) + ref_res
    _assert_close(y, y_ref.detach(), 1e-5, "instance_norm + residual")
    g, g_res = torch.autograd.grad(y, (leaf, res), dy)
    g_ref, g_res_ref = torch.autograd.grad(y_ref, (ref_leaf, ref_res), dy)
    _assert_close(g, g_ref, 1e-4, "grad x")
    _assert_close(g_res, g_res_ref, 1e-4, "grad residual")


def test_flat_weight_and_channels_last(backend):
    x, w, b, r, _ = _inputs((5, 3, 7, 9), torch.float32, device_for(backend), residual=True)
    expected = adain_reference(x, w, b, r, relu=True)
    got = adain(x.to(memory_format=torch.channels_last), w.reshape(-1), b.reshape(-1), r, relu=True, backend=backend)
    _assert_close(got, expected, 1e-5, "channels_last with (B*C,) affine")


# ----------------------------------------------------------------------------------------------------------------
# The reference twin


def test_reference_twin_agrees_with_instance_norm_and_float64_formula():
    x, w, b, r, _ = _inputs((5, 19, 7, 9), torch.float32, "cpu", residual=True)
    ones, zeros = torch.ones(5, 19), torch.zeros(5, 19)
    _assert_close(adain_reference(x, ones, zeros), F.instance_norm(x, eps=1e-5), 1e-6, "batch_norm view vs IN")
    _assert_close(instance_norm_reference(x, relu=True), F.relu(F.instance_norm(x, eps=1e-5)), 1e-6, "IN reference")
    xd = x.double()
    xhat = (xd - xd.mean((2, 3), keepdim=True)) / torch.sqrt(xd.var((2, 3), unbiased=False, keepdim=True) + 1e-5)
    manual = torch.relu(xhat * w.double()[..., None, None] + b.double()[..., None, None]) + r.double()
    _assert_close(adain_reference(x, w, b, r, relu=True), manual, 1e-5, "reference vs float64 formula")


def test_reference_twin_matches_the_reference_module():
    from council_fast.reference.networks import AdaptiveInstanceNorm2d
    x, w, b, _, _ = _inputs((5, 19, 7, 9), torch.float32, "cpu", residual=False)
    module = AdaptiveInstanceNorm2d(19)
    module.weight, module.bias = w.reshape(-1), b.reshape(-1)
    assert torch.equal(adain_reference(x, w, b), module(x))


def test_bad_inputs_name_the_problem():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="weight must hold B\\*C = 6"):
        adain(x, torch.ones(5), torch.zeros(6), backend="reference")
    with pytest.raises(ValueError, match="residual must match"):
        adain(x, torch.ones(6), torch.zeros(6), residual=torch.zeros(2, 3, 4, 5), backend="reference")
    with pytest.raises(ValueError, match="\\(B, C, H, W\\)"):
        adain(torch.randn(3, 4, 4), torch.ones(3), torch.zeros(3), backend="reference")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        instance_norm(torch.zeros(1, 1, 2, 2, dtype=torch.float64), backend="reference")


# ----------------------------------------------------------------------------------------------------------------
# Back-end choice


def test_explicitly_named_unavailable_backend_raises():
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(BackendUnavailable, match="cuda"):
        adain(x, torch.ones(1, 2), torch.zeros(1, 2), backend="cuda")
    with pytest.raises(ValueError, match="unknown back-end"):
        adain(x, torch.ones(1, 2), torch.zeros(1, 2), backend="fastest")


def test_auto_falls_back_with_one_warning_and_strict_raises(monkeypatch):
    monkeypatch.delenv("COUNCIL_FAST_BACKEND", raising=False)
    monkeypatch.delenv("COUNCIL_FAST_STRICT", raising=False)
    monkeypatch.setattr(registry, "why_unavailable", lambda name, device, op=None: None if name == "reference" else "test")
    monkeypatch.setattr(registry, "_warned", set())
    x, w, b, _, _ = _inputs((1, 3, 7, 9), torch.float32, "cpu", residual=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = adain(x, w, b)
        adain(x, w, b)
    fallbacks = [c for c in caught if "falling back to the reference" in str(c.message)]
    assert len(fallbacks) == 1, [str(c.message) for c in caught]
    assert torch.equal(first, adain_reference(x, w, b))
    monkeypatch.setenv("COUNCIL_FAST_STRICT", "1")
    with pytest.raises(BackendUnavailable, match="no fused back-end"):
        adain(x, w, b)


def test_environment_variable_picks_the_backend(monkeypatch):
    calls = []
    real = adain_mod.adain_reference
    monkeypatch.setattr(adain_mod, "adain_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("COUNCIL_FAST_BACKEND", "reference")
    x, w, b, _, _ = _inputs((1, 3, 7, 9), torch.float32, "cpu", residual=False)
    adain(x, w, b)
    assert calls == [1]


# ----------------------------------------------------------------------------------------------------------------
# torch.compile and the op registration


def test_compiles_fullgraph_with_gradients():
    torch._dynamo.reset()

    def block(x, w, b, r):
        return adain(x, w, b, r, relu=True, backend="cpu") * 2.0

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x, w, b, r, dy = _inputs((2, 3, 5, 7), torch.float32, "cpu", residual=True)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
    y = compiled(*leaves)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
    y_ref = adain_reference(*ref_leaves, relu=True) * 2.0
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy)
    _assert_close(y, y_ref, 1e-5, "compiled forward")
    for g, g_ref in zip(grads, ref_grads):
        _assert_close(g, g_ref, 1e-4, "compiled grad")


def test_opcheck_custom_ops():
    x, w, b, r, dy = _inputs((2, 3, 5, 7), torch.float32, "cpu", residual=True)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), r.requires_grad_(), True, 1e-5, "cpu")
    torch.library.opcheck(torch.ops.council_fast.adain.default, args)
    _, mean, rstd = torch.ops.council_fast.adain(x.detach(), w.detach(), b.detach(), None, True, 1e-5, "cpu")
    torch.library.opcheck(torch.ops.council_fast.adain_backward.default,
                          (dy, x.detach(), w.detach(), b.detach(), mean, rstd, True, "cpu"))


def test_empty_batch(backend):
    x, w, b, _, _ = _inputs((0, 3, 4, 5), torch.float32, device_for(backend), residual=False)
    leaf = x.requires_grad_()
    y = adain(leaf, w, b, relu=True, backend=backend)
    assert y.shape == (0, 3, 4, 5)
    y.sum().backward()
    assert leaf.grad.shape == x.shape
