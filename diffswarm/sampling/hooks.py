"""The trajectory hooks a velocity model may declare to take part in sampling beyond ``velocity`` (reset, begin
and end of steps, rollbacks, the routing record of its last evaluation), declared once instead of probed."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RouteRecord:
    """What routing did at a model's last velocity evaluation: the part of ``StepInfo`` a routed model reports."""

    weights: torch.Tensor  # (B, K)
    chosen: list[str]
    events: list[str]


class StepRollback(Exception):
    """Raised by a velocity model to make ``sample`` recompute from the start of step ``step`` (the swarm
    client does this after catching a peer that lied in that step or later; the liar is banned first)."""

    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


class TrajectoryHooks:
    """Base of velocity models that take part in a whole trajectory; every hook does nothing by default.

    The sampler calls ``reset(batch, device, evaluations)`` before the first step, ``begin_step(i, steps)``
    before each step (a recomputed one too; ``steps``: how many the trajectory has) and ``end_trajectory()``
    after the last, where the model may audit the trajectory. Any hook, and ``velocity``, may raise
    ``StepRollback`` to have steps recomputed. After each velocity evaluation the sampler reads ``last``: the
    routing of that evaluation over the K experts ``expert_ids`` (None: report the model as one expert). A model
    that is no ``TrajectoryHooks`` is sampled as if it had these defaults.
    """

    expert_ids: list[str]  # ids of all K experts, column order of ``last.weights``
    last: RouteRecord | None = None  # routing of the last velocity evaluation

    def reset(self, batch: int, device, evaluations: int | None = None) -> None:
        """Start a new trajectory of ``batch`` samples on ``device`` and (when known) ``evaluations`` velocity
        evaluations (rollbacks aside)."""

    def begin_step(self, i: int, steps: int) -> None:
        """Step ``i`` (0-based) of ``steps`` is about to be computed, for the first time or again after a
        rollback."""

    def end_trajectory(self) -> None:
        """All steps are done; raising ``StepRollback`` here has steps computed again."""


__all__ = ["RouteRecord", "StepRollback", "TrajectoryHooks"]
