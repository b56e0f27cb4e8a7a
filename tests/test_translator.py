"""The universal translator: true eps in, true velocity out; finite at t = 1."""

import torch

from diffswarm.experts.config import ExpertConfig
from diffswarm.experts.expert import Expert
from diffswarm.experts.networks import NetConfig
from diffswarm.experts.schedules import ScheduleConfig, VPSchedule, flow_point
from diffswarm.experts.translator import eps_to_velocity, flow_to_vp_scale


def _data(n=64, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.rand(n, 1, 6, 6, generator=g, dtype=dtype) * 2 - 1)  # data range [-1, 1]
    eps = torch.randn(n, 1, 6, 6, generator=g, dtype=dtype)
    return x0, eps


def test_true_eps_gives_true_velocity_float64_across_t():
    x0, eps = _data()
    t = torch.linspace(1e-4, 1 - 1e-4, 64, dtype=torch.float64)
    v = eps_to_velocity(flow_point(x0, eps, t), t, eps)
    assert torch.allclose(v, eps - x0, atol=1e-9)


def test_true_eps_gives_true_velocity_float32():
    x0, eps = _data(dtype=torch.float32)
    t = torch.linspace(0.001, 0.99, 64)
    v = eps_to_velocity(flow_point(x0, eps, t), t, eps)
    assert torch.allclose(v, eps - x0, atol=1e-4)


def test_t_equal_one_is_finite_and_bounded_even_for_wrong_eps():
    x0, eps = _data(dtype=torch.float32)
    t = torch.ones(x0.shape[0])
    x1 = flow_point(x0, eps, t)
    for eps_hat in (eps, eps + 0.3 * torch.randn_like(eps), torch.zeros_like(eps), 100 * torch.randn_like(eps)):
        v = eps_to_velocity(x1, t, eps_hat)
        assert torch.isfinite(v).all()
        # |v| <= |x_t| + x0_clip by construction
        assert (v.abs() <= x1.abs() + 1.0 + 1e-5).all()


def test_high_noise_error_is_not_amplified():
    """An eps error at t = 0.99 would be amplified 100x by the plain formula; the clipped branch is bounded."""
    x0, eps = _data(dtype=torch.float32)
    t = torch.full((x0.shape[0],), 0.99)
    xt = flow_point(x0, eps, t)
    err = eps_to_velocity(xt, t, eps + 0.1) - (eps - x0)
    assert err.abs().max() < 2.1  # at most |x0_hat - x0| / t <= 2 / 0.99


class _OracleEps(torch.nn.Module):
    """A 'network' that returns the exact eps of a VP point, knowing x0."""

    def __init__(self, x0, schedule):
        super().__init__()
        self.x0, self.schedule = x0, schedule

    def forward(self, x, tau, labels):
        ab = self.schedule.alpha_bar_at(tau.double()).to(x.dtype).reshape(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()


def test_ddpm_expert_adapter_with_oracle_network_returns_true_velocity():
    x0, eps = _data(dtype=torch.float64)
    for kind in ("linear", "cosine"):
        cfg = ExpertConfig(objective="ddpm", net=NetConfig(kind="mlp", size=6, width=8, depth=1, num_classes=0),
                           schedule=ScheduleConfig(kind=kind))
        sched = VPSchedule(cfg.schedule)
        expert = Expert(cfg, net=_OracleEps(x0, sched))
        # inside the schedule's noise range the oracle is exact
        lo, hi = 0.02, 0.97 if kind == "linear" else 0.999
        t = torch.linspace(lo, hi, x0.shape[0], dtype=torch.float64)
        v = expert.velocity(flow_point(x0, eps, t), t, torch.full((x0.shape[0],), -1))
        assert torch.allclose(v, eps - x0, atol=1e-6), kind


def test_vp_scale():
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(flow_to_vp_scale(t), torch.tensor([1.0, 0.5**0.5, 1.0]))
