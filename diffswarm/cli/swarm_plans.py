"""Plans of the local swarm on 127.0.0.1: `swarm up` (serve checkpoints, or train experts and router first) and
`swarm down`. (`swarm status` is a client: ``diffswarm.cli.client_plans``.)"""

from __future__ import annotations

from dataclasses import dataclass

from diffswarm.cli.planning import DATASET_DESTS, dataset, full_swarm_name, refuse
from diffswarm.data import DatasetSpec
from diffswarm.experts.train import TrainConfig
from diffswarm.router.train import RouterTrainConfig
from diffswarm.swarm.up import DEFAULT_TRAIN_MINUTES, SwarmUpConfig


def plan_swarm_up(args, given) -> SwarmUpConfig:
    from diffswarm.dht.names import SwarmNameError, check_bare_name, is_full_name

    try:
        swarm = full_swarm_name(args.swarm) if is_full_name(args.swarm) else check_bare_name(args.swarm)
    except SwarmNameError as e:
        raise ValueError(f"--swarm: {e}") from None
    common = dict(run_dir=args.run_dir, swarm=swarm, owner_key=args.owner_key, replicas=args.replicas,
                  threads=args.threads, port=args.port, timeout=args.timeout, router_kind=args.router_kind)
    if args.router_kind == "stats":
        refuse(given, ["router", "router_steps"], "with --router-kind stats (the swarm has no router peer)")
    training = ["experts", "partition", "objectives", "train_steps", "train_minutes", "router_steps", "net", "width",
                "depth", "seed", *DATASET_DESTS]
    if args.checkpoints:
        refuse(given, [d for d in training if d != "partition"],
               "with --checkpoints (the peers serve them instead of training new experts)")
        if len(args.checkpoints) > 1 and not args.router and args.router_kind == "trained":
            raise ValueError("serving several --checkpoints needs their --router (or --router-kind stats)")
        return SwarmUpConfig(**common, checkpoints=tuple(args.checkpoints), router=args.router,
                             partition=args.partition)  # with --checkpoints: the data admission scores them on
    refuse(given, ["router"], "without --checkpoints (the swarm trains its own router)")
    if args.partition:
        refuse(given, DATASET_DESTS, "with --partition (the manifest names its dataset)")
    # wall-clock by default (a slower machine trains fewer steps instead of keeping its peers offline longer)
    length = ({"steps": args.train_steps} if args.train_steps
              else {"steps": None, "minutes": args.train_minutes or DEFAULT_TRAIN_MINUTES})
    seed = args.seed if args.seed is not None else 0
    return SwarmUpConfig(**common, experts=args.experts or 4, partition=args.partition,
                         data=DatasetSpec() if args.partition else dataset(args),
                         objectives=args.objectives or "auto", train=TrainConfig(**length, seed=seed),
                         router_train=RouterTrainConfig(steps=args.router_steps or 300, seed=seed),
                         net=args.net or "unet", width=args.width, depth=args.depth, seed=seed)


@dataclass(frozen=True)
class SwarmDownPlan:
    run_dir: str
    timeout: float


def plan_swarm_down(args, given) -> SwarmDownPlan:
    return SwarmDownPlan(args.run_dir, args.timeout)
