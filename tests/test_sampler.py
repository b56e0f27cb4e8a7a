"""Samplers and the routed ensemble over tiny analytic models."""

import pytest
import torch

from diffswarm.router.ensemble import RoutedEnsemble
from diffswarm.router.routing import RoutingConfig
from diffswarm.sampling.loop import StepInfo, sample


class ConstantField:
    """v = x - c: the exact flow from N(0, I) to the point mass at c (x_t = (1-t) c + t eps)."""

    def __init__(self, c: float, expert_id: str):
        self.c, self.expert_id, self.calls = c, expert_id, []

    def velocity(self, x, t, labels, guidance=1.0):
        self.calls.append(x.shape[0])
        # exact velocity field for the data distribution delta(c): v = (x - c) / t
        return (x - self.c) / t.clamp_min(1e-6).reshape(-1, 1, 1, 1)


class FixedRouter:
    def __init__(self, probs):
        self.probs_ = torch.tensor(probs)
        self.cfg = type("C", (), {"num_clusters": len(probs)})()

    def probs(self, x, t, labels):
        return self.probs_.expand(x.shape[0], -1)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sampler_reaches_point_mass_exactly(method):
    model = ConstantField(0.5, "c")
    x = sample(model, torch.randn(3, 1, 2, 2), torch.full((3,), -1), steps=4, method=method)
    assert torch.allclose(x, torch.full_like(x, 0.5), atol=1e-5)


def test_callback_reports_every_step_with_routing():
    experts = [ConstantField(-1.0, "a"), ConstantField(1.0, "b"), ConstantField(0.0, "c")]
    ens = RoutedEnsemble(experts, FixedRouter([0.6, 0.3, 0.1]), RoutingConfig("top-k", 2))
    seen: list[StepInfo] = []
    sample(ens, torch.randn(5, 1, 2, 2), torch.full((5,), -1), steps=6, callback=seen.append)
    assert [s.step for s in seen] == list(range(6))
    assert seen[0].t == 1.0 and seen[-1].t_next == 0.0
    assert seen[0].expert_ids == ["a", "b", "c"] and seen[0].chosen == ["a", "b"]
    assert torch.allclose(seen[0].weights[0], torch.tensor([2 / 3, 1 / 3, 0.0]))
    assert seen[-1].x.shape == (5, 1, 2, 2)


def test_only_chosen_experts_are_evaluated():
    experts = [ConstantField(-1.0, "a"), ConstantField(1.0, "b"), ConstantField(0.0, "c")]
    ens = RoutedEnsemble(experts, FixedRouter([0.6, 0.3, 0.1]), RoutingConfig("top-k", 1))
    x = sample(ens, torch.randn(4, 1, 2, 2), torch.full((4,), -1), steps=5)
    assert len(experts[0].calls) == 5 and experts[1].calls == [] and experts[2].calls == []
    assert torch.allclose(x, torch.full_like(x, -1.0), atol=1e-5)


def test_mixture_of_point_masses_is_the_weighted_velocity():
    """Full routing with fixed weights mixes velocities linearly at every step."""
    experts = [ConstantField(-1.0, "a"), ConstantField(1.0, "b")]
    ens = RoutedEnsemble(experts, FixedRouter([0.25, 0.75]), RoutingConfig("full"))
    x = torch.randn(2, 1, 2, 2)
    t = torch.full((2,), 0.5)
    v = ens.velocity(x, t, torch.full((2,), -1))
    want = 0.25 * experts[0].velocity(x, t, None) + 0.75 * experts[1].velocity(x, t, None)
    assert torch.allclose(v, want)


def test_per_sample_routing_evaluates_each_expert_on_its_rows_only():
    class RowRouter(FixedRouter):
        def probs(self, x, t, labels):  # sample i prefers expert i % 2
            p = torch.zeros(x.shape[0], 2)
            p[torch.arange(x.shape[0]), torch.arange(x.shape[0]) % 2] = 1.0
            return p

    experts = [ConstantField(-1.0, "a"), ConstantField(1.0, "b")]
    ens = RoutedEnsemble(experts, RowRouter([0.5, 0.5]), RoutingConfig("top-k", 1))
    x = sample(ens, torch.randn(4, 1, 1, 1), torch.full((4,), -1), steps=3)
    assert experts[0].calls == [2, 2, 2] and experts[1].calls == [2, 2, 2]
    assert torch.allclose(x.flatten(), torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5)


def test_router_and_expert_count_must_match():
    with pytest.raises(ValueError):
        RoutedEnsemble([ConstantField(0, "a")], FixedRouter([0.5, 0.5]), RoutingConfig())


def test_bad_sampler_arguments():
    with pytest.raises(ValueError):
        sample(ConstantField(0, "a"), torch.randn(1, 1, 1, 1), torch.zeros(1), method="rk4")
