"""Tracing a sampling run (see :mod:`diffswarm.eval.diagnostics` for the conventions).

- :func:`trace_sampling`: :func:`diffswarm.sampling.loop.sample` itself (same output, same expert
  call counts) with a step callback that records all of the above at every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from diffswarm.data.partition import Partition
from diffswarm.eval.diagnostics.alignment import (
    angular_disagreement,
    centroid_distances,
    expert_velocities,
    split_by_selection,
)
from diffswarm.eval.diagnostics.stability import flat_norm, local_lipschitz
from diffswarm.experts.expert import VelocityModel
from diffswarm.experts.translator import velocity_to_x0
from diffswarm.router.ensemble import RoutedEnsemble
from diffswarm.sampling.loop import StepCallback, StepInfo, sample
from diffswarm.sampling.steps import time_grid

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

    x0: torch.Tensor  # (B, C, H, W) final sample, equal to sampling.loop.sample's output
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
        self.change.append((flat_norm(info.x - x) / math.sqrt(dim)).cpu())
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
