"""Stability and expert-data alignment diagnostics over velocity models.

Pure functions over anything with ``velocity(x, t, labels, guidance) -> v`` (x: (B, C, H, W),
t: (B,) flow time, labels: (B,) with -1 = none), including a
:class:`~diffswarm.router.ensemble.RoutedEnsemble` under any routing strategy. Conventions are
those of :mod:`diffswarm.experts.schedules`: t = 0 data, x_t = (1 - t) x0 + t eps, v = eps - x0,
sampling integrates dx/dt = v from t = 1 to 0. D = C * H * W below.

They test the alignment study's claims (Villagra et al. 2026; science sheet, "Expert-data
alignment"), whose exact estimators are not public; the definitions here are ours:

Stability
- :func:`local_lipschitz`: L(x) = E_d ||Phi(x + h d) - Phi(x)|| / h over random unit directions d
  (uniform on the sphere of R^D, per sample), Phi one sampler step. The model is called at the
  perturbed point exactly as the sampler calls it, so routing is re-decided there: a top-1
  router switching experts under the perturbation shows up as a large L. h is finite on purpose
  (default 0.01 sqrt(D), an RMS change of 0.01 per coordinate on data in [-1, 1]): routing
  discontinuities are what the study attributes the instability of sparse routing to, and an
  infinitesimal h would never cross them.
- :func:`refinement_gap`: Delta_refine = ||x0(N steps) - x0(2N steps)|| / sqrt(D) from the same
  noise (and, for ``sample-k``, the same per-trajectory Gumbel draw). Chosen because it needs no
  reference solution and measures what matters for a sampler: for a first-order solver with a
  smooth field the global error is ~C/N, so the gap estimates the N-step error (Richardson);
  a routing decision that flips when the grid is refined shows up as a gap of order the distance
  between the two experts' samples, far above the smooth-field value. The per-step change
  ||x_{i+1} - x_i|| / sqrt(D) is recorded by :func:`trace_sampling` too, but it mostly reflects
  |dt| ||v|| and says little about convergence, so it is not the headline number.

Alignment (per step, on generated or on real noised data)
- :func:`centroid_distances`: distance from the predicted x0_hat = x_t - t u to each cluster
  centroid, in the partition's whitened-PCA feature space (``Partition.features``).
- :func:`expert_errors` / :func:`real_data_alignment`: on real x0 noised to x_t (``flow_point``),
  each expert's per-sample error mean_D (v_k - (eps - x0))^2, the flow-matching loss.
- :func:`angular_disagreement`: the weighted mean pairwise angle between the velocities of the
  experts mixed for each sample.
- :func:`split_by_selection`: any (B, K) per-expert value split into experts routing selects
  (weight > 0) and those it does not.
- :func:`trace_sampling`: :func:`diffswarm.sampling.loop.sample` itself (same output, same expert
  call counts) with a step callback that records all of the above at every step.

Diagnostic calls never change what the sampler does: they restore a ``RoutedEnsemble``'s
``last`` record, ``calls`` counters and ``gumbel`` noise afterwards.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from diffswarm.data.partition import Partition
from diffswarm.experts.expert import VelocityModel
from diffswarm.experts.schedules import flow_point
from diffswarm.experts.translator import velocity_to_x0
from diffswarm.router.ensemble import RoutedEnsemble
from diffswarm.sampling.loop import StepCallback, StepInfo, sample
from diffswarm.sampling.steps import sampler_step, time_grid

# ------------------------------------------------------------------------------------ side effects


@contextmanager
def side_effect_free(model: VelocityModel) -> Iterator[None]:
    """Restore a routed ensemble's ``last`` record, ``calls`` counters and ``gumbel`` noise on exit.

    Diagnostic evaluations then neither inflate the cost accounting nor change the record a
    step callback reads, nor the per-trajectory Gumbel draw of ``sample-k``. A no-op for models
    without these attributes.
    """
    last = getattr(model, "last", None)
    gumbel = getattr(model, "gumbel", None)
    calls = getattr(model, "calls", None)
    saved_calls = calls.clone() if isinstance(calls, torch.Tensor) else None
    try:
        yield
    finally:
        if hasattr(model, "last"):
            model.last = last
        if hasattr(model, "gumbel"):
            model.gumbel = gumbel
        if saved_calls is not None:
            model.calls = saved_calls


def _flat_norm(x: torch.Tensor) -> torch.Tensor:
    """(..., B, C, H, W) -> (..., B) Euclidean norm over the last three dims."""
    return x.flatten(-3).norm(dim=-1)


# ------------------------------------------------------------------------------------ stability


@dataclass
class LipschitzEstimate:
    """Result of :func:`local_lipschitz`."""

    per_sample: torch.Tensor  # (B,) mean over directions of ||Phi(x + h d) - Phi(x)|| / h
    per_direction: torch.Tensor  # (directions, B) the individual ratios
    h: float  # perturbation norm used (flattened Euclidean norm over C*H*W)
    directions: int  # number of random unit directions

    @property
    def mean(self) -> float:
        """Mean over samples and directions."""
        return float(self.per_sample.mean())


def local_lipschitz(
    model: VelocityModel,
    x: torch.Tensor,
    t: float | torch.Tensor,
    t_next: float | torch.Tensor,
    labels: torch.Tensor,
    guidance: float = 1.0,
    method: str = "euler",
    h: float | None = None,
    directions: int = 4,
    seed: int = 0,
    phi_x: torch.Tensor | None = None,
) -> LipschitzEstimate:
    """Local Lipschitz estimate of one sampler step Phi at (B, C, H, W) states x.

    Estimator (science sheet): L(x) = (1/n) sum_j ||Phi(x + h d_j) - Phi(x)|| / h with n =
    ``directions`` independent directions d_j, each uniform on the unit sphere of R^D (a Gaussian
    normalised per sample, from a CPU generator seeded with ``seed``, so it is reproducible on
    any device), and Phi = :func:`~diffswarm.sampling.steps.sampler_step` (Euler: Phi(x) = x + (t_next - t)
    u(x, t)).
    ``h`` is the norm of the perturbation over the flattened C*H*W coordinates; None means
    0.01 sqrt(D). Dimensionless; for the linear field u = a x it is exactly |1 + (t_next - t) a|.

    The model is called on the perturbed batch as the sampler calls it (same batch size B, so a
    ``RoutedEnsemble`` keeps its per-trajectory Gumbel noise and re-decides routing at x + h d);
    its record, counters and noise are restored afterwards (:func:`side_effect_free`).
    ``phi_x``: Phi(x) if already computed (saves the unperturbed evaluation).
    """
    if directions < 1:
        raise ValueError(f"directions must be >= 1, got {directions}")
    b, dim = x.shape[0], x[0].numel()
    h = 0.01 * math.sqrt(dim) if h is None else float(h)
    if not h > 0:
        raise ValueError(f"h must be > 0, got {h}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    d = torch.randn((directions, *x.shape), generator=gen, dtype=torch.float64)  # (n, B, C, H, W)
    d = (d / _flat_norm(d)[..., None, None, None]).to(x.device, x.dtype)  # unit per (direction, sample)
    ratios = x.new_empty((directions, b))
    with torch.no_grad(), side_effect_free(model):
        if phi_x is None:
            phi_x = sampler_step(model, x, t, t_next, labels, guidance, method)
        for j in range(directions):
            phi_j = sampler_step(model, x + h * d[j], t, t_next, labels, guidance, method)
            ratios[j] = _flat_norm(phi_j - phi_x) / h
    return LipschitzEstimate(per_sample=ratios.mean(0), per_direction=ratios, h=h, directions=directions)


@torch.no_grad()
def refinement_gap(
    model: VelocityModel,
    noise: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 30,
    method: str = "euler",
    guidance: float = 1.0,
) -> dict:
    """Delta_refine of the sampler at ``steps``: how far the sample still moves when the grid is halved.

    Runs :func:`~diffswarm.sampling.loop.sample` from the same (B, C, H, W) noise with N and 2N
    steps and returns ``{"per_sample": (B,) ||x0_N - x0_2N|| / sqrt(D), "mean": float, "steps": N,
    "x0": x0_N, "x0_refined": x0_2N}``. Units: RMS per coordinate, in data units (pixels in
    [-1, 1]). ``sample`` resets a ``RoutedEnsemble``'s Gumbel noise from its seed, so both runs
    use the same ``sample-k`` draw; the expert calls of both runs are counted in ``calls``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x_n = sample(model, noise, labels, steps, method, guidance)
    x_2n = sample(model, noise, labels, 2 * steps, method, guidance)
    gap = _flat_norm(x_n - x_2n) / math.sqrt(noise[0].numel())  # (B,)
    return {"per_sample": gap, "mean": float(gap.mean()), "steps": steps, "x0": x_n, "x0_refined": x_2n}


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


