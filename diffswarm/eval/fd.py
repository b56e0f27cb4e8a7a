"""Frechet distance between two feature sets (the FID formula of Heusel et al. 2017, Eq. 6).

    FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))

with the numerical handling of pytorch-fid's ``calculate_frechet_distance``: if the matrix
square root is not finite (here also: does not square back to the product), retry with eps*I
added to both covariances; drop the imaginary part
that round-off leaves in the square root. Here the features come from the small classifier of
:mod:`diffswarm.eval.classifier`, not Inception, so the numbers are comparable only with each other.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, float64."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrtm(m: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(m)


def frechet_distance_from_stats(
    mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b); means (D,), covariances (D, D)."""
    mu_a, mu_b = np.atleast_1d(mu_a), np.atleast_1d(mu_b)
    sigma_a, sigma_b = np.atleast_2d(sigma_a), np.atleast_2d(sigma_b)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != mu_a.shape * 2:
        raise ValueError(
            f"mismatched statistics: means {mu_a.shape} / {mu_b.shape}, covariances {sigma_a.shape} / {sigma_b.shape}"
        )
    diff = mu_a - mu_b
    # 1. Square root of the product; singular products (N < D, constant features) can make it
    #    non-finite or inaccurate, so retry with a small ridge as pytorch-fid does.
    #    Dead ReLU units give zero-variance features, hence singular covariances: scipy warns about
    #    those, but the root is still usable, so we check it ourselves (finite, squares back).
    prod = sigma_a @ sigma_b
    covmean = _sqrtm(prod)
    residual = np.abs(covmean @ covmean - prod).max() if np.isfinite(covmean).all() else np.inf
    if residual > 1e-4 * max(1.0, np.abs(prod).max()):
        offset = np.eye(len(sigma_a)) * eps
        covmean = _sqrtm((sigma_a + offset) @ (sigma_b + offset))
    # 2. Round-off leaves a small imaginary component; the true root of a product of PSD matrices is real.
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    fd = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean)
    return float(max(fd, 0.0))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to (N_a, D) and (N_b, D) feature sets."""
    mu_a, sigma_a = gaussian_stats(feats_a)
    mu_b, sigma_b = gaussian_stats(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    return frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b, eps=eps)
