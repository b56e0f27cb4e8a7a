"""Expert-data alignment diagnostics (see :mod:`diffswarm.eval.diagnostics` for the conventions).

Alignment (per step, on generated or on real noised data)
- :func:`centroid_distances`: distance from the predicted x0_hat = x_t - t u to each cluster
  centroid, in the partition's whitened-PCA feature space (``Partition.features``).
- :func:`expert_errors` / :func:`real_data_alignment`: on real x0 noised to x_t (``flow_point``),
  each expert's per-sample error mean_D (v_k - (eps - x0))^2, the flow-matching loss.
- :func:`angular_disagreement`: the weighted mean pairwise angle between the velocities of the
  experts mixed for each sample.
- :func:`split_by_selection`: any (B, K) per-expert value split into experts routing selects
  (weight > 0) and those it does not.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from diffswarm.data.partition import Partition
from diffswarm.eval.diagnostics.isolation import side_effect_free
from diffswarm.experts.expert import VelocityModel
from diffswarm.experts.schedules import flow_point
from diffswarm.router.ensemble import RoutedEnsemble

# ------------------------------------------------------------------------------------ alignment


def centroid_distances(partition: Partition, x0_hat: torch.Tensor) -> torch.Tensor:
    """(B, K) Euclidean distance from each (B, C, H, W) predicted x0 to each cluster centroid.

    In the partition's whitened-PCA feature space (``Partition.features``; units: whitened PCA
    standard deviations), where the clusters were formed. x0_hat is used as is (no clipping to
    the data range). Returned on x0_hat's device and dtype.
    """
    f = partition.features(x0_hat)  # (B, D_pca) float64
    d = np.sqrt(((f[:, None, :] - partition.centroids[None, :, :]) ** 2).sum(-1))  # (B, K)
    return torch.from_numpy(d).to(x0_hat.device, x0_hat.dtype)


def split_by_selection(values: torch.Tensor, weights: torch.Tensor) -> dict:
    """Split (B, K) per-expert values (lower = better) into experts routing selects (weight > 0) and the rest.

    Returns ``selected_per_sample`` / ``other_per_sample``: (B,) unweighted mean over the
    selected / non-selected experts of each sample (NaN where a sample has none, e.g. ``other``
    under full routing); ``selected`` / ``other``: their means over the samples that have any
    (NaN if none); ``best_selected``: share of samples whose lowest-value expert is selected.
    """
    if values.shape != weights.shape or values.dim() != 2:
        raise ValueError(f"values and weights must be (B, K), got {tuple(values.shape)} and {tuple(weights.shape)}")
    v = values.detach().double().cpu()
    sel = weights.detach().cpu() > 0  # (B, K)
    nan = torch.full_like(v, float("nan"))
    n_sel, n_oth = sel.sum(1), (~sel).sum(1)
    sel_mean = torch.where(sel, v, torch.zeros_like(v)).sum(1) / n_sel.clamp_min(1)
    oth_mean = torch.where(~sel, v, torch.zeros_like(v)).sum(1) / n_oth.clamp_min(1)
    sel_mean = torch.where(n_sel > 0, sel_mean, nan[:, 0])
    oth_mean = torch.where(n_oth > 0, oth_mean, nan[:, 0])
    best = v.argmin(1)
    return {
        "selected_per_sample": sel_mean,
        "other_per_sample": oth_mean,
        "selected": float(sel_mean.nanmean()),
        "other": float(oth_mean.nanmean()),
        "best_selected": float(sel.gather(1, best[:, None]).double().mean()),
    }


def angular_disagreement(velocities: torch.Tensor, weights: torch.Tensor, kind: str = "angle") -> torch.Tensor:
    """(B,) disagreement among the experts mixed for each sample.

    velocities: (K, B, C, H, W), expert k's velocity for each sample (entries of unselected
    experts are ignored); weights: (B, K) mixing weights (selected = weight > 0). With a_ij the
    angle between v_i and v_j (radians, in [0, pi]; ``kind="cosine"``: 1 - cos, in [0, 2]),

        disagreement = sum_{i<j} w_i w_j a_ij / sum_{i<j} w_i w_j   over selected i, j,

    and 0 where fewer than two experts are mixed (nothing to disagree with). The angle uses the
    stable form 2 atan2(||e_i - e_j||, ||e_i + e_j||) of unit vectors e in float64, so equal
    velocities give exactly 0 and opposite ones exactly pi; a zero velocity counts as orthogonal
    to everything. Returned in float32 on the velocities' device.
    """
    if kind not in ("angle", "cosine"):
        raise ValueError(f"kind must be 'angle' or 'cosine', got {kind!r}")
    k, b = velocities.shape[:2]
    if tuple(weights.shape) != (b, k):
        raise ValueError(f"weights must be ({b}, {k}) for velocities of shape {tuple(velocities.shape)}")
    vel = velocities.detach().double().flatten(2)  # (K, B, D)
    norm = vel.norm(dim=-1, keepdim=True)  # (K, B, 1)
    unit = torch.where(norm > 0, vel / norm.clamp_min(1e-300), torch.zeros_like(vel))
    w = torch.where(weights > 0, weights, torch.zeros_like(weights)).double().to(vel.device).T  # (K, B)
    num = vel.new_zeros(b)
    den = vel.new_zeros(b)
    for i in range(k - 1):
        ei, ej = unit[i : i + 1], unit[i + 1 :]  # (1, B, D), (K-i-1, B, D)
        if kind == "angle":
            a = 2.0 * torch.atan2((ei - ej).norm(dim=-1), (ei + ej).norm(dim=-1))  # (K-i-1, B)
            # a zero vector: atan2(1, 1) already gives pi/2; two zero vectors give atan2(0, 0) = 0: make it pi/2
            both_zero = (norm[i : i + 1, :, 0] == 0) & (norm[i + 1 :, :, 0] == 0)
            a = torch.where(both_zero, torch.full_like(a, math.pi / 2), a)
        else:
            a = 1.0 - (ei * ej).sum(-1).clamp(-1.0, 1.0)
        pw = w[i : i + 1] * w[i + 1 :]  # (K-i-1, B)
        num += (pw * a).sum(0)
        den += pw.sum(0)
    out = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return out.to(velocities.device, torch.float32)


@torch.no_grad()
def expert_velocities(
    ensemble: RoutedEnsemble,
    x: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    guidance: float = 1.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """(K, B, C, H, W) each expert's velocity at (B, C, H, W) x, t (B,).

    With (B, K) ``weights``, expert k is evaluated only on the rows with weight > 0 (zeros
    elsewhere), as the ensemble does; without, every expert on every row. Experts are called
    directly (``ensemble.experts[k].velocity``), so ``ensemble.calls`` is not touched.
    """
    out = x.new_zeros((ensemble.num_experts, *x.shape))
    for k, expert in enumerate(ensemble.experts):
        if weights is None:
            rows = torch.arange(x.shape[0], device=x.device)
        else:
            rows = (weights[:, k] > 0).nonzero(as_tuple=True)[0].to(x.device)
        if rows.numel():
            out[k, rows] = expert.velocity(x[rows], t[rows], labels[rows], guidance)
    return out


@torch.no_grad()
def expert_errors(
    experts: Sequence[VelocityModel],
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    guidance: float = 1.0,
) -> torch.Tensor:
    """(B, K) per-sample error of each expert on real data: mean over D of (v_k(x_t, t) - (eps - x0))^2.

    x0, eps: (B, C, H, W); t: (B,) flow times; x_t = (1 - t) x0 + t eps. The flow-matching
    loss per sample (squared data units per coordinate).
    """
    x_t = flow_point(x0, eps, t)
    target = eps - x0
    errs = [((e.velocity(x_t, t, labels, guidance) - target) ** 2).flatten(1).mean(1) for e in experts]
    return torch.stack(errs, 1)  # (B, K)


@torch.no_grad()
def real_data_alignment(
    ensemble: RoutedEnsemble,
    x0: torch.Tensor,
    labels: torch.Tensor,
    t: float | torch.Tensor,
    eps: torch.Tensor | None = None,
    seed: int = 0,
    guidance: float = 1.0,
    clusters: torch.Tensor | np.ndarray | None = None,
) -> dict:
    """Do the experts routing selects predict real data better than the others? (diagnostic 2)

    Noises (B, C, H, W) real x0 to x_t at flow time t (a float or (B,)) with eps (drawn from a
    CPU generator seeded with ``seed`` when None), asks the ensemble for its routing at x_t as
    the sampler would (one ``velocity`` call after ``reset(B)``, so ``sample-k`` uses a fresh
    trajectory's draw; state restored afterwards), and computes every expert's error with
    :func:`expert_errors`. Returns :func:`split_by_selection` of the (B, K) ``errors`` plus
    ``errors``, ``weights`` (B, K) and, with the (B,) true ``clusters`` of x0 (e.g.
    ``partition.assign(x0)``), ``own_error`` (B,): the error of each sample's own-cluster expert.
    """
    b = x0.shape[0]
    tb = torch.as_tensor(t, dtype=x0.dtype, device=x0.device).expand(b).contiguous()
    if eps is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        eps = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
    x_t = flow_point(x0, eps, tb)
    with side_effect_free(ensemble):
        ensemble.reset(b, x0.device)
        ensemble.velocity(x_t, tb, labels, guidance)
        weights = ensemble.last.weights  # (B, K)
    errors = expert_errors(ensemble.experts, x0, eps, tb, labels, guidance)
    out = split_by_selection(errors, weights)
    out["errors"], out["weights"] = errors, weights
    if clusters is not None:
        c = torch.as_tensor(np.asarray(clusters), dtype=torch.long, device=errors.device).reshape(-1)
        out["own_error"] = errors.gather(1, c[:, None]).squeeze(1)
    return out