# ------------------------------------------------------------------------------------ tracing


@dataclass
class LipschitzConfig:
    """How :func:`trace_sampling` probes the local Lipschitz constant (see :func:`local_lipschitz`)."""

    h: float | None = None  # perturbation norm; None: 0.01 sqrt(D)
    directions: int = 4  # random unit directions per probed step
    seed: int = 0  # step i uses seed + i
    every: int = 1  # probe steps 0, every, 2 every, ...


@dataclass
class Trace:
    """Everything :func:`trace_sampling` recorded; S steps, B samples, K experts (K = 1 for a plain model)."""

    x0: torch.Tensor  # (B, C, H, W) final sample, equal to sampler.sample's output
    t: torch.Tensor  # (S,) flow time at the start of each step
    t_next: torch.Tensor  # (S,)
    weights: torch.Tensor  # (S, B, K) mixing weights at the step's first evaluation (as StepInfo)
    step_change: torch.Tensor  # (S, B) ||x_{i+1} - x_i|| / sqrt(D)
    lipschitz: torch.Tensor | None = None  # (S, B) local Lipschitz estimate of step i at x_i; NaN where not probed
    centroid_dist: torch.Tensor | None = None  # (S, B, K_partition) x0_hat_i to each centroid, feature units
    disagreement: torch.Tensor | None = None  # (S, B) angular_disagreement at x_i, radians

    def _experts_are_clusters(self) -> bool:
        """Expert k serves cluster k (a routed ensemble over the partition), so selection splits apply."""
        return self.centroid_dist is not None and self.centroid_dist.shape[-1] == self.weights.shape[-1]

    def per_sample(self) -> dict:
        """(B,) means over steps, to correlate with per-sample quality: ``lipschitz``, ``disagreement``,
        ``centroid_selected`` / ``centroid_other`` (mean distance to selected / other centroids)."""
        out: dict = {}
        if self.lipschitz is not None:
            out["lipschitz"] = self.lipschitz.nanmean(0)
        if self.disagreement is not None:
            out["disagreement"] = self.disagreement.mean(0)
        if self.centroid_dist is not None and self._experts_are_clusters():
            splits = [split_by_selection(d, w) for d, w in zip(self.centroid_dist, self.weights, strict=True)]
            out["centroid_selected"] = torch.stack([s["selected_per_sample"] for s in splits]).nanmean(0)
            out["centroid_other"] = torch.stack([s["other_per_sample"] for s in splits]).nanmean(0)
        return out

    def summary(self) -> dict:
        """Scalars and per-step lists (floats, JSON-ready): means over samples (and steps).

        Centroid splits (``centroid_selected`` / ``_other`` / ``_best_selected``) need expert k to be
        cluster k's (K experts = K centroids); ``centroid_nearest`` (mean distance to the nearest
        centroid) is always there when a partition was given.
        """
        out: dict = {
            "steps": int(self.t.shape[0]),
            "t": self.t.tolist(),
            "step_change_mean": float(self.step_change.mean()),
            "experts_per_step": float((self.weights > 0).sum(-1).double().mean()),
        }
        if self.lipschitz is not None:
            out["lipschitz_mean"] = float(self.lipschitz.nanmean())
            out["lipschitz_per_step"] = self.lipschitz.nanmean(1).tolist()
        if self.disagreement is not None:
            out["disagreement_mean"] = float(self.disagreement.mean())
            out["disagreement_per_step"] = self.disagreement.mean(1).tolist()
        if self.centroid_dist is not None:
            out["centroid_nearest"] = float(self.centroid_dist.amin(-1).mean())
        if self.centroid_dist is not None and self._experts_are_clusters():
            splits = [split_by_selection(d, w) for d, w in zip(self.centroid_dist, self.weights, strict=True)]
            for key in ("selected", "other", "best_selected"):
                per_step = [s[key] for s in splits]
                out[f"centroid_{key}_per_step"] = per_step
                out[f"centroid_{key}"] = float(np.nanmean(per_step)) if not np.isnan(per_step).all() else float("nan")
        return out


