"""Joining by training: a peer started without a checkpoint first trains its expert in a worker thread, while
its heartbeat announces the expert as ``joining`` with the training progress."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from diffswarm.training.jobs import TrainJob, run_train_job

logger = logging.getLogger(__name__)


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
