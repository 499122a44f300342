"""pytest-benchmark suite: the reference generator and the fused ops at small sizes.

The plain ``pytest`` of the README collects it with ``--benchmark-disable`` (pyproject.toml), so CI
runs each case once as a correctness check. For timings::

    pytest benchmarks --benchmark-enable --benchmark-only      # GPU: real sizes via the variables below

Sizes come from COUNCIL_FAST_BENCH_BATCH / COUNCIL_FAST_BENCH_SIZE (default 2 and 32, the tiny
config). Back-ends: reference, triton and the C++ extension of the device (cpu or cuda).
"""
from __future__ import annotations

import os

import pytest
import torch

from council_fast.config import packaged_config
from council_fast.ops import _backend
from council_fast.reference.networks import AdaINGen, blend_with_masks

BATCH = int(os.environ.get("COUNCIL_FAST_BENCH_BATCH", "2"))
SIZE = int(os.environ.get("COUNCIL_FAST_BENCH_SIZE", "32"))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CONFIG = packaged_config(os.environ.get("COUNCIL_FAST_BENCH_CONFIG", "tiny"))


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _backends() -> list:
    params = [pytest.param("reference", id="reference")]
    for name in ("triton", DEVICE.type):
        reason = _backend._why_unavailable(name, DEVICE)
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return params


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    return AdaINGen(CONFIG["input_dim_b"], CONFIG["gen"]).to(DEVICE).eval()


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    x = torch.rand(BATCH, CONFIG["input_dim_b"], SIZE, SIZE, device=DEVICE) * 2 - 1
    z = torch.randn(BATCH, CONFIG["gen"]["style_dim"], 1, 1, device=DEVICE)
    return x, z


def test_reference_translate(benchmark, generator, batch):
    x, z = batch

    def run():
        with torch.inference_mode():
            out = generator.translate(x, z)
        _sync()
        return out
    out = benchmark(run)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_fused_generator_translate(benchmark, generator, batch):
    fast_generator = pytest.importorskip("council_fast.lowering")
    fused = fast_generator.FastGenerator(CONFIG["input_dim_b"], CONFIG["gen"])
    fused.load_state_dict(generator.state_dict())
    fused = fused.to(DEVICE).eval()
    x, z = batch

    def run():
        with torch.inference_mode():
            out = fused.translate(x, z)
        _sync()
        return out
    out = benchmark(run)
    with torch.inference_mode():
        want = generator.translate(x, z)
    assert torch.allclose(out, want, rtol=1e-4, atol=1e-4)


def _adain_inputs(requires_grad: bool):
    torch.manual_seed(2)
    c = CONFIG["gen"]["dim"] * 2 ** CONFIG["gen"]["n_downsample"]
    low = SIZE // 2 ** CONFIG["gen"]["n_downsample"]
    x = torch.randn(BATCH, c, low, low, device=DEVICE, requires_grad=requires_grad)
    w = torch.randn(BATCH, c, device=DEVICE, requires_grad=requires_grad)
    b = torch.randn(BATCH, c, device=DEVICE, requires_grad=requires_grad)
    return x, w, b


@pytest.mark.parametrize("backend", _backends())
def test_adain_relu_forward(benchmark, backend):
    adain = pytest.importorskip("council_fast.ops.adain")
    x, w, b = _adain_inputs(False)

    def run():
        out = adain.adain(x, w, b, relu=True, backend=backend)
        _sync()
        return out
    out = benchmark(run)
    assert torch.allclose(out, adain.adain_reference(x, w, b, relu=True), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", _backends())
def test_adain_relu_forward_backward(benchmark, backend):
    adain = pytest.importorskip("council_fast.ops.adain")
    x, w, b = _adain_inputs(True)

    def run():
        for t in (x, w, b):
            t.grad = None
        adain.adain(x, w, b, relu=True, backend=backend).square().mean().backward()
        _sync()
        return x.grad
    grad = benchmark(run)
    x2, w2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    adain.adain_reference(x2, w2, b2, relu=True).square().mean().backward()
    assert torch.allclose(grad, x2.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("backend", _backends())
def test_decoder_tail_forward(benchmark, generator, batch, backend):
    tail = pytest.importorskip("council_fast.ops.decoder_tail")
    dim, masks = CONFIG["gen"]["dim"], CONFIG["gen"]["num_of_mask_dim_to_add"]
    convs = [block.conv for block in list(generator.dec.model)[-3:]]
    weights = [t.detach() for conv in convs for t in (conv.weight, conv.bias)]
    torch.manual_seed(3)
    h = torch.randn(BATCH, dim, SIZE, SIZE, device=DEVICE).relu()
    images = batch[0]

    def run():
        out = tail.decoder_tail(h, *weights, images, masks, backend=backend)
        _sync()
        return out
    out, _ = benchmark(run)
    with torch.no_grad():
        raw = torch.nn.Sequential(*list(generator.dec.model)[-3:])(h)
        want, _ = blend_with_masks(raw, images, masks)
    assert torch.allclose(out, want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="Winograd convs are the cpu back-end's (cuDNN picks its own)")
@pytest.mark.parametrize("engine", ["direct", "winograd"])
def test_residual_conv3x3_forward(benchmark, engine):
    """The residual blocks' 3x3 conv at 256 channels (the anime config's width)."""
    winograd = pytest.importorskip("council_fast.ops.winograd")
    torch.manual_seed(4)
    low = max(4, SIZE // 4)
    x = torch.randn(BATCH, 256, low, low)
    w = torch.randn(256, 256, 3, 3) / 48
    b = torch.randn(256)
    conv = winograd.conv3x3 if engine == "winograd" else winograd.conv3x3_reference
    out = benchmark(lambda: conv(x, w, b))
    want = winograd.conv3x3_reference(x, w, b)
    assert (out - want).abs().max() <= 1e-5 * want.abs().max()
