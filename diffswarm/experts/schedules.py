"""Time conventions and noise schedules, stated once.

Flow time (the shared convention every expert answers in)
----------------------------------------------------------
- ``t`` in [0, 1] is a (B,) tensor; t = 0 is data, t = 1 is pure noise.
- ``x_t = (1 - t) * x0 + t * eps`` with ``eps ~ N(0, I)``.
- velocity ``v = dx_t/dt = eps - x0``; sampling integrates dx/dt = v from t = 1 to t = 0.
- diffusers' ``FlowMatchEulerDiscreteScheduler`` uses the same convention (its sigma is our t).

DDPM (variance preserving) time
-------------------------------
- discrete steps ``tau = 0 .. T-1``; ``x = sqrt(abar(tau)) * x0 + sqrt(1 - abar(tau)) * eps``.
- ``VPSchedule`` extends ``abar`` to real-valued tau by linear interpolation of the log-SNR
  ``lambda(tau) = log(abar / (1 - abar))`` between integer steps, and inverts it
  (``tau_for_logsnr``), which is what the eps -> velocity translator needs.

Networks see their own time scale: DDPM networks get tau, FM networks get ``FM_TIME_SCALE * t``
(999 * t), so a DDPM trunk already knows the embedding range when an FM expert is initialised
from it (HDDM's checkpoint conversion).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

FM_TIME_SCALE = 999.0


def flow_point(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps. x0, eps: (B, ...); t: (B,)."""
    tb = bcast(t, x0)
    return (1 - tb) * x0 + tb * eps


def bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor to broadcast against ``like`` (B, ...) and match its dtype."""
    return t.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class ScheduleConfig:
    """A DDPM beta schedule; saved inside DDPM checkpoints."""

    kind: str = "cosine"  # linear | cosine
    steps: int = 1000  # T
    beta_start: float = 1e-4  # linear only
    beta_end: float = 0.02  # linear only

    def to_dict(self) -> dict:
        return asdict(self)


class VPSchedule:
    """Variance-preserving schedule ``abar(tau)`` with a continuous, invertible extension.

    ``linear``: betas from beta_start to beta_end (Ho et al. 2020).
    ``cosine``: Nichol & Dhariwal 2021, ``abar = cos^2(((tau/T) + s) / (1 + s) * pi/2)``, betas
    clipped at 0.999 as in diffusers' ``squaredcos_cap_v2``.
    """

    def __init__(self, cfg: ScheduleConfig = ScheduleConfig()):
        self.cfg = cfg
        T = cfg.steps
        if cfg.kind == "linear":
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
        elif cfg.kind == "cosine":
            s = 0.008

            def f(u: float) -> float:
                return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

            betas = torch.tensor(
                [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64
            )
        else:
            raise ValueError(f"unknown schedule {cfg.kind!r}; choose 'linear' or 'cosine'")
        self.alpha_bar = torch.cumprod(1 - betas, dim=0)  # (T,) float64, decreasing
        self.logsnr = torch.log(self.alpha_bar) - torch.log1p(-self.alpha_bar)  # (T,) decreasing

    @property
    def steps(self) -> int:
        return self.cfg.steps

    def alpha_bar_at(self, tau: torch.Tensor) -> torch.Tensor:
        """abar at real-valued tau in [0, T-1] (log-SNR interpolated). tau: (B,) -> (B,)."""
        lam = self._interp_logsnr(tau)
        return torch.sigmoid(lam).to(tau.dtype if tau.is_floating_point() else torch.float32)

    def _interp_logsnr(self, tau: torch.Tensor) -> torch.Tensor:
        table = self.logsnr.to(tau.device)
        tau = tau.to(torch.float64).clamp(0, self.steps - 1)
        lo = tau.floor().long().clamp(max=self.steps - 2)
        frac = tau - lo
        return table[lo] * (1 - frac) + table[lo + 1] * frac

    def tau_for_logsnr(self, lam: torch.Tensor) -> torch.Tensor:
        """Real-valued tau with logsnr(tau) = lam, clamped to [0, T-1]. lam: (B,) -> (B,) float64."""
        table = self.logsnr.to(lam.device)
        neg = (-table).contiguous()  # increasing
        target = (-lam.to(torch.float64)).clamp(neg[0].item(), neg[-1].item())
        hi = torch.searchsorted(neg, target).clamp(1, self.steps - 1)  # first index with neg >= target
        lo = hi - 1
        span = (neg[hi] - neg[lo]).clamp_min(1e-12)
        frac = ((target - neg[lo]) / span).clamp(0, 1)
        return lo.to(torch.float64) + frac

    def tau_for_flow_time(self, t: torch.Tensor) -> torch.Tensor:
        """The DDPM step whose noise level matches flow time t (SNR matching). t: (B,) -> (B,).

        A flow point x_t is a scaled VP point: x_t / r = a x0 + s eps with r = sqrt((1-t)^2 + t^2),
        a = (1-t)/r, s = t/r, so abar* = a^2 and logsnr* = 2 log((1-t)/t).
        """
        t64 = t.to(torch.float64).clamp(1e-12, 1 - 1e-12)
        lam = 2 * (torch.log1p(-t64) - torch.log(t64))
        return self.tau_for_logsnr(lam)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """VP point sqrt(abar) x0 + sqrt(1-abar) eps at real-valued tau (B,)."""
        ab = bcast(self.alpha_bar_at(tau.to(torch.float64)), x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps
