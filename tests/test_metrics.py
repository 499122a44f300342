"""FID / KID formulas and the FID Inception-v3 network."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _inception import random_inception_state, save_random_inception
from council_fast.metrics import (FIDInceptionV3, InceptionWeightsError, fid_from_features, frechet_distance,
                                  kid_from_features, load_inception, mmd2_unbiased)
from council_fast.metrics.evaluate import quantize_8bit

# ---------------------------------------------------------------------------------------------- FID


def _fid_reference(a: np.ndarray, b: np.ndarray) -> float:
    """The formula in float64 by another route: Tr((S_a S_b)^1/2) = sum of sqrt(eigenvalues of S_a S_b),
    whose eigenvalues are real and >= 0 for covariance matrices."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a = (a - mu_a).T @ (a - mu_a) / (len(a) - 1)
    s_b = (b - mu_b).T @ (b - mu_b) / (len(b) - 1)
    eig = np.linalg.eigvals(s_a @ s_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.sum(np.sqrt(np.clip(eig, 0, None))))


def _exact_sample(mu: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n points whose sample mean and (N - 1) sample covariance are exactly mu and cov."""
    z = np.random.default_rng(seed).standard_normal((n, len(mu)))
    z -= z.mean(0)
    white = np.linalg.cholesky(np.cov(z, rowvar=False))
    z = np.linalg.solve(white, z.T).T  # sample covariance I
    return z @ np.linalg.cholesky(cov).T + mu


def test_fid_matches_a_float64_reference_of_the_formula():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((60, 8)) @ rng.standard_normal((8, 8))
    b = rng.standard_normal((50, 8)) * 1.7 + 0.3
    expected = _fid_reference(a, b)
    assert expected > 1.0
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-9)
    assert fid_from_features(a.astype(np.float32), b) == pytest.approx(_fid_reference(a.astype(np.float32), b),
                                                                       rel=1e-9)


@pytest.mark.parametrize("n_a, n_b, d", [(60, 50, 8), (5, 7, 12), (20, 20, 20)])
def test_fid_methods_agree_with_scipy_sqrtm(n_a, n_b, d):
    """The singular values of A^T B, the symmetric eigendecompositions and scipy.linalg.sqrtm of the product
    (pytorch-fid's computation) give the same FID, also with fewer images than dimensions (rank-deficient
    covariances; there sqrtm and the eigendecompositions carry ~1e-9 of rounding the SVD does not)."""
    rng = np.random.default_rng(n_a)
    a, b = rng.standard_normal((n_a, d)) @ rng.standard_normal((d, d)), rng.standard_normal((n_b, d)) + 0.2
    expected = _fid_reference(a, b)
    rel = 1e-9 if min(n_a, n_b) > d else 1e-6
    for method in ("auto", "svd", "eigh", "sqrtm"):
        assert fid_from_features(a, b, method=method) == pytest.approx(expected, rel=rel), method


def test_fid_of_identical_sets_is_zero():
    a = np.random.default_rng(1).standard_normal((40, 16))
    for method in ("svd", "eigh", "sqrtm"):
        assert abs(fid_from_features(a, a.copy(), method=method)) < 1e-9 * np.trace(np.cov(a, rowvar=False))


def test_fid_of_gaussians_in_closed_form_diagonal_and_commuting():
    rng = np.random.default_rng(2)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    # diagonal covariances
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(closed, rel=1e-10)
    # commuting, non-diagonal: the same eigenvalues in a shared random orthonormal basis
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s1, s2 = q @ np.diag(v1) @ q.T, q @ np.diag(v2) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-10)
    assert frechet_distance(mu1, s1, mu2, s2, method="sqrtm") == pytest.approx(closed, rel=1e-10)
    # from features whose sample statistics are exactly those Gaussians'
    a, b = _exact_sample(mu1, s1, 40, seed=3), _exact_sample(mu2, s2, 55, seed=4)
    for method in ("svd", "eigh", "sqrtm"):
        assert fid_from_features(a, b, method=method) == pytest.approx(closed, rel=1e-9), method


def test_fid_rejects_bad_features():
    with pytest.raises(ValueError, match="feature sizes differ"):
        fid_from_features(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        fid_from_features(np.full((4, 3), np.nan), np.zeros((4, 3)))


# ---------------------------------------------------------------------------------------------- KID


def _k(x, y):
    return (float(np.dot(x, y)) / len(x) + 1.0) ** 3


def _mmd2_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 written out as the double sums of its definition (float64)."""
    m = len(x)
    pairs = [(i, j) for i, j in itertools.product(range(m), repeat=2) if i != j]
    xx = sum(_k(x[i], x[j]) for i, j in pairs) / (m * (m - 1))
    yy = sum(_k(y[i], y[j]) for i, j in pairs) / (m * (m - 1))
    xy = sum(_k(x[i], y[j]) for i, j in itertools.product(range(m), repeat=2)) / (m * m)
    return xx + yy - 2 * xy


def test_mmd2_matches_the_double_sums_of_its_definition():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((7, 5)), rng.standard_normal((7, 5)) + 0.5
    assert mmd2_unbiased(x, y) == pytest.approx(_mmd2_reference(x, y), rel=1e-12)


def test_kid_with_whole_sets_as_subsets_is_the_full_statistic():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((12, 4)), rng.standard_normal((12, 4)) * 2
    kid = kid_from_features(x, y, subsets=5, subset_size=1000)  # capped at 12: every subset is the whole set
    assert kid.subset_size == 12 and kid.subsets == 5
    assert kid.mean == pytest.approx(_mmd2_reference(x, y), rel=1e-12)
    assert kid.std < 1e-12 * abs(kid.mean)


def test_kid_is_unbiased_over_random_subsets():
    """The mean over random subsets estimates the whole-population U-statistic (an unbiased estimator's
    expectation over subsets drawn without replacement); the V-statistic (diagonals included) would be
    off by far more than the tolerance, so a biased implementation fails here. Fixed seed: deterministic."""
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((60, 3)), rng.standard_normal((60, 3)) * 1.2
    population = mmd2_unbiased(x, y)
    subsets, m = 3000, 10
    kid = kid_from_features(x, y, subsets=subsets, subset_size=m, seed=0)
    tolerance = 4 * kid.std / np.sqrt(subsets)
    assert abs(kid.mean - population) < tolerance
    kxx, kyy = (x @ x.T / 3 + 1) ** 3, (y @ y.T / 3 + 1) ** 3
    bias_of_v_statistic = (np.trace(kxx) + np.trace(kyy)) / len(x) / m - (kxx.sum() + kyy.sum()) / len(x) ** 2 / m
    assert abs(bias_of_v_statistic) > 3 * tolerance


def test_kid_of_one_distribution_is_near_zero_and_of_two_is_not():
    rng = np.random.default_rng(8)
    a, b, c = rng.standard_normal((200, 8)), rng.standard_normal((200, 8)), rng.standard_normal((200, 8)) + 1
    same, other = kid_from_features(a, b, subsets=50, subset_size=100), kid_from_features(a, c, subsets=50,
                                                                                          subset_size=100)
    assert abs(same.mean) < 3 * same.std
    assert other.mean > 10 * other.std > 0


# ---------------------------------------------------------------------------------------------- network


def test_inception_has_the_fid_weights_file_layout():
    """94 conv + batch-norm units (6 entries each) and fc. torchvision's Inception-v3 has 27,161,264
    parameters with its auxiliary classifier (3,326,696) and 1000 classes; the FID file has no auxiliary
    classifier and 1008 classes (+16,392): 23,850,960."""
    model = FIDInceptionV3()
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    assert len(sd) == 94 * 6 + 2 and not any(k.startswith("AuxLogits") for k in sd)
    shapes = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
              "Mixed_6a.branch3x3dbl_3.conv.weight": (96, 96, 3, 3), "Mixed_6e.branch7x7dbl_5.conv.weight":
              (192, 192, 1, 7), "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
              "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1), "Mixed_7c.branch_pool.bn.running_var":
              (192,), "fc.weight": (1008, 2048), "fc.bias": (1008,)}
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


