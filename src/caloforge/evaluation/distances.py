"""Fréchet and kernel physics distances (FPD, KPD) and precision/recall/density/coverage.

FPD and KPD follow exactly the JetNet 0.2 definitions that the official CaloChallenge
``evaluate.py`` calls (``fpd(ref, gen, min_samples=10000)``, ``kpd(ref, gen,
batch_size=10000)``); JetNet itself is not a dependency (it pulls coffea and energyflow):

* both scale every feature of both samples by the reference's max |x| (features that are 0
  throughout keep scale 1);
* FPD: the Fréchet distance between Gaussian fits, ||mu1 - mu2||^2 +
  Tr(S1 + S2 - 2 (S1 S2)^(1/2)), averaged over 20 pairs of batches drawn with replacement
  at each of 10 sizes regular in 1/N from 10,000 to 50,000, then fitted linearly in 1/N with
  intercept and slope bounded >= 0; the value is the intercept (N -> infinity), the error
  its fit error;
* KPD: the unbiased squared maximum mean discrepancy with the polynomial kernel
  k(x, y) = (x . y / d + 1)^4 on 10 pairs of batches of 10,000 drawn with replacement
  (batch i from ``default_rng(seed + 1000 i)``); the median and half the 16.275-83.725 %
  inter-percentile range.

With the same seed (42, JetNet's default) the batches are the ones JetNet draws. Callers
quote both x 10^3, as published.

PRDC (Naeem et al. 2020, the ``prdc`` package's definitions): with r_k(x) the distance of
x to its k-th nearest neighbour in its own sample, precision = share of generated points
inside some reference ball, recall = share of reference points inside some generated ball,
density = mean number of reference balls holding a generated point / k, coverage = share of
reference balls holding a generated point.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

from ..errors import CaloforgeError

FPD_DEFINITION = {"source": "jetnet 0.2 fpd", "scaling": "reference max |x|",
                  "min_samples": 10_000, "max_samples": 50_000, "batches": 20, "points": 10,
                  "fit": "linear in 1/N, intercept and slope >= 0", "seed": 42}
KPD_DEFINITION = {"source": "jetnet 0.2 kpd", "scaling": "reference max |x|",
                  "kernel": "(x.y/d + 1)^4", "batch_size": 10_000, "batches": 10,
                  "summary": "median +- half the 16.275-83.725 % range", "seed": 42}


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2)."""
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a constant feature makes the product singular: JetNet
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # silences this (disp=False)
        covmean = linalg.sqrtm(cov1 @ cov2)
        if not np.isfinite(covmean).all():  # regularise as JetNet does
            offset = np.eye(len(cov1)) * eps
            covmean = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def scale_by_reference_max(reference: np.ndarray, generated: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Both samples ``(N, d)`` divided by the reference's per-feature max |x| (JetNet)."""
    maxes = np.max(np.abs(reference), axis=0)
    maxes[maxes == 0] = 1
    return reference / maxes, generated / maxes


def _check_features(reference: np.ndarray, generated: np.ndarray, what: str) -> None:
    if reference.ndim != 2 or generated.ndim != 2 or reference.shape[1] != generated.shape[1]:
        raise CaloforgeError(f"{what} needs two (N, d) feature arrays with the same d, got "
                             f"{reference.shape} and {generated.shape}")
    if min(len(reference), len(generated)) < 2:
        raise CaloforgeError(f"{what} needs at least 2 showers per sample")


def fpd(reference: np.ndarray, generated: np.ndarray, min_samples: int = 10_000,
        max_samples: int = 50_000, n_batches: int = 20, n_points: int = 10,
        normalise: bool = True, seed: int = 42) -> tuple[float, float]:
    """FPD extrapolated to infinite N and its fit error (JetNet's ``fpd``), features
    ``(N1, d)`` and ``(N2, d)``."""
    from scipy.optimize import curve_fit

    _check_features(reference, generated, "FPD")
    x, y = (scale_by_reference_max(reference, generated) if normalise
            else (reference, generated))
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    # regular intervals in 1/N
    sizes = (1 / np.linspace(1.0 / min_samples, 1.0 / max_samples, n_points)).astype("int32")
    rng = np.random.default_rng(seed)
    values = []
    for size in sizes:
        batch = []
        for _ in range(n_batches):
            a = x[rng.choice(len(x), size=size)]
            b = y[rng.choice(len(y), size=size)]
            batch.append(frechet_distance(a.mean(axis=0), np.atleast_2d(np.cov(a, rowvar=False)),
                                          b.mean(axis=0), np.atleast_2d(np.cov(b, rowvar=False))))
        values.append(np.mean(batch))
    params, covariance = curve_fit(lambda n_inv, intercept, slope: intercept + slope * n_inv,
                                   1 / sizes, values, bounds=([0, 0], [np.inf, np.inf]))
    return float(params[0]), float(np.sqrt(np.diag(covariance)[0]))


def mmd_poly_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 4,
                      block: int = 1024) -> float:
    """Unbiased MMD^2 of ``(m, d)`` and ``(n, d)`` with the kernel (x.y/d + 1)^degree.

    The kernel matrices are summed block by block in float64 (torch, in place), never held
    whole: three 10,000 x 10,000 matrices would be 2.4 GB. The self terms sum only the blocks
    on and above the diagonal (the matrices are symmetric).
    """
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float64))
    gamma = 1.0 / x.shape[1]

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        k = (a @ b.T).mul_(gamma).add_(1.0)
        if degree == 4:  # two squarings: 3x faster than pow on a CPU
            return k.square_().square_()
        return k.pow_(degree)

    def cross_sum(a: torch.Tensor, b: torch.Tensor) -> float:
        return sum(float(kernel(a[s:s + block], b).sum()) for s in range(0, len(a), block))

    def self_term(a: torch.Tensor) -> float:
        m, total = len(a), 0.0
        for s in range(0, m, block):
            k = kernel(a[s:s + block], a[s:])  # the diagonal block, then the blocks right of it
            size = min(block, m - s)
            diagonal_block = k[:, :size]
            total += float(diagonal_block.sum() - diagonal_block.diagonal().sum())
            total += 2 * float(k[:, size:].sum())
        return total / (m * (m - 1))

    m, n = len(xt), len(yt)
    return self_term(xt) + self_term(yt) - 2 * cross_sum(xt, yt) / (m * n)


