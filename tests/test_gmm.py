"""Exact checks on the 2-D Gaussian mixture: closed forms against Monte Carlo and the score, the
true-posterior ensemble against the true density, and what sparse routing does."""

import json
import math

import pytest
import torch

from diffswarm.eval.gmm import (
    ExactExpert,
    TruePosteriorRouter,
    UniformRouter,
    cluster_posterior,
    cluster_velocities,
    default_mixture,
    fit_stats_router,
    log_density,
    marginal_velocity,
    sample_data,
)
from diffswarm.eval.studies.gmm import generate, kl_to_router, router_kl_by_t, run_gmm_study, sample_metrics
from diffswarm.router.routing import RoutingConfig

G = default_mixture()
POINTS = torch.tensor([[-0.8, 0.5], [0.5, 0.3], [0.0, -0.9], [1.5, -1.5]], dtype=torch.float64)


def mc_velocity(x, t, x0):
    """Self-normalised importance estimate of E[eps - x0 | x_t = x] with x0 drawn from the data (or one
    cluster): weights N(x; a x0, b^2 I), eps = (x - a x0) / b. Returns (estimate (2,), standard error (2,))."""
    a, b = 1 - t, t
    logw = -0.5 * ((x - a * x0) ** 2).sum(-1) / b**2
    w = (logw - logw.max()).exp()
    w = w / w.sum()
    f = (x - a * x0) / b - x0  # (N, 2)
    mean = (w[:, None] * f).sum(0)
    se = ((w[:, None] ** 2) * (f - mean) ** 2).sum(0).sqrt()
    return mean, se


def test_mixture_has_clusters_of_several_components():
    counts = torch.bincount(G.cluster_of)
    assert len(counts) == 3 and (counts >= 2).all()
    assert torch.allclose(G.cluster_weights(), torch.tensor([0.45, 0.35, 0.2], dtype=torch.float64))


@pytest.mark.parametrize("t", [0.3, 0.6, 0.9])
def test_velocities_match_monte_carlo(t):
    gen = torch.Generator().manual_seed(0)
    x0, _, k0 = sample_data(G, 300_000, gen)
    tt = torch.full((len(POINTS),), t, dtype=torch.float64)
    u = marginal_velocity(G, POINTS, tt)
    uk = cluster_velocities(G, POINTS, tt)  # (P, K, 2)
    for i, x in enumerate(POINTS):
        est, se = mc_velocity(x, t, x0)
        assert se.max() < 0.05
        assert ((est - u[i]).abs() <= 4 * se + 2e-3).all(), (t, i, est, u[i], se)
        for k in range(3):
            est, se = mc_velocity(x, t, x0[k0 == k])
            assert ((est - uk[i, k]).abs() <= 4 * se + 2e-3).all(), (t, i, k, est, uk[i, k], se)


@pytest.mark.parametrize("t", [0.05, 0.4, 0.95])
def test_velocity_matches_score_relation(t):
    """u = E[eps - x0 | x_t] = -b s - (x + b^2 s) / a with s = grad log p_t (Tweedie), by autograd."""
    x = POINTS.clone().requires_grad_(True)
    tt = torch.full((len(POINTS),), t, dtype=torch.float64)
    s = torch.autograd.grad(log_density(G, x, tt).sum(), x)[0]
    a, b = 1 - t, t
    want = -b * s - (x.detach() + b * b * s) / a
    assert torch.allclose(marginal_velocity(G, POINTS, tt), want, atol=1e-10)


def test_posterior_mixture_of_cluster_velocities_is_the_marginal():
    x = torch.randn(50, 2, dtype=torch.float64)
    for t in (0.0, 0.2, 0.7, 1.0):
        tt = torch.full((50,), t, dtype=torch.float64)
        mixed = (cluster_posterior(G, x, tt)[:, :, None] * cluster_velocities(G, x, tt)).sum(1)
        assert torch.allclose(mixed, marginal_velocity(G, x, tt), atol=1e-12)
    # ends of the flow: t = 1 gives v = x - E[x0], t = 0 gives v = -x
    mean = (G.weights[:, None] * G.means).sum(0)
    assert torch.allclose(marginal_velocity(G, x, torch.ones(50)), x - mean, atol=1e-12)
    assert torch.allclose(marginal_velocity(G, x, torch.zeros(50)), -x, atol=1e-12)


