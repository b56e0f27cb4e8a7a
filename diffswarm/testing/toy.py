"""Small experts and a router built in seconds on random data: tests, benchmarks, protocol demos.

The experts are real ``Expert`` checkpoints (``train_expert`` for a few steps on ``torch.rand``
images), one per cluster of a made-up partition, with objectives as given; the router is an
untrained ``Router`` with the same partition hash. Their images are noise, but every code path
(DDPM translation, CFG, routing, checkpoints, hashes) is the real one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch


@dataclass(frozen=True)
class ToySwarmSpec:
    """What ``make_toy_swarm`` builds: K = len(objectives) experts of one small network, and a router."""

    objectives: Sequence[str]  # one expert per cluster, e.g. ("ddpm", "fm")
    size: int = 8  # image side
    channels: int = 1
    num_classes: int = 4
    net: str = "mlp"
    width: int = 32
    depth: int = 1
    steps: int = 10  # training steps per expert
    seed: int = 0
    router_width: int = 32
    partition_hash: str | None = None  # default: derived from K, size and seed


def make_toy_swarm(out_dir: str | Path, spec: ToySwarmSpec) -> tuple[list[Path], Path]:
    """Write the experts and router of ``spec`` under ``out_dir``; returns (expert paths, router path)."""
    from diffswarm.experts.train import TrainConfig, train_expert
    from diffswarm.router.model import Router
    from diffswarm.router.stats.publish import STATS_FILE, write_cluster_stats
    from diffswarm.training.jobs import ClusterData, expert_config, router_config

    out = Path(out_dir)
    k = len(spec.objectives)
    ph = spec.partition_hash or f"toy-{k}-{spec.size}-{spec.seed}"
    data = ClusterData((spec.channels, spec.size, spec.size), spec.num_classes, k, ph, f"toy:{spec.size}")
    gen = torch.Generator().manual_seed(spec.seed)
    paths = []
    for c, obj in enumerate(spec.objectives):
        images = torch.rand(64, spec.channels, spec.size, spec.size, generator=gen) * 2 - 1
        labels = torch.randint(0, max(1, spec.num_classes), (64,), generator=gen)
        cfg = expert_config(data, obj, c, net=spec.net, width=spec.width, depth=spec.depth)
        d = out / f"c{c}-{obj}"
        train_expert(cfg, TrainConfig(steps=spec.steps, batch=16, warmup=1, ckpt_every=10**9, log_every=10**9,
                                      seed=spec.seed + c, device="cpu"), images, labels, d, progress=False)
        write_cluster_stats(cfg, images, labels, d / STATS_FILE)  # what its peer publishes for the stats router
        paths.append(d / "expert.safetensors")
    torch.manual_seed(spec.seed)
    # the toy router records no dataset id (its experts do)
    router = Router(router_config(replace(data, dataset_id=""), width=spec.router_width, depth=1))
    # the AdaLN gates start at zero; randomise the head so routing is not uniform
    with torch.no_grad():
        router.head.weight.normal_(0, 1.0, generator=gen)
    router_path = out / "router.safetensors"
    router.save(router_path, {"toy": True})
    return paths, router_path
