"""Fréchet and kernel physics distances (FPD, KPD) between feature samples.

Same definitions as the JetNet implementation the CaloChallenge used (not a dependency:
it pulls in ~80 packages):

* FPD: the Fréchet distance between Gaussian fits, ||mu1 - mu2||^2 +
  Tr(S1 + S2 - 2 (S1 S2)^(1/2)), computed on random subsets of several sizes N and
  extrapolated linearly in 1/N to infinite sample size (removes the finite-sample bias).
* KPD: the unbiased squared maximum mean discrepancy with the cubic polynomial kernel
  k(x, y) = (x . y / d + 1)^3, over batches; the median and half the inter-quartile range.

Callers multiply by 10^3 to quote them as published.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

from ..errors import CaloforgeError


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray
                     ) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2)."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():  # singular product: regularise as JetNet does
        offset = np.eye(len(cov1)) * 1e-6
        covmean = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def _gaussian_fd(x: np.ndarray, y: np.ndarray) -> float:
    return frechet_distance(x.mean(0), np.atleast_2d(np.cov(x, rowvar=False)),
                            y.mean(0), np.atleast_2d(np.cov(y, rowvar=False)))


def fpd(reference: np.ndarray, generated: np.ndarray, n_points: int = 8, n_batches: int = 10,
        max_samples: int = 50_000, seed: int = 0) -> tuple[float, float]:
    """FPD extrapolated to infinite N, and its standard error from the linear fit."""
    n_max = min(len(reference), len(generated), max_samples)
    if n_max < 20:
        raise CaloforgeError(f"FPD needs at least 20 showers per sample, got {n_max}")
    rng = np.random.default_rng(seed)
    sizes = np.linspace(max(n_max // 2, 10), n_max, n_points).astype(int)
    values = []
    for n in sizes:
        batch = [_gaussian_fd(reference[rng.choice(len(reference), n, replace=False)],
                              generated[rng.choice(len(generated), n, replace=False)])
                 for _ in range(n_batches)]
        values.append(np.mean(batch))
    design = np.stack([np.ones(len(sizes)), 1.0 / sizes], axis=1)
    coefficients, residuals, *_ = np.linalg.lstsq(design, np.array(values), rcond=None)
    fitted = design @ coefficients
    dof = max(len(sizes) - 2, 1)
    sigma2 = float(np.sum((np.array(values) - fitted) ** 2) / dof)
    covariance = sigma2 * np.linalg.inv(design.T @ design)
    return float(coefficients[0]), float(np.sqrt(covariance[0, 0]))


def _mmd_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                 + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())


def kpd(reference: np.ndarray, generated: np.ndarray, n_batches: int = 10,
        batch_size: int = 5000, seed: int = 0) -> tuple[float, float]:
    """KPD: median over batches of the unbiased MMD^2 and half the inter-quartile range."""
    # batches of at most half the smaller sample, so that they differ from each other
    size = min(batch_size, min(len(reference), len(generated)) // 2)
    if size < 10:
        raise CaloforgeError(f"KPD needs at least 10 showers per sample, got {size}")
    rng = np.random.default_rng(seed)
    values = np.array([_mmd_unbiased(reference[rng.choice(len(reference), size, replace=False)],
                                     generated[rng.choice(len(generated), size, replace=False)])
                       for _ in range(n_batches)])
    q1, q3 = np.percentile(values, [25, 75])
    return float(np.median(values)), float((q3 - q1) / 2)
