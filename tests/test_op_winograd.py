"""Winograd F(4x4, 3x3) convolution (cpu back-end) against F.conv2d: forward, every gradient, edge tiles."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from council_fast.ops import winograd
from council_fast.ops.winograd import conv3x3, conv3x3_reference, matrices, winograd_applies


@pytest.fixture(autouse=True)
def _small_layers_use_winograd(monkeypatch):
    monkeypatch.setattr(winograd, "WINOGRAD_MIN_CHANNELS", 1)


def _assert_close(actual, expected, tol, what):
    scale = max(expected.abs().max().item(), 1e-6)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an element left unwritten?)"
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x {scale:.3g}"


def _operands(batch, c_in, c_out, height, width, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, height, width, generator=gen)
    w = torch.randn(c_out, c_in, 3, 3, generator=gen) * (9 * c_in) ** -0.5
    b = torch.randn(c_out, generator=gen) * 0.1 if bias else None
    return x, w, b


def test_transform_matrices_are_exact():
    """A^T [(G g G^T) . (B^T d B)] A is the 4x4 'valid' correlation of a 6x6 tile d with a 3x3 g (float64)."""
    bt, at, g = matrices()
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        d = torch.randn(6, 6, generator=gen, dtype=torch.float64)
        k = torch.randn(3, 3, generator=gen, dtype=torch.float64)
        y = at @ ((g @ k @ g.T) * (bt @ d @ bt.T)) @ at.T
        expected = F.conv2d(d[None, None], k[None, None])[0, 0]
        assert torch.allclose(y, expected, rtol=0, atol=1e-12)


CASES = [  # batch, c_in, c_out, height, width: odd sizes, edge tiles, planes smaller than a tile, > 16 tiles a
    # row, output channels not a multiple of the GEMM's 8 rows, several 32-tile GEMM column blocks (2x81 tiles)
    (1, 5, 7, 13, 11), (5, 3, 19, 7, 9), (2, 17, 4, 1, 1), (1, 6, 6, 3, 70), (3, 16, 16, 8, 8), (1, 33, 65, 30, 2),
    (2, 8, 9, 33, 35), (5, 4, 3, 13, 15),  # the last: 16 tiles a sample, 40-tile chunks: 2 + 2 + 1 samples
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_{}to{}_{}x{}".format(*c))
def test_forward_and_gradients(case, monkeypatch):
    monkeypatch.setattr(winograd, "MAX_TILES_PER_CHUNK", 40)  # several chunks for the batched cases
    x, w, b = _operands(*case)
    assert winograd_applies(x, w)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y = conv3x3(xs, ws, bs)
    y_ref = conv3x3_reference(xr, wr, br)
    assert y.shape == y_ref.shape
    _assert_close(y, y_ref.detach(), 1e-5, "out")
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * grad).sum().backward()
    (y_ref * grad).sum().backward()
    for name, got, want in (("x", xs.grad, xr.grad), ("weight", ws.grad, wr.grad), ("bias", bs.grad, br.grad)):
        _assert_close(got, want, 1e-4, f"grad {name}")


def test_without_bias_and_anime_width():
    x, w, _ = _operands(1, 256, 256, 16, 16, bias=False)
    _assert_close(conv3x3(x, w), conv3x3_reference(x, w), 1e-5, "out")


def test_is_not_the_direct_convolution():
    """The fast path runs (and rounds differently); with it switched off the result is F.conv2d's exactly."""
    x, w, b = _operands(1, 32, 32, 12, 12)
    assert not torch.equal(conv3x3(x, w, b), conv3x3_reference(x, w, b))
    assert torch.equal(conv3x3(x.double(), w.double(), b.double()), conv3x3_reference(x.double(), w.double(),
                                                                                      b.double()))


def test_applies_only_to_wide_fp32_cpu_layers(monkeypatch):
    monkeypatch.setattr(winograd, "WINOGRAD_MIN_CHANNELS", 128)
    x, w, _ = _operands(1, 128, 128, 4, 4)
    assert winograd_applies(x, w)
    assert not winograd_applies(x[:, :64], w[:, :64])
    assert not winograd_applies(x.bfloat16(), w.bfloat16())
    assert not winograd_applies(x[:0], w)
    assert not winograd_applies(x, w[:, :, :2, :2])


def test_weight_update_invalidates_the_cached_transform():
    x, w, b = _operands(1, 8, 8, 9, 9)
    first = conv3x3(x, w, b)
    with torch.no_grad():
        w.mul_(2.0)
    _assert_close(conv3x3(x, w, b) - b.view(1, -1, 1, 1), 2.0 * (first - b.view(1, -1, 1, 1)), 1e-5, "updated")


def test_data_assignment_invalidates_and_clear_cache_covers_in_place_data_writes():
    x, w, b = _operands(1, 8, 8, 9, 9)
    conv3x3(x, w, b)
    w.data = w.data * 3.0  # new storage: seen
    _assert_close(conv3x3(x, w, b), conv3x3_reference(x, w, b), 1e-5, "after .data =")
    w.data.mul_(0.5)  # in place through .data: the version counter does not move...
    winograd.clear_cache()  # ...so the documented remedy is needed
    _assert_close(conv3x3(x, w, b), conv3x3_reference(x, w, b), 1e-5, "after clear_cache")


def test_opcheck_custom_op():
    x, w, b = _operands(2, 3, 4, 5, 6)
    transformed = winograd.transform_weight(w)
    torch.library.opcheck(torch.ops.council_fast.conv3x3_winograd.default,
                          (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), transformed, "cpu"))


def test_weights_made_under_inference_mode():
    """Inference tensors have no version counter: they are transformed afresh rather than cached."""
    with torch.inference_mode():
        x, w, b = _operands(1, 8, 8, 9, 9)
        first = conv3x3(x, w, b)
        w.mul_(2.0)
        _assert_close(conv3x3(x, w, b), conv3x3_reference(x, w, b), 1e-5, "after an in-place update")
        assert not torch.equal(first, conv3x3(x, w, b))


def test_views_of_one_parameter_share_the_cached_transform():
    # The lowered generators pass a fresh view of each parameter (unsqueeze, reshape, member slice)
    # on every call: those views must hit the cache, and an update of the parameter must miss it.
    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(2, 8, 8, 3, 3))
    first = winograd._cached_transform(stacked.reshape(16, 8, 3, 3)[:8])
    assert winograd._cached_transform(stacked.reshape(16, 8, 3, 3)[:8]) is first
    second_member = winograd._cached_transform(stacked.reshape(16, 8, 3, 3)[8:])
    assert second_member is not first
    torch.testing.assert_close(second_member, winograd.transform_weight(stacked[1].detach()), rtol=0, atol=0)
    with torch.no_grad():
        stacked.mul_(2.0)
    updated = winograd._cached_transform(stacked.reshape(16, 8, 3, 3)[:8])
    torch.testing.assert_close(updated, winograd.transform_weight(stacked[0].detach()), rtol=0, atol=0)


def test_cache_entries_go_with_their_parameter():
    weight = torch.nn.Parameter(torch.randn(8, 8, 3, 3))
    winograd._cached_transform(weight.unsqueeze(0).reshape(8, 8, 3, 3))
    key = id(weight)
    assert key in winograd._weight_cache
    del weight
    assert key not in winograd._weight_cache
