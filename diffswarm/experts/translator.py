"""The universal translator: an epsilon prediction becomes a velocity in flow time.

Implements the eps-to-velocity conversion of HDDM (Jiang et al. 2026, Sec. 3), in the flow
convention of ``schedules.py`` (t = 0 data, x_t = (1-t) x0 + t eps, v = eps - x0):

1. r = sqrt((1-t)^2 + t^2); the DDPM network sees x_t / r at the SNR-matched step tau(t).
2. x0_hat = (x_t - t * eps_hat) / (1 - t).
3. v_hat = eps_hat - x0_hat.

The t -> 1 end (documented in docs/architecture.md, tested in tests/test_translator.py):
step 2 divides by (1 - t), so any error in eps_hat is amplified without bound. For
t >= ``T_SWITCH`` (0.5) we instead

2'. compute x0_hat with the denominator floored at ``DENOM_FLOOR`` and clip it to the data range
    [-x0_clip, x0_clip] (pixel-space data lives in [-1, 1]),
3'. write v_hat = (x_t - x0_hat) / t, which is exact algebra (eps = (x_t - (1-t) x0)/t) and
    well conditioned because t >= 0.5.

Both branches return the true velocity when eps_hat is the true eps and x0 lies in the data
range, and stay finite and bounded by |x_t| + x0_clip at t = 1. Below T_SWITCH the plain form is
used (no division by t, which would explode at t -> 0).
"""

from __future__ import annotations

import torch

from diffswarm.experts.schedules import bcast

T_SWITCH = 0.5
DENOM_FLOOR = 1e-4


def flow_to_vp_scale(t: torch.Tensor) -> torch.Tensor:
    """r(t) = sqrt((1-t)^2 + t^2), the factor with x_t / r a unit-variance VP point. (B,) -> (B,)."""
    return ((1 - t) ** 2 + t**2).sqrt()


def eps_to_velocity(
    x_t: torch.Tensor, t: torch.Tensor, eps_hat: torch.Tensor, x0_clip: float | None = 1.0
) -> torch.Tensor:
    """Velocity v = eps - x0 from an epsilon estimate at flow time t.

    x_t, eps_hat: (B, C, H, W); t: (B,) in [0, 1]. ``x0_clip=None`` disables clipping (the
    high-noise branch then only floors the denominator).
    """
    tb = bcast(t, x_t)
    high = tb >= T_SWITCH  # (B, 1, 1, 1)
    # 1. x0 estimate (denominator floored so t = 1 stays finite)
    x0_hat = (x_t - tb * eps_hat) / (1 - tb).clamp_min(DENOM_FLOOR)
    # 2. low noise: plain form, exact and well conditioned for t < 0.5
    v_low = eps_hat - x0_hat
    # 3. high noise: clip x0 to the data range, then v = (x_t - x0)/t with t >= 0.5
    x0_c = x0_hat.clamp(-x0_clip, x0_clip) if x0_clip is not None else x0_hat
    v_high = (x_t - x0_c) / tb.clamp_min(T_SWITCH)
    return torch.where(high, v_high, v_low)


def velocity_to_x0(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Predicted data x0 = x_t - t v (exact in the flow convention). (B, ...) -> (B, ...)."""
    return x_t - bcast(t, x_t) * v