class _Tracer:
    """The step callback of :func:`trace_sampling`: records the diagnostics of each step from its ``StepInfo``."""

    def __init__(self, model: VelocityModel, labels: torch.Tensor, guidance: float, method: str,
                 partition: Partition | None, lipschitz: LipschitzConfig | None, disagreement: bool,
                 callback: StepCallback | None):
        self.model, self.labels, self.guidance, self.method = model, labels, guidance, method
        self.partition, self.lipschitz, self.disagreement, self.callback = partition, lipschitz, disagreement, callback
        self.weights: list[torch.Tensor] = []
        self.change: list[torch.Tensor] = []
        self.lip: list[torch.Tensor] = []
        self.cdist: list[torch.Tensor] = []
        self.dis: list[torch.Tensor] = []

    def __call__(self, info: StepInfo) -> None:
        i, x, v, w = info.step, info.x_start, info.v, info.weights  # x_i, u_i (B, C, H, W); w (B, K)
        for rows in (self.weights, self.change, self.lip, self.cdist, self.dis):
            del rows[i:]  # a step recomputed after a rollback replaces what was recorded from it on
        b, dim = x.shape[0], x[0].numel()
        tb = torch.tensor(info.t, dtype=x.dtype, device=x.device).expand(b)
        # 1. Probes at x_i (each restores the ensemble's state).
        if self.partition is not None:
            self.cdist.append(centroid_distances(self.partition, velocity_to_x0(x, tb, v)).cpu())
        if self.disagreement:
            vel = expert_velocities(self.model, x, tb, self.labels, self.guidance, w)  # (K, B, C, H, W)
            self.dis.append(angular_disagreement(vel, w).cpu())
        # 2. The sampler's step Phi(x_i) = x_{i+1}, probed around x_i.
        if self.lipschitz is not None:
            if i % self.lipschitz.every == 0:
                est = local_lipschitz(
                    self.model, x, info.t, info.t_next, self.labels, self.guidance, self.method, self.lipschitz.h,
                    self.lipschitz.directions, self.lipschitz.seed + i, phi_x=info.x,
                )
                self.lip.append(est.per_sample.cpu())
            else:
                self.lip.append(torch.full((b,), float("nan")))
        self.change.append((_flat_norm(info.x - x) / math.sqrt(dim)).cpu())
        self.weights.append(w.detach().cpu().float())
        if self.callback is not None:
            self.callback(info)

    def trace(self, x0: torch.Tensor, ts: torch.Tensor) -> Trace:
        """The recorded diagnostics of a trajectory that ended at x0, over the time grid ts (S + 1,)."""
        return Trace(
            x0=x0,
            t=ts[:-1].cpu(),
            t_next=ts[1:].cpu(),
            weights=torch.stack(self.weights),
            step_change=torch.stack(self.change),
            lipschitz=torch.stack(self.lip) if self.lipschitz is not None else None,
            centroid_dist=torch.stack(self.cdist) if self.partition is not None else None,
            disagreement=torch.stack(self.dis) if self.disagreement else None,
        )


