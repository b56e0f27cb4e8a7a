"""The translator ablations of HDDM, and cost accounting, over the project's experts and ensembles.

Native DDPM sampling (:func:`sample_native_ddim`, :func:`sample_native_dpm`)
    A routed ensemble of DDPM experts integrated in its own variance-preserving space. At step tau the
    state is the VP point x_vp = a x0 + s eps (a = sqrt(abar(tau)), s = sqrt(1 - abar)); the router is
    asked at the matching flow point x_t = x_vp / (a + s), t = s / (a + s) (the inverse of the
    translator's SNR matching), each chosen expert's network predicts eps at (x_vp, tau) with CFG, and
    the eps are mixed with the routing weights. The same (B, C, H, W) noise starts every sampler
    (abar(T - 1) is ~0, so x_vp at tau = T - 1 is the noise). Timesteps: diffusers' "trailing" spacing
    (the first step is tau = T - 1, the last lands on the data, abar = 1).

    - DDIM (eta = 0): x_prev = a' x0_hat + s' eps_hat with x0_hat = (x_vp - s eps_hat) / a, clipped
      **exactly as the translator clips** (translator.py): where t >= T_SWITCH, x0_hat is clipped to
      [-x0_clip, x0_clip] and eps_hat recomputed from it, and a is floored as (1 - t) is there. For one
      expert, DDIM on a grid of steps is then algebraically the translator + Euler on the SNR-matched
      flow grid (x_t' = (1 - t') x0_hat + t' eps_hat either way; tests/test_eval_study.py checks it
      numerically), so a gap between the two measures the time grid, not the translator.
    - DPM-Solver++ (2M, diffusers' ``DPMSolverMultistepScheduler``, its x0 prediction held to the data range by
      diffusers' dynamic thresholding at ``x0_clip``: without it x0 = (x - s eps) / a explodes at the first
      step, where a ~ 0, and the quick run's FD was 159 against the translator's 30): a native
      second-order solver, compared with the translator + Heun at the same network evaluations.

No translator (:class:`NoTranslator`)
    HDDM's "one shared schedule" ablation. A DDPM expert queried as an FM expert makes three errors:
    the input scale (raw x_t instead of the VP point x_t / r), the noise level (tau = 999 t,
    ``FM_TIME_SCALE``, instead of the SNR-matched tau(t)) and the output (eps taken for v). ``errors``
    picks them: ``all`` (the published ablation) or one at a time (``scale``, ``time``, ``output``),
    the other two done right. FM experts are unchanged (it is how they are always queried).

Cost (:func:`forward_flops`)
    FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one forward call: every
    matmul, convolution and attention product the aten ops perform (elementwise ops, norms and
    activations are not counted). One expert "call" is one row of ``Expert.velocity`` with the
    run's guidance, i.e. two network rows under CFG.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from diffswarm.experts.expert import Expert
from diffswarm.experts.schedules import FM_TIME_SCALE
from diffswarm.experts.translator import DENOM_FLOOR, T_SWITCH, eps_to_velocity
from diffswarm.router.ensemble import RoutedEnsemble
from diffswarm.sampling.hooks import RouteRecord

NO_TRANSLATOR_ERRORS = ("all", "scale", "time", "output")


class NoTranslator:
    """An expert queried (partly) as if it were an FM expert: the module docstring's errors, all or one."""

    def __init__(self, expert: Expert, errors: str = "all"):
        if errors not in NO_TRANSLATOR_ERRORS:
            raise ValueError(f"errors must be one of {NO_TRANSLATOR_ERRORS}, got {errors!r}")
        self.expert, self.errors = expert, errors
        self.config = expert.config
        self.expert_id = expert.expert_id + ("" if expert.config.objective == "fm" else f"(raw:{errors})")

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
        t = t.to(device=x.device, dtype=x.dtype)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        e = self.expert
        if e.schedule is None:  # FM: nothing to get wrong
            return e.velocity(x, t, labels, guidance)
        if self.errors == "all":
            return e.network_output(x, t * FM_TIME_SCALE, labels, guidance)
        vp, tau = e.network_input(x, t)  # done right: (x_t / r, tau(t))
        inp = x if self.errors == "scale" else vp
        ts = t * FM_TIME_SCALE if self.errors == "time" else tau
        out = e.network_output(inp, ts, labels, guidance)
        return out if self.errors == "output" else eps_to_velocity(x, t, out, e.config.x0_clip)


def trailing_timesteps(train_steps: int, steps: int) -> list[int]:
    """diffusers' "trailing" spacing: ``steps`` DDPM steps from T - 1 down, evenly spaced (first T - 1)."""
    if not 1 <= steps <= train_steps:
        raise ValueError(f"need 1 <= steps <= {train_steps}, got {steps}")
    return [int(v) for v in np.round(np.arange(train_steps, 0, -train_steps / steps)).astype(np.int64) - 1]


def ddim_update(x: torch.Tensor, eps: torch.Tensor, abar: float, abar_prev: float,
                x0_clip: float | None) -> torch.Tensor:
    """One DDIM (eta = 0) step of VP point x (B, C, H, W) at alpha_bar ``abar`` to ``abar_prev``, with the
    translator's clipping (module docstring): where t = s / (a + s) >= T_SWITCH, x0_hat is clipped and eps
    recomputed."""
    a, s = math.sqrt(abar), math.sqrt(1.0 - abar)
    t = s / (a + s)  # the SNR-matched flow time
    a_eff = max(a, DENOM_FLOOR * (a + s))  # (1 - t) floored as the translator floors it
    x0 = (x - s * eps) / a_eff
    if t >= T_SWITCH and x0_clip is not None:
        x0 = x0.clamp(-x0_clip, x0_clip)
        eps = (x - a * x0) / s
    return math.sqrt(abar_prev) * x0 + math.sqrt(1.0 - abar_prev) * eps


