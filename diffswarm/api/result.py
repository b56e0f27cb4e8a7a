"""What a generation returns: the samples as a tensor and as PIL images, their labels, and the routing record of
every sampling step (``Generation``, ``RoutingStep``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from diffswarm.sampling.loop import StepInfo
from diffswarm.utils.images import make_grid, save_grid, save_samples, to_uint8


def pil_images(x: torch.Tensor) -> list[Image.Image]:
    """(N, C, H, W) in [-1, 1] -> N PIL images (mode "L" for one channel, "RGB" for three)."""
    arr = to_uint8(x)  # (N, H, W, C) uint8
    return [Image.fromarray(a[..., 0], mode="L") if a.shape[-1] == 1 else Image.fromarray(a, mode="RGB") for a in arr]


@dataclass(frozen=True)
class RoutingStep:
    """The routing of one sampling step of one trajectory (a batch of rows integrated together)."""

    trajectory: int  # 0-based batch index within the generation
    rows: tuple[int, int]  # [start, stop): the samples of the generation this trajectory integrates
    step: int  # 0-based step index
    num_steps: int
    t: float  # flow time at the start of the step (1 = noise, 0 = data)
    t_next: float
    expert_ids: list[str]  # the K experts, column order of ``weights``
    weights: torch.Tensor  # (B, K) mixing weights of the step's first velocity evaluation
    chosen: list[str]  # experts evaluated at this step (union over the rows)
    events: list[str] = field(default_factory=list)  # failovers, bans, re-routes, recomputed steps (swarm)

    @classmethod
    def of(cls, info: StepInfo, trajectory: int, rows: tuple[int, int]) -> RoutingStep:
        return cls(trajectory, rows, info.step, info.num_steps, info.t, info.t_next, list(info.expert_ids),
                   info.weights.detach().float().cpu().clone(), list(info.chosen), list(info.events))


@dataclass
class Generation:
    """Samples of one ``Session.generate`` call.

    ``samples`` is (N, C, H, W) float32 on the CPU in [-1, 1] (clamped, as ``--save-samples`` writes them);
    ``labels`` is (N,) int64 (-1: unconditional); ``routing`` holds every step of every trajectory as it was
    finally used (a step recomputed after a rollback replaces the earlier one; its ``events`` say why).
    """

    samples: torch.Tensor
    labels: torch.Tensor
    routing: list[RoutingStep]
    expert_ids: list[str]
    wall_s: float  # seconds the sampling took

    @property
    def images(self) -> list[Image.Image]:
        """One PIL image per sample (mode "L" for one channel, "RGB" for three)."""
        return pil_images(self.samples)

    def grid(self, nrow: int | None = None, scale: int = 1) -> Image.Image:
        """All samples tiled into one image, ``nrow`` per row (default: about a square)."""
        return make_grid(self.samples, nrow or self.default_nrow(), scale=scale)

    def default_nrow(self) -> int:
        return max(1, round(self.samples.shape[0] ** 0.5))

    def save_grid(self, path: str | Path, nrow: int | None = None, scale: int = 3) -> Path:
        """Write the grid as a PNG (the file ``diffswarm generate --output`` writes); returns its path."""
        return save_grid(self.samples, path, nrow or self.default_nrow(), scale)

    def save_samples(self, path: str | Path) -> Path:
        """Write ``samples`` and ``labels`` to an ``.npz`` (``diffswarm generate --save-samples``)."""
        return save_samples(path, self.samples, self.labels)

    def expert_share(self) -> dict[str, float]:
        """Mean mixing weight of each expert over every row and step: which experts made these images."""
        if not self.routing:
            return {}
        w = torch.cat([r.weights for r in self.routing]).mean(0)  # (K,)
        return {e: float(w[k]) for k, e in enumerate(self.routing[0].expert_ids)}


__all__ = ["Generation", "RoutingStep", "pil_images"]
