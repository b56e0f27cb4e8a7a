import pytest
import torch

from diffswarm.router.routing import NoExpertsError, RoutingConfig, choose_experts, sample_gumbel

P = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
ALL = torch.ones(4, dtype=torch.bool)


def test_top_k_keeps_k_largest_and_renormalises():
    w = choose_experts(P, ALL, RoutingConfig("top-k", 2))
    assert torch.allclose(w[0], torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(w[1], torch.tensor([0, 0, 3 / 7, 4 / 7]))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_top_k_any_k_rows_sum_to_one(k):
    w = choose_experts(P, ALL, RoutingConfig("top-k", k))
    assert torch.allclose(w.sum(-1), torch.ones(2))
    assert ((w > 0).sum(-1) == min(k, 4)).all()


def test_full_is_router_probabilities():
    assert torch.allclose(choose_experts(P, ALL, RoutingConfig("full")), P)


def test_unavailable_experts_get_zero_and_top_k_moves_on():
    avail = torch.tensor([False, True, True, True])
    w = choose_experts(P, avail, RoutingConfig("top-k", 2))
    assert w[0, 0] == 0
    assert torch.allclose(w[0], torch.tensor([0, 0.3 / 0.45, 0.15 / 0.45, 0]))


def test_threshold_keeps_at_least_argmax():
    w = choose_experts(P, ALL, RoutingConfig("threshold", threshold=0.25))
    assert torch.allclose(w[0], torch.tensor([0.5 / 0.8, 0.3 / 0.8, 0, 0]))
    assert torch.allclose(w[1], torch.tensor([0, 0, 3 / 7, 4 / 7]))
    w = choose_experts(P, ALL, RoutingConfig("threshold", threshold=0.9))
    assert torch.allclose(w, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))


def test_sample_k_follows_router_probabilities():
    n = 20000
    probs = torch.tensor([0.6, 0.3, 0.1]).expand(n, 3)
    g = sample_gumbel((n, 3), torch.Generator().manual_seed(0), "cpu")
    w = choose_experts(probs, torch.ones(3, dtype=torch.bool), RoutingConfig("sample-k", 1), gumbel=g)
    share = (w > 0).float().mean(0)
    assert torch.allclose(share, torch.tensor([0.6, 0.3, 0.1]), atol=0.02)


class _Field:
    def __init__(self, c):
        self.c = c

    def velocity(self, x, t, labels, guidance=1.0):
        return x - self.c


class _Router:
    """p(k) = base, plus a drift linear in t (a real router's p moves along the trajectory)."""

    cfg = type("C", (), {"num_clusters": 4})()

    def __init__(self, drift: float):
        self.drift = drift

    def probs(self, x, t, labels):
        p = torch.tensor([0.4, 0.3, 0.2, 0.1]) + self.drift * t.reshape(-1, 1) * torch.tensor([-1.0, 1.0, -1.0, 1.0])
        return (p / p.sum(-1, keepdim=True)).expand(x.shape[0], -1)


def _sample_k_choices(drift: float, seed: int, n: int = 400, steps: int = 12, draw: str = "trajectory"
                      ) -> torch.Tensor:
    """(steps, n) expert chosen by sample-1 at every step of one trajectory batch."""
    from diffswarm.router.ensemble import RoutedEnsemble
    from diffswarm.sampling.loop import sample

    ens = RoutedEnsemble([_Field(float(k)) for k in range(4)], _Router(drift), RoutingConfig("sample-k", 1, draw=draw),
                         seed=seed)
    chosen = []
    sample(ens, torch.randn(n, 1, 2, 2), torch.full((n,), -1), steps=steps,
           callback=lambda info: chosen.append(info.weights.argmax(-1)))
    return torch.stack(chosen)


def test_sample_k_keeps_each_trajectory_on_its_experts_across_steps():
    """draw="trajectory": every sample keeps the expert it drew at step 0 for the whole run, even while p drifts,
    and samples draw experts in proportion to p."""
    chosen = _sample_k_choices(0.0, seed=3)
    assert (chosen == chosen[0]).all(), "a trajectory switched experts between steps"
    share = torch.bincount(chosen[0], minlength=4).float() / chosen.shape[1]
    assert torch.allclose(share, torch.tensor([0.4, 0.3, 0.2, 0.1]), atol=0.07)
    drifting = _sample_k_choices(0.08, seed=3)
    assert (drifting == drifting[0]).all(), "drawn once per trajectory, kept while p moves"
    # another trajectory (seed) draws again: stickiness is per trajectory, not global
    assert (_sample_k_choices(0.0, seed=4)[0] != chosen[0]).float().mean() > 0.3


def test_sample_k_redrawn_at_every_step_as_ddm():
    """draw="step": fresh noise at every evaluation, so 1 - sum p^2 = 70% of the samples switch per step."""
    chosen = _sample_k_choices(0.0, seed=3, draw="step")
    switch = (chosen[1:] != chosen[:-1]).float().mean()
    assert abs(float(switch) - 0.70) < 0.05
    share = torch.bincount(chosen.reshape(-1), minlength=4).float() / chosen.numel()
    assert torch.allclose(share, torch.tensor([0.4, 0.3, 0.2, 0.1]), atol=0.03)
    assert torch.equal(chosen, _sample_k_choices(0.0, seed=3, draw="step"))  # seeded: reproducible
    with pytest.raises(ValueError, match="draw"):
        RoutingConfig("sample-k", 1, draw="sometimes")


def test_full_above_switches_strategy_by_time():
    cfg = RoutingConfig("top-k", 1, full_above=0.5)
    assert torch.allclose(choose_experts(P, ALL, cfg, t=0.8), P)
    assert ((choose_experts(P, ALL, cfg, t=0.2) > 0).sum(-1) == 1).all()


def test_no_available_expert_raises():
    with pytest.raises(NoExpertsError):
        choose_experts(P, torch.zeros(4, dtype=torch.bool), RoutingConfig())


def test_bad_config_raises():
    with pytest.raises(ValueError):
        RoutingConfig("argmax")
    with pytest.raises(ValueError):
        RoutingConfig("top-k", 0)
