"""The translator ablations of HDDM, and cost accounting, over the project's experts and ensembles.

Native DDPM sampling (:func:`sample_native_ddim`)
    A routed ensemble of DDPM experts integrated in its own variance-preserving space with
    diffusers' ``DDIMScheduler`` (eta = 0, the experts' own beta schedule passed as
    ``trained_betas``, ``timestep_spacing="trailing"`` so the first step is tau = T - 1, diffusers'
    default ``clip_sample=True`` clipping the predicted x0 to [-1, 1]). At DDIM step tau the state
    is the VP point x_vp = a x0 + s eps (a = sqrt(abar(tau)), s = sqrt(1 - abar)); the router is
    asked at the matching flow point x_t = x_vp / (a + s), t = s / (a + s) (the inverse of the
    translator's SNR matching), each chosen expert's network predicts eps at (x_vp, tau) with CFG,
    and the eps are mixed with the routing weights. No translator is involved: this is what the
    eps -> v translator + Euler in flow time is compared with. The same (B, C, H, W) noise starts
    both (abar(T - 1) is ~0, so x_vp at tau = T - 1 is the noise).

No translator (:class:`NoTranslator`)
    HDDM's "one shared schedule" ablation, defined here as: every expert's network is queried on the
    raw flow point x_t at the FM time scale tau = 999 t (``FM_TIME_SCALE``), and its output (with
    CFG) is used as the velocity as is. FM experts are unchanged by this (it is how they are always
    queried); a DDPM expert's eps prediction, made at the wrong input scale and the wrong noise
    level, is taken for v = eps - x0.

Cost (:func:`forward_flops`)
    FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one forward call: every
    matmul, convolution and attention product the aten ops perform (elementwise ops, norms and
    activations are not counted). One expert "call" is one row of ``Expert.velocity`` with the
    run's guidance, i.e. two network rows under CFG.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffswarm.experts.expert import Expert
from diffswarm.experts.schedules import FM_TIME_SCALE
from diffswarm.router.ensemble import RoutedEnsemble
from diffswarm.router.routing import choose_experts
from diffswarm.sampling.hooks import RouteRecord


class NoTranslator:
    """An expert queried as if it were an FM expert: network(x_t, 999 t) with CFG taken as the velocity."""

    def __init__(self, expert: Expert):
        self.expert = expert
        self.config = expert.config
        self.expert_id = expert.expert_id + ("" if expert.config.objective == "fm" else "(raw)")

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
        t = t.to(device=x.device, dtype=x.dtype)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.expert.network_output(x, t * FM_TIME_SCALE, labels, guidance)


def ddim_scheduler(expert: Expert, steps: int):
    """diffusers' DDIMScheduler with ``expert``'s own beta schedule, set to ``steps`` inference steps."""
    from diffusers import DDIMScheduler

    if expert.schedule is None:
        raise ValueError(f"{expert.expert_id} is an FM expert: native DDIM sampling needs DDPM experts")
    abar = expert.schedule.alpha_bar  # (T,) float64
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])  # (T,)
    sched = DDIMScheduler(num_train_timesteps=expert.schedule.steps, trained_betas=betas.numpy(),
                          timestep_spacing="trailing", clip_sample=True, set_alpha_to_one=True,
                          prediction_type="epsilon")
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def sample_native_ddim(ens: RoutedEnsemble, noise: torch.Tensor, labels: torch.Tensor, steps: int,
                       guidance: float = 1.0) -> torch.Tensor:
    """Sample a routed ensemble of DDPM experts natively with DDIM (module docstring). (B, C, H, W) -> same.

    Counts each chosen expert's rows in ``ens.calls`` as ``RoutedEnsemble.evaluate`` does, and leaves
    the last step's routing in ``ens.last``. All experts must share one schedule.
    """
    first = ens.experts[0]
    for e in ens.experts:
        if e.config.objective != "ddpm" or e.config.schedule != first.config.schedule:
            raise ValueError("native DDIM sampling needs DDPM experts that share one schedule")
    sched = ddim_scheduler(first, steps)
    abar = first.schedule.alpha_bar.to(noise.device)
    b = noise.shape[0]
    ens.reset(b, noise.device)
    x = noise
    for tau in sched.timesteps:
        ab = abar[int(tau)].to(x.dtype)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        t = (s / (a + s)).expand(b)  # (B,) flow time with the same SNR
        probs = ens.route_probs(x / (a + s), t, labels)  # routed at the flow point x_t = x_vp / (a + s)
        weights = choose_experts(probs, ens.available(), ens.routing, float(t[0]), ens.gumbel)
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
        x = sched.step(eps, int(tau), x, eta=0.0).prev_sample
    return x


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


__all__ = ["NoTranslator", "ddim_scheduler", "forward_flops", "router_flops", "sample_native_ddim", "velocity_flops"]
