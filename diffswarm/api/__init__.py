"""diffswarm's Python API (user guide: docs/api.md): generate from a swarm or from local checkpoints, and the
diffusers pipeline of a trained ensemble.

    from diffswarm.api import connect, load_run

    with load_run("runs/demo") as session:          # or connect("NAME@FINGERPRINT", ["/ip4/.../p2p/..."])
        out = session.generate(classes="all", steps=6, seed=0)
    out.images[0].save("first.png")

Sessions (``connect``, ``connect_local``, ``load_local``, ``load_run``) take the options of ``diffswarm generate``
and return a ``Generation`` (samples tensor, PIL images, labels, the routing of every step). The diffusers side
(``DiffswarmPipeline``, ``ExpertModel``, ``RouterModel``, ``StatsRouterModel``, ``export_pipeline``) imports
diffusers' pipeline machinery only when first used. The command line (``diffswarm generate``, ``diffswarm
export``) and the dashboard generate through this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffswarm.api.result import Generation, RoutingStep
from diffswarm.api.session import (
    Session,
    class_names,
    connect,
    connect_local,
    load_local,
    load_run,
    parse_classes,
    routing_config,
    run_checkpoints,
)
from diffswarm.router.routing import RoutingConfig
from diffswarm.sampling.config import SamplingConfig
from diffswarm.sampling.loop import StepInfo

if TYPE_CHECKING:
    from diffswarm.api.components import ExpertModel, RouterModel, StatsRouterModel
    from diffswarm.api.export import export_pipeline
    from diffswarm.api.pipeline import DiffswarmPipeline

_LAZY = {"DiffswarmPipeline": "diffswarm.api.pipeline", "ExpertModel": "diffswarm.api.components",
         "RouterModel": "diffswarm.api.components", "StatsRouterModel": "diffswarm.api.components",
         "export_pipeline": "diffswarm.api.export"}


def __getattr__(name: str):
    """The diffusers names, imported on first use (diffusers' pipeline machinery takes seconds to import)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DiffswarmPipeline", "ExpertModel", "Generation", "RouterModel", "RoutingConfig", "RoutingStep",
           "SamplingConfig", "Session", "StatsRouterModel", "StepInfo", "class_names", "connect", "connect_local",
           "export_pipeline", "load_local", "load_run", "parse_classes", "routing_config", "run_checkpoints"]