def test_inception_pooling_quirks():
    """The FID graph's pools: A/C/7b average without counting the padding, 7c a 3x3 max pool."""
    model = FIDInceptionV3()
    model.load_state_dict(random_inception_state(1))
    seen = {}

    def keep(name):
        def hook(module, inputs, *output):
            seen.setdefault(name, []).append(inputs[0])  # returns None: the forward is unchanged
        return hook

    for name in ("Mixed_5b", "Mixed_6b", "Mixed_7b", "Mixed_7c"):
        block = getattr(model, name)
        block.register_forward_pre_hook(keep(name))
        block.branch_pool.register_forward_hook(keep(name))
    with torch.inference_mode():
        model.pool3(torch.rand(1, 3, 80, 80) * 2 - 1)
    for name in ("Mixed_5b", "Mixed_6b", "Mixed_7b"):
        x, pooled = seen[name]
        assert torch.equal(pooled, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)), name
        assert not torch.allclose(pooled, F.avg_pool2d(x, 3, 1, 1, count_include_pad=True)), name
    x, pooled = seen["Mixed_7c"]
    assert torch.equal(pooled, F.max_pool2d(x, 3, 1, 1))


def test_inception_fp32_matches_its_float64_twin(tmp_path):
    path = save_random_inception(tmp_path / "w.pth", seed=2)
    m32, m64 = load_inception(path), load_inception(path, dtype=torch.float64)
    x = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.inference_mode():
        a, b = m32.features(x), m64.features(x.double())
    assert a.shape == (2, 2048) and a.dtype == torch.float32
    assert b.std() > 0.1 and (a[0] - a[1]).abs().max() > 1e-3  # not degenerate: the comparison means something
    assert ((a.double() - b).norm() / b.norm()).item() < 1e-5


