"""Diagnostics never change what the sampler does: ``side_effect_free`` restores a routed ensemble's state."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from diffswarm.experts.expert import VelocityModel


@contextmanager
def side_effect_free(model: VelocityModel) -> Iterator[None]:
    """Restore a routed ensemble's ``last`` record, ``calls`` counters and ``gumbel`` noise on exit.

    Diagnostic evaluations then neither inflate the cost accounting nor change the record a
    step callback reads, nor the per-trajectory Gumbel draw of ``sample-k``. A no-op for models
    without these attributes.
    """
    last = getattr(model, "last", None)
    gumbel = getattr(model, "gumbel", None)
    drawn = getattr(model, "drawn", None)
    step_gen = getattr(model, "_step_gen", None)
    step_state = step_gen.get_state() if isinstance(step_gen, torch.Generator) else None
    calls = getattr(model, "calls", None)
    saved_calls = calls.clone() if isinstance(calls, torch.Tensor) else None
    try:
        yield
    finally:
        if hasattr(model, "last"):
            model.last = last
        if hasattr(model, "gumbel"):
            model.gumbel = gumbel
        if hasattr(model, "drawn"):
            model.drawn = drawn
        if step_state is not None:
            step_gen.set_state(step_state)
        if saved_calls is not None:
            model.calls = saved_calls
