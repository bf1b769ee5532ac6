"""Set-to-set distances of feature vectors: Fréchet distance (FID / FVD) and kernel inception distance (KID).

Both take features (N, D) of two sets, whatever network made them (InceptionV3 pool3 for images and
video frames, a video network for FVD).

FID = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)), in float64. The trace of the matrix
square root is computed through eigenvalues: tr((S_a S_b)^(1/2)) = sum_i sqrt(lambda_i), lambda_i the
eigenvalues of the symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2) (similar to S_a S_b). With fewer
samples than dimensions the covariances are rank-deficient; a general ``sqrtm`` then returns complex
noise, while ``eigh`` of a symmetric matrix stays real and its tiny negative eigenvalues are clipped to 0.

KID is the unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3, averaged over
random subsets (the torchmetrics / torch-fidelity convention: subset size 1000, 100 subsets). The estimator
is Bińkowski et al.'s (and torchmetrics', clean-fid's, torch-fidelity's): for subsets x, y of m samples each,
sum_{i != j} (k(x_i, x_j) + k(y_i, y_j)) / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2 -- K_xy's diagonal
included, since x_i and y_i are independent draws. Each subset draws the two sets' samples independently
(first ``a``'s permutation, then ``b``'s, as torchmetrics does for real then fake); the std is over subsets
with the 1/n normaliser, as torchmetrics reports it (``std(unbiased=False)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FeatureStats:
    """Mean (D,) and covariance (D, D), float64, of N feature vectors."""

    mean: Tensor
    cov: Tensor
    n: int


def feature_stats(features: Tensor) -> FeatureStats:
    """features (N, D), N >= 2 -> their float64 mean and unbiased covariance."""
    assert features.dim() == 2 and features.shape[0] >= 2, f"need (N >= 2, D) features, got {tuple(features.shape)}"
    f = features.detach().to("cpu", torch.float64)
    mean = f.mean(0)
    centred = f - mean
    return FeatureStats(mean, centred.T @ centred / (f.shape[0] - 1), f.shape[0])


def _clip_noise(w: Tensor) -> Tensor:
    """Eigenvalues (D,) of a PSD matrix with those below its numerical rank tolerance (D eps max|w|, as
    ``matrix_rank``) set to 0: in a rank-deficient covariance they are rounding noise, and their square
    roots (~1e-7 each, not ~1e-14) would add up in the trace."""
    tol = w.shape[-1] * torch.finfo(w.dtype).eps * w.abs().max()
    return torch.where(w > tol, w, torch.zeros_like(w))


def _psd_sqrt(m: Tensor) -> Tensor:
    """Square root of a symmetric PSD matrix (D, D) through its eigendecomposition; noise eigenvalues zeroed."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * _clip_noise(w).sqrt()) @ v.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (>= 0, float64)."""
    assert a.mean.shape == b.mean.shape, (a.mean.shape, b.mean.shape)
    root_a = _psd_sqrt(a.cov)
    inner = root_a @ b.cov @ root_a  # (D, D) symmetric PSD, eigenvalues those of S_a S_b
    eig = _clip_noise(torch.linalg.eigvalsh((inner + inner.T) / 2))
    diff = a.mean - b.mean
    fd = diff @ diff + torch.trace(a.cov) + torch.trace(b.cov) - 2 * eig.sqrt().sum()
    return max(float(fd), 0.0)


def fid_from_features(a: Tensor, b: Tensor) -> float:
    """a (N, D), b (M, D) -> Fréchet distance of their fitted Gaussians."""
    return frechet_distance(feature_stats(a), feature_stats(b))


def _poly_mmd2(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 of x (m, D), y (m, D) under k(x, y) = (x.y / D + 1)^3: K_xx's and K_yy's diagonals left
    out, K_xy's kept (module doc)."""
    m, d = x.shape
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    off = lambda k: (k.sum() - k.diagonal().sum()) / (m * (m - 1))  # noqa: E731
    return off(kxx) + off(kyy) - 2 * kxy.sum() / (m * m)


def kid_from_features(a: Tensor, b: Tensor, subset_size: int = 1000, subsets: int = 100,
                      seed: int = 0) -> tuple[float, float]:
    """a (N, D), b (M, D) -> (mean, std) of the polynomial-kernel MMD^2 over ``subsets`` random subsets of
    min(subset_size, N, M) samples each (float64; a fixed seed, so the same sets give the same answer; the std
    with the 1/n normaliser, as torchmetrics)."""
    assert a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1], (a.shape, b.shape)
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got {a.shape[0]} and {b.shape[0]}")
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        ia = torch.randperm(a.shape[0], generator=g)[:m]
        ib = torch.randperm(b.shape[0], generator=g)[:m]
        vals.append(_poly_mmd2(a[ia], b[ib]))
    vals = torch.stack(vals)
    return float(vals.mean()), float(vals.std(unbiased=False))
