"""``SamplingConfig``: how to integrate from noise to data, the one set of sampling defaults the CLI, the demo and
the dashboard share."""

from __future__ import annotations

from dataclasses import dataclass

from diffswarm.sampling.steps import SAMPLERS, evaluations


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
        return evaluations(self.sampler, self.steps)


__all__ = ["SamplingConfig"]
