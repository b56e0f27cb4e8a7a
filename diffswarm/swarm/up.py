"""`swarm up`: start a local swarm from checkpoints, or partition a dataset and train its experts (and router) first.

``swarm_up`` lays out the run dir (partition.json, router.safetensors, experts/c{i}-{objective}/), turns every
expert into a peer process of ``diffswarm.swarm.local`` and waits until each is online.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from diffswarm.data import DatasetSpec, Partition
from diffswarm.experts.train import TrainConfig
from diffswarm.router.train import RouterTrainConfig
from diffswarm.swarm.local import LocalSwarm, PeerSpec, refuse_beside_running, start_local_swarm
from diffswarm.training.jobs import RouterJob, TrainJob

logger = logging.getLogger(__name__)

# the experts' training budget when neither --train-steps nor --train-minutes is given: wall-clock, so that a
# slow machine trains fewer steps instead of keeping its peers offline for longer (300 steps of the UNet took
# over 10 minutes on a 2-core AVX2 EPYC before any peer was online)
DEFAULT_TRAIN_MINUTES = 4.0


@dataclass(frozen=True)
class SwarmUpConfig:
    """A local swarm to start: serve ``checkpoints``, or partition, train ``experts`` experts (and a router)
    in ``run_dir`` first."""

    run_dir: str
    swarm: str  # NAME, or NAME@FINGERPRINT that must match the owner key
    owner_key: str | None  # None: RUN_DIR/owner.key
    replicas: int
    threads: int
    port: int
    timeout: float
    checkpoints: tuple[str, ...] | None = None  # serve these (no training)
    router: str | None = None
    experts: int = 4  # K (training mode)
    partition: str | None = None  # existing manifest; None: partition `data` in the run dir
    data: DatasetSpec = field(default_factory=DatasetSpec)
    objectives: str = "auto"  # auto | mixed | fm | ddpm (training.recipes.choose_objectives)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=None, minutes=DEFAULT_TRAIN_MINUTES))
    router_train: RouterTrainConfig = field(default_factory=lambda: RouterTrainConfig(steps=300))
    net: str = "unet"
    width: int | None = None
    depth: int | None = None
    seed: int = 0
    router_kind: str = "trained"  # stats: no router peer (clients use the statistics the peers publish)

def swarm_up(p: SwarmUpConfig) -> LocalSwarm:
    """Start the local swarm ``p`` (training its experts and router first unless it serves checkpoints) and wait
    until every peer is online."""
    run_dir = Path(p.run_dir)
    refuse_beside_running(run_dir)  # before training: not after minutes of it
    run_dir.mkdir(parents=True, exist_ok=True)
    names = [f"peer{i}-r{r}" if p.replicas > 1 else f"peer{i}"
             for i in range(len(p.checkpoints) if p.checkpoints else p.experts) for r in range(p.replicas)]
    if p.checkpoints:
        paths = [c for c in p.checkpoints for _ in range(p.replicas)]
        specs = [PeerSpec(n, checkpoint=c) for n, c in zip(names, paths, strict=True)]
        router, partition = p.router, p.partition
        validate = p.partition  # admission needs the partition (and its dataset)
    else:
        specs, router, partition = _train_first(p, run_dir, names)
        validate = partition
    logger.info(f"starting a bootstrap node and {len(specs)} peer(s) on 127.0.0.1 (logs in {run_dir / 'logs'})")
    if validate is None:
        logger.info("admission off: no --partition to score the checkpoints on (clients use every expert announced)")
    sw = start_local_swarm(specs, router, run_dir, swarm=p.swarm, owner_key=p.owner_key, threads=p.threads,
                           timeout=p.timeout, port=p.port, validate=validate, partition=partition)
    owner = p.owner_key or run_dir / "owner.key"
    logger.info(f"swarm {sw.swarm} is up with {len(specs)} expert peer(s) (owner key {owner}). Multiaddr:\n"
        f"  {' '.join(sw.initial_peers)}")
    return sw


def plan_objectives(p: SwarmUpConfig, part: Partition) -> tuple[list[str], str]:
    """The experts' objectives (``choose_objectives``). ``auto``: from the steps each expert will train: a fixed
    ``--train-steps``, or its wall-clock minutes at the step cost measured here (a few seconds) with the machine's
    CPUs shared by the K training peers, read off the measured quality curves of the recipe of the same network
    (the nearest batch); a network without measured curves trains the mix."""
    from diffswarm.training.recipes import choose_objectives, measure_costs, recipe_for
    from diffswarm.utils.cpus import available_cpus

    k = p.experts
    if p.objectives != "auto":
        return choose_objectives(k, p.objectives)
    recipe = recipe_for(p.net, p.width, p.depth, p.train.batch)
    if recipe is None:
        return choose_objectives(k, "auto")
    steps = p.train.steps
    if steps is None:
        sized = replace(recipe, batch=p.train.batch)  # what the peers will train
        step_s = measure_costs(sized, tuple(part.image_shape), part.num_classes).step_s
        share = min(1.0, available_cpus() / (k * p.replicas))  # of a core, per training peer
        steps = max(1, int(60 * (p.train.minutes or 0) * share / max(step_s, 1e-6)))
    return choose_objectives(k, "auto", recipe, steps)


def _train_first(p: SwarmUpConfig, run_dir: Path, names: list[str]) -> tuple[list[PeerSpec], str | None, str]:
    """The partition (made in ``run_dir`` unless given), the router trained now (unless ``router_kind`` is stats),
    and one peer per expert and replica that trains its expert before serving it: (peer specs, router path,
    partition path: every peer serves it to volunteers that ``diffswarm join``, the owner signs its sha256)."""
    from diffswarm.training.jobs import run_router_job, write_partition

    k = p.experts
    if p.partition:
        part_path = p.partition
        part = Partition.load(part_path)
    else:
        ds = p.data.load("train")
        part_path = str(run_dir / "partition.json")
        part = write_partition(ds, p.data, k, p.seed, part_path)
        logger.info(f"partitioned {ds.dataset_id} into K={k} clusters -> {part_path}")
    if part.k != k:
        raise ValueError(f"--experts {k} but the partition has K={part.k}")
    router = None
    if p.router_kind == "trained":
        router = str(run_dir / "router.safetensors")
        logger.info(f"training the router ({p.router_train.steps} steps)")
        run_router_job(RouterJob(part_path, router, train=p.router_train), progress=False, evaluate=False)
    objectives, why = plan_objectives(p, part)
    logger.info(f"objectives: {why}")
    specs = []
    for i, obj in enumerate(objectives):
        for r in range(p.replicas):
            out = run_dir / "experts" / (f"c{i}-{obj}" + (f"-r{r}" if p.replicas > 1 else ""))
            job = TrainJob(part_path, i, str(out), objective=obj, net=p.net, width=p.width, depth=p.depth,
                           train=replace(p.train, seed=p.seed + i, resume=True, threads=p.threads))
            specs.append(PeerSpec(names[i * p.replicas + r], train=job))
    if p.replicas > 1:
        logger.info("note: replicas of a cluster each train their own expert (same data and seed)")
    return specs, router, part_path
