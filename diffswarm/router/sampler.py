"""Samplers over the one velocity contract, and the routed ensemble of experts.

Samplers (``sample``) integrate dx/dt = v(x, t) from t = 1 to t = 0 with Euler or Heun on a
uniform grid, and report every step through one callback payload, ``StepInfo``, which the CLI
progress bar, the dashboard and the analysis tools all consume.

``RoutedEnsemble`` is itself a velocity model: at each call it asks the router for
p(k | x_t, t, cond), turns that into weights with a pure routing strategy, evaluates only the
chosen experts on only the rows that chose them (CFG per expert), and mixes
u = sum_k w_k v_k. Its ``evaluate`` step is the seam the swarm client overrides with remote
calls and failover.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from diffswarm.experts.expert import VelocityModel
from diffswarm.router.routing import NoExpertsError, RoutingConfig, choose_experts, sample_gumbel


@dataclass
class StepInfo:
    """What happened at one sampling step: the single payload every observer receives."""

    step: int  # 0-based step index
    num_steps: int
    t: float  # flow time at the start of the step
    t_next: float
    x: torch.Tensor  # (B, C, H, W) state after the step
    expert_ids: list[str]  # ids of all K experts, column order of `weights`
    weights: torch.Tensor  # (B, K) mixing weights used at this step (first evaluation for Heun)
    chosen: list[str]  # experts evaluated at this step (union over the batch)
    events: list[str] = field(default_factory=list)  # failovers, bans, re-routes (swarm client)


StepCallback = Callable[[StepInfo], None]
SAMPLERS = ("euler", "heun")


@dataclass(frozen=True)
class SamplingConfig:
    """How to integrate from noise to data: the one set of defaults the CLI, the demo and the dashboard share."""

    # Heun, 6 steps (11 velocity evaluations): on the CPU demo's experts it beat Euler with 30 steps at both
    # seeds tried (FD 21.6 vs 25.7 and 23.9 vs 27.4) for a third of the compute (bench/sampling_choice.py,
    # docs/benchmarks.md); the gpu preset sets its own
    steps: int = 6  # integration steps (Heun: two velocity evaluations per step but the last)
    sampler: str = "heun"  # euler | heun
    guidance: float = 2.0  # classifier-free guidance scale (1 = none), applied per expert
    seed: int = 0  # noise seed (one CPU generator: the same images on any device and batch split)
    batch: int = 256  # samples integrated at once

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.steps < 1 or self.batch < 1:
            raise ValueError("steps and batch must be >= 1")
        if not 0 <= self.guidance <= 100:
            raise ValueError(f"guidance must be in [0, 100], got {self.guidance}")

    @property
    def evaluations(self) -> int:
        """Velocity evaluations per trajectory (network evaluations of each chosen expert)."""
        return self.steps if self.sampler == "euler" else 2 * self.steps - 1


@dataclass
class RouteRecord:
    weights: torch.Tensor  # (B, K)
    chosen: list[str]
    events: list[str]


class RoutedEnsemble:
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
        self.gumbel: torch.Tensor | None = None
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

    def reset(self, batch: int, device) -> None:
        """Start a new trajectory: fix the per-sample Gumbel noise used by ``sample-k``."""
        gen = torch.Generator(device="cpu").manual_seed(self.gen_seed + 1)
        self.gumbel = sample_gumbel((batch, self.num_experts), gen, "cpu").to(device)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if self.gumbel is None or self.gumbel.shape[0] != x.shape[0]:
            self.reset(x.shape[0], x.device)
        probs = self.route_probs(x, t, labels)
        weights = choose_experts(probs, self.routable(), self.routing, float(t[0]), self.gumbel)
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


def time_grid(steps: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Uniform flow-time grid 1 -> 0 with steps + 1 points."""
    return torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=dtype)


class StepRollback(Exception):
    """Raised by a velocity model to make ``sample`` recompute from the start of step ``step`` (the swarm
    client does this after catching a peer that lied in that step or later; the liar is banned first)."""

    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


MAX_ROLLBACKS = 16  # a trajectory that keeps rolling back fails instead of looping


@torch.no_grad()
def sample(
    model: VelocityModel,
    noise: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 30,
    method: str = "euler",
    guidance: float = 1.0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Integrate from pure noise (t = 1) to data (t = 0). noise: (B, C, H, W); labels: (B,), -1 = none.

    Euler: x <- x + (t_next - t) v(x, t). Heun: average the slopes at both ends, except on the
    final step to t = 0 (plain Euler there, as in EDM/k-diffusion).

    A model with ``begin_step(i)`` is told which step it is asked for; one that raises ``StepRollback``
    gets the steps from ``rollback.step`` on again, from the states kept for them (the callback then sees
    those steps a second time, after an event saying why).
    """
    if method not in SAMPLERS:
        raise ValueError(f"sampler method must be one of {SAMPLERS}, got {method!r}")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    x = noise
    b = x.shape[0]
    ts = time_grid(steps, x.device, x.dtype)
    if isinstance(model, RoutedEnsemble):
        model.reset(b, x.device)
    begin = getattr(model, "begin_step", None)
    end = getattr(model, "end_trajectory", None)
    states = [x]  # states[i]: x at the start of step i
    pending: list[str] = []  # rollback notices for the next callback
    rollbacks, i = 0, 0
    while i <= steps:
        if i == steps:  # done: a model may audit the trajectory and ask for steps again
            try:
                if end is not None:
                    end()
                break
            except StepRollback as r:
                rollbacks += 1
                if rollbacks > MAX_ROLLBACKS or not 0 <= r.step < steps:
                    raise RuntimeError(f"sampling gave up after {rollbacks} rollbacks: {r.reason}") from None
                pending.append(f"recomputing from step {r.step + 1}: {r.reason}")
                del states[r.step + 1:]
                i = r.step
                continue
        t, t_next = ts[i], ts[i + 1]
        x = states[i]
        try:
            if begin is not None:
                begin(i)
            v = model.velocity(x, t.expand(b), labels, guidance)
            record = getattr(model, "last", None)
            events = pending + (list(record.events) if record else [])
            x_euler = x + (t_next - t) * v
            if method == "heun" and t_next > 0:
                v2 = model.velocity(x_euler, t_next.expand(b), labels, guidance)
                if getattr(model, "last", None) is not None:
                    events += model.last.events
                x = x + (t_next - t) * 0.5 * (v + v2)
            else:
                x = x_euler
        except StepRollback as r:
            rollbacks += 1
            if rollbacks > MAX_ROLLBACKS or not 0 <= r.step <= i:
                raise RuntimeError(f"sampling gave up after {rollbacks} rollbacks: {r.reason}") from None
            pending.append(f"recomputing from step {r.step + 1}: {r.reason}")
            del states[r.step + 1:]
            i = r.step
            continue
        pending = []
        states.append(x)
        if callback is not None:
            if record is not None:
                ids, weights, chosen = model.expert_ids, record.weights, record.chosen
            else:
                name = getattr(model, "expert_id", "model")
                ids, weights, chosen = [name], torch.ones(b, 1), [name]
            callback(StepInfo(i, steps, float(t), float(t_next), x, list(ids), weights, chosen, events))
        i += 1
    return states[steps]


__all__ = ["SAMPLERS", "NoExpertsError", "RoutedEnsemble", "SamplingConfig", "StepInfo", "StepRollback", "sample",
           "time_grid"]
