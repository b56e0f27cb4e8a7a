"""Stability and expert-data alignment diagnostics over tiny analytic velocity models."""

import json
import math

import numpy as np
import pytest
import torch

from diffswarm.data.partition import Partition
from diffswarm.eval.diagnostics.alignment import (
    angular_disagreement,
    centroid_distances,
    expert_errors,
    expert_velocities,
    real_data_alignment,
    split_by_selection,
)
from diffswarm.eval.diagnostics.stability import local_lipschitz, refinement_gap
from diffswarm.eval.diagnostics.tracing import LipschitzConfig, trace_sampling
from diffswarm.router.ensemble import RoutedEnsemble
from diffswarm.router.routing import RoutingConfig
from diffswarm.sampling.loop import sample
from diffswarm.sampling.steps import sampler_step

SHAPE = (1, 2, 2)  # (C, H, W), D = 4
NONE = torch.full((6,), -1)


class Linear:
    """v = a * x, a a scalar or a (C, H, W) tensor: one Euler step is x -> (1 + dt a) x."""

    def __init__(self, a, expert_id="lin"):
        self.a, self.expert_id = a, expert_id

    def velocity(self, x, t, labels, guidance=1.0):
        return self.a * x


class PointMass:
    """v = (x - c) / t, the exact flow to the point mass at c; x0_hat = x - t v = c exactly."""

    def __init__(self, c, expert_id):
        self.c, self.expert_id = torch.as_tensor(c, dtype=torch.float32), expert_id

    def velocity(self, x, t, labels, guidance=1.0):
        return (x - self.c) / t.clamp_min(1e-6).reshape(-1, 1, 1, 1)


class Router:
    """probs = softmax(beta * [mean(x), -mean(x)]): cluster 0 for bright states, 1 for dark ones."""

    def __init__(self, beta=50.0, fixed=None):
        self.beta, self.fixed = beta, fixed
        self.cfg = type("C", (), {"num_clusters": 2})()

    def probs(self, x, t, labels):
        if self.fixed is not None:
            return torch.tensor(self.fixed).expand(x.shape[0], -1)
        m = x.flatten(1).mean(1)
        return torch.stack([self.beta * m, -self.beta * m], 1).softmax(1)


# ------------------------------------------------------------------------------------ stability


@pytest.mark.parametrize("a", [-2.0, 0.5, 3.0])
def test_lipschitz_of_a_linear_field_is_exact(a):
    x = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(0))
    dt = -0.1
    est = local_lipschitz(Linear(a), x, 0.6, 0.5, NONE, directions=3)
    assert est.per_sample.shape == (6,) and est.per_direction.shape == (3, 6)
    assert torch.allclose(est.per_sample, torch.full((6,), abs(1 + dt * a)), atol=1e-4)
    assert est.h == pytest.approx(0.01 * 2.0) and est.directions == 3
    # Heun: x -> (1 + dt a + (dt a)^2 / 2) x
    heun = local_lipschitz(Linear(a), x, 0.6, 0.5, NONE, method="heun", h=0.5)
    assert heun.mean == pytest.approx(abs(1 + dt * a + (dt * a) ** 2 / 2), abs=1e-4)


def test_lipschitz_of_an_anisotropic_linear_field_averages_over_directions():
    shape = (1, 32, 32)  # D = 1024: ||M d|| concentrates at sqrt(mean m_i^2)
    a = torch.linspace(-5.0, 5.0, 1024).reshape(shape)
    m = 1 + (-0.1) * a
    x = torch.randn(2, *shape)
    est = local_lipschitz(Linear(a), x, 1.0, 0.9, torch.full((2,), -1), directions=16)
    assert float(m.abs().min()) <= float(est.per_direction.min())
    assert float(est.per_direction.max()) <= float(m.abs().max())
    assert est.mean == pytest.approx(float(m.pow(2).mean().sqrt()), rel=0.02)


def _boundary_states(n=6):
    """States with mean exactly 0 (the router's decision boundary), plus a hair towards cluster 0."""
    x = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(1))
    return x - x.flatten(1).mean(1).reshape(-1, 1, 1, 1) + 1e-6


def test_lipschitz_sees_routing_switches_because_routing_is_redone_at_the_perturbed_point():
    experts = [Linear(-1.0, "a"), Linear(2.0, "b")]  # smooth constants 1.1 and 0.8 at dt = -0.1
    top1 = RoutedEnsemble(experts, Router(), RoutingConfig("top-k", 1))
    full = RoutedEnsemble(experts, Router(), RoutingConfig("full"))
    x = _boundary_states()
    far = x + 1.0  # far into cluster 0: no switch under a small perturbation
    l_far = local_lipschitz(top1, far, 0.6, 0.5, NONE, directions=8)
    assert torch.allclose(l_far.per_sample, torch.full((6,), 1.1), atol=1e-4)
    l_top1 = local_lipschitz(top1, x, 0.6, 0.5, NONE, directions=16)
    l_full = local_lipschitz(full, x, 0.6, 0.5, NONE, directions=16)
    # a frozen routing decision would give exactly 1.1; switches give ratios of order |dt| |a_b - a_a| ||x|| / h
    assert float(l_top1.per_sample.min()) > 5 * 1.1
    assert l_full.mean < l_top1.mean / 3  # the full ensemble is the smoother sampler


