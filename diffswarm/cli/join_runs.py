"""The runner of `join`: ask the swarm (``swarm.join``), choose, say what training will cost and refuse when the
machine cannot hold the expert, then run the same ``Peer`` as `diffswarm peer --partition P --cluster K`; a peer that
a confirmed rebalancing move stopped (``--rebalance``) starts again on the cluster it moved to."""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path

from diffswarm.cli.join_plans import JoinPlan
from diffswarm.training.jobs import TrainJob


def _say(msg: str) -> None:
    print(msg, flush=True)


def _check_memory(job: TrainJob, survey, ds) -> None:
    """Say what training will cost; ``JoinError`` when the machine cannot hold the expert."""
    from diffswarm.experts.train import pick_device
    from diffswarm.swarm.join import JoinError
    from diffswarm.training.footprint import HEADROOM, available_memory, fits, measure_footprint

    ecfg, images, _ = job.expert(survey.partition, ds)
    fp = measure_footprint(ecfg, job.train.batch, len(images))
    dev = pick_device(job.train.device)
    free, what = available_memory(dev)
    have = f"{free >> 20} MiB {what}" if free is not None else what
    _say(f"memory: training {ecfg.expert_id} on {dev} takes about {fp.describe()}; {have}")
    _say(f"time: up to {job.train.minutes:g} minutes of training (a restart resumes and counts what earlier runs "
         "spent), then it serves until stopped")
    if not fits(fp, free):
        raise JoinError(f"this machine cannot hold expert {ecfg.expert_id} on {dev}: it needs about "
                        f"{fp.total >> 20} MiB and at most {HEADROOM:.0%} of the {have} may be used. Free memory, "
                        "use a smaller --batch, --width or --depth, or another --device")


def run_join(p: JoinPlan) -> int:
    from diffswarm.dht.node import identity_peer_id
    from diffswarm.peer.placement import RebalanceConfig
    from diffswarm.peer.server import Peer, run
    from diffswarm.swarm.join import JoinChoice, decide, describe_cover, load_volunteer_data, survey

    out = Path(p.out)
    ident = p.peer.net.identity_path
    own = identity_peer_id(ident) if ident and Path(ident).exists() else None
    previous = JoinChoice.load(out)
    cluster, moved = p.cluster, None
    if p.cluster is None and (previous is None or previous.swarm != p.swarm) and p.start_delay > 0:
        delay = random.uniform(0, p.start_delay)
        _say(f"waiting {delay:.1f} s (random, up to --start-delay {p.start_delay:g}) so that volunteers joining "
             "together see each other's choice")
        time.sleep(delay)
    while True:
        s = survey(p.swarm, p.peer.net, out, p.wait)
        m = s.manifest
        _say(f"swarm {p.swarm}: K={m.num_clusters}, dataset {s.partition.dataset_id}, partition "
             f"{m.partition_hash[:12]} (file {s.partition_path}, sha256 signed by the owner)")
        ds = load_volunteer_data(s.partition, p.data_root)
        choice, cover = decide(p.swarm, s, previous, cluster, p.objective, own)
        if moved is not None:
            choice = replace(choice, reason=f"rebalancing from cluster {moved.src} ({moved.before:.2f} -> "
                                            f"{moved.after:.2f} balance quality)")
        _say(f"coverage of the swarm:\n{describe_cover(cover)}")
        _say(f"joining cluster {choice.cluster} with a {choice.objective} expert: {choice.reason}")
        choice.save(out)
        run_dir = out / f"c{choice.cluster}-{choice.objective}-{m.partition_hash[:8]}"  # one per expert and partition
        job = replace(p.job, partition=str(s.partition_path), cluster=choice.cluster, objective=choice.objective,
                      out=str(run_dir), data_root=p.data_root or "")
        _check_memory(job, s, ds)
        del ds
        rb = p.rebalancing
        cfg = replace(p.peer, train=job, rebalance=RebalanceConfig(
            tuple(float(x) for x in s.partition.shares()), rb.interval, rb.checks, margin=rb.margin, move=rb.move))
        peer = Peer(cfg)
        code = run(peer)
        if peer.move is None:
            return code
        previous, cluster, moved = None, peer.move.dst, peer.move
        _say(f"rebalancing: leaving cluster {peer.move.src} for cluster {peer.move.dst}")
