"""Routing strategies on trained experts: quality and the share of samples per cluster.

Uses a finished demo run (``diffswarm demo --out runs/demo``): its partition, experts and router.
For each strategy it samples N images with the same seeds and prints FD (classifier features,
with the real train-vs-test floor), class accuracy, and the share of samples per cluster
(assigned through the partition) against the data's share, plus the total-variation distance
between the two. Two settings:

- class-conditional generation with the conditional router (the shipped default: top-2);
- unconditional generation (no class) where the router only sees x_t and t: the setting in
  which argmax routing collapses onto the largest cluster at high noise (science sheet).

    .venv/bin/python bench/routing_study.py --run runs/demo [--n 500] [--steps 30]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from diffswarm.clusters import dataset_for_partition
from diffswarm.data import Partition
from diffswarm.eval import get_classifier, quality_report
from diffswarm.router.local import generate, load_local_ensemble
from diffswarm.router.routing import RoutingConfig
from diffswarm.router.sampler import SamplingConfig

SETTINGS = [
    # (name, conditional generation, routing)
    ("cond  top-2 (default)", True, RoutingConfig("top-k", 2)),
    ("cond  top-1", True, RoutingConfig("top-k", 1)),
    ("cond  full", True, RoutingConfig("full")),
    ("cond  sample-1", True, RoutingConfig("sample-k", 1)),
    ("uncond top-2", False, RoutingConfig("top-k", 2)),
    ("uncond top-1", False, RoutingConfig("top-k", 1)),
    ("uncond full", False, RoutingConfig("full")),
    ("uncond sample-1", False, RoutingConfig("sample-k", 1)),
    ("uncond top-1, full t>0.5", False, RoutingConfig("top-k", 1, full_above=0.5)),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    run = Path(args.run)
    part = Partition.load(run / "partition.json")
    train, test = dataset_for_partition(part), dataset_for_partition(part, "test")
    clf = get_classifier(train, progress=False)
    experts = sorted((run / "experts").glob("*/expert.safetensors"))
    data_share = part.shares()
    print(f"{train.dataset_id}, K={part.k}, experts: {', '.join(p.parent.name for p in experts)}; "
          f"n={args.n}, {args.steps} Euler steps, CFG {args.guidance}, seed {args.seed}")
    print("data share per cluster: " + " ".join(f"{s:.2f}" for s in data_share))
    print(f"{'setting':26s} {'FD':>7s} {'floor':>6s} {'class acc':>9s}  {'sample share per cluster':26s} "
          f"{'TV':>5s} {'s':>5s}")
    for name, cond, routing in SETTINGS:
        model = load_local_ensemble(experts, run / "router.safetensors", routing, seed=args.seed)
        model.router_sees_labels = cond
        labels = torch.arange(args.n) % train.num_classes if cond else torch.full((args.n,), -1)
        t0 = time.perf_counter()
        sampling = SamplingConfig(steps=args.steps, guidance=args.guidance if cond else 1.0, seed=args.seed)
        x = generate(model, labels, train.shape, sampling)
        dt = time.perf_counter() - t0
        rep = quality_report(x, labels if cond else None, train, test, clf, part, seed=args.seed)
        share = np.asarray(rep.cluster_share)
        tv = 0.5 * np.abs(share - data_share).sum()
        acc = f"{rep.class_accuracy:.1%}" if rep.class_accuracy is not None else "-"
        print(f"{name:26s} {rep.fd:7.2f} {rep.fd_floor:6.2f} {acc:>9s}  {' '.join(f'{s:.2f}' for s in share):26s} "
              f"{tv:5.3f} {dt:5.0f}", flush=True)


if __name__ == "__main__":
    main()