def test_lipschitz_keeps_the_trajectory_gumbel_draw_and_the_ensemble_state():
    experts = [Linear(-1.0, "a"), Linear(3.0, "b")]
    ens = RoutedEnsemble(experts, Router(fixed=[0.5, 0.5]), RoutingConfig("sample-k", 1), seed=3)
    x = torch.randn(6, *SHAPE)
    ens.reset(6, x.device)
    gumbel = ens.gumbel.clone()
    ens.velocity(x, torch.full((6,), 0.6), NONE)
    last, calls = ens.last, ens.calls.clone()
    chosen = last.weights.argmax(1)
    assert 0 < int(chosen.sum()) < 6  # both experts drawn somewhere in the batch
    est = local_lipschitz(ens, x, 0.6, 0.5, NONE, directions=4)
    want = torch.tensor([1.1, 0.7])[chosen]  # |1 + dt a| of each sample's own draw
    assert torch.allclose(est.per_sample, want, atol=1e-4)
    assert torch.equal(ens.gumbel, gumbel) and ens.last is last and torch.equal(ens.calls, calls)


def test_refinement_gap_of_a_linear_field_is_the_closed_form():
    a, n = 1.5, 5
    noise = torch.randn(6, *SHAPE, dtype=torch.float64)
    gap = refinement_gap(Linear(a), noise, NONE, steps=n)
    # Euler on dx/dt = a x from t = 1 to 0 with N steps: x0 = (1 - a/N)^N x1
    factor = abs((1 - a / n) ** n - (1 - a / (2 * n)) ** (2 * n))
    want = factor * noise.flatten(1).norm(dim=1) / 2.0  # sqrt(D) = 2
    assert torch.allclose(gap["per_sample"], want, rtol=1e-9)
    assert gap["mean"] == pytest.approx(float(want.mean())) and gap["steps"] == n
    # Euler is exact for the point-mass flow: nothing moves on refinement
    assert refinement_gap(PointMass(0.3, "p"), noise.float(), NONE, steps=4)["mean"] < 1e-5


def test_refinement_gap_reuses_the_sample_k_draw():
    """Each sample lands on the point mass of its drawn expert; a redraw between the N- and 2N-step runs
    would move some samples from +0.5 to -0.5 (a gap of 1)."""
    experts = [PointMass(0.5, "a"), PointMass(-0.5, "b")]
    ens = RoutedEnsemble(experts, Router(fixed=[0.5, 0.5]), RoutingConfig("sample-k", 1), seed=0)
    gap = refinement_gap(ens, torch.randn(6, *SHAPE), NONE, steps=3)
    assert gap["x0"].abs().sub(0.5).abs().max() < 1e-5
    assert 0 < int((gap["x0"].flatten(1)[:, 0] > 0).sum()) < 6  # both experts drawn
    assert gap["mean"] < 1e-5


# ------------------------------------------------------------------------------------ disagreement


def test_angular_disagreement_of_agreeing_opposite_and_orthogonal_experts():
    v = torch.randn(4, *SHAPE)
    w = torch.full((4, 2), 0.5)
    assert torch.equal(angular_disagreement(torch.stack([v, v]), w), torch.zeros(4))
    # length does not count (float32 rounding of 3 v leaves ~1e-8)
    assert torch.allclose(angular_disagreement(torch.stack([v, 3 * v]), w), torch.zeros(4), atol=1e-6)
    assert torch.allclose(angular_disagreement(torch.stack([v, -v]), w), torch.full((4,), math.pi))
    assert torch.allclose(angular_disagreement(torch.stack([v, -v]), w, kind="cosine"), torch.full((4,), 2.0))
    e1, e2 = torch.zeros(1, *SHAPE), torch.zeros(1, *SHAPE)
    e1.view(-1)[0], e2.view(-1)[1] = 1.0, 1.0
    assert torch.allclose(angular_disagreement(torch.stack([e1, e2]), torch.full((1, 2), 0.5)),
                          torch.tensor([math.pi / 2]))


