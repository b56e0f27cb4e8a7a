"""Training objectives, each returning per-sample losses (B,) and the flow time of each sample.

- ``fm``: flow matching, ``|| v_theta(x_t, 999 t) - (eps - x0) ||^2``, t ~ U(0,1) or logit-normal.
- ``ddpm``: epsilon prediction, ``|| eps_theta(x_tau, tau) - eps ||^2``, tau ~ U{0..T-1}; with
  ``loss_weighting="min_snr"`` each sample's loss is multiplied by ``min(SNR, gamma) / SNR``
  (Min-SNR-gamma, Hang et al. 2023, eps-prediction form; SNR = abar / (1 - abar)), which stops the
  nearly clean steps (huge SNR, tiny x0 error) from taking most of the gradient. With
  ``ddpm_time="logit_normal"`` the steps are those SNR-matched to logit-normal flow times
  (real-valued tau), the noise levels the FM objective trains on. ``loss_weighting="flow"``
  multiplies the eps loss by ``1 / (1 - t)^2`` (capped at ``FLOW_WEIGHT_CAP``): the eps error
  translated to a velocity error is ``(eps_hat - eps) / (1 - t)`` (translator.py), so this is
  the FM loss of the translated prediction, and with ``ddpm_time="logit_normal"`` the DDPM expert
  weights noise levels as the FM expert does. Plain eps loss weights the x0 error by SNR, which
  all but ignores the high-noise steps that decide an image's layout.

The flow time of a DDPM sample (t = s / (a + s) with a = sqrt(abar), s = sqrt(1 - abar)) is
returned so that both objectives bin their loss on one axis.
"""

from __future__ import annotations

import torch

from diffswarm.experts.expert import Expert, null_labels
from diffswarm.experts.schedules import FM_TIME_SCALE, flow_point

FLOW_WEIGHT_CAP = 100.0  # the "flow" weighting 1 / (1 - t)^2 stops growing at t = 0.9


def drop_labels(labels: torch.Tensor, num_classes: int, p: float, gen: torch.Generator | None) -> torch.Tensor:
    """Replace each label by the null label with probability p (CFG training)."""
    labels = null_labels(labels, num_classes)
    if p <= 0 or num_classes == 0:
        return labels
    drop = torch.rand(labels.shape, generator=gen, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


def sample_flow_time(n: int, kind: str, gen: torch.Generator | None, device) -> torch.Tensor:
    """(n,) flow times: uniform, or logit-normal(0, 1) as in SD3."""
    if kind == "uniform":
        return torch.rand(n, generator=gen, device=device)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=gen, device=device))
    raise ValueError(f"unknown fm time distribution {kind!r}")


def expert_loss(expert: Expert, x0: torch.Tensor, labels: torch.Tensor, gen: torch.Generator | None = None):
    """(per-sample loss (B,), flow time (B,)) for one batch of clean data x0 (B, C, H, W)."""
    cfg = expert.config
    b = x0.shape[0]
    eps = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    y = drop_labels(labels, cfg.net.num_classes, cfg.cond_drop, gen)
    if cfg.objective == "fm":
        t = sample_flow_time(b, cfg.fm_time, gen, x0.device)
        pred = expert.net(flow_point(x0, eps, t), t * FM_TIME_SCALE, y)
        target = eps - x0
    else:
        sched = expert.schedule
        if cfg.ddpm_time == "uniform":
            tau = torch.randint(0, sched.steps, (b,), generator=gen, device=x0.device).to(torch.float64)
        else:  # the noise levels of logit-normal flow times, as real-valued (SNR-matched) steps
            tau = sched.tau_for_flow_time(sample_flow_time(b, "logit_normal", gen, x0.device))
        ab = sched.alpha_bar_at(tau)  # (B,) float64
        a, s = ab.sqrt(), (1 - ab).sqrt()
        t = (s / (a + s)).to(x0.dtype)
        pred = expert.net(sched.add_noise(x0, eps, tau), tau.to(x0.dtype), y)
        target = eps
    loss = (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    if cfg.objective == "ddpm" and cfg.loss_weighting == "min_snr":
        snr = ab / (1 - ab)  # (B,) float64
        loss = loss * (snr.clamp(max=cfg.min_snr_gamma) / snr).to(loss.dtype)
    elif cfg.objective == "ddpm" and cfg.loss_weighting == "flow":
        loss = loss * (1 - t.float()).pow(-2).clamp(max=FLOW_WEIGHT_CAP)
    return loss, t
