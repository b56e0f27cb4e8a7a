"""Routing strategies: pure functions from router probabilities to mixing weights.

No network, no model: ``route`` and ``choose_experts`` take tensors and return tensors, so every
strategy is tested offline and the swarm client reuses them when it re-routes after a failure.

Strategies (decided per sample, per sampling step; DDM Sec. 4, Paris, the alignment study):

- ``top-k``: keep the k largest p_k among available experts, w_i = p_i / sum_{top-k} p_j.
- ``full``: all available experts, weights p_k renormalised over them.
- ``threshold``: keep p_k >= tau (always at least the argmax), renormalised.
- ``sample-k``: k experts drawn from p without replacement (Gumbel top-k); weights are p renormalised
  over the drawn experts. ``draw`` says when: ``trajectory`` (default) draws each sample's experts once,
  from p at the trajectory's first routed evaluation, and keeps them to the end (``RoutedEnsemble``
  remembers the draw; an expert that becomes unavailable is replaced by a draw among the available
  ones with the trajectory's Gumbel noise); ``step`` redraws at every evaluation with fresh noise, as
  DDM's Sample-1 does (catastrophic there: FID 157).

``full_above``: optionally use the full ensemble while t > full_above and the strategy below it
(the science sheet's remedy for unconditional-router collapse at high noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STRATEGIES = ("top-k", "full", "threshold", "sample-k")
DRAWS = ("trajectory", "step")  # when sample-k draws: once per trajectory, or at every evaluation


@dataclass
class RoutingConfig:
    """How the sampler turns router probabilities into expert weights."""

    strategy: str = "top-k"  # top-k | full | threshold | sample-k
    k: int = 2  # experts per step for top-k / sample-k
    threshold: float = 0.1  # minimum probability for `threshold`
    full_above: float | None = None  # use `full` while t > full_above
    draw: str = "trajectory"  # sample-k: trajectory (drawn once, kept) | step (redrawn every evaluation, as DDM)

    def __post_init__(self) -> None:
        if self.draw not in DRAWS:
            raise ValueError(f"sample-k draw must be one of {DRAWS}, got {self.draw!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"routing strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")


def _renorm(p: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    w = torch.where(keep, p, torch.zeros_like(p))
    s = w.sum(-1, keepdim=True)
    # rows whose kept mass underflows get uniform weights over the kept experts
    uniform = keep.to(p.dtype) / keep.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(s > 1e-12, w / s.clamp_min(1e-30), uniform)


def _topk_mask(scores: torch.Tensor, k: int, allowed: torch.Tensor) -> torch.Tensor:
    scores = torch.where(allowed, scores, torch.full_like(scores, float("-inf")))
    k = min(k, scores.shape[-1])
    idx = scores.topk(k, dim=-1).indices  # (B, k)
    keep = torch.zeros_like(allowed).scatter_(-1, idx, True)
    return keep & allowed


def choose_experts(
    probs: torch.Tensor,
    available: torch.Tensor,
    cfg: RoutingConfig,
    t: float | None = None,
    gumbel: torch.Tensor | None = None,
    drawn: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mixing weights (B, K) from router probabilities.

    probs: (B, K) rows summing to 1; available: (K,) or (B, K) bool, experts that may be called
    (online and not banned); t: current flow time (for ``full_above``); gumbel: (B, K) fixed noise
    for ``sample-k``; drawn: (B, K) bool, the experts a ``draw="trajectory"`` sample-k drew at the
    trajectory's start (kept where available; a row left with none draws again with ``gumbel``).
    Rows sum to 1 over chosen experts; unavailable experts always get 0.
    Raises ``NoExpertsError`` when no expert is available.
    """
    probs = probs.float()
    allowed = available.to(probs.device).bool().expand_as(probs)
    if not allowed.any(-1).all():
        raise NoExpertsError("no available expert to route to")
    strategy = effective_strategy(cfg, t)
    if strategy == "full":
        keep = allowed
    elif strategy == "top-k":
        keep = _topk_mask(probs, cfg.k, allowed)
    elif strategy == "threshold":
        keep = (probs >= cfg.threshold) & allowed
        keep |= _topk_mask(probs, 1, allowed)
    else:  # sample-k
        if gumbel is None:
            gumbel = sample_gumbel(probs.shape, None, probs.device)
        keep = _topk_mask(probs.clamp_min(1e-30).log() + gumbel.to(probs.device), cfg.k, allowed)
        if drawn is not None and cfg.draw == "trajectory":
            kept = drawn.to(probs.device).bool() & allowed
            keep = torch.where(kept.any(-1, keepdim=True), kept, keep)
    return _renorm(probs, keep)


def effective_strategy(cfg: RoutingConfig, t: float | None) -> str:
    """The strategy in force at flow time t (``full`` above ``full_above``)."""
    if cfg.full_above is not None and t is not None and t > cfg.full_above:
        return "full"
    return cfg.strategy


def sample_gumbel(shape, gen: torch.Generator | None, device) -> torch.Tensor:
    u = torch.rand(shape, generator=gen, device=device).clamp(1e-10, 1 - 1e-10)
    return -torch.log(-torch.log(u))


class NoExpertsError(RuntimeError):
    """No expert can serve a sampling step; the message names the uncovered clusters."""
