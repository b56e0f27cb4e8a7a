"""Stability diagnostics (see :mod:`diffswarm.eval.diagnostics` for the conventions).

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffswarm.eval.diagnostics.isolation import side_effect_free
from diffswarm.experts.expert import VelocityModel
from diffswarm.sampling.loop import sample
from diffswarm.sampling.steps import sampler_step


def flat_norm(x: torch.Tensor) -> torch.Tensor:
    """(..., B, C, H, W) -> (..., B) Euclidean norm over the last three dims."""
    return x.flatten(-3).norm(dim=-1)





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
    d = (d / flat_norm(d)[..., None, None, None]).to(x.device, x.dtype)  # unit per (direction, sample)
    ratios = x.new_empty((directions, b))
    with torch.no_grad(), side_effect_free(model):
        if phi_x is None:
            phi_x = sampler_step(model, x, t, t_next, labels, guidance, method)
        for j in range(directions):
            phi_j = sampler_step(model, x + h * d[j], t, t_next, labels, guidance, method)
            ratios[j] = flat_norm(phi_j - phi_x) / h
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
    gap = flat_norm(x_n - x_2n) / math.sqrt(noise[0].numel())  # (B,)
    return {"per_sample": gap, "mean": float(gap.mean()), "steps": steps, "x0": x_n, "x0_refined": x_2n}
