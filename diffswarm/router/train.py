"""Train the router: cross-entropy on cluster labels of x0, with x0 noised to random flow times."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffswarm.experts.objectives import drop_labels
from diffswarm.experts.schedules import flow_point
from diffswarm.experts.train import pick_device
from diffswarm.router.model import Router, RouterConfig
from diffswarm.utils.signals import raise_if_stopped

EVAL_TIMES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class RouterTrainConfig:
    """How to train a router (saved in its summary)."""

    steps: int = 1500
    batch: int = 256
    lr: float = 2e-3
    seed: int = 0
    threads: int = 0  # torch CPU threads (0: leave torch's default)
    device: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)


def format_router_accuracy(summary: dict) -> str:
    """The router summary's accuracy-against-t table as text (top-1/top-2, and top-1 without the class)."""
    rows = summary.get("accuracy_by_t", [])
    unc = {r["t"]: r for r in summary.get("accuracy_by_t_uncond", [])}
    out = ["router accuracy on the test split (true cluster of x0):",
           "     t   top1   top2" + ("   top1 (no class)" if unc else "")]
    for r in rows:
        extra = f"   {unc[r['t']]['top1']:.3f}" if r["t"] in unc else ""
        out.append(f"  {r['t']:4.1f}  {r['top1']:.3f}  {r['top2']:.3f}{extra}")
    return "\n".join(out)


@torch.no_grad()
def router_accuracy_by_t(router: Router, images: torch.Tensor, labels: torch.Tensor, clusters: torch.Tensor,
                         times=EVAL_TIMES, seed: int = 0, conditional: bool | None = None) -> list[dict]:
    """Top-1 and top-2 accuracy of the router against the true cluster of x0, at fixed flow times.

    ``conditional``: give the router the class label (None: when the router has classes).
    """
    router.eval()
    dev = next(router.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    use_labels = router.cfg.num_classes > 0 if conditional is None else conditional
    y = labels if use_labels else torch.full_like(labels, -1)
    rows = []
    for tv in times:
        eps = torch.randn(images.shape, generator=gen)
        t = torch.full((images.shape[0],), float(tv))
        correct1 = correct2 = 0
        for s in range(0, images.shape[0], 1024):
            xt = flow_point(images[s:s + 1024], eps[s:s + 1024], t[s:s + 1024]).to(dev)
            logits = router(xt, t[s:s + 1024].to(dev), y[s:s + 1024].to(dev)).cpu()
            top2 = logits.topk(min(2, logits.shape[1]), dim=-1).indices
            c = clusters[s:s + 1024]
            correct1 += int((top2[:, 0] == c).sum())
            correct2 += int((top2 == c[:, None]).any(-1).sum())
        n = images.shape[0]
        rows.append({"t": tv, "top1": correct1 / n, "top2": correct2 / n})
    return rows


def train_router(
    cfg: RouterConfig,
    train: RouterTrainConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    clusters: torch.Tensor,
    out_path: str | Path,
    eval_set: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    progress: bool = True,
) -> Router:
    """Fit p(k | x_t, t, cond). images: (N, C, H, W); labels, clusters: (N,). Writes ``out_path``."""
    if train.threads:
        torch.set_num_threads(train.threads)
    dev = pick_device(train.device)
    torch.manual_seed(train.seed)
    gen = torch.Generator(device="cpu").manual_seed(train.seed)
    router = Router(cfg).to(dev)
    opt = torch.optim.AdamW(router.parameters(), lr=train.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train.lr, total_steps=train.steps, pct_start=0.1)
    t0 = time.perf_counter()
    bar = tqdm(range(train.steps), desc="train router", disable=not progress, dynamic_ncols=True)
    router.train()
    for step in bar:
        raise_if_stopped()
        idx = torch.randint(0, images.shape[0], (train.batch,), generator=gen)
        x0 = images[idx]
        t = torch.rand(train.batch, generator=gen)
        xt = flow_point(x0, torch.randn(x0.shape, generator=gen), t)
        y = drop_labels(labels[idx], cfg.num_classes, cfg.label_drop, gen)
        loss = torch.nn.functional.cross_entropy(router(xt.to(dev), t.to(dev), y.to(dev)), clusters[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    summary = {"steps": train.steps, "final_loss": loss.item(), "seconds": time.perf_counter() - t0,
               "train": train.to_dict()}
    if eval_set is not None:
        summary["accuracy_by_t"] = router_accuracy_by_t(router, *eval_set)
        if cfg.num_classes > 0:
            summary["accuracy_by_t_uncond"] = router_accuracy_by_t(router, *eval_set, conditional=False)
    router.save(out_path, summary)
    return router.eval()
