"""The op registry (council_fast.ops.registry): back-end resolution, strict mode, the one fallback warning,
output poisoning, fake implementations and autograd wiring, checked on the real ops and on toy ops
registered here (one of them deliberately leaves an element unwritten)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from council_fast.ops import adain as adain_mod  # noqa: F401 - registers the real ops
from council_fast.ops import decoder_tail as tail_mod  # noqa: F401
from council_fast.ops import registry, winograd  # noqa: F401
from council_fast.ops.registry import BackendUnavailable, FusedOp


def _double_reference(x):
    return 2 * x


def _double_outputs(alloc, x):
    return alloc.new(x.shape, x.dtype, x.device)


def _double_forward(x, y):
    torch.mul(x, 2, out=y)


def _double_backward(grad_y, grad_x):
    torch.mul(grad_y, 2, out=grad_x)


def _forgetful_forward(x, y):
    """Leaves the last element unwritten, as a kernel with an off-by-one grid would."""
    y.view(-1)[:-1] = 2 * x.reshape(-1)[:-1]


def _setup_context(ctx, inputs, output):
    ctx.backend = inputs[-1]


def _backward(ctx, grad_y):
    return TOY.backward(grad_y.contiguous(), ctx.backend), None


TOY = FusedOp("test_registry_double", _double_reference, schema="(Tensor x) -> Tensor", outputs=_double_outputs,
              backward_schema="(Tensor grad_y) -> Tensor", backward_outputs=_double_outputs)
TOY.register("cpu", _double_forward, _double_backward)
TOY.autograd(_backward, _setup_context)
FORGETFUL = FusedOp("test_registry_forgetful", _double_reference, schema="(Tensor x) -> Tensor",
                    outputs=_double_outputs)
FORGETFUL.register("cpu", _forgetful_forward)


@pytest.fixture
def availability(monkeypatch):
    """Sets which back-ends are available (by name, for every device); clears the warned-once memory."""
    monkeypatch.delenv("COUNCIL_FAST_BACKEND", raising=False)
    monkeypatch.delenv("COUNCIL_FAST_STRICT", raising=False)
    monkeypatch.setattr(registry, "_warned", set())

    def set_available(*names):
        monkeypatch.setattr(registry, "why_unavailable",
                            lambda name, device, op=None: None if name in names + ("reference",) else f"no {name}")
    return set_available


def test_every_real_op_is_registered_with_its_backends():
    assert set(registry.OPS["adain"].impls) == {"cpu", "triton", "cuda"}
    assert set(registry.OPS["decoder_tail"].impls) == {"cpu", "triton", "cuda"}
    assert set(registry.OPS["conv3x3_winograd"].impls) == {"cpu"}
    assert registry.OPS["adain"].reference is adain_mod.adain_reference
    assert "has no triton implementation" in registry.why_unavailable("triton", "cpu", "conv3x3_winograd")


def test_auto_takes_the_fastest_available(availability):
    availability("cuda", "triton", "cpu")
    assert registry.resolve_backend(None, "cuda") == "cuda"
    assert registry.resolve_backend("auto", "cpu") == "cpu"
    availability("triton", "cpu")
    assert registry.resolve_backend(None, "cuda") == "triton"


def test_fallback_warns_once_and_strict_mode_raises(availability, monkeypatch):
    availability()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert registry.resolve_backend(None, "cpu") == "reference"
        assert registry.resolve_backend(None, "cpu") == "reference"
    assert [str(w.message) for w in caught] == [
        "council-fast: no fused back-end for cpu (cpu: no cpu); falling back to the reference back-end"]
    with pytest.raises(BackendUnavailable, match="no fused back-end for cuda"):
        registry.resolve_backend(None, "cuda", strict=True)
    monkeypatch.setenv("COUNCIL_FAST_STRICT", "1")
    with pytest.raises(BackendUnavailable, match="no fused back-end for cpu"):
        registry.resolve_backend(None, "cpu")
    assert registry.resolve_backend(None, "cpu", strict=False) == "reference"  # the argument wins


def test_an_explicit_backend_that_cannot_run_is_an_error(availability, monkeypatch):
    availability("cpu")
    for strict in (None, False, True):
        with pytest.raises(BackendUnavailable, match="back-end 'triton' is unavailable: no triton"):
            registry.resolve_backend("triton", "cpu", strict)
    monkeypatch.setenv("COUNCIL_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="back-end 'cuda' is unavailable"):
        registry.resolve_backend(None, "cpu", strict=False)
    assert registry.resolve_backend("reference", "cpu") == "reference"
    with pytest.raises(ValueError, match="unknown back-end 'fastest'"):
        registry.resolve_backend("fastest", "cpu")


def test_an_op_without_the_backend_is_unavailable_for_it():
    with pytest.raises(BackendUnavailable, match="test_registry_forgetful has no triton implementation"):
        registry.resolve_backend("triton", "cpu", op="test_registry_forgetful")
    with pytest.raises(BackendUnavailable, match="has no 'triton' implementation"):
        FORGETFUL.forward(torch.ones(3), "triton")


def test_poisoning_catches_an_element_left_unwritten():
    x = torch.randn(4, 5)
    with registry.poisoned_outputs():
        good = TOY.forward(x, "cpu")
        bad = FORGETFUL.forward(x, "cpu")
    assert torch.equal(good, 2 * x)
    assert torch.equal(bad.view(-1)[:-1], 2 * x.view(-1)[:-1]) and bad.view(-1)[-1].isnan()
    with registry.poisoned_outputs(False):
        assert not registry.poisoning()
    assert registry.poisoning()  # conftest.py turns it on for every test


def test_fake_implementations_give_the_output_shapes():
    with FakeTensorMode():
        x = torch.empty(2, 3, 5, 7)
        w = torch.empty(2, 3)
        y, mean, rstd = torch.ops.council_fast.adain(x, w, w, None, True, 1e-5, "cpu")
        assert (y.shape, mean.shape, rstd.dtype) == (x.shape, w.shape, torch.float32)
        dx, dw, db = torch.ops.council_fast.adain_backward(x, x, w, w, w, w, False, "cpu")
        assert (dx.shape, dw.shape, db.shape) == (x.shape, w.shape, w.shape)
        h, images = torch.empty(2, 8, 5, 6), torch.empty(2, 3, 5, 6)
        weights = [torch.empty(8, 8), torch.empty(8), torch.empty(8, 8), torch.empty(8), torch.empty(8, 8),
                   torch.empty(8)]
        out, masks = torch.ops.council_fast.decoder_tail(h, *weights, images, 2, "triton")
        assert (out.shape, masks.shape) == ((2, 3, 5, 6), (2, 2, 5, 6))
        conv = torch.ops.council_fast.conv3x3_winograd(torch.empty(1, 4, 9, 10), torch.empty(6, 4, 3, 3), None,
                                                       torch.empty(36, 1, 4, 8), "cpu")
        assert conv.shape == (1, 6, 9, 10)


def test_toy_op_passes_opcheck_and_compiles_with_gradients():
    x = torch.randn(3, 4, requires_grad=True)
    torch.library.opcheck(TOY.forward, (x, "cpu"))
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: TOY.forward(t, "cpu") * 3, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(y, 6 * x) and torch.equal(grad, torch.full_like(x, 6.0))


def test_a_second_registration_of_a_name_is_refused():
    with pytest.raises(ValueError, match="registered already"):
        FusedOp("adain", adain_mod.adain_reference, schema="(Tensor x) -> Tensor", outputs=_double_outputs)
    with pytest.raises(ValueError, match="unknown fused back-end"):
        TOY.register("reference", _double_forward, _double_backward)
    with pytest.raises(ValueError, match="needs a backward exactly when"):
        TOY.register("cpu", _double_forward)
