"""Joining by training: a peer started without a checkpoint first trains its expert in a worker thread, while
its heartbeat announces the expert as ``joining`` with the training progress."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffswarm.training.jobs import TrainJob, run_train_job

logger = logging.getLogger(__name__)


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclass
class TrainingProgress:
    """What a joining peer says about its training: an ETA from the progress so far, and a log line every
    ``every_s`` seconds (and at the end)."""

    started: float  # time.monotonic() when training started
    every_s: float = 15.0
    last: float = float("-inf")  # when a line was last shown

    def eta(self, progress: float, now: float) -> float | None:
        """Seconds left, from the time per unit of progress so far (None before any progress)."""
        if not 0 < progress <= 1:
            return None
        return max(0.0, (now - self.started) * (1 - progress) / progress)

    def line(self, expert_id: str, step: int, loss: float, progress: float, now: float) -> str | None:
        """The log line for this step, or None when the last one is recent."""
        if now - self.last < self.every_s and progress < 1:
            return None
        self.last = now
        eta = self.eta(progress, now)
        left = f", about {_duration(eta)} left" if eta is not None and progress < 1 else ""
        return f"training {expert_id}: {progress:.0%} (step {step}, loss {loss:.4f}){left}; announced as joining"


async def train_while_joining(job: TrainJob, stop: asyncio.Event, on_start: Callable[[object], None],
                              on_step: Callable[[int, float, float], None]) -> str | None:
    """Train ``job``'s expert in a worker thread: ``on_start(expert_config)`` once its data is loaded (the peer
    announces ``joining`` from then on), ``on_step(step, loss, progress)`` after every step. Returns the
    checkpoint path, None if ``stop`` was set meanwhile (the last checkpoint is kept)."""
    prepared = job.load_data()
    ecfg, images = prepared[0], prepared[1]
    on_start(ecfg)
    length = f"{job.train.steps} steps" if job.train.steps else f"{job.train.minutes:g} minutes"
    logger.info(f"training {ecfg.expert_id} on {len(images)} images of cluster {job.cluster} for {length} "
        f"(announced as joining)")

    class Stopped(Exception):
        pass

    def step_done(step: int, loss: float, progress: float) -> None:
        on_step(step, loss, progress)
        if stop.is_set():
            raise Stopped

    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, lambda: run_train_job(job, progress=False, on_step=step_done,
                                                               prepared=prepared))
    except Stopped:
        logger.info("training interrupted; the last checkpoint is kept (run again to resume)")
        return None
    return str(Path(job.out) / "expert.safetensors")
