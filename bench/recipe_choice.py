"""Which training recipe makes the best images from the same CPU time? Trains each candidate for
the same budget of CPU-seconds on one thread, samples, and scores the images.

Each candidate is a class-conditional expert on all of the train split (a monolith, as a proxy
for one demo expert): ms/step is measured in CPU time over a few warm-up steps, the step count is
``budget / (ms/step)``, and ``train_expert`` then trains for exactly that many steps (so the LR
warm-up + cosine schedule spans the steps that fit, as the demo's wall-clock budget will). Then
1,000 class-conditional images (100 per class) are sampled with fixed settings and scored with
``diffswarm.eval.quality_report`` (FD in the quality classifier's features, the real-vs-real floor
at the same n, class accuracy). CPU time is ``time.process_time()`` of the job's own process with
``torch.set_num_threads(1)``, so other work on the machine inflates it far less than wall time.

    python bench/recipe_choice.py --budget 140 --only 0,1 --objective fm --jobs 2

Writes ``<out>/<tag>.json`` (one record per candidate), a 10x10 grid per candidate (one row per
class) and the EMA checkpoint, and prints the table. The machine has 2 cores: ``--jobs`` is capped
at 2 single-thread processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import torch

# name, network (NetConfig), training (TrainConfig), expert (ExpertConfig) options; unset = defaults
# of the demo today: DiT 96x3 patch 4, batch 96, lr 1e-3, warm-up 100, EMA 0.999, logit-normal t.
CANDIDATES = [
    dict(name="dit96x3p4 (demo)", net=dict(kind="dit")),  # 0
    dict(name="dit96x3p4 head16", net=dict(kind="dit", head=16)),  # 1
    dict(name="dit96x3p4 head32", net=dict(kind="dit", head=32)),  # 2
    dict(name="dit64x3p2", net=dict(kind="dit", width=64, patch=2)),  # 3
    dict(name="unet16x2", net=dict(kind="unet", width=16, depth=2)),  # 4
    dict(name="unet16x2 nomid", net=dict(kind="unet", width=16, depth=2, mid_attn=False)),  # 5
    dict(name="unet16x3 nomid", net=dict(kind="unet", width=16, depth=3, mid_attn=False)),  # 6
    # UNet (16, 32, 64) without mid attention (the best of 0-6): batch, lr, EMA, t distribution
    dict(name="unet16x3 nomid", net=dict(kind="unet", width=16, depth=3, mid_attn=False), train=dict(batch=48)),  # 7
    dict(name="unet16x3 nomid", net=dict(kind="unet", width=16, depth=3, mid_attn=False),
         train=dict(batch=48, lr=2e-3)),  # 8
    dict(name="unet16x3 nomid", net=dict(kind="unet", width=16, depth=3, mid_attn=False), train=dict(lr=2e-3)),  # 9
    dict(name="unet16x3 nomid", net=dict(kind="unet", width=16, depth=3, mid_attn=False), train=dict(lr=4e-3)),  # 10
    dict(name="unet16x3 nomid", net=dict(kind="unet", width=16, depth=3, mid_attn=False),
         train=dict(ema_decay=0.99)),  # 11
    dict(name="unet16x3 nomid", net=dict(kind="unet", width=16, depth=3, mid_attn=False),
         train=dict(ema_decay=0.0)),  # 12
    dict(name="unet16x3 nomid", net=dict(kind="unet", width=16, depth=3, mid_attn=False),
         expert=dict(fm_time="uniform")),  # 13
    # UNet architecture around (16, 32, 64)
    dict(name="unet16x3 (mid attn)", net=dict(kind="unet", width=16, depth=3)),  # 14
    dict(name="unet16x3 nomid attn7x7", net=dict(kind="unet", width=16, depth=3, mid_attn=False, attn=True)),  # 15
    dict(name="unet24x3 nomid", net=dict(kind="unet", width=24, depth=3, mid_attn=False)),  # 16
    dict(name="unet16x3 nomid layers2", net=dict(kind="unet", width=16, depth=3, mid_attn=False, layers=2)),  # 17
    dict(name="unet16x3 nomid", net=dict(kind="unet", width=16, depth=3, mid_attn=False), train=dict(batch=128)),  # 18
    # DDPM options on the same network (run with --objective ddpm; 6 is the plain cosine schedule)
    dict(name="unet16x3 nomid", net=dict(kind="unet", width=16, depth=3, mid_attn=False),
         expert=dict(ddpm=dict(loss_weighting="min_snr"))),  # 19
    dict(name="unet16x3 nomid", net=dict(kind="unet", width=16, depth=3, mid_attn=False),
         expert=dict(ddpm=dict(schedule=dict(kind="linear")))),  # 20
    dict(name="unet16x3 nomid", net=dict(kind="unet", width=16, depth=3, mid_attn=False),
         expert=dict(ddpm=dict(schedule=dict(kind="linear"), loss_weighting="min_snr"))),  # 21
    dict(name="unet8x3 nomid", net=dict(kind="unet", width=8, depth=3, mid_attn=False)),  # 22
    dict(name="unet16x3 nomid", net=dict(kind="unet", width=16, depth=3, mid_attn=False),
         expert=dict(ddpm=dict(ddpm_time="logit_normal"))),  # 23
    dict(name="unet16x3 nomid", net=dict(kind="unet", width=16, depth=3, mid_attn=False),
         expert=dict(ddpm=dict(ddpm_time="logit_normal", loss_weighting="min_snr"))),  # 24
    dict(name="unet16x3 nomid", net=dict(kind="unet", width=16, depth=3, mid_attn=False),
         expert=dict(ddpm=dict(ddpm_time="logit_normal", loss_weighting="flow"))),  # 25
    # the quality-per-step curves of the demo's machine-measured choice (diffswarm/training/recipes.py)
    dict(name="dit96x3p4", net=dict(kind="dit"), train=dict(batch=48)),  # 26
    dict(name="unet16x2 nomid", net=dict(kind="unet", width=16, depth=2, mid_attn=False), train=dict(batch=48)),  # 27
    # smaller batches for slow machines (issue 21: an AVX2-only EPYC trains 3.3x fewer UNet steps in the demo)
    dict(name="unet16x3 nomid", net=dict(kind="unet", width=16, depth=3, mid_attn=False), train=dict(batch=32)),  # 28
    dict(name="unet16x3 nomid", net=dict(kind="unet", width=16, depth=3, mid_attn=False), train=dict(batch=24)),  # 29
]

DEFAULT_NET = dict(channels=1, size=28, num_classes=10)
DEFAULT_TRAIN = dict(batch=96, lr=1e-3, warmup=100, ema_decay=0.999)


def _describe(cand: dict) -> str:
    parts = [f"{k}={v}" for k, v in {**cand.get("train", {}), **cand.get("expert", {})}.items()]
    return cand["name"] + (" " + " ".join(parts) if parts else "")


def make_config(cand: dict, objective: str, dataset_id: str, **meta):
    """(ExpertConfig, TrainConfig options) of a candidate; ``objective`` unless the candidate sets one."""
    from diffswarm.experts.config import ExpertConfig
    from diffswarm.experts.networks import NetConfig
    from diffswarm.experts.schedules import ScheduleConfig

    ex = dict(cand.get("expert", {}))
    objective = ex.pop("objective", objective)
    ex.pop("ddpm", None), ex.pop("fm", None)
    ex.update(cand.get("expert", {}).get(objective, {}))  # per-objective options, e.g. min_snr for ddpm
    sched = ScheduleConfig(**ex.pop("schedule", {}))
    cfg = ExpertConfig(objective=objective, net=NetConfig(**{**DEFAULT_NET, **cand["net"]}), schedule=sched,
                       dataset_id=dataset_id, **meta, **ex)
    return cfg, {**DEFAULT_TRAIN, **cand.get("train", {})}


def probe_ms_per_step(cfg, tk: dict, images: torch.Tensor, labels: torch.Tensor, seed: int = 0,
                      timed: int = 15, warm: int = 3) -> tuple[float, int]:
    """(CPU ms per training step, parameter count): the step of train_expert (loss, backward, clip,
    AdamW, EMA) timed with process_time over ``timed`` steps after ``warm`` untimed ones."""
    from diffswarm.experts.expert import Expert
    from diffswarm.experts.objectives import expert_loss

    torch.manual_seed(seed)
    probe, probe_ema = Expert(cfg), Expert(cfg)
    opt = torch.optim.AdamW(probe.net.parameters(), lr=tk["lr"])
    g = torch.Generator().manual_seed(seed)
    for s in range(warm + timed):
        if s == warm:
            c0 = time.process_time()
        idx = torch.randint(0, len(images), (tk["batch"],), generator=g)
        loss, _ = expert_loss(probe, images[idx], labels[idx], g)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(probe.net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(probe_ema.net.parameters(), probe.net.parameters(), strict=True):
                pe.lerp_(pm, 0.001)
    ms = 1000 * (time.process_time() - c0) / timed
    return ms, sum(p.numel() for p in probe.net.parameters())


def fit_train_config(tk: dict, ms: float, budget: float, seed: int = 0):
    """TrainConfig for the steps that fit ``budget`` CPU-seconds at ``ms`` per step; a float warm-up
    below 1 is a fraction of those steps."""
    from diffswarm.experts.train import TrainConfig

    tk = dict(tk)
    steps = max(1, int(budget * 1000 / ms))
    if isinstance(tk["warmup"], float) and tk["warmup"] < 1:
        tk["warmup"] = max(1, int(tk["warmup"] * steps))
    tk["warmup"] = min(int(tk["warmup"]), steps // 2)
    return TrainConfig(steps=steps, seed=seed, ckpt_every=10**9, log_every=max(1, steps // 10), **tk)


def class_rows(samples: torch.Tensor, labels: torch.Tensor, num_classes: int, per_class: int = 10) -> torch.Tensor:
    """The first ``per_class`` samples of each class in class order: a grid with one row per class."""
    return torch.cat([samples[labels == c][:per_class] for c in range(num_classes)])


def run_candidate(i: int, cand: dict, args: argparse.Namespace) -> dict:
    """Measure ms/step, train for the budget, sample, score. Runs in its own single-thread process."""
    torch.set_num_threads(1)
    from diffswarm.data import load_dataset
    from diffswarm.eval import get_classifier, quality_report
    from diffswarm.experts.expert import Expert
    from diffswarm.experts.train import train_expert
    from diffswarm.router.local import generate
    from diffswarm.sampling.config import SamplingConfig
    from diffswarm.utils.images import save_grid

    train_ds, test_ds = load_dataset(args.dataset, "train"), load_dataset(args.dataset, "test")
    clf = get_classifier(train_ds, test_ds=test_ds, progress=False)
    cfg, tk = make_config(cand, args.objective, train_ds.dataset_id)
    out = Path(args.out) / f"{args.tag}-{i:02d}"

    # 1. ms/step in CPU time, then the steps that fit the budget
    ms, n_params = probe_ms_per_step(cfg, tk, train_ds.images, train_ds.labels, args.seed, args.probe_steps)
    tc = fit_train_config(tk, ms, (args.steps + 0.5) * ms / 1000 if args.steps else args.budget, args.seed)

    # 2. train for the steps that fit
    if out.exists():
        for f in out.iterdir():
            f.unlink()
    c0 = time.process_time()
    summary = train_expert(cfg, tc, train_ds.images, train_ds.labels, out, progress=False)
    train_cpu = time.process_time() - c0

    # 3. sample 100 per class with fixed settings; score
    expert = Expert.from_checkpoint(out / "expert.safetensors")
    labels = torch.arange(args.n) % train_ds.num_classes
    c0 = time.process_time()
    samples = generate(expert, labels, train_ds.shape, SamplingConfig(steps=args.sample_steps, sampler=args.sampler,
                                                                      guidance=args.guidance, seed=args.seed + 1,
                                                                      batch=250))
    sample_cpu = time.process_time() - c0
    rep = quality_report(samples, labels, train_ds, test_ds, clf, seed=args.seed)
    save_grid(class_rows(samples, labels, train_ds.num_classes), out / "grid.png", 10)
    return {"index": i, "candidate": _describe(cand), "objective": cfg.objective, "net": cfg.net.to_dict(),
            "train": tc.to_dict(), "expert": cfg.to_dict(), "params": n_params, "ms_per_step": ms,
            "steps": tc.steps, "train_cpu_s": train_cpu, "final_loss": summary["final_loss"],
            "fd": rep.fd, "fd_floor": rep.fd_floor, "class_accuracy": rep.class_accuracy,
            "sample_cpu_s_per_1000": sample_cpu * 1000 / args.n, "checkpoint": str(out / "expert.safetensors"),
            "grid": str(out / "grid.png")}


def _job(payload):
    i, cand, args = payload
    t0 = time.perf_counter()
    rec = run_candidate(i, cand, args)
    rec["wall_s"] = time.perf_counter() - t0
    print(f"done {i}: {rec['candidate']}: FD {rec['fd']:.1f} acc {100 * rec['class_accuracy']:.1f}%", flush=True)
    return rec


def _row(r: dict) -> str:
    return (f"{r['index']:>2d} {r['candidate'][:58]:58s} {r['objective']:>4s} {r['params'] / 1e6:6.2f}M "
            f"{r['ms_per_step']:7.0f} {r['steps']:6d} {r['fd']:6.1f} {r['fd_floor']:5.1f} "
            f"{100 * r['class_accuracy']:6.1f}% {r['sample_cpu_s_per_1000']:7.1f}")


def _table(records: list[dict]) -> None:
    print(f"\n{'#':>2s} {'candidate':58s} {'obj':>4s} {'params':>7s} {'ms/step':>7s} {'steps':>6s} "
          f"{'FD':>6s} {'floor':>5s} {'acc':>7s} {'samp s/1k':>9s}")
    for r in records:
        print(_row(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=140, help="training CPU-seconds of one thread per candidate")
    ap.add_argument("--steps", type=int, default=None,
                    help="train every candidate this many steps instead of --budget CPU-seconds")
    ap.add_argument("--only", default=None, help="comma-separated candidate indices (default: all)")
    ap.add_argument("--objective", default="fm", choices=["fm", "ddpm"], help="for candidates that do not set one")
    ap.add_argument("--jobs", type=int, default=1, help="concurrent single-thread jobs (at most 2)")
    ap.add_argument("--dataset", default="fashion")
    ap.add_argument("--n", type=int, default=1000, help="samples scored (a multiple of the class count)")
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--sampler", default="euler", choices=["euler", "heun"])
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--probe-steps", type=int, default=15, help="timed steps of the ms/step measurement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/recipe_choice")
    ap.add_argument("--tag", default=None, help="name of the JSON and run folders (default: from the options)")
    ap.add_argument("--list", action="store_true", help="print the candidates and exit")
    ap.add_argument("--show", action="store_true", help="print the table of <out>/<tag>.json and exit")
    args = ap.parse_args()
    if args.list:
        for i, c in enumerate(CANDIDATES):
            print(f"{i:2d} {_describe(c)} net={c['net']}")
        return
    jobs = max(1, min(args.jobs, 2))
    idx = [int(i) for i in args.only.split(",")] if args.only else list(range(len(CANDIDATES)))
    length = f"s{args.steps}" if args.steps else f"b{args.budget:g}"
    args.tag = args.tag or f"{args.objective}-{length}-{args.sampler}{args.sample_steps}-g{args.guidance:g}"
    if args.show:
        d = json.loads((Path(args.out) / f"{args.tag}.json").read_text())
        _table([r for r in d["records"] if not args.only or r["index"] in idx])
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    # the quality classifier is trained once, here, before any job could race to write its cache
    from diffswarm.data import load_dataset
    from diffswarm.eval import get_classifier

    torch.set_num_threads(1)
    get_classifier(load_dataset(args.dataset, "train"), test_ds=load_dataset(args.dataset, "test"), progress=False)
    print(f"{args.dataset}, objective {args.objective}, budget {args.budget:g} CPU-s of one thread per candidate, "
          f"sampling {args.n} images ({args.sampler} {args.sample_steps} steps, CFG {args.guidance:g}), "
          f"{jobs} job(s), {os.cpu_count()} CPUs", flush=True)
    payloads = [(i, CANDIDATES[i], args) for i in idx]
    path = Path(args.out) / f"{args.tag}.json"
    old = {r["index"]: r for r in json.loads(path.read_text())["records"]} if path.exists() else {}
    records = []

    def keep(rec: dict) -> None:  # the JSON is rewritten after every candidate, so a stopped run keeps its results
        records.append(rec)
        if path.exists():  # another run may have added records to this tag meanwhile
            old.update({r["index"]: r for r in json.loads(path.read_text())["records"]})
        old[rec["index"]] = rec
        path.write_text(json.dumps({"args": vars(args), "records": [old[k] for k in sorted(old)]}, indent=1))

    if jobs == 1:
        for p in payloads:
            keep(_job(p))
    else:
        with mp.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
            for rec in pool.imap_unordered(_job, payloads, chunksize=1):
                keep(rec)
    _table(sorted(records, key=lambda r: r["index"]))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
