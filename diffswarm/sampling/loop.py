"""The one sampler loop: integrate from noise (t = 1) to data (t = 0) with a step function, call the model's
trajectory hooks, recompute rolled-back steps, and report every step through one callback payload,
``StepInfo``, which the CLI progress bar, the dashboard, the analysis tools and the diagnostics' trace consume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from diffswarm.experts.expert import VelocityModel
from diffswarm.sampling.hooks import StepRollback, TrajectoryHooks
from diffswarm.sampling.steps import Step, evaluations, model_velocity, step_function, time_grid
from diffswarm.utils.signals import raise_if_stopped


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
    x_start: torch.Tensor | None = None  # (B, C, H, W) state at the start of the step (at t)
    v: torch.Tensor | None = None  # (B, C, H, W) the step's first velocity, v(x_start, t)


StepCallback = Callable[[StepInfo], None]
MAX_ROLLBACKS = 16  # a trajectory that keeps rolling back fails instead of looping
_NO_HOOKS = TrajectoryHooks()  # what a model that declares no hooks is sampled with


def _step(model: VelocityModel, hooks: TrajectoryHooks, step: Step, x: torch.Tensor, ts: torch.Tensor, i: int,
          labels: torch.Tensor, guidance: float, events: list[str]) -> StepInfo:
    """Step i from x at ts[i] to ts[i + 1]. ``events``: the notices so far (rollbacks), to which the events of
    each velocity evaluation are added."""
    velocity = model_velocity(model, labels, guidance)

    def f(x_: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
        v_ = velocity(x_, t_)
        if hooks.last is not None:
            events.extend(hooks.last.events)
        return v_

    t, t_next = ts[i], ts[i + 1]
    hooks.begin_step(i, len(ts) - 1)
    v = f(x, t)
    record = hooks.last  # the routing of the step's first evaluation
    x_next = step(f, x, t, t_next, v)
    if record is not None:
        ids, weights, chosen = hooks.expert_ids, record.weights, record.chosen
    else:
        name = getattr(model, "expert_id", "model")
        ids, weights, chosen = [name], torch.ones(x.shape[0], 1), [name]
    return StepInfo(i, len(ts) - 1, float(t), float(t_next), x_next, list(ids), weights, chosen, events,
                    x_start=x, v=v)


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

    A model that is a ``TrajectoryHooks`` is reset before the first step, told which step it is asked for
    (``begin_step(i, steps)``) and may audit the trajectory at its end (``end_trajectory``); one that raises
    ``StepRollback`` gets the steps from ``rollback.step`` on again, from the states kept for them (the callback
    then sees those steps a second time, after an event saying why).
    """
    step = step_function(method)
    if steps < 1:
        raise ValueError("steps must be >= 1")
    ts = time_grid(steps, noise.device, noise.dtype)
    hooks = model if isinstance(model, TrajectoryHooks) else _NO_HOOKS
    hooks.reset(noise.shape[0], noise.device, evaluations(method, steps))
    states = [noise]  # states[i]: x at the start of step i
    pending: list[str] = []  # rollback notices for the next callback
    rollbacks, i = 0, 0
    while True:
        raise_if_stopped()  # a command's stop signal whose exception was swallowed (utils.signals)
        try:
            if i == steps:  # done: a model may audit the trajectory and ask for steps again
                hooks.end_trajectory()
                return states[steps]
            info = _step(model, hooks, step, states[i], ts, i, labels, guidance, list(pending))
        except StepRollback as r:
            rollbacks += 1
            if rollbacks > MAX_ROLLBACKS or not 0 <= r.step <= min(i, steps - 1):
                raise RuntimeError(f"sampling gave up after {rollbacks} rollbacks: {r.reason}") from None
            pending.append(f"recomputing from step {r.step + 1}: {r.reason}")
            del states[r.step + 1:]
            i = r.step
            continue
        pending = []
        states.append(info.x)
        if callback is not None:
            callback(info)
        i += 1


__all__ = ["MAX_ROLLBACKS", "StepCallback", "StepInfo", "sample"]
