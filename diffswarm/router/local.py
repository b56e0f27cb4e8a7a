"""Loading local experts and a router into one routed ensemble, and generating with it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from diffswarm.experts.expert import Expert
from diffswarm.router.ensemble import RoutedEnsemble
from diffswarm.router.model import Router
from diffswarm.router.routing import RoutingConfig
from diffswarm.sampling.config import SamplingConfig
from diffswarm.sampling.loop import StepCallback, StepInfo, sample


def order_by_cluster(experts: Sequence[Expert], num_clusters: int, partition_hash: str | None) -> list[Expert]:
    """Place experts at their cluster index; refuse mismatched partitions and gaps."""
    slots: list[Expert | None] = [None] * num_clusters
    for e in experts:
        c = e.config.cluster
        if c is None or not 0 <= c < num_clusters:
            raise ValueError(f"expert {e.expert_id} has cluster {c}, outside the router's 0..{num_clusters - 1}")
        if partition_hash and e.config.partition_hash and e.config.partition_hash != partition_hash:
            raise ValueError(f"expert {e.expert_id} was trained on partition {e.config.partition_hash[:12]}, "
                             f"the router on {partition_hash[:12]}")
        if slots[c] is not None:
            raise ValueError(f"two local experts for cluster {c}: {slots[c].expert_id} and {e.expert_id}")
        slots[c] = e
    missing = [k for k, e in enumerate(slots) if e is None]
    if missing:
        raise ValueError(f"no expert for clusters {missing}; pass one checkpoint per cluster")
    return slots  # type: ignore[return-value]


def local_stats_router(expert_paths: Sequence[str | Path], device="cpu"):
    """A ``StatsRouter`` from the ``cluster_stats.bin`` beside each expert checkpoint (one per cluster)."""
    from diffswarm.router.stats.publish import read_cluster_stats, stats_path
    from diffswarm.router.stats.router import StatsRouter

    stats = []
    for p in expert_paths:
        if not stats_path(p).exists():
            raise ValueError(f"{p} has no {stats_path(p).name} beside it: the statistics router needs every "
                             "cluster's statistics (`diffswarm train` writes them)")
        stats.append(read_cluster_stats(stats_path(p))[1])
    if any(s.cluster is None for s in stats) or sorted(s.cluster for s in stats) != list(range(len(stats))):
        raise ValueError(f"the experts' statistics are for clusters {[s.cluster for s in stats]}; the statistics "
                         f"router needs exactly clusters 0..{len(stats) - 1}")
    return StatsRouter(sorted(stats, key=lambda s: s.cluster)).to(device)


def load_local_ensemble(expert_paths: Sequence[str | Path], router_path: str | Path | None,
                        routing: RoutingConfig, device="cpu", seed: int = 0,
                        router_kind: str = "trained") -> RoutedEnsemble:
    """The experts of ``expert_paths`` with the router file ``router_path`` (``router_kind`` trained), or with
    the statistics router built from the stats files beside them (stats)."""
    experts = [Expert.from_checkpoint(p, device) for p in expert_paths]
    if router_kind == "stats":
        router = local_stats_router(expert_paths, device)
        ordered = order_by_cluster(experts, router.cfg.num_clusters, router.cfg.partition_hash)
        return RoutedEnsemble(ordered, router, routing, seed=seed)
    if router_path is None:
        if len(experts) != 1:
            raise ValueError("several experts need a router (--router)")
        return RoutedEnsemble(experts, None, routing, seed=seed)
    router = Router.load(router_path, device)
    ordered = order_by_cluster(experts, router.cfg.num_clusters, router.cfg.partition_hash)
    return RoutedEnsemble(ordered, router, routing, seed=seed)


def make_labels(n: int, classes: Sequence[int] | None, num_classes: int) -> torch.Tensor:
    """(n,) labels cycling through ``classes`` (None: unconditional, -1)."""
    if not classes:
        return torch.full((n,), -1, dtype=torch.long)
    for c in classes:
        if not -1 <= c < num_classes:
            raise ValueError(f"class {c} is outside 0..{num_classes - 1}")
    return torch.tensor([classes[i % len(classes)] for i in range(n)], dtype=torch.long)


class ProgressCallback:
    """tqdm bar over sampling steps showing the experts chosen at each step."""

    def __init__(self, desc: str = "sample", enabled: bool = True):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def __call__(self, info: StepInfo) -> None:
        if info.step == 0:  # a new trajectory (one per batch)
            self.bar = tqdm(total=info.num_steps, desc=self.desc, disable=not self.enabled, dynamic_ncols=True)
        share = info.weights.mean(0)
        top = sorted(range(len(info.expert_ids)), key=lambda k: -float(share[k]))[:3]
        self.bar.set_postfix_str(f"t={info.t:.2f} "
                                 + " ".join(f"{info.expert_ids[k]}:{float(share[k]):.2f}" for k in top))
        for e in info.events:
            self.bar.write(e)
        self.bar.update(1)
        if info.step + 1 == info.num_steps:
            self.bar.close()


def seeded_noise(n: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """(n, *shape) standard normal noise from one CPU generator seeded with ``seed`` (the same on every device)."""
    return torch.randn((n, *shape), generator=torch.Generator(device="cpu").manual_seed(seed))


def generate(model, labels: torch.Tensor, shape: tuple[int, int, int], sampling: SamplingConfig | None = None,
             device="cpu", callback: StepCallback | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Samples (N, C, H, W) for ``labels`` (N,); noise drawn from one seeded CPU generator so a seed
    gives the same images on any device and any batch split. ``sampling``: default ``SamplingConfig()``.
    ``noise``: (N, *shape) starting points to use instead (a caller's own generator, e.g. the diffusers pipeline)."""
    sampling = sampling or SamplingConfig()
    if noise is None:
        noise = seeded_noise(labels.shape[0], shape, sampling.seed)
    elif tuple(noise.shape) != (labels.shape[0], *shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(labels.shape[0], *shape)}")
    outs = []
    for s in range(0, labels.shape[0], sampling.batch):
        x = noise[s:s + sampling.batch].to(device)
        outs.append(sample(model, x, labels[s:s + sampling.batch].to(device), sampling.steps, sampling.sampler,
                           sampling.guidance, callback).cpu())
    return torch.cat(outs)
