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


def test_sample_k_is_sticky_for_fixed_noise():
    g = sample_gumbel((2, 4), torch.Generator().manual_seed(1), "cpu")
    a = choose_experts(P, ALL, RoutingConfig("sample-k", 2), gumbel=g)
    b = choose_experts(P, ALL, RoutingConfig("sample-k", 2), gumbel=g)
    assert torch.equal(a, b)


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
