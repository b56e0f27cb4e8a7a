"""The plan of `join` (options -> ``JoinPlan``; its runner is ``join_runs``): resolve swarm -> owner's manifest ->
partition -> cluster and objective, then run the same peer as `diffswarm peer --partition P --cluster K` (train,
then serve).

The plan holds the peer's config without its training job (``peer``) and the expert's network and training settings
(``job``, a template whose partition and cluster the runner fills in); ``run_join`` asks the swarm
(``swarm.join``), says what training will cost (``training.footprint``), refuses when the machine cannot hold the
expert, and runs the peer; a peer that a confirmed rebalancing move stopped (``--rebalance``) starts again on the
cluster it moved to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from diffswarm.cli.peer_plans import MAX_ANNOUNCE_PERIOD, _server_network
from diffswarm.cli.planning import full_swarm_name
from diffswarm.experts.train import TrainConfig
from diffswarm.training.jobs import TrainJob

if TYPE_CHECKING:
    from diffswarm.peer.config import PeerConfig

JOIN_MINUTES = 30.0  # default training budget of a joining volunteer
START_DELAY_S = 10.0  # default upper bound of the random wait before choosing a cluster (Petals: mean 5 s)


@dataclass(frozen=True)
class Rebalancing:
    move: bool  # --rebalance
    interval: float
    checks: int
    margin: float


@dataclass(frozen=True)
class JoinPlan:
    swarm: str  # NAME@FINGERPRINT
    peer: PeerConfig  # the serving peer, without its training job
    job: TrainJob  # network and training settings (partition, cluster, objective and out are the runner's)
    out: str  # the partition copy, join.json and one training folder per cluster
    cluster: int | None  # --cluster
    objective: str | None  # --objective
    data_root: str | None
    start_delay: float
    wait: float  # seconds to wait for the owner's manifest
    rebalancing: Rebalancing


def _default_out(swarm: str, identity: str | None) -> str:
    name = swarm.split("@")[0]
    if identity:
        p = Path(identity)
        return str(p.parent / f"{p.stem}-join" / name)
    return str(Path("runs") / "join" / name)


def plan_join(args, given) -> JoinPlan:
    if not args.swarm:
        raise ValueError("`diffswarm join` needs --swarm NAME@FINGERPRINT (the swarm's full name, from its owner)")
    if not args.initial_peers:
        raise ValueError("`diffswarm join` needs --initial-peers MADDR (a multiaddr of a peer of the swarm)")
    swarm = full_swarm_name(args.swarm)
    for opt, v in (("--start-delay", args.start_delay), ("--wait", args.wait)):
        if v < 0:
            raise ValueError(f"{opt} must be >= 0, got {v:g}")
    if not 0 < args.announce_period <= MAX_ANNOUNCE_PERIOD:
        raise ValueError(f"--announce-period {args.announce_period:g} must be in (0, {MAX_ANNOUNCE_PERIOD:g}] seconds")
    if not args.minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {args.minutes:g}")
    from diffswarm.peer.config import PeerConfig
    from diffswarm.peer.placement import RebalanceConfig

    d = PeerConfig()
    peer = PeerConfig(net=_server_network(args, given), swarm=swarm, device=args.device or d.device,
                      threads=args.threads if args.threads is not None else d.threads,
                      max_batch=args.max_batch or d.max_batch, announce_period=args.announce_period,
                      info_file=args.info_file, check_reachability=not args.no_reachability_check)
    try:
        rb = Rebalancing(args.rebalance, args.rebalance_interval, args.rebalance_checks, args.rebalance_margin)
        RebalanceConfig((1.0,), rb.interval, rb.checks, margin=rb.margin)  # checks the values now
    except ValueError as e:
        raise ValueError(f"--rebalance-interval / --rebalance-checks / --rebalance-margin: {e}") from None
    if args.cluster is not None and args.cluster < 0:
        raise ValueError(f"--cluster must be >= 0, got {args.cluster}")
    train = TrainConfig(steps=None, minutes=args.minutes, batch=args.batch, lr=args.lr, seed=args.seed,
                        device=args.device or "auto", threads=args.threads or 0, resume=True)
    job = TrainJob(partition="", cluster=0, out="", net=args.net, width=args.width, depth=args.depth, train=train)
    return JoinPlan(swarm, peer, job, args.out or _default_out(swarm, args.identity), args.cluster, args.objective,
                    args.data_root, args.start_delay, args.wait, rb)
