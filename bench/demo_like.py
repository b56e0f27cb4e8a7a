"""The demo's true target metric for a recipe: K experts (DDPM and FM alternating, as the demo
does) trained each for the same CPU-time budget on its own k-means cluster, a router, and
class-conditional samples through ``diffswarm.router.local`` with top-2 routing.

Recipes are candidates of ``bench/recipe_choice.py`` (``--recipe`` index; ``--ddpm-recipe`` when
the DDPM experts should use another). Each expert is a single-thread job: ms/step measured in CPU
time over a few steps, steps = budget / (ms/step), then ``train_expert`` for exactly those steps.
The router (1,000 steps) is trained once per partition and cached in ``--out``.

    python bench/demo_like.py --recipe 0 --budget 140 --jobs 2

Prints per-expert steps and the quality of ``--n`` samples (FD, floor, class accuracy, cluster
shares) and writes ``<out>/<tag>/report.json`` and a grid with one row per class.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_choice import CANDIDATES, class_rows, fit_train_config, make_config, probe_ms_per_step  # noqa: E402


def _expert_job(payload) -> dict:
    part_path, k, objective, cand, budget, out, seed = payload
    torch.set_num_threads(1)
    from diffswarm.data import Partition
    from diffswarm.experts.train import train_expert
    from diffswarm.training.jobs import dataset_for_partition

    part = Partition.load(part_path)
    ds = dataset_for_partition(part)
    idx = torch.from_numpy(part.indices(k))
    images, labels = ds.images[idx], ds.labels[idx]
    cfg, tk = make_config(cand, objective, ds.dataset_id, cluster=k, num_clusters=part.k,
                          partition_hash=part.partition_hash)
    ms, n_params = probe_ms_per_step(cfg, tk, images, labels, seed + k)
    tc = fit_train_config(tk, ms, budget, seed + k)
    c0 = time.process_time()
    summary = train_expert(cfg, tc, images, labels, out, progress=False)
    rec = {"cluster": k, "objective": objective, "n_train": int(len(idx)), "ms_per_step": ms, "steps": tc.steps,
           "train_cpu_s": time.process_time() - c0, "final_loss": summary["final_loss"], "params": n_params}
    print(f"  expert c{k}-{objective}: {ms:.0f} ms/step, {tc.steps} steps, "
          f"{rec['train_cpu_s']:.0f} CPU-s, loss {rec['final_loss']:.4f}", flush=True)
    return rec


def _router_job(payload) -> dict:
    part_path, out, steps, seed = payload
    torch.set_num_threads(1)
    from diffswarm.data import Partition
    from diffswarm.router.model import RouterConfig
    from diffswarm.router.train import RouterTrainConfig, train_router
    from diffswarm.training.jobs import dataset_for_partition

    part = Partition.load(part_path)
    ds = dataset_for_partition(part)
    c, h, _ = ds.shape
    cfg = RouterConfig(num_clusters=part.k, num_classes=ds.num_classes, channels=c, size=h,
                       partition_hash=part.partition_hash, dataset_id=ds.dataset_id)
    c0 = time.process_time()
    train_router(cfg, RouterTrainConfig(steps=steps, seed=seed), ds.images, ds.labels,
                 torch.from_numpy(part.assignments), out, progress=False)
    return {"router_cpu_s": time.process_time() - c0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=int, default=0, help="candidate index in recipe_choice.CANDIDATES")
    ap.add_argument("--ddpm-recipe", type=int, default=None, help="candidate for the DDPM experts (default: --recipe)")
    ap.add_argument("--budget", type=float, default=140, help="training CPU-seconds of one thread per expert")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--objectives", default="alternate", help="alternate (ddpm, fm, ...) | fm | ddpm")
    ap.add_argument("--jobs", type=int, default=2, help="concurrent single-thread jobs (at most 2)")
    ap.add_argument("--router-steps", type=int, default=1000)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--sampler", default="euler", choices=["euler", "heun"])
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/demo_like")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--sample-only", action="store_true", help="reuse the trained experts of this tag")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from diffswarm.data import load_dataset, make_partition
    from diffswarm.eval import get_classifier, quality_report
    from diffswarm.router.local import generate, load_local_ensemble
    from diffswarm.router.routing import RoutingConfig
    from diffswarm.sampling.config import SamplingConfig
    from diffswarm.utils.images import save_grid

    ddpm_recipe = args.recipe if args.ddpm_recipe is None else args.ddpm_recipe
    tag = args.tag or f"r{args.recipe}-d{ddpm_recipe}-b{args.budget:g}-{args.objectives}"
    out = Path(args.out)
    run = out / tag
    run.mkdir(parents=True, exist_ok=True)
    ds, test = load_dataset("fashion", "train"), load_dataset("fashion", "test")
    clf = get_classifier(ds, test_ds=test, progress=False)  # trained once here, before any job
    part_path = out / f"partition-k{args.k}-s{args.seed}.json"
    if part_path.exists():
        from diffswarm.data import Partition

        part = Partition.load(part_path)
    else:
        part = make_partition(ds, args.k, seed=args.seed)
        part.source = {"name": "fashion", "root": None, "size": None, "channels": None}
        part.save(part_path)
    objectives = {"alternate": ["ddpm" if k % 2 == 0 else "fm" for k in range(args.k)],
                  "fm": ["fm"] * args.k, "ddpm": ["ddpm"] * args.k}[args.objectives]
    router_path = out / f"router-k{args.k}-s{args.seed}-{args.router_steps}.safetensors"
    print(f"demo-like: K={args.k} {objectives}, recipe {args.recipe} ({CANDIDATES[args.recipe]['name']}), "
          f"ddpm recipe {ddpm_recipe} ({CANDIDATES[ddpm_recipe]['name']}), {args.budget:g} CPU-s of one thread "
          f"per expert, shares {[round(x, 2) for x in part.shares().tolist()]}", flush=True)
    experts = []
    if not args.sample_only:
        payloads = [(str(part_path), k, obj, CANDIDATES[ddpm_recipe if obj == "ddpm" else args.recipe],
                     args.budget, str(run / f"c{k}-{obj}"), args.seed) for k, obj in enumerate(objectives)]
        jobs = max(1, min(args.jobs, 2))
        with mp.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
            f_router = None if router_path.exists() else pool.apply_async(
                _router_job, ((str(part_path), str(router_path), args.router_steps, args.seed),))
            experts = pool.map(_expert_job, payloads, chunksize=1)
            if f_router is not None:
                print(f"  router: {f_router.get()['router_cpu_s']:.0f} CPU-s", flush=True)
    paths = [run / f"c{k}-{obj}" / "expert.safetensors" for k, obj in enumerate(objectives)]
    model = load_local_ensemble(paths, router_path, RoutingConfig("top-k", 2), "cpu", seed=args.seed)
    labels = torch.arange(args.n) % ds.num_classes
    c0 = time.process_time()
    samples = generate(model, labels, ds.shape, SamplingConfig(steps=args.sample_steps, sampler=args.sampler,
                                                               guidance=args.guidance, seed=args.seed + 1, batch=250))
    sample_cpu = time.process_time() - c0
    rep = quality_report(samples, labels, ds, test, clf, part, seed=args.seed)
    s_tag = f"{args.sampler}{args.sample_steps}-g{args.guidance:g}"
    grid = save_grid(class_rows(samples, labels, ds.num_classes), run / f"grid-{s_tag}.png", 10)
    report = {"args": vars(args), "experts": experts, "quality": rep.to_dict(),
              "sample_cpu_s_per_1000": sample_cpu * 1000 / args.n, "grid": str(grid)}
    name = "report.json" if not args.sample_only else f"report-{s_tag}.json"
    (run / name).write_text(json.dumps(report, indent=1))
    print(f"{tag} {s_tag}: FD {rep.fd:.1f} (floor {rep.fd_floor:.1f}), class accuracy "
          f"{100 * rep.class_accuracy:.1f}%, sampling {report['sample_cpu_s_per_1000']:.0f} CPU-s / 1000 "
          f"(top-2), shares {[round(x, 2) for x in rep.cluster_share]} vs data "
          f"{[round(x, 2) for x in rep.data_share]}\n-> {run / name}, {grid}")


if __name__ == "__main__":
    main()
