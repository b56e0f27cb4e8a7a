"""The routed ensemble of experts: ``RoutedEnsemble`` is itself a velocity model.

At each call it asks the router for p(k | x_t, t, cond), turns that into weights with a pure routing strategy,
evaluates only the chosen experts on only the rows that chose them (CFG per expert), and mixes
u = sum_k w_k v_k (``mix``, shared with the swarm client). Its ``evaluate`` step is the seam the swarm client
overrides with remote calls and failover; it takes part in sampling through the trajectory hooks
(:class:`~diffswarm.sampling.hooks.TrajectoryHooks`) and reports each evaluation's routing in ``last``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from diffswarm.experts.expert import VelocityModel
from diffswarm.router.routing import RoutingConfig, choose_experts, effective_strategy, sample_gumbel
from diffswarm.sampling.hooks import RouteRecord, TrajectoryHooks


class RoutedEnsemble(TrajectoryHooks):
    """A mixture of K experts weighted by a router; answers ``velocity`` like a single expert."""

    def __init__(self, experts: Sequence[VelocityModel], router, routing: RoutingConfig,
                 expert_ids: Sequence[str] | None = None, seed: int = 0, router_sees_labels: bool = True):
        self.experts = list(experts)
        self.router = router
        self.routing = routing
        self.expert_ids = (list(expert_ids) if expert_ids
                           else [getattr(e, "expert_id", str(i)) for i, e in enumerate(experts)])
        self.gen_seed = seed
        self.router_sees_labels = router_sees_labels  # False: route as an unconditional router would
        self.gumbel: torch.Tensor | None = None  # (B, K) sample-k's noise of this trajectory
        self.drawn: torch.Tensor | None = None  # (B, K) bool: sample-k's experts drawn once per trajectory
        self._step_gen: torch.Generator | None = None  # sample-k's fresh noise per evaluation (draw="step")
        self.last: RouteRecord | None = None
        self.calls = torch.zeros(len(self.experts), dtype=torch.long)  # rows evaluated per expert
        if router is not None and router.cfg.num_clusters != len(self.experts):
            raise ValueError(f"router has {router.cfg.num_clusters} clusters but {len(self.experts)} experts "
                             "were given")

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def available(self) -> torch.Tensor:
        """(K,) bool: experts that may be called now. Local experts are always available."""
        return torch.tensor([e is not None for e in self.experts])

    def routable(self) -> torch.Tensor:
        """(K,) bool: experts the router may choose (``available`` here; the swarm client may choose all and
        fail a step that needs a missing one instead of re-routing it)."""
        return self.available()

    def route_probs(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            return x.new_full((x.shape[0], self.num_experts), 1.0 / self.num_experts, dtype=torch.float32)
        if not self.router_sees_labels:
            labels = torch.full_like(labels, -1)
        return self.router.probs(x, t, labels)

    def reset(self, batch: int, device, evaluations: int | None = None) -> None:
        """Start a new trajectory: fix the per-sample Gumbel noise used by ``sample-k``, forget its draw."""
        gen = torch.Generator(device="cpu").manual_seed(self.gen_seed + 1)
        self.gumbel = sample_gumbel((batch, self.num_experts), gen, "cpu").to(device)
        self.drawn = None
        self._step_gen = torch.Generator(device="cpu").manual_seed(self.gen_seed + 2)

    def choose(self, probs: torch.Tensor, available: torch.Tensor, t: float) -> torch.Tensor:
        """Weights (B, K) from router probabilities with this ensemble's strategy and sample-k state."""
        cfg, gumbel = self.routing, self.gumbel
        sampling = effective_strategy(cfg, t) == "sample-k"
        if sampling and cfg.draw == "step":
            gen = self._step_gen or torch.Generator(device="cpu").manual_seed(self.gen_seed + 2)
            self._step_gen = gen
            gumbel = sample_gumbel(tuple(probs.shape), gen, "cpu").to(probs.device)
        drawn = self.drawn if self.drawn is not None and self.drawn.shape == probs.shape else None
        weights = choose_experts(probs, available, cfg, t, gumbel, drawn)
        if sampling and cfg.draw == "trajectory" and drawn is None:
            self.drawn = weights > 0  # drawn once, at the trajectory's first routed evaluation
        return weights

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if self.gumbel is None or self.gumbel.shape[0] != x.shape[0]:
            self.reset(x.shape[0], x.device)
        probs = self.route_probs(x, t, labels)
        weights = self.choose(probs, self.routable(), float(t[0]))
        v, weights, events = self.evaluate(x, t, labels, guidance, weights, probs)
        chosen = [self.expert_ids[k] for k in range(self.num_experts) if bool((weights[:, k] > 0).any())]
        self.last = RouteRecord(weights=weights.detach().cpu(), chosen=chosen, events=events)
        return v

    def evaluate(self, x, t, labels, guidance, weights, probs):
        """Call each chosen expert on the rows that chose it and mix. Returns (v, weights, events)."""
        def answer(k: int, rows: torch.Tensor) -> torch.Tensor:
            return self.experts[k].velocity(x[rows], t[rows], labels[rows], guidance)  # (b, C, H, W)

        return mix(x, weights, answer, self.calls), weights, []


def mix(x: torch.Tensor, weights: torch.Tensor, answer: Callable[[int, torch.Tensor], torch.Tensor],
        calls: torch.Tensor) -> torch.Tensor:
    """u = sum_k w_k v_k, each expert on only the rows that chose it, in expert order k = 0..K-1 (so that a
    swarm mixes exactly as local sampling does, up to float tolerance).

    ``answer(k, rows)`` gives expert k's velocities (b, C, H, W) on those rows of ``x`` (B, C, H, W);
    ``weights`` is (B, K); ``calls[k]`` counts the rows expert k was evaluated on.
    """
    v = torch.zeros_like(x)
    for k in range(weights.shape[1]):
        rows = (weights[:, k] > 0).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        w = weights[rows, k].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))  # (b, 1, 1, 1)
        v.index_add_(0, rows, w * answer(k, rows))
        calls[k] += rows.numel()
    return v


__all__ = ["RoutedEnsemble", "mix"]
