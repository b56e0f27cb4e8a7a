"""Plans of the training subcommands: `partition`, `train`, `train-router` (and the training options of `peer`)."""

from __future__ import annotations

from dataclasses import dataclass

from diffswarm.cli.planning import dataset, refuse
from diffswarm.data import DatasetSpec
from diffswarm.experts.train import TrainConfig
from diffswarm.router.train import RouterTrainConfig
from diffswarm.training.jobs import RouterJob, TrainJob


@dataclass(frozen=True)
class PartitionPlan:
    data: DatasetSpec
    k: int
    seed: int
    out: str


def plan_partition(args, given) -> PartitionPlan:
    return PartitionPlan(dataset(args), args.k, args.seed, args.out)


def train_job(args, given, *, out: str | None, resume: bool, device: str, threads: int) -> TrainJob:
    """``TrainJob`` from the shared training options of `train` and `peer`."""
    if args.objective != "ddpm":
        refuse(given, ["schedule"], "on an FM expert (the schedule is DDPM's)")
    if args.objective != "fm":
        refuse(given, ["init_from"], "on a DDPM expert (it initialises an FM expert from a DDPM one)")
    length = {"minutes": args.minutes, "steps": None} if args.minutes is not None else {"steps": args.steps or 2000}
    train = TrainConfig(**length, batch=args.batch, lr=args.lr, seed=args.seed, ckpt_every=args.ckpt_every,
                        threads=threads, device=device, resume=resume, init_from=args.init_from)
    return TrainJob(partition=args.partition, cluster=args.cluster, objective=args.objective, schedule=args.schedule,
                    net=args.net, width=args.width, depth=args.depth, unconditional=args.unconditional,
                    out=out or f"runs/peer-c{args.cluster}-{args.objective}", train=train)


TRAIN_DESTS = ("partition", "cluster", "objective", "schedule", "net", "width", "depth", "unconditional", "steps",
               "minutes", "batch", "lr", "seed", "ckpt_every", "init_from", "out")


def plan_train(args, given) -> TrainJob:
    for need in ("partition", "cluster", "out"):
        if getattr(args, need) is None:
            raise ValueError(f"`diffswarm train` needs --{need.replace('_', '-')}")
    return train_job(args, given, out=args.out, resume=args.resume, device=args.device, threads=args.threads)


def plan_train_router(args, given) -> RouterJob:
    train = RouterTrainConfig(steps=args.steps, batch=args.batch, seed=args.seed, device=args.device)
    return RouterJob(args.partition, args.out, args.unconditional, args.width, train)