def test_angular_disagreement_is_weighted_over_selected_pairs_only():
    e = torch.zeros(1, *SHAPE)
    e.view(-1)[0] = 1.0
    vel = torch.stack([e, e, -e, 1e6 * torch.randn(1, *SHAPE)])  # the 4th expert is not selected
    w = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    # pairs (0,1): angle 0, weight .15; (0,2): pi, .10; (1,2): pi, .06
    want = math.pi * (0.10 + 0.06) / (0.15 + 0.10 + 0.06)
    assert float(angular_disagreement(vel, w)) == pytest.approx(want, rel=1e-6)
    one = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    assert float(angular_disagreement(vel, one)) == 0.0  # one expert: nothing to disagree with


def test_split_by_selection():
    values = torch.tensor([[1.0, 2.0, 3.0], [5.0, 0.5, 4.0], [1.0, 1.0, 1.0]])
    weights = torch.tensor([[0.7, 0.3, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    s = split_by_selection(values, weights)
    assert s["selected_per_sample"].tolist() == [1.5, 5.0, 1.0]
    assert s["other_per_sample"][:2].tolist() == [3.0, 2.25] and math.isnan(s["other_per_sample"][2])
    assert s["selected"] == pytest.approx(2.5) and s["other"] == pytest.approx(2.625)
    assert s["best_selected"] == pytest.approx(2 / 3)  # row 1's best (0.5) is not selected


# ------------------------------------------------------------------------------------ alignment


def _partition():
    """Two clusters of 1x2x2 images at +-0.5 everywhere; features = the flattened pixels."""
    p = 4
    return Partition(
        dataset_id="toy", content_hash="0" * 64, k=2, seed=0, assignments=np.array([0, 1]),
        centroids=np.array([[0.5] * p, [-0.5] * p]), pca_mean=np.zeros(p), pca_components=np.eye(p),
        pca_scale=np.ones(p), cluster_summary=[{}, {}], num_classes=0, image_shape=SHAPE, partition_hash="",
    )


def test_centroid_distances():
    x0 = torch.stack([torch.full(SHAPE, 0.5), torch.zeros(SHAPE), torch.full(SHAPE, -1.5)]).double()
    d = centroid_distances(_partition(), x0)
    assert d.dtype == torch.float64 and d.shape == (3, 2)
    assert torch.allclose(d, torch.tensor([[0.0, 2.0], [1.0, 1.0], [4.0, 2.0]], dtype=torch.float64))


def _cluster_data(n=8, noise=0.05):
    gen = torch.Generator().manual_seed(2)
    c = torch.tensor([0.5] * (n // 2) + [-0.5] * (n // 2)).reshape(-1, 1, 1, 1)
    return c + noise * torch.randn(n, *SHAPE, generator=gen), torch.tensor([0] * (n // 2) + [1] * (n // 2))


def test_the_true_expert_predicts_its_cluster_better():
    experts = [PointMass(0.5, "a"), PointMass(-0.5, "b")]
    x0, clusters = _cluster_data()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    t = torch.full((8,), 0.2)  # low enough noise for the mean-brightness router to see the cluster
    err = expert_errors(experts, x0, eps, t, torch.full((8,), -1))  # (B, K)
    assert err.shape == (8, 2)
    assert (err[clusters == 0, 0] < err[clusters == 0, 1]).all()
    assert (err[clusters == 1, 1] < err[clusters == 1, 0]).all()
    # good router: picks the own-cluster expert, whose error is the lower
    ens = RoutedEnsemble(experts, Router(), RoutingConfig("top-k", 1))
    good = real_data_alignment(ens, x0, torch.full((8,), -1), 0.2, eps=eps, clusters=clusters)
    assert good["best_selected"] == 1.0 and good["selected"] < good["other"]
    assert torch.allclose(good["own_error"], good["selected_per_sample"].float())
    assert ens.last is None and int(ens.calls.sum()) == 0  # the routing query left no trace
    # mid-trajectory at another batch size: the trajectory's Gumbel draw survives the query
    ens.reset(3, x0.device)
    gumbel = ens.gumbel
    real_data_alignment(ens, x0, torch.full((8,), -1), 0.2, eps=eps)
    assert ens.gumbel is gumbel
    # a router stuck on expert 1 selects the worse expert for cluster 0
    stuck = RoutedEnsemble(experts, Router(fixed=[0.0, 1.0]), RoutingConfig("top-k", 1))
    bad = real_data_alignment(stuck, x0[:4], torch.full((4,), -1), 0.2, eps=eps[:4])
    assert bad["best_selected"] == 0.0 and bad["selected"] > bad["other"]
    # full routing selects everyone: no "other" group
    full = real_data_alignment(RoutedEnsemble(experts, Router(), RoutingConfig("full")), x0, torch.full((8,), -1), 0.5)
    assert math.isnan(full["other"]) and full["best_selected"] == 1.0


# ------------------------------------------------------------------------------------ tracing


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("routing", [RoutingConfig("top-k", 1), RoutingConfig("full"), RoutingConfig("sample-k", 1)])
def test_trace_follows_the_sampler_exactly(method, routing):
    experts = [PointMass(0.5, "a"), PointMass(-0.5, "b"), Linear(0.3, "c")]

    class Router3(Router):
        def __init__(self):
            super().__init__()
            self.cfg = type("C", (), {"num_clusters": 3})()

        def probs(self, x, t, labels):
            m = x.flatten(1).mean(1)
            return torch.stack([5 * m, -5 * m, torch.zeros_like(m)], 1).softmax(1)

    noise = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(4))
    ref = RoutedEnsemble(experts, Router3(), routing, seed=7)
    x_ref = sample(ref, noise, NONE, steps=5, method=method)
    ens = RoutedEnsemble(experts, Router3(), routing, seed=7)
    seen = []
    tr = trace_sampling(ens, noise, NONE, steps=5, method=method, partition=None,
                        lipschitz=LipschitzConfig(directions=2, every=2), callback=seen.append)
    assert torch.equal(tr.x0, x_ref)
    assert torch.equal(ens.calls, ref.calls)  # diagnostic calls are not counted as sampling cost
    assert [s.step for s in seen] == list(range(5)) and torch.equal(seen[-1].x, x_ref)
    assert tr.weights.shape == (5, 6, 3) and tr.step_change.shape == (5, 6) and tr.disagreement.shape == (5, 6)
    assert torch.isnan(tr.lipschitz[1]).all() and torch.isfinite(tr.lipschitz[[0, 2, 4]]).all()
    if routing.strategy != "full":
        assert (tr.disagreement == 0).all()  # one expert per sample: nothing to disagree
    json.dumps(tr.summary())


def test_trace_lipschitz_equals_the_standalone_estimate():
    experts = [Linear(-1.0, "a"), Linear(2.0, "b")]
    ens = RoutedEnsemble(experts, Router(), RoutingConfig("top-k", 1))
    noise = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(5))
    tr = trace_sampling(ens, noise, NONE, steps=3, lipschitz=LipschitzConfig(directions=3, seed=10))
    # step 1 starts from the state after step 0
    x1 = sampler_step(ens, noise, 1.0, 2 / 3, NONE)
    est = local_lipschitz(ens, x1, torch.tensor(2 / 3), torch.tensor(1 / 3), NONE, directions=3, seed=11)
    assert torch.allclose(tr.lipschitz[1], est.per_sample, atol=1e-5)


def test_trace_alignment_top1_lands_on_the_selected_centroid():
    experts = [PointMass(0.5, "a"), PointMass(-0.5, "b")]
    noise = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(6))
    top1 = trace_sampling(RoutedEnsemble(experts, Router(), RoutingConfig("top-k", 1)), noise, NONE, steps=4,
                          partition=_partition())
    s = top1.summary()
    # a point-mass expert predicts x0_hat = its own centroid exactly: distance 0 to the selected, 2 to the other
    assert s["centroid_selected"] == pytest.approx(0.0, abs=1e-6) and s["centroid_other"] == pytest.approx(2.0)
    assert s["centroid_best_selected"] == 1.0 and s["disagreement_mean"] == 0.0 and s["experts_per_step"] == 1.0
    full = trace_sampling(RoutedEnsemble(experts, Router(beta=1.0), RoutingConfig("full")), noise, NONE, steps=4,
                          partition=_partition())
    fs = full.summary()
    assert math.isnan(fs["centroid_other"]) and fs["centroid_selected"] > 0.5  # the mixture sits between clusters
    assert fs["disagreement_mean"] > 0 and fs["experts_per_step"] == 2.0
    per = full.per_sample()
    assert per["disagreement"].shape == (6,) and per["centroid_selected"].shape == (6,)


def test_trace_of_a_plain_model_has_no_routing_diagnostics():
    tr = trace_sampling(Linear(0.5), torch.randn(3, *SHAPE), torch.full((3,), -1), steps=2, partition=_partition())
    assert tr.disagreement is None and tr.lipschitz is None and tr.weights.shape == (2, 3, 1)
    s = tr.summary()
    assert "centroid_selected" not in s and s["centroid_nearest"] >= 0


def test_expert_velocities_only_evaluates_selected_rows():
    experts = [Linear(1.0, "a"), Linear(-1.0, "b")]
    ens = RoutedEnsemble(experts, Router(), RoutingConfig("top-k", 1))
    x = torch.randn(4, *SHAPE)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    vel = expert_velocities(ens, x, torch.full((4,), 0.5), torch.full((4,), -1), weights=w)
    assert torch.equal(vel[0, [0, 2]], x[[0, 2]]) and (vel[0, [1, 3]] == 0).all()
    assert torch.equal(vel[1, [1, 3]], -x[[1, 3]]) and (vel[1, [0, 2]] == 0).all()
