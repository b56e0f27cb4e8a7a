"""Which denoiser trains best per CPU-second? Measures ms/step and held-out loss at equal wall time.

Each candidate trains a flow-matching expert on the default dataset's train split for the same
wall-clock budget on one thread (as one demo worker would), then reports its held-out FM loss on
the test split at fixed flow times and noise (lower is better). Run:

    .venv/bin/python bench/network_choice.py [--seconds 45] [--dataset fashion]
"""

from __future__ import annotations

import argparse
import time

import torch

from diffswarm.data import default_dataset_name, load_dataset
from diffswarm.experts.config import ExpertConfig
from diffswarm.experts.expert import Expert
from diffswarm.experts.networks import NetConfig
from diffswarm.experts.objectives import expert_loss
from diffswarm.experts.schedules import FM_TIME_SCALE, flow_point

CANDIDATES = [
    dict(kind="mlp", width=384, depth=3),
    dict(kind="mlp", width=512, depth=3),
    dict(kind="mlp", width=512, depth=4),
    dict(kind="mlp", width=768, depth=3),
    dict(kind="dit", width=96, depth=3, patch=4, heads=4),
    dict(kind="dit", width=128, depth=3, patch=4, heads=4),
    dict(kind="dit", width=64, depth=4, patch=4, heads=4),
    dict(kind="unet", width=16, depth=2),
    dict(kind="unet", width=8, depth=2),
]


@torch.no_grad()
def heldout_loss(expert: Expert, x0: torch.Tensor, labels: torch.Tensor) -> float:
    g = torch.Generator().manual_seed(123)
    total = 0.0
    times = [0.1, 0.3, 0.5, 0.7, 0.9]
    for tv in times:
        eps = torch.randn(x0.shape, generator=g)
        t = torch.full((x0.shape[0],), tv)
        pred = expert.net(flow_point(x0, eps, t), t * FM_TIME_SCALE, labels)
        total += float((pred - (eps - x0)).pow(2).mean())
    return total / len(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=45)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--only", default=None, help="comma-separated candidate indices")
    args = ap.parse_args()
    torch.set_num_threads(1)
    name = args.dataset or default_dataset_name()
    train, test = load_dataset(name, "train"), load_dataset(name, "test")
    c, h, _ = train.shape
    xv, yv = test.images[:1000], test.labels[:1000]
    print(f"dataset {train.dataset_id}, budget {args.seconds:.0f}s per candidate, batch {args.batch}, 1 thread")
    print(f"{'network':28s} {'params':>8s} {'ms/step':>8s} {'steps':>6s} {'held-out FM loss':>17s}")
    chosen = [CANDIDATES[int(i)] for i in args.only.split(",")] if args.only else CANDIDATES
    for cand in chosen:
        torch.manual_seed(0)
        cfg = ExpertConfig(objective="fm", net=NetConfig(channels=c, size=h, num_classes=train.num_classes, **cand))
        expert = Expert(cfg)
        opt = torch.optim.AdamW(expert.net.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            idx = torch.randint(0, len(train), (args.batch,), generator=g)
            loss, _ = expert_loss(expert, train.images[idx], train.labels[idx], g)
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
            steps += 1
        ms = 1000 * (time.perf_counter() - t0) / steps
        n = sum(p.numel() for p in expert.net.parameters())
        label = " ".join(f"{k}={v}" for k, v in cand.items())
        loss = heldout_loss(expert.eval(), xv, yv)
        print(f"{label:28s} {n / 1e6:7.2f}M {ms:8.0f} {steps:6d} {loss:17.4f}", flush=True)


if __name__ == "__main__":
    main()