def _ddpm_experts(ens: RoutedEnsemble) -> Expert:
    """The first expert, after checking that every expert is a DDPM expert of one schedule."""
    first = ens.experts[0]
    for e in ens.experts:
        if e.config.objective != "ddpm" or e.config.schedule != first.config.schedule:
            raise ValueError("native DDPM sampling needs DDPM experts that share one schedule")
    return first


def _native_loop(ens: RoutedEnsemble, noise: torch.Tensor, labels: torch.Tensor, timesteps: list[int],
                 guidance: float, step) -> torch.Tensor:
    """Shared loop of the native samplers: route at the SNR-matched flow point, mix the chosen experts' eps
    (counted in ``ens.calls``; the last routing in ``ens.last``), then ``step(eps, i, tau, x) -> x_prev``."""
    first = _ddpm_experts(ens)
    abar = first.schedule.alpha_bar.to(noise.device)
    b = noise.shape[0]
    ens.reset(b, noise.device)
    x = noise
    for i, tau in enumerate(timesteps):
        ab = abar[int(tau)].to(x.dtype)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        t = (s / (a + s)).expand(b)  # (B,) flow time with the same SNR
        probs = ens.route_probs(x / (a + s), t, labels)  # routed at the flow point x_t = x_vp / (a + s)
        weights = ens.choose(probs, ens.available(), float(t[0]))
        eps = torch.zeros_like(x)
        ts = torch.full((b,), float(tau), device=x.device, dtype=x.dtype)
        for k, expert in enumerate(ens.experts):
            rows = (weights[:, k] > 0).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            out = expert.network_output(x[rows], ts[rows], labels[rows], guidance)  # (b, C, H, W) eps
            eps.index_add_(0, rows, weights[rows, k].to(x.dtype).reshape(-1, 1, 1, 1) * out)
            ens.calls[k] += rows.numel()
        chosen = [ens.expert_ids[k] for k in range(ens.num_experts) if bool((weights[:, k] > 0).any())]
        ens.last = RouteRecord(weights=weights.detach().cpu(), chosen=chosen, events=[])
        x = step(eps, i, int(tau), x)
    return x


@torch.no_grad()
def sample_native_ddim(ens: RoutedEnsemble, noise: torch.Tensor, labels: torch.Tensor, steps: int,
                       guidance: float = 1.0) -> torch.Tensor:
    """Sample a routed ensemble of DDPM experts natively with DDIM (module docstring). (B, C, H, W) -> same."""
    sched = _ddpm_experts(ens).schedule
    taus = trailing_timesteps(sched.steps, steps)
    abar = sched.alpha_bar.double()
    clip = ens.experts[0].config.x0_clip

    def step(eps, i, tau, x):
        prev = float(abar[taus[i + 1]]) if i + 1 < len(taus) else 1.0
        return ddim_update(x, eps, float(abar[tau]), prev, clip)

    return _native_loop(ens, noise, labels, taus, guidance, step)


@torch.no_grad()
def sample_native_dpm(ens: RoutedEnsemble, noise: torch.Tensor, labels: torch.Tensor, steps: int,
                      guidance: float = 1.0) -> torch.Tensor:
    """Sample a routed ensemble of DDPM experts with DPM-Solver++ (2M; diffusers), ``steps`` network evaluations."""
    from diffusers import DPMSolverMultistepScheduler

    first = _ddpm_experts(ens)
    abar = first.schedule.alpha_bar  # (T,) float64
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])  # (T,)
    sched = DPMSolverMultistepScheduler(num_train_timesteps=first.schedule.steps, trained_betas=betas.numpy(),
                                        algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon",
                                        timestep_spacing="trailing", lower_order_final=True,
                                        # its x0 prediction held to the data range, as the translator's clipping
                                        thresholding=True, sample_max_value=first.config.x0_clip or 1.0,
                                        final_sigmas_type="zero")
    sched.set_timesteps(steps)
    taus = [int(v) for v in sched.timesteps]
    return _native_loop(ens, noise, labels, taus, guidance,
                        lambda eps, i, tau, x: sched.step(eps, tau, x).prev_sample)


def forward_flops(fn) -> int:
    """FLOPs of one call of ``fn()`` (``FlopCounterMode``: matmuls, convolutions, attention; see the module doc)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@torch.no_grad()
def velocity_flops(model, shape: tuple[int, int, int], guidance: float, num_classes: int, device="cpu") -> int:
    """FLOPs of one row of ``model.velocity`` (an expert: both CFG halves when guided) at flow time 0.5."""
    x = torch.zeros(1, *shape, device=device)
    t = torch.full((1,), 0.5, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device) if num_classes else torch.full((1,), -1, device=device)
    return forward_flops(lambda: model.velocity(x, t, y, guidance))


@torch.no_grad()
def router_flops(router, shape: tuple[int, int, int], device="cpu") -> int:
    """FLOPs of one row of ``router.probs`` at flow time 0.5."""
    x = torch.zeros(1, *shape, device=device)
    t = torch.full((1,), 0.5, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    return forward_flops(lambda: router.probs(x, t, y))


__all__ = ["NO_TRANSLATOR_ERRORS", "NoTranslator", "ddim_update", "forward_flops", "router_flops", "sample_native_ddim",
           "sample_native_dpm", "trailing_timesteps", "velocity_flops"]
