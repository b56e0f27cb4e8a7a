"""Small experts and a router built in seconds on random data: tests, benchmarks, protocol demos.

The experts are real ``Expert`` checkpoints (``train_expert`` for a few steps on ``torch.rand``
images), one per cluster of a made-up partition, with objectives as given; the router is an
untrained ``Router`` with the same partition hash. Their images are noise, but every code path
(DDPM translation, CFG, routing, checkpoints, hashes) is the real one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def make_toy_swarm(out_dir: str | Path, objectives: Sequence[str], *, size: int = 8, channels: int = 1,
                   num_classes: int = 4, net: str = "mlp", width: int = 32, depth: int = 1, steps: int = 10,
                   seed: int = 0,
                   router_width: int = 32, partition_hash: str | None = None) -> tuple[list[Path], Path]:
    """Write K = len(objectives) expert checkpoints and a router under ``out_dir``; returns (experts, router)."""
    from ..experts.config import ExpertConfig
    from ..experts.networks import NetConfig, default_patch
    from ..experts.train import TrainConfig, train_expert
    from ..router.model import Router, RouterConfig

    out = Path(out_dir)
    k = len(objectives)
    ph = partition_hash or f"toy-{k}-{size}-{seed}"
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for c, obj in enumerate(objectives):
        images = torch.rand(64, channels, size, size, generator=gen) * 2 - 1
        labels = torch.randint(0, max(1, num_classes), (64,), generator=gen)
        ncfg = NetConfig(kind=net, channels=channels, size=size, num_classes=num_classes, width=width, depth=depth,
                         patch=default_patch(size))
        cfg = ExpertConfig(objective=obj, net=ncfg,
                           cluster=c, num_clusters=k, partition_hash=ph, dataset_id=f"toy:{size}")
        d = out / f"c{c}-{obj}"
        train_expert(cfg, TrainConfig(steps=steps, batch=16, warmup=1, ckpt_every=10**9, log_every=10**9,
                                      seed=seed + c), images, labels, d, device="cpu", progress=False)
        paths.append(d / "expert.safetensors")
    torch.manual_seed(seed)
    router = Router(RouterConfig(num_clusters=k, num_classes=num_classes, channels=channels, size=size,
                                 width=router_width, depth=1, partition_hash=ph))
    # the AdaLN gates start at zero; randomise the head so routing is not uniform
    with torch.no_grad():
        router.head.weight.normal_(0, 1.0, generator=gen)
    router_path = out / "router.safetensors"
    router.save(router_path, {"toy": True})
    return paths, router_path