def test_true_posterior_at_t1_is_the_cluster_weights():
    p = cluster_posterior(G, torch.randn(10, 2, dtype=torch.float64), torch.ones(10))
    assert torch.allclose(p, G.cluster_weights().expand(10, -1), atol=1e-12)


def test_kl_of_true_posterior_to_itself_is_zero_and_routers_rank_as_expected():
    gen = torch.Generator().manual_seed(1)
    fit_x, _, fit_k = sample_data(G, 20000, gen)
    routers = {"true": TruePosteriorRouter(G), "stats": fit_stats_router(fit_x, fit_k, 3), "uniform": UniformRouter(G)}
    kl, acc = router_kl_by_t(G, routers, times=(0.0, 0.3, 0.7, 1.0), n=2000, seed=2)
    for row in kl:
        assert abs(row["true"]) < 1e-6  # float32 rounding of probs only
        assert row["stats"] < 0.05 and row["stats"] < row["uniform"] - 0.04
    assert kl[0]["uniform"] > 0.5  # at t = 0 the clusters are well separated
    assert acc[0]["true"] == acc[0]["bayes"] > 0.9
    p = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    assert float(kl_to_router(p, p)) == 0.0
    assert math.isclose(float(kl_to_router(p, torch.tensor([[0.25, 0.25, 0.5]]))), math.log(2), rel_tol=1e-6)


def test_exact_experts_answer_the_velocity_contract():
    e = ExactExpert(G, 1)
    x = torch.randn(7, 2)
    v = e.velocity(x, torch.full((7,), 0.5), torch.full((7,), -1))
    assert v.shape == (7, 2) and v.dtype == torch.float32
    assert torch.allclose(v.double(), cluster_velocities(G, x.double(), torch.full((7,), 0.5))[:, 1], atol=1e-6)


@pytest.fixture(scope="module")
def samples():
    """The true-posterior ensemble under full and top-1 routing, and the true-sample references."""
    gen = torch.Generator().manual_seed(3)
    n = 4000
    big, _, _ = sample_data(G, 40000, gen)
    ref, _, _ = sample_data(G, n, gen)
    heldout, _, _ = sample_data(G, n, gen)
    bw = float(ref.std(0).mean()) * n ** (-1 / 6)
    noise = torch.randn(n, 2, generator=gen)
    out = {"floor": sample_metrics(G, big), "ref_parzen": sample_metrics(G, ref, heldout, bw)["parzen_nll"]}
    for name, routing in (("full", RoutingConfig("full")), ("top-1", RoutingConfig("top-k", k=1))):
        x = generate(G, TruePosteriorRouter(G), routing, noise, steps=50, method="heun")
        out[name] = sample_metrics(G, x, heldout, bw)
    return out


def test_full_ensemble_with_true_posterior_samples_the_true_density(samples):
    full, floor = samples["full"], samples["floor"]
    assert abs(full["nll"] - floor["nll"]) < 0.05, (full, floor)
    assert full["share_tv"] < 0.025, full
    assert abs(full["parzen_nll"] - samples["ref_parzen"]) < 0.05, (full, samples["ref_parzen"])


def test_top1_with_true_posterior_collapses_onto_the_largest_cluster(samples):
    """Unconditional top-1 follows the largest cluster's expert near t = 1 and over-samples it; its
    mean -log p0 of the samples is *lower* than the full ensemble's (mode seeking), while the held-out
    cross-entropy and the cluster shares expose it as worse."""
    full, top1 = samples["full"], samples["top-1"]
    assert top1["shares"][0] > 0.6 > 0.45 + 0.1  # true weight 0.45
    assert top1["share_tv"] > full["share_tv"] + 0.15
    assert top1["parzen_nll"] > full["parzen_nll"] + 0.3
    assert top1["nll"] < full["nll"] - 0.1


def test_run_gmm_study_small_is_json_and_complete():
    out = run_gmm_study(seed=0, n_samples=300, steps=10, router_steps=200, stats_fit_samples=3000, kl_samples=500,
                        reference_samples=2000)
    json.dumps(out)
    assert {r["router"] for r in out["sampling"]} == {"true", "trained", "stats", "uniform"}
    assert len(out["sampling"]) == 3 * 6 + 1
    assert [r["t"] for r in out["router_kl"]][0] == 0.0 and out["router_kl"][-1]["t"] == 1.0
    assert all(abs(r["true"]) < 1e-6 for r in out["router_kl"])
    assert out["seconds"] > 0  # recorded for the report (no speed target in a unit test: machines are shared)
