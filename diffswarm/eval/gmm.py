"""Exact checks of routed ensembles on a 2-D Gaussian mixture, where everything is known in closed form.

The data distribution is a mixture of J Gaussian components N(m_j, S_j) with weights pi_j, grouped
into K clusters (each cluster a mixture of >= 2 components, so a one-Gaussian-per-cluster
statistics router is only approximate). In flow time (x_t = a x0 + b eps, a = 1 - t, b = t;
t = 0 data, t = 1 noise; v = eps - x0; the conventions of ``experts/schedules.py``):

1. Noised component: x_t | j ~ N(a m_j, C_j), C_j = a^2 S_j + b^2 I.
2. Densities: log p_t(x) = logsumexp_j [log pi_j + log N(x; a m_j, C_j)]; p0 is the t = 0 case.
3. Posteriors: p(j | x_t) proportional to pi_j N(x; a m_j, C_j);
   p(k | x_t) = sum_{j in k} p(j | x_t) (the true router); p(j | x_t, k) = p(j | x_t) / p(k | x_t).
4. Gaussian conditioning per component (Cov(x0, x_t) = a S_j, Cov(eps, x_t) = b I):
   E[x0 | x_t, j] = m_j + a S_j C_j^-1 (x - a m_j),  E[eps | x_t, j] = b C_j^-1 (x - a m_j), so
   v_j(x, t) = E[eps - x0 | x_t, j] = (b I - a S_j) C_j^-1 (x - a m_j) - m_j.
   (t = 1: v_j = x - m_j; t = 0: v_j = -x.)
5. Cluster velocity (an exact expert): u_k = sum_{j in k} p(j | x_t, k) v_j.
6. Marginal velocity: u = sum_j p(j | x_t) v_j = sum_k p(k | x_t) u_k (DDM's theorem: the mixture
   of experts weighted by the true cluster posterior is the flow of the whole data set).
   Equivalently u = -b s - (x + b^2 s) / a with s = grad log p_t(x) (Tweedie; tested).

Experts (``ExactExpert``) and routers (``TruePosteriorRouter``, a trained ``MLPRouter``, and the
statistics router of ``router/stats/`` fitted from samples, one Gaussian per cluster) answer the
project's contracts, so the real ``RoutedEnsemble``, ``choose_experts`` strategies and ``sample``
integrator run unchanged: points are (B, 2) tensors, which those functions handle as they only
broadcast over trailing dimensions. The statistics router, written for images, sees the points as
(B, 2, 1, 1) images through ``PointRouter`` (the DCT of a 1x1 image is the identity, so its
features are the coordinates themselves).

The study's measures and its run at one seed are in :mod:`diffswarm.eval.studies.gmm`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from diffswarm.router.model import RouterConfig

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class GaussianMixture2D:
    """A 2-D mixture of J Gaussian components grouped into K clusters (float64 tensors)."""

    weights: torch.Tensor  # (J,) component weights pi_j, sum 1
    means: torch.Tensor  # (J, 2) m_j
    covs: torch.Tensor  # (J, 2, 2) S_j, positive definite
    cluster_of: torch.Tensor  # (J,) int64 cluster of each component, every cluster in 0..K-1 used

    def __post_init__(self) -> None:
        j = self.weights.shape[0]
        if self.means.shape != (j, 2) or self.covs.shape != (j, 2, 2) or self.cluster_of.shape != (j,):
            raise ValueError("weights (J,), means (J, 2), covs (J, 2, 2), cluster_of (J,) must agree")
        if not torch.isclose(self.weights.sum(), self.weights.new_tensor(1.0)):
            raise ValueError("component weights must sum to 1")
        if (torch.linalg.eigvalsh(self.covs) <= 0).any():
            raise ValueError("component covariances must be positive definite")
        k = int(self.cluster_of.max()) + 1
        if sorted(set(self.cluster_of.tolist())) != list(range(k)):
            raise ValueError("every cluster 0..K-1 needs at least one component")

    @property
    def num_clusters(self) -> int:
        return int(self.cluster_of.max()) + 1

    def cluster_weights(self) -> torch.Tensor:
        """(K,) float64 cluster weights sum_{j in k} pi_j."""
        return torch.zeros(self.num_clusters, dtype=torch.float64).index_add_(0, self.cluster_of, self.weights)

    def membership(self) -> torch.Tensor:
        """(J, K) float64 one-hot cluster membership of each component."""
        return torch.nn.functional.one_hot(self.cluster_of, self.num_clusters).double()


def default_mixture() -> GaussianMixture2D:
    """Three clusters of two or three components each (weights 0.45 / 0.35 / 0.20), with clusters
    overlapping where their components meet, in roughly [-1.5, 1.5]^2 (the scale of image data)."""

    def cov(sx, sy, rho):
        return [[sx * sx, rho * sx * sy], [rho * sx * sy, sy * sy]]

    comps = [  # (cluster, weight, mean, covariance)
        (0, 0.20, (-1.0, 0.6), cov(0.25, 0.18, 0.4)),
        (0, 0.15, (-0.4, 1.1), cov(0.20, 0.15, -0.3)),
        (0, 0.10, (-0.2, 0.2), cov(0.22, 0.22, 0.0)),
        (1, 0.20, (0.9, 0.6), cov(0.22, 0.30, 0.2)),
        (1, 0.15, (0.4, -0.2), cov(0.25, 0.20, -0.5)),
        (2, 0.12, (-0.5, -0.8), cov(0.25, 0.20, 0.3)),
        (2, 0.08, (0.3, -1.0), cov(0.20, 0.15, 0.0)),
    ]
    return GaussianMixture2D(
        weights=torch.tensor([c[1] for c in comps], dtype=torch.float64),
        means=torch.tensor([c[2] for c in comps], dtype=torch.float64),
        covs=torch.tensor([c[3] for c in comps], dtype=torch.float64),
        cluster_of=torch.tensor([c[0] for c in comps], dtype=torch.int64),
    )


# ---------------------------------------------------------------------------------------------
# closed forms (float64 inside; x: (B, 2), t: (B,) or scalar)


def _ab(x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0]).clamp(0.0, 1.0)
    return 1.0 - t, t  # (B,), (B,)


def _noised(g: GaussianMixture2D, x: torch.Tensor, t):
    """Per-component pieces: r = x - a m (B, J, 2), C^-1 (B, J, 2, 2), log det C (B, J), a, b."""
    x = x.to(torch.float64)
    a, b = _ab(x, t)
    means, covs = g.means.to(x.device), g.covs.to(x.device)
    eye = torch.eye(2, dtype=torch.float64, device=x.device)
    c = a[:, None, None, None] ** 2 * covs[None] + b[:, None, None, None] ** 2 * eye  # (B, J, 2, 2)
    det = c[..., 0, 0] * c[..., 1, 1] - c[..., 0, 1] * c[..., 1, 0]  # (B, J)
    inv = torch.stack([torch.stack([c[..., 1, 1], -c[..., 0, 1]], -1),
                       torch.stack([-c[..., 1, 0], c[..., 0, 0]], -1)], -2) / det[..., None, None]
    r = x[:, None, :] - a[:, None, None] * means[None]  # (B, J, 2)
    return r, inv, det.log(), a, b


def component_log_joint(g: GaussianMixture2D, x: torch.Tensor, t) -> torch.Tensor:
    """log pi_j + log N(x; a m_j, a^2 S_j + b^2 I): (B, J) float64 (steps 1-2)."""
    r, inv, logdet, _, _ = _noised(g, x, t)
    maha = torch.einsum("bji,bjik,bjk->bj", r, inv, r)  # (B, J)
    return g.weights.to(r.device).log()[None] - 0.5 * (maha + logdet + 2 * LOG_2PI)


def log_density(g: GaussianMixture2D, x: torch.Tensor, t=0.0) -> torch.Tensor:
    """log p_t(x): (B,) float64; t = 0 gives the data density log p0."""
    return component_log_joint(g, x, t).logsumexp(-1)


def component_posterior(g: GaussianMixture2D, x: torch.Tensor, t) -> torch.Tensor:
    """p(j | x_t): (B, J) float64 (step 3)."""
    return component_log_joint(g, x, t).softmax(-1)


def cluster_posterior(g: GaussianMixture2D, x: torch.Tensor, t) -> torch.Tensor:
    """The true router p(k | x_t): (B, K) float64 (step 3)."""
    return component_posterior(g, x, t) @ g.membership().to(x.device)


def component_velocities(g: GaussianMixture2D, x: torch.Tensor, t) -> torch.Tensor:
    """v_j = E[eps - x0 | x_t, j] = (b I - a S_j) C_j^-1 (x - a m_j) - m_j: (B, J, 2) float64 (step 4)."""
    r, inv, _, a, b = _noised(g, x, t)
    eye = torch.eye(2, dtype=torch.float64, device=r.device)
    gain = b[:, None, None, None] * eye - a[:, None, None, None] * g.covs.to(r.device)[None]  # (B, J, 2, 2)
    return torch.einsum("bjik,bjkl,bjl->bji", gain, inv, r) - g.means.to(r.device)[None]


def cluster_velocities(g: GaussianMixture2D, x: torch.Tensor, t) -> torch.Tensor:
    """u_k = E[eps - x0 | x_t, k]: (B, K, 2) float64 (step 5)."""
    logj = component_log_joint(g, x, t)  # (B, J)
    member = g.membership().to(logj.device)  # (J, K)
    masked = logj[:, :, None] + torch.where(member > 0, 0.0, float("-inf"))[None]  # (B, J, K)
    w = masked.softmax(1)  # (B, J, K) p(j | x_t, k)
    return torch.einsum("bjk,bji->bki", w, component_velocities(g, x, t))


def marginal_velocity(g: GaussianMixture2D, x: torch.Tensor, t) -> torch.Tensor:
    """u = E[eps - x0 | x_t]: (B, 2) float64 (step 6)."""
    return torch.einsum("bj,bji->bi", component_posterior(g, x, t), component_velocities(g, x, t))


def sample_data(g: GaussianMixture2D, n: int, gen: torch.Generator | None = None):
    """n draws from p0: (x0 (n, 2) float64, component (n,), cluster (n,))."""
    comp = torch.multinomial(g.weights, n, replacement=True, generator=gen)
    chol = torch.linalg.cholesky(g.covs)  # (J, 2, 2)
    z = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    x0 = g.means[comp] + torch.einsum("nij,nj->ni", chol[comp], z)
    return x0, comp, g.cluster_of[comp]


def sample_noised(g: GaussianMixture2D, n: int, t: float, gen: torch.Generator | None = None):
    """n draws of x_t from the true noised marginal: (x_t (n, 2), cluster of x0 (n,))."""
    x0, _, clusters = sample_data(g, n, gen)
    eps = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return (1 - t) * x0 + t * eps, clusters


# ---------------------------------------------------------------------------------------------
# experts and routers answering the project's contracts


def _point_router_config(g: GaussianMixture2D) -> RouterConfig:
    return RouterConfig(num_clusters=g.num_clusters, num_classes=0, channels=2, size=1, dataset_id="gmm2d")


class ExactExpert:
    """Cluster k's exact velocity u_k as a velocity model: ``velocity(x (B, 2), t (B,), labels, guidance)``.

    Unconditional: labels and guidance are accepted for the contract and have no effect.
    """

    def __init__(self, gmm: GaussianMixture2D, k: int):
        self.gmm, self.k = gmm, int(k)
        self.expert_id = f"gmm-c{k}"

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
        return cluster_velocities(self.gmm, x, t)[:, self.k].to(x.dtype)


class TruePosteriorRouter:
    """The exact router p(k | x_t) with the trained router's interface (``cfg``, ``probs``)."""

    def __init__(self, gmm: GaussianMixture2D):
        self.gmm = gmm
        self.cfg = _point_router_config(gmm)

    @torch.no_grad()
    def probs(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) float32 on x's device."""
        return cluster_posterior(self.gmm, x, t).float()


