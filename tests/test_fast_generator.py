"""FastGenerator (fused kernels) against the reference AdaINGen on the same weights, on every back-end here.

Forward (image and masks) and gradients with respect to the input image, the style code and every
parameter. The CPU extension must build and, under TRITON_INTERPRET=1, Triton must run: those fail rather
than skip; cuda needs a GPU.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from council_fast import lowering as fast_generator_mod
from council_fast.lowering import FastGenerator
from council_fast.ops import registry
from council_fast.ops import adain as adain_mod
from council_fast.ops import winograd as winograd_mod
from council_fast.ops.registry import BackendUnavailable
from council_fast.reference.networks import AdaINGen, Conv2dBlock
from _backends import CPU_AND_CUDA, FUSED, HAS_CUDA, device_for, require_backend

BACKENDS = ["reference", *FUSED]



@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    name = require_backend(request.param, monkeypatch)
    return name


def _tiny_params(tiny_config):
    return dict(tiny_config["gen"])


def _odd_params(tiny_config):
    """One down-sampling step, two residual blocks, 6 channels, one mask: other loop counts and sizes."""
    return dict(tiny_config["gen"], dim=6, mlp_dim=10, style_dim=5, n_downsample=1, n_res=2,
                num_of_mask_dim_to_add=1)


def _reference(params, seed=0):
    torch.manual_seed(seed)
    gen = AdaINGen(3, params)
    with torch.no_grad():  # non-zero biases everywhere (the official init leaves them 0)
        for name, p in gen.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return gen


def _biases_cancelled_by_a_norm(gen):
    """Conv biases right before an instance norm / AdaIN: their true gradient is exactly 0."""
    return {f"{name}.conv.bias" for name, m in gen.named_modules() if isinstance(m, Conv2dBlock) and m.norm is not None}


def _assert_close(actual, expected, tol, what, scale=None):
    expected = expected.detach().float()
    scale = max(expected.abs().max().item() if scale is None else scale, 1e-6)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.detach().float() - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x {scale:.3g}"


def _compare(params, backend, batch, height, width, dtype=torch.float32, tol=1e-5, grad_tol=1e-4):
    device = device_for(backend)
    ref = _reference(params).to(device)
    fast = FastGenerator.from_reference(ref, backend=backend).to(dtype)
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(batch, 3, height, width, generator=gen) * 2 - 1).to(device)
    z = torch.randn(batch, params["style_dim"], 1, 1, generator=gen).to(device)
    x_ref, z_ref = x.clone().requires_grad_(), z.clone().requires_grad_()
    x_fast, z_fast = x.to(dtype).requires_grad_(), z.to(dtype).requires_grad_()

    content, _ = ref.encode(x_ref)  # the official flow
    out_ref, masks_ref = ref.decode(content, z_ref, x_ref, return_mask=True)
    out, masks = fast.translate(x_fast, z_fast, return_mask=True)
    assert out.dtype == dtype and out.shape == out_ref.shape and masks.shape == masks_ref.shape
    _assert_close(out, out_ref, tol, "out")
    _assert_close(masks, masks_ref, tol, "masks")

    g = torch.randn(out_ref.shape, generator=gen).to(device)
    (out_ref * g).sum().backward()
    (out * g.to(dtype)).sum().backward()
    _assert_close(x_fast.grad, x_ref.grad, grad_tol, "grad image")
    _assert_close(z_fast.grad, z_ref.grad, grad_tol, "grad style")
    fast_params = dict(fast.named_parameters())
    ref_params = dict(ref.named_parameters())
    cancelled = _biases_cancelled_by_a_norm(ref)
    checked = 0
    for name, p in ref_params.items():
        if name.startswith("enc_style."):  # translation never uses the style encoder
            assert fast_params[name].grad is None
            continue
        fast_grad = fast_params[name].grad
        assert fast_grad is not None, f"no gradient reached {name}"
        if name in cancelled:  # exactly 0 in exact arithmetic: both must be rounding noise
            weight_scale = ref_params[name[:-len("bias")] + "weight"].grad.abs().max().item()
            _assert_close(fast_grad, torch.zeros_like(p.grad), grad_tol, f"grad {name}", scale=weight_scale)
            _assert_close(p.grad, torch.zeros_like(p.grad), grad_tol, f"reference grad {name}", scale=weight_scale)
        else:
            _assert_close(fast_grad, p.grad, grad_tol, f"grad {name}")
        checked += 1
    assert checked == sum(1 for n in ref_params if not n.startswith("enc_style."))


def test_tiny_config(backend, tiny_config):
    size = (16, 16) if backend == "triton" and not HAS_CUDA else (20, 28)
    _compare(_tiny_params(tiny_config), backend, 2, *size)


def test_odd_config(backend, tiny_config):
    size = (16, 18) if backend == "triton" and not HAS_CUDA else (18, 22)
    _compare(_odd_params(tiny_config), backend, 1, *size)


@pytest.mark.parametrize("params_of, size", [(_tiny_params, (20, 28)), (_odd_params, (18, 22))], ids=["tiny", "odd"])
def test_winograd_convs_cpu(params_of, size, tiny_config, monkeypatch):
    """With every zero-padded 3x3 conv on the Winograd path (normally only the >= 128-channel ones),
    the generator still meets the fp32 tolerances, forward and backward."""
    require_backend("cpu")
    monkeypatch.setattr(winograd_mod, "WINOGRAD_MIN_CHANNELS", 1)
    calls = []
    real = winograd_mod.conv3x3
    monkeypatch.setattr(fast_generator_mod, "winograd_conv3x3", lambda *a: calls.append(1) or real(*a))
    _compare(params_of(tiny_config), "cpu", 2, *size)
    assert len(calls) >= 2 * params_of(tiny_config)["n_res"] * 2  # encoder and decoder residual convs


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_half_precision_cpu(dtype, tiny_config):
    """bf16 parameters and activations (statistics in fp32) stay within 2e-2 of the fp32 reference."""
    params = _tiny_params(tiny_config)
    ref = _reference(params)
    fast = FastGenerator.from_reference(ref, backend="cpu").to(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    z = torch.randn(2, params["style_dim"], 1, 1, generator=gen)
    with torch.no_grad():
        out = fast.translate(x, z)
        out_ref = ref.translate(x, z)
    assert out.dtype == dtype
    _assert_close(out, out_ref, 2e-2, "bf16 out")


def test_state_dict_matches_reference(tiny_config):
    params = _tiny_params(tiny_config)
    ref = _reference(params)
    fast = FastGenerator(3, params)
    ref_sd, fast_sd = ref.state_dict(), fast.state_dict()
    assert list(ref_sd) == list(fast_sd)
    assert all(ref_sd[k].shape == fast_sd[k].shape for k in ref_sd)
    assert any(k.endswith("running_mean") for k in fast_sd) and any(k.startswith("enc_style.") for k in fast_sd)
    fast.load_state_dict(ref_sd, strict=True)
    for (name, a), b in zip(fast_sd.items(), ref_sd.values()):
        assert torch.equal(a, b), name


def test_encode_and_forward_match_reference(tiny_config):
    params = _tiny_params(tiny_config)
    ref = _reference(params)
    fast = FastGenerator.from_reference(ref, backend="cpu")
    x = torch.rand(2, 3, 16, 20) * 2 - 1
    z = torch.randn(2, params["style_dim"], 1, 1)
    with torch.no_grad():
        content, style = fast.encode(x)
        ref_content, ref_style = ref.encode(x)
        _assert_close(content, ref_content, 1e-5, "content")
        torch.testing.assert_close(style, ref_style, rtol=0, atol=0)  # same torch modules
        _assert_close(fast(x, z), ref(x, z), 1e-5, "forward")
        _assert_close(fast.decode(content, z, x), ref.decode(ref_content, z, x), 1e-5, "decode")


def test_backend_choice(monkeypatch, tiny_config):
    params = _tiny_params(tiny_config)
    ref = _reference(params)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    z = torch.randn(1, params["style_dim"], 1, 1)
    with torch.no_grad():
        expected = ref.translate(x, z)
        fast = FastGenerator.from_reference(ref, backend="bogus")
        with pytest.raises(ValueError, match="bogus"):
            fast.translate(x, z)

        # COUNCIL_FAST_BACKEND picks the back-end when the constructor leaves it open.
        fast = FastGenerator.from_reference(ref)
        monkeypatch.setenv("COUNCIL_FAST_BACKEND", "reference")
        assert fast.kernel_backend_for(x) == "reference"
        _assert_close(fast.translate(x, z), expected, 1e-5, "env reference")
        monkeypatch.setenv("COUNCIL_FAST_BACKEND", "cpu")
        assert fast.kernel_backend_for(x) == "cpu"
        _assert_close(fast.translate(x, z), expected, 1e-5, "env cpu")
        monkeypatch.delenv("COUNCIL_FAST_BACKEND")

        # auto without any fused back-end: one warning and the reference; strict mode raises instead.
        monkeypatch.setattr(registry, "why_unavailable",
                            lambda name, device, op=None: None if name == "reference" else "disabled by the test")
        monkeypatch.setattr(registry, "_warned", set())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            auto = FastGenerator.from_reference(ref, backend="auto")
            _assert_close(auto.translate(x, z), expected, 1e-5, "auto fallback")
            assert auto.kernel_backend_for(x) == "reference"
        assert any("falling back to the reference" in str(w.message) for w in caught)
        with pytest.raises(BackendUnavailable):
            FastGenerator.from_reference(ref, backend="auto", strict=True).translate(x, z)
        monkeypatch.setenv("COUNCIL_FAST_STRICT", "1")
        with pytest.raises(BackendUnavailable):
            FastGenerator.from_reference(ref).translate(x, z)
        # An explicitly named back-end that cannot run is always an error.
        monkeypatch.delenv("COUNCIL_FAST_STRICT")
        with pytest.raises(BackendUnavailable, match="disabled by the test"):
            FastGenerator.from_reference(ref, backend="cpu").translate(x, z)


def test_from_reference_copies(tiny_config):
    ref = _reference(_tiny_params(tiny_config))
    fast = FastGenerator.from_reference(ref)
    with torch.no_grad():
        next(fast.parameters()).add_(1.0)
    assert not torch.equal(next(fast.parameters()), next(ref.parameters()))
    assert copy.deepcopy(fast).backend == fast.backend


def test_upsample_conv_equals_upsample_then_conv():
    """Four 2x2 phase convs on the small image == nearest 2x upsample + 3x3 conv (exact in float64)."""
    from council_fast.ops.upsample_conv import upsample2x_conv3x3, upsample2x_conv3x3_reference
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    out, ref = upsample2x_conv3x3(x, w, b), upsample2x_conv3x3_reference(x, w, b)
    assert out.shape == (2, 3, 8, 14)
    _assert_close(out, ref, 1e-12, "upsample conv")
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    for got, want, name in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g), "xwb"):
        _assert_close(got, want, 1e-12, f"upsample conv grad {name}")
    cl = x.detach().float().contiguous(memory_format=torch.channels_last)
    _assert_close(upsample2x_conv3x3(cl, w.detach().float(), b.detach().float()),
                  upsample2x_conv3x3_reference(cl, w.detach().float(), b.detach().float()), 1e-6, "channels_last")
    with pytest.raises(ValueError, match="3, 3"):
        upsample2x_conv3x3(x, w[:, :, :2], b)


@pytest.mark.parametrize("options", [dict(channels_last=True), dict(upsample_conv=False)],
                         ids=["channels_last", "plain_upsample"])
def test_optional_paths(options, tiny_config):
    params = _tiny_params(tiny_config)
    ref = _reference(params)
    fast = FastGenerator.from_reference(ref, backend="cpu")
    for key, value in options.items():
        setattr(fast, key, value)
    x = torch.rand(2, 3, 20, 24) * 2 - 1
    z = torch.randn(2, params["style_dim"], 1, 1)
    with torch.no_grad():
        _assert_close(fast.translate(x, z), ref.translate(x, z), 1e-5, f"translate {options}")


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype,tol,grad_tol", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 2e-2, 2e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("affine,relu,residual", [(True, True, False), (False, False, True), (True, False, True)])
@pytest.mark.parametrize("batch,channels,height,width", [(1, 5, 7, 3), (3, 19, 5, 9)])
def test_channels_last_norm(device, dtype, tol, grad_tol, affine, relu, residual, batch, channels, height, width):
    """The NHWC norm of the channels-last mode against the NCHW reference twins: output stays NHWC."""
    gen = torch.Generator().manual_seed(batch * 100 + channels)

    def make(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)

    x = make(batch, channels, height, width, scale=2.0, shift=0.5).contiguous(memory_format=torch.channels_last)
    weight = make(batch, channels, scale=0.5, shift=1.0) if affine else None
    bias = make(batch, channels, scale=0.3) if affine else None
    res = make(batch, channels, height, width).contiguous(memory_format=torch.channels_last) if residual else None
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias, res)]
    ref_leaves = [t.detach().float().requires_grad_() if t is not None else None for t in (x, weight, bias, res)]
    out = fast_generator_mod.channels_last_norm(leaves[0], leaves[1], leaves[2], relu, leaves[3])
    if affine:
        expected = adain_mod.adain_reference(ref_leaves[0], ref_leaves[1], ref_leaves[2], ref_leaves[3], relu)
    else:
        expected = adain_mod.instance_norm_reference(ref_leaves[0], relu, residual=ref_leaves[3])
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    _assert_close(out, expected, tol, "output")
    grad = torch.randn(out.shape, generator=gen).to(device)
    out.backward(grad.to(dtype))
    expected.backward(grad)
    for name, mine, theirs in zip(("x", "weight", "bias", "residual"), leaves, ref_leaves):
        if mine is not None:
            _assert_close(mine.grad, theirs.grad, grad_tol, f"grad {name}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="the GPU case needs a CUDA device; this machine has none")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_channels_last_mode_on_the_gpu(backend, tiny_config):
    require_backend(backend)
    params = _tiny_params(tiny_config)
    ref = _reference(params).cuda()
    fast = FastGenerator.from_reference(ref, backend=backend, channels_last=True)
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(2, 3, 20, 24, generator=gen) * 2 - 1).cuda()
    z = torch.randn(2, params["style_dim"], 1, 1, generator=gen).cuda()
    with torch.no_grad():
        _assert_close(fast.translate(x, z), ref.translate(x, z), 1e-5, "translate channels_last")


def test_anime_width_uses_winograd_by_default(monkeypatch):
    """The published config's widths (256-channel residual blocks) take the Winograd path with the default
    thresholds; the translation stays within the fp32 tolerance of the reference."""
    from council_fast.config import packaged_config

    require_backend("cpu")
    params = packaged_config("selfie2anime")["gen"]
    ref = _reference(params).eval()
    fast = FastGenerator.from_reference(ref, backend="cpu").eval()
    calls = []
    real = winograd_mod.conv3x3
    monkeypatch.setattr(fast_generator_mod, "winograd_conv3x3", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    z = torch.randn(1, params["style_dim"], 1, 1, generator=gen)
    with torch.no_grad():
        out, masks = fast.translate(x, z, return_mask=True)
        out_ref, masks_ref = ref.translate(x, z, return_mask=True)
    assert len(calls) == 4 * params["n_res"] + 1  # residual convs of encoder and decoder, the 128-channel conv
    _assert_close(out, out_ref, 1e-5, "out")
    _assert_close(masks, masks_ref, 1e-5, "masks")

    # The generator passes a fresh view of each weight per call: the Winograd transforms must still come
    # from the cache after the first call (re-transforming them doubled a 256x256 CPU translation's time).
    transforms = []
    real_transform = winograd_mod.transform_weight
    monkeypatch.setattr(winograd_mod, "transform_weight", lambda w: transforms.append(1) or real_transform(w))
    with torch.no_grad():
        again = fast.translate(x, z)
    assert transforms == [] and torch.equal(again, out)