@torch.no_grad()
def trace_sampling(
    model: VelocityModel,
    noise: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 30,
    method: str = "euler",
    guidance: float = 1.0,
    partition: Partition | None = None,
    lipschitz: LipschitzConfig | None = None,
    disagreement: bool = True,
    callback: StepCallback | None = None,
) -> Trace:
    """Sample with :func:`~diffswarm.sampling.loop.sample` and record the diagnostics at every step.

    The trajectory, the final sample and a ``RoutedEnsemble``'s ``calls`` are those of ``sample``
    with the same arguments (it is ``sample``, with a step callback); diagnostic evaluations are extra
    and side-effect free. At step i, with state x_i at time t_i and the sampler's first velocity
    u_i = model.velocity(x_i, t_i):

    - ``weights``: the routing of that evaluation (StepInfo's), (B, K);
    - ``step_change``: ||x_{i+1} - x_i|| / sqrt(D);
    - with ``partition``: :func:`centroid_distances` of x0_hat = x_i - t_i u_i;
    - with ``disagreement`` and a ``RoutedEnsemble``: :func:`angular_disagreement` of the selected
      experts' velocities at x_i (one extra evaluation of each selected expert on its rows);
    - with ``lipschitz``: :func:`local_lipschitz` of the step at x_i (``directions`` extra
      sampler steps).

    ``callback`` receives the sampler's StepInfo after each step.
    """
    if lipschitz is not None and lipschitz.every < 1:
        raise ValueError(f"lipschitz.every must be >= 1, got {lipschitz.every}")
    tracer = _Tracer(model, labels, guidance, method, partition, lipschitz,
                     disagreement and isinstance(model, RoutedEnsemble), callback)
    x0 = sample(model, noise, labels, steps, method, guidance, tracer)
    return tracer.trace(x0, time_grid(steps, noise.device, noise.dtype))


__all__ = [
    "LipschitzConfig",
    "LipschitzEstimate",
    "Trace",
    "angular_disagreement",
    "centroid_distances",
    "expert_errors",
    "expert_velocities",
    "local_lipschitz",
    "real_data_alignment",
    "refinement_gap",
    "side_effect_free",
    "split_by_selection",
    "trace_sampling",
]
