import torch

from diffswarm.experts.schedules import FM_TIME_SCALE, ScheduleConfig, VPSchedule, flow_point


def test_linear_schedule_matches_ddpm_definition():
    s = VPSchedule(ScheduleConfig(kind="linear"))
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(s.alpha_bar, torch.cumprod(1 - betas, 0))
    assert s.alpha_bar[0] > 0.9998 and s.alpha_bar[-1] < 1e-4


def test_cosine_schedule_is_decreasing_and_ends_near_zero():
    s = VPSchedule(ScheduleConfig(kind="cosine"))
    assert (s.alpha_bar[1:] < s.alpha_bar[:-1]).all()
    assert s.alpha_bar[-1] < 1e-6
    assert abs(float(s.alpha_bar[499]) - 0.5) < 0.05  # cosine: half signal at mid-schedule


def test_continuous_alpha_bar_interpolates_integer_steps():
    s = VPSchedule(ScheduleConfig(kind="cosine"))
    tau = torch.arange(0, 1000, 37, dtype=torch.float64)
    assert torch.allclose(s.alpha_bar_at(tau), s.alpha_bar[tau.long()], rtol=1e-9)
    mid = s.alpha_bar_at(torch.tensor([10.5], dtype=torch.float64))
    assert s.alpha_bar[11] < mid < s.alpha_bar[10]


def test_tau_for_logsnr_inverts_the_schedule():
    for kind in ("linear", "cosine"):
        s = VPSchedule(ScheduleConfig(kind=kind))
        tau = torch.tensor([0.0, 3.25, 100.0, 511.7, 998.5, 999.0], dtype=torch.float64)
        assert torch.allclose(s.tau_for_logsnr(s._interp_logsnr(tau)), tau, atol=1e-6)


def test_snr_matched_step_has_the_flow_points_noise_level():
    s = VPSchedule(ScheduleConfig(kind="linear"))
    t = torch.linspace(0.05, 0.9, 18, dtype=torch.float64)
    ab = s.alpha_bar_at(s.tau_for_flow_time(t))
    r2 = (1 - t) ** 2 + t**2
    assert torch.allclose(ab, (1 - t) ** 2 / r2, rtol=1e-6)


def test_snr_matching_clamps_outside_the_schedule():
    s = VPSchedule(ScheduleConfig(kind="linear"))
    tau = s.tau_for_flow_time(torch.tensor([0.0, 1.0]))
    assert tau.tolist() == [0.0, 999.0]


def test_flow_point_endpoints():
    x0, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    assert torch.equal(flow_point(x0, eps, torch.zeros(2)), x0)
    assert torch.equal(flow_point(x0, eps, torch.ones(2)), eps)
    assert FM_TIME_SCALE == 999.0