def kpd(reference: np.ndarray, generated: np.ndarray, n_batches: int = 10,
        batch_size: int = 10_000, normalise: bool = True, seed: int = 42
        ) -> tuple[float, float]:
    """KPD: median over batches of the unbiased MMD^2 and half the 16.275-83.725 % range
    (JetNet's ``kpd``), features ``(N1, d)`` and ``(N2, d)``."""
    from scipy.stats import iqr

    _check_features(reference, generated, "KPD")
    x, y = (scale_by_reference_max(reference, generated) if normalise
            else (reference, generated))
    values = []
    for i in range(n_batches):
        rng = np.random.default_rng(seed + i * 1000)
        a = x[rng.choice(len(x), size=batch_size)]
        b = y[rng.choice(len(y), size=batch_size)]
        values.append(mmd_poly_unbiased(a, b))
    return float(np.median(values)), float(iqr(values, rng=(16.275, 83.725)) / 2)


def prdc(reference: np.ndarray, generated: np.ndarray, nearest_k: int = 5,
         block: int = 1024) -> dict[str, float]:
    """Precision, recall, density and coverage of ``generated`` ``(M, d)`` against
    ``reference`` ``(N, d)`` (Euclidean distances, blocks of ``block`` rows in float64)."""
    import torch

    _check_features(reference, generated, "PRDC")
    if min(len(reference), len(generated)) <= nearest_k:
        raise CaloforgeError(f"PRDC with k = {nearest_k} needs more than {nearest_k} showers "
                             "per sample")
    real = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float64))
    fake = torch.from_numpy(np.ascontiguousarray(generated, dtype=np.float64))

    def kth_neighbour_radii(a: torch.Tensor) -> torch.Tensor:
        # the (k+1)-th smallest distance: the point itself is the first
        return torch.cat([torch.cdist(a[s:s + block], a).kthvalue(nearest_k + 1, dim=1).values
                          for s in range(0, len(a), block)])

    real_radii, fake_radii = kth_neighbour_radii(real), kth_neighbour_radii(fake)
    balls_holding = torch.zeros(len(fake), dtype=torch.float64)  # reference balls per fake
    recalled = torch.zeros(len(real), dtype=torch.bool)
    covered = torch.zeros(len(real), dtype=torch.bool)
    for s in range(0, len(real), block):
        distances = torch.cdist(real[s:s + block], fake)  # (b, M)
        inside_real = distances < real_radii[s:s + block, None]
        balls_holding += inside_real.sum(dim=0)
        recalled[s:s + block] = (distances < fake_radii[None, :]).any(dim=1)
        covered[s:s + block] = distances.min(dim=1).values < real_radii[s:s + block]
    return {"precision": float((balls_holding > 0).double().mean()),
            "recall": float(recalled.double().mean()),
            "density": float(balls_holding.mean() / nearest_k),
            "coverage": float(covered.double().mean())}

