"""Runners of the training subcommands: `partition`, `train`, `train-router` (the I/O halves of ``train_plans``)."""

from __future__ import annotations

import time
from pathlib import Path

from diffswarm.cli.train_plans import PartitionPlan
from diffswarm.training.jobs import RouterJob, TrainJob


def run_partition(p: PartitionPlan) -> int:
    from diffswarm.training.jobs import write_partition

    ds = p.data.load("train")
    t0 = time.perf_counter()
    part = write_partition(ds, p.data, p.k, p.seed, p.out)
    print(f"partitioned {ds.dataset_id} ({len(ds)} images) into K={p.k} clusters in {time.perf_counter() - t0:.1f}s")
    print(part.describe(ds.class_names))
    print(f"manifest: {p.out}  partition hash: {part.partition_hash[:16]}")
    return 0


def run_train(job: TrainJob) -> int:
    from diffswarm.training.jobs import run_train_job

    cfg, images, labels = job.load_data()
    length = f"{job.train.steps} steps" if job.train.steps else f"{job.train.minutes:g} minutes"
    print(f"training {cfg.expert_id} on {len(images)} images of cluster {job.cluster} ({job.net}, {length})")
    summary = run_train_job(job, prepared=(cfg, images, labels))
    print(f"done: {summary['steps']} steps in {summary['seconds']:.0f}s, final loss {summary['final_loss']:.4f} "
          f"-> {Path(job.out) / 'expert.safetensors'}")
    from diffswarm.training.loss_plot import write_loss_plot

    plot = write_loss_plot(job.out, f"{cfg.expert_id} ({cfg.objective}): loss by t, {summary['steps']} steps")
    if plot is not None:
        print(f"loss by t -> {plot}")
    return 0


def run_train_router(job: RouterJob) -> int:
    from diffswarm.router.train import format_router_accuracy
    from diffswarm.training.jobs import run_router_job

    router = run_router_job(job)
    print(format_router_accuracy(router.summary))
    print(f"router -> {job.out}")
    return 0
