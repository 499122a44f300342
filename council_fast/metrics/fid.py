"""FID and KID from Inception features, computed as the common tools compute them.

FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to the two feature sets,
``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, in float64. The common tools take the matrix
square root with ``scipy.linalg.sqrtm`` (a Schur decomposition of the non-symmetric product, minutes
for 2048-d features on a small CPU); only its trace enters FID, and that trace is computed here
exactly, without the non-symmetric root: with ``S_a = A A^T`` (A the centred features over sqrt(N - 1)),
the eigenvalues of ``S_a S_b`` are the squared singular values of ``A^T B``, so
``Tr((S_a S_b)^(1/2))`` is the sum of the singular values of ``A^T B`` (an N_a x N_b matrix: fast when
there are fewer images than feature dimensions), or, from covariances,
``sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))`` (symmetric eigendecompositions). ``method="sqrtm"`` runs the
common tools' computation instead (needs scipy; the tests check the three agree).

KID (Binkowski et al. 2018): the unbiased estimate of the squared MMD with the cubic polynomial kernel
``k(x, y) = (x.y / d + 1)^3``, averaged over ``subsets`` random subsets of ``subset_size`` features drawn
without replacement from each set (as the official TF code, torch-fidelity and clean-fid do); the mean
and the standard deviation over the subsets are reported. When a set holds fewer than ``subset_size``
features the subsets take all of the smaller set's size (``KID.subset_size`` says what was used).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["KID", "fid_from_features", "frechet_distance", "gaussian_stats", "kid_from_features", "mmd2_unbiased"]


class KID(NamedTuple):
    mean: float
    std: float
    subsets: int
    subset_size: int


def _features(a, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected an (N, D) array of features, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: features hold NaN or infinite values")
    return arr


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N - 1) covariance of (N, D) features, float64."""
    f = _features(features, "features")
    if f.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _trace_sqrt_sqrtm(sigma_a: np.ndarray, sigma_b: np.ndarray, eps: float) -> float:
    """pytorch-fid's way: scipy's sqrtm of the product; eps * I added to both when it is not finite."""
    try:
        from scipy import linalg  # optional: only this cross-check method needs scipy
    except ImportError:
        raise ValueError("method='sqrtm' needs scipy (pip install scipy); the default method does not") from None
    root = linalg.sqrtm(sigma_a @ sigma_b)
    if not np.all(np.isfinite(root)):  # singular product: shift both covariances by eps * I
        offset = np.eye(sigma_a.shape[0]) * eps
        root = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(root):
        largest = np.max(np.abs(np.diagonal(root).imag))
        if largest > 1e-3:
            raise ValueError(f"matrix square root has an imaginary component of {largest:g}")
        root = root.real
    return float(np.trace(root))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt_eigh(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """Tr((S_a S_b)^1/2) = sum of sqrt(eigenvalues of S_a^1/2 S_b S_a^1/2), a symmetric PSD matrix."""
    root_a = _psd_sqrt(sigma_a)
    eig = np.linalg.eigvalsh(root_a @ sigma_b @ root_a)
    return float(np.sum(np.sqrt(np.clip(eig, 0, None))))


def frechet_distance(mu_a, sigma_a, mu_b, sigma_b, method: str = "eigh", eps: float = 1e-6) -> float:
    """Frechet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b); ``method``: "eigh" or "sqrtm"."""
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != mu_a.shape * 2:
        raise ValueError(f"mismatched statistics: means {mu_a.shape} / {mu_b.shape}, "
                         f"covariances {sigma_a.shape} / {sigma_b.shape}")
    if method not in ("eigh", "sqrtm"):
        raise ValueError(f"method must be 'eigh' or 'sqrtm', not {method!r}")
    diff = mu_a - mu_b
    trace_root = (_trace_sqrt_eigh(sigma_a, sigma_b) if method == "eigh"
                  else _trace_sqrt_sqrtm(sigma_a, sigma_b, eps))
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_root)


def _centred(f: np.ndarray) -> np.ndarray:
    """Features minus their mean, over sqrt(N - 1): ``C^T C`` is the (N - 1) covariance."""
    return (f - f.mean(axis=0)) / np.sqrt(f.shape[0] - 1)


def fid_from_features(a, b, method: str = "auto") -> float:
    """FID between two (N, D) feature sets (e.g. 2048-d Inception pool3 features).

    ``method``: "auto" (singular values of A^T B when both sets have fewer vectors than dimensions,
    else "eigh"), "svd", "eigh", or "sqrtm" (scipy.linalg.sqrtm, as pytorch-fid)."""
    a, b = _features(a, "a"), _features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if method == "auto":
        method = "svd" if max(a.shape[0], b.shape[0]) <= a.shape[1] else "eigh"
    if method != "svd":
        return frechet_distance(*gaussian_stats(a), *gaussian_stats(b), method=method)
    if min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"FID needs at least 2 feature vectors per set, got {a.shape[0]} and {b.shape[0]}")
    ca, cb = _centred(a), _centred(b)
    diff = a.mean(axis=0) - b.mean(axis=0)
    trace_root = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    return float(diff @ diff + np.sum(ca * ca) + np.sum(cb * cb) - 2.0 * trace_root)


def _cubic_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
    """Unbiased squared MMD between two equal-size samples with the cubic polynomial kernel."""
    x, y = _features(x, "x"), _features(y, "y")
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise ValueError(f"mmd2_unbiased needs two samples of the same size >= 2, got {x.shape[0]} and {y.shape[0]}")
    k_xx, k_yy, k_xy = _cubic_kernel(x, x), _cubic_kernel(y, y), _cubic_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kid_from_features(a, b, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> KID:
    """KID between two (N, D) feature sets: mean and std of the unbiased MMD^2 over random subsets."""
    a, b = _features(a, "a"), _features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be at least 1, got {subsets}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {a.shape[0]} and {b.shape[0]}")
    rng = np.random.default_rng(seed)
    values = np.array([mmd2_unbiased(a[rng.choice(a.shape[0], m, replace=False)],
                                     b[rng.choice(b.shape[0], m, replace=False)]) for _ in range(subsets)])
    return KID(float(values.mean()), float(values.std()), subsets, m)