class UniformRouter:
    """p(k) = 1/K everywhere: the reference a router must beat."""

    def __init__(self, gmm: GaussianMixture2D):
        self.cfg = _point_router_config(gmm)

    def probs(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        k = self.cfg.num_clusters
        return x.new_full((x.shape[0], k), 1.0 / k, dtype=torch.float32)


class PointRouter:
    """Adapter: an image router (``probs`` on (B, C, H, W)) answering on (B, 2) points as (B, 2, 1, 1)."""

    def __init__(self, router):
        self.router = router
        self.cfg = router.cfg

    def probs(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        return self.router.probs(x.reshape(x.shape[0], 2, 1, 1), t, labels)


class MLPRouter(nn.Module):
    """The trained router of the papers at 2-D scale: an MLP on (x_t, t) -> K logits."""

    def __init__(self, num_clusters: int, width: int = 64):
        super().__init__()
        self.cfg = RouterConfig(num_clusters=num_clusters, num_classes=0, channels=2, size=1, width=width,
                                dataset_id="gmm2d")
        self.net = nn.Sequential(nn.Linear(5, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, num_clusters))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits (B, K). x: (B, 2); t: (B,)."""
        t = t.to(x.dtype).reshape(-1, 1)
        return self.net(torch.cat([x, t, (1 - t) * x], 1))

    @torch.no_grad()
    def probs(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        dt = next(self.parameters()).dtype
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        return self(x.to(dt), t.to(dt)).float().softmax(-1)


def train_mlp_router(gmm: GaussianMixture2D, steps: int = 1500, batch: int = 512, lr: float = 3e-3,
                     seed: int = 0) -> tuple[MLPRouter, dict]:
    """Cross-entropy on the cluster of x0 with x0 noised to t ~ U(0, 1) (DDM/HDDM/Paris recipe).

    Returns (router, summary with steps, final_loss (mean of the last 100 steps), seconds).
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    router = MLPRouter(gmm.num_clusters)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for _ in range(steps):
        x0, _, k = sample_data(gmm, batch, gen)
        t = torch.rand(batch, generator=gen, dtype=torch.float64)
        xt = (1 - t[:, None]) * x0 + t[:, None] * torch.randn(batch, 2, generator=gen, dtype=torch.float64)
        loss = nn.functional.cross_entropy(router(xt.float(), t.float()), k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    summary = {"steps": steps, "final_loss": float(np.mean(losses[-100:])), "seconds": time.perf_counter() - t0}
    return router.eval(), summary


def fit_stats_router(points: torch.Tensor, clusters: torch.Tensor, num_clusters: int):
    """The statistics router of ``router/stats/`` from samples, one Gaussian per cluster, each
    cluster's statistics from its own points only. points: (N, 2); clusters: (N,). Exact options
    (no regularising floor: in 2-D the Gaussian model has nothing to over-trust)."""
    from diffswarm.router.stats.basis import DCTBasis
    from diffswarm.router.stats.publish import partition_cluster_stats
    from diffswarm.router.stats.router import StatsRouter, StatsRouterOptions

    basis = DCTBasis((2, 1, 1), 2)
    imgs = points.float().reshape(-1, 2, 1, 1)
    labels = torch.zeros(len(points), dtype=torch.long)
    stats = partition_cluster_stats(imgs, labels, clusters, num_clusters, 0, basis)
    return PointRouter(StatsRouter(stats, StatsRouterOptions(var_floor=1e-8, var_floor_rel=0.0)))


__all__ = [
    "ExactExpert",
    "GaussianMixture2D",
    "LOG_2PI",
    "MLPRouter",
    "PointRouter",
    "TruePosteriorRouter",
    "UniformRouter",
    "cluster_posterior",
    "cluster_velocities",
    "component_log_joint",
    "component_posterior",
    "component_velocities",
    "default_mixture",
    "fit_stats_router",
    "log_density",
    "marginal_velocity",
    "sample_data",
    "sample_noised",
    "train_mlp_router",
]
