"""Sampler steps: one integration step of dx/dt = v(x, t) from t to t_next, as plain functions of a velocity
function (k-diffusion style: they never inspect the model).

Conventions are those of :mod:`diffswarm.experts.schedules`: flow time t = 1 is noise, t = 0 data; the grid runs
1 -> 0, so dt = t_next - t < 0.
"""

from __future__ import annotations

from typing import Callable

import torch

from diffswarm.experts.expert import VelocityModel

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # f(x (B, C, H, W), t 0-d) -> v (B, C, H, W)
Step = Callable[..., torch.Tensor]  # step(f, x, t, t_next, v=None) -> x at t_next


def euler_step(f: Velocity, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
               v: torch.Tensor | None = None) -> torch.Tensor:
    """x + (t_next - t) v(x, t): (B, C, H, W) -> (B, C, H, W). ``v``: v(x, t) if already known."""
    if v is None:
        v = f(x, t)
    return x + (t_next - t) * v


def heun_step(f: Velocity, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
              v: torch.Tensor | None = None) -> torch.Tensor:
    """x + (t_next - t) (v(x, t) + v(x_euler, t_next)) / 2: average the slopes at both ends, except on the final
    step to t_next = 0 (plain Euler there, as in EDM/k-diffusion). ``v``: v(x, t) if already known."""
    if v is None:
        v = f(x, t)
    x_euler = euler_step(f, x, t, t_next, v)
    if t_next > 0:
        v2 = f(x_euler, t_next)
        return x + (t_next - t) * 0.5 * (v + v2)
    return x_euler


STEPS: dict[str, Step] = {"euler": euler_step, "heun": heun_step}
SAMPLERS = tuple(STEPS)


def step_function(method: str) -> Step:
    """The step function of sampler ``method`` (one of ``SAMPLERS``)."""
    if method not in STEPS:
        raise ValueError(f"sampler method must be one of {SAMPLERS}, got {method!r}")
    return STEPS[method]


def evaluations(method: str, steps: int) -> int:
    """Velocity evaluations of a trajectory of ``steps`` steps of ``method`` (Heun: two per step but the last)."""
    step_function(method)  # a known method
    return steps if method == "euler" else 2 * steps - 1


def time_grid(steps: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Uniform flow-time grid 1 -> 0 with steps + 1 points."""
    return torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=dtype)


def model_velocity(model: VelocityModel, labels: torch.Tensor, guidance: float = 1.0) -> Velocity:
    """The velocity function of ``model`` for (B,) ``labels``: f(x, t) = model.velocity(x, t as (B,), labels,
    guidance), t a 0-d flow time (the sampler uses one t per step)."""
    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model.velocity(x, t.expand(x.shape[0]), labels, guidance)

    return f


def _time(t: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar flow time as a 0-d tensor of like's dtype and device."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.dim() != 0:
        raise ValueError(f"flow time must be a scalar (the sampler uses one t per step), got shape {tuple(t.shape)}")
    return t


def sampler_step(
    model: VelocityModel,
    x: torch.Tensor,
    t: float | torch.Tensor,
    t_next: float | torch.Tensor,
    labels: torch.Tensor,
    guidance: float = 1.0,
    method: str = "euler",
    v: torch.Tensor | None = None,
) -> torch.Tensor:
    """One step of :func:`~diffswarm.sampling.loop.sample` from t to t_next: (B, C, H, W) -> (B, C, H, W).

    ``euler_step`` or ``heun_step`` over ``model``'s velocity; ``v``: v(x, t) if already known.
    """
    step = step_function(method)
    return step(model_velocity(model, labels, guidance), x, _time(t, x), _time(t_next, x), v)


__all__ = ["SAMPLERS", "STEPS", "Velocity", "euler_step", "evaluations", "heun_step", "model_velocity", "sampler_step",
           "step_function", "time_grid"]
