"""The dashboard's generation worker: one request run on the source in a thread, reported to the app as
messages (its steps in batches, then its images, or how it ended)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from textual.message import Message
from textual.worker import get_current_worker

from diffswarm.tui.model import GenRequest, event_line


class GenerationSteps(Message):
    """Sampling steps of the running generation, (step, events) pairs (posted from its worker thread)."""

    def __init__(self, steps: list) -> None:
        super().__init__()
        self.steps = steps


class GenerationFinished(Message):
    def __init__(self, x, path: Path, req: GenRequest, wall_s: float) -> None:
        super().__init__()
        self.x, self.path, self.req, self.wall_s = x, path, req, wall_s


class GenerationEnded(Message):
    """The generation stopped without images (cancelled, failed)."""

    def __init__(self, message: str, severity: str) -> None:
        super().__init__()
        self.message, self.severity = message, severity


def run_generation(source, req: GenRequest, post: Callable[[Message], object], clock: Callable[[], float],
                   png_path: Callable[[GenRequest], Path], idle: threading.Event) -> None:
    """Generate ``req`` with ``source`` and save the grid at ``png_path(req)``, inside a thread worker (it stops at
    the next step once the worker is cancelled); ``post``s the messages above and sets ``idle`` when it ends."""
    from diffswarm.utils.images import save_grid

    worker = get_current_worker()

    class Cancelled(Exception):
        pass

    t0 = clock()
    batch: list = []  # steps not posted yet
    posted = [0.0]  # monotonic time of the last post

    def on_step(info) -> None:
        if worker.is_cancelled:
            raise Cancelled
        # what the strip needs, copied; posted without waiting for the UI (post_message is thread-safe)
        # and at most ~10 times a second, so drawing never holds the sampler up
        step = SimpleNamespace(step=info.step, num_steps=info.num_steps, t=info.t, expert_ids=list(info.expert_ids),
                               weights=info.weights.detach().float().cpu().clone(), chosen=list(info.chosen),
                               elapsed=clock() - t0)
        batch.append((step, [event_line(e) for e in info.events]))
        now = time.monotonic()
        if info.step + 1 == info.num_steps or now - posted[0] >= 0.1:
            post(GenerationSteps(batch.copy()))
            batch.clear()
            posted[0] = now

    try:
        x = source.generate(req, callback=on_step)
        path = save_grid(x, png_path(req), min(req.n, 8))
    except Cancelled:
        post(GenerationEnded("cancelled", "warning"))
        return
    except Exception as e:  # noqa: BLE001 - the UI reports any failure instead of crashing
        post(GenerationEnded(f"generation failed: {e}", "error"))
        return
    finally:
        idle.set()
    # through the same queue as the steps, so the UI sees every step before the end
    post(GenerationFinished(x, path, req, clock() - t0))
