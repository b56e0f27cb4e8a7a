"""Named training sizes (``cpu``, ``gpu``, ``tiny``): the demo runs them, ``diffswarm eval`` builds its pool from them.

``cpu`` fits a 2-core CPU, ``gpu`` is larger, ``tiny`` (digits) is what the tests run. The eval takes the
network, batch, learning rate, router steps and sampling of ``tiny`` (quick) or ``cpu`` (full), so that
changing a preset changes the eval too. The demo samples with ``demo_sampling`` where a preset sets one: its
time budget buys training with what fewer evaluations save.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffswarm.router.routing import RoutingConfig
from diffswarm.sampling.config import SamplingConfig


@dataclass(frozen=True)
class Preset:
    """Sizes of one demo configuration (frozen: a run derives its own copy, never edits these)."""

    dataset: str | None  # None: the default dataset
    net: str
    width: int
    depth: int
    batch: int
    minutes: float  # wall-clock budget of the whole demo
    router_steps: int
    classifier_epochs: int
    per_class: int  # grid columns
    eval_n: int  # samples scored for FD
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    lr: float = 1e-3
    min_train_minutes: float = 1.0  # never train for less than this, whatever the estimate says
    # candidate recipes (names in diffswarm.training.recipes.RECIPES) the demo times on the machine at start to
    # train the one predicted best in its budget; () or a fixed --steps: net/width/depth/batch above
    recipes: tuple[str, ...] = ()
    demo_sampling: SamplingConfig | None = None  # the demo's sampling where it differs from ``sampling`` (the eval's)

    @property
    def sampling_for_demo(self) -> SamplingConfig:
        return self.demo_sampling or self.sampling


PRESETS = {
    "cpu": Preset(None, "unet", 16, 3, 96, minutes=8.5, router_steps=1000, classifier_epochs=2, per_class=10,
                  eval_n=1000, recipes=("unet16x3-b96", "unet16x3-b32", "unet16x3-b48", "dit96x3-b96"),
                  # Heun 3 (5 evaluations) instead of 6 (11): on the demo's experts at 115 training steps FD 47.8 vs
                  # 49.5, at 355 steps 14.7 vs 12.3 (docs/benchmarks.md); generating costs less than half, and a slow
                  # machine's budget trains that much longer
                  demo_sampling=SamplingConfig(steps=3)),
    "gpu": Preset(None, "dit", 256, 6, 256, minutes=30.0, router_steps=6000, classifier_epochs=4, per_class=10,
                  eval_n=5000, sampling=SamplingConfig(steps=50, sampler="euler")),
    "tiny": Preset("digits", "mlp", 128, 2, 64, minutes=1.0, router_steps=150, classifier_epochs=1, per_class=4,
                   eval_n=100, sampling=SamplingConfig(steps=10, sampler="euler"), min_train_minutes=0.05),
}


def device_preset(device_type: str) -> str:
    """The preset the demo runs by default on a device of this type (``torch.device.type``)."""
    return "gpu" if device_type == "cuda" else "cpu"