def test_inception_resizes_and_normalises_as_pytorch_fid(tmp_path):
    """[-1, 1] images -> [0, 1] -> bilinear 299x299 (align_corners=False, no antialias) -> 2x - 1."""
    model = load_inception(save_random_inception(tmp_path / "w.pth", seed=4))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    unit = F.interpolate((x + 1) / 2, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.inference_mode():
        torch.testing.assert_close(model.features(x), model.pool3(2 * unit - 1), rtol=1e-6, atol=1e-6)


def test_quantize_8bit_is_what_a_png_holds():
    from council_fast.images import pil_to_tensor, tensor_to_pil
    x = torch.rand(3, 9, 7) * 2.4 - 1.2
    assert torch.equal(quantize_8bit(x), pil_to_tensor(tensor_to_pil(x)))


# ---------------------------------------------------------------------------------------------- weights file


@pytest.mark.parametrize("batches_tracked", [True, False])
def test_weights_file_round_trip(tmp_path, batches_tracked):
    state = random_inception_state(5, batches_tracked)
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    loaded = load_inception(path).state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_weights_file_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(InceptionWeightsError, match="--inception-weights"):
        load_inception(None)
    with pytest.raises(InceptionWeightsError, match="no such file"):
        load_inception(tmp_path / "absent.pth")
    state = random_inception_state(6)
    wrong = dict(state, **{"Mixed_6c.branch7x7_2.conv.weight": torch.zeros(160, 160, 7, 1)})
    torch.save(wrong, tmp_path / "shape.pth")
    with pytest.raises(InceptionWeightsError, match=r"shape\.pth: key 'Mixed_6c\.branch7x7_2\.conv\.weight'"):
        load_inception(tmp_path / "shape.pth")
    missing = {k: v for k, v in state.items() if k != "Mixed_7b.branch1x1.bn.running_mean"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(InceptionWeightsError, match=r"missing\.pth.*Mixed_7b\.branch1x1\.bn\.running_mean"):
        load_inception(tmp_path / "missing.pth")
    torch.save(dict(state, **{"AuxLogits.fc.weight": torch.zeros(1)}), tmp_path / "extra.pth")
    with pytest.raises(InceptionWeightsError, match="unexpected key.*AuxLogits"):
        load_inception(tmp_path / "extra.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InceptionWeightsError, match=r"junk\.pth: cannot be read"):
        load_inception(tmp_path / "junk.pth")
