"""``diffswarm demo``: the whole path on the embedded default dataset, in one command.

1. partition the data into K clusters (k-means on whitened pixel PCA, no labels);
2. train K experts in parallel processes, one per cluster, alternating DDPM and flow matching,
   as independent volunteers would (the router and the quality classifier train beside them);
3. start a local swarm (a bootstrap node serving the router + one peer process per expert on
   127.0.0.1) and sample a per-class grid over it, as a client, with top-2 routing and CFG;
4. score 1,000 class-conditional samples: Frechet distance in the classifier's features against
   real data (with the real train-vs-test floor), class accuracy, and the share of samples per
   cluster against the data's share.

Presets size the work to the machine: ``cpu`` fits a 2-core CPU in under 10 minutes, ``gpu`` is
larger, ``tiny`` (digits) is what the tests run.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Preset:
    dataset: str | None  # None: the default dataset
    net: str
    width: int
    depth: int
    expert_steps: int
    batch: int
    router_steps: int
    classifier_epochs: int
    sample_steps: int
    per_class: int  # grid columns
    eval_n: int  # samples scored for FD
    guidance: float = 2.0


PRESETS = {
    "cpu": Preset(None, "dit", 96, 3, 900, 96, 1000, 2, 30, 10, 1000),
    "gpu": Preset(None, "dit", 256, 6, 20000, 256, 6000, 4, 50, 10, 5000),
    "tiny": Preset("digits", "mlp", 128, 2, 150, 64, 150, 1, 10, 4, 100),
}


def _expert_job(partition: str, cluster: int, objective: str, out: str, preset: Preset, seed: int, threads: int):
    """One volunteer: load the data, keep its own cluster, train, write the checkpoint."""
    torch.set_num_threads(threads)
    from .clusters import cluster_expert, dataset_for_partition
    from .data import Partition
    from .experts.train import TrainConfig, train_expert

    part = Partition.load(partition)
    cfg, images, labels = cluster_expert(part, dataset_for_partition(part), cluster, objective, preset.net,
                                         preset.width, preset.depth)
    tc = TrainConfig(steps=preset.expert_steps, batch=preset.batch, seed=seed + cluster,
                     ckpt_every=max(100, preset.expert_steps // 4))
    t0 = time.perf_counter()
    summary = train_expert(cfg, tc, images, labels, out, device="auto", resume=True,
                           position=cluster, progress=True)
    return {"expert": cfg.expert_id, "seconds": time.perf_counter() - t0, **summary}


def _router_job(partition: str, out: str, preset: Preset, seed: int, threads: int):
    torch.set_num_threads(threads)
    from .clusters import dataset_for_partition
    from .data import Partition
    from .router.model import RouterConfig
    from .router.train import RouterTrainConfig, train_router

    part = Partition.load(partition)
    ds, test = dataset_for_partition(part), dataset_for_partition(part, "test")
    c, h, _ = ds.shape
    cfg = RouterConfig(num_clusters=part.k, num_classes=ds.num_classes, channels=c, size=h,
                       partition_hash=part.partition_hash, dataset_id=ds.dataset_id)
    router = train_router(cfg, RouterTrainConfig(steps=preset.router_steps, seed=seed), ds.images, ds.labels,
                          torch.from_numpy(part.assignments), out,
                          eval_set=(test.images, test.labels, torch.from_numpy(part.assign(test.images))),
                          device="auto", progress=False)
    return router.summary


def _classifier_job(partition: str, preset: Preset, threads: int):
    torch.set_num_threads(threads)
    from .clusters import dataset_for_partition
    from .data import Partition
    from .eval import get_classifier

    part = Partition.load(partition)
    ds, test = dataset_for_partition(part), dataset_for_partition(part, "test")
    t0 = time.perf_counter()
    clf = get_classifier(ds, epochs=preset.classifier_epochs, progress=False, test_ds=test)
    return {"seconds": time.perf_counter() - t0, "test_accuracy": getattr(clf, "test_accuracy", None)}


def run_demo(args) -> dict:
    from .commands import describe_partition, format_router_accuracy
    from .data import default_dataset_name, load_dataset, make_partition
    from .eval import get_classifier, quality_report
    from .experts.train import pick_device
    from .images import save_grid, save_samples
    from .router.local import ProgressCallback, generate, load_local_ensemble
    from .router.routing import RoutingConfig

    t_start = time.perf_counter()
    dev = pick_device("auto")
    preset = PRESETS[args.preset or ("gpu" if dev.type == "cuda" else "cpu")]
    if args.steps:
        preset.expert_steps = args.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.dataset or preset.dataset or default_dataset_name()
    timings: dict[str, float] = {}

    # 1. partition
    t0 = time.perf_counter()
    ds = load_dataset(name, "train", root=args.data_root, size=args.size, channels=args.channels)
    test = load_dataset(name, "test", root=args.data_root, size=args.size, channels=args.channels)
    part = make_partition(ds, args.k, seed=args.seed)
    part.source = {"name": name, "root": args.data_root, "size": args.size, "channels": args.channels}
    part_path = out / "partition.json"
    part.save(part_path)
    timings["partition_s"] = time.perf_counter() - t0
    print(f"[1/4] partitioned {ds.dataset_id} ({len(ds)} images) into K={args.k} clusters "
          f"in {timings['partition_s']:.1f}s")
    print(describe_partition(part, ds))

    # 2. experts (alternating DDPM / FM), router and classifier, in parallel processes
    workers = args.workers or min(os.cpu_count() or 1, 8)
    threads = max(1, (os.cpu_count() or 1) // workers)
    objectives = ["ddpm" if k % 2 == 0 else "fm" for k in range(args.k)]
    print(f"[2/4] training {args.k} experts ({objectives.count('ddpm')} DDPM + {objectives.count('fm')} FM, "
          f"{preset.net} {preset.width}x{preset.depth}, {preset.expert_steps} steps) + router + classifier "
          f"on {workers} worker processes")
    t0 = time.perf_counter()
    expert_dirs = [out / "experts" / f"c{k}-{obj}" for k, obj in enumerate(objectives)]
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futs = [pool.submit(_expert_job, str(part_path), k, obj, str(d), preset, args.seed, threads)
                for k, (obj, d) in enumerate(zip(objectives, expert_dirs))]
        f_router = pool.submit(_router_job, str(part_path), str(out / "router.safetensors"), preset, args.seed, threads)
        f_clf = pool.submit(_classifier_job, str(part_path), preset, threads)
        expert_summaries = [f.result() for f in futs]
        router_summary = f_router.result()
        clf_info = f_clf.result()
    timings["train_s"] = time.perf_counter() - t0
    for s in expert_summaries:
        print(f"  {s['expert']}: {s['steps']} steps, final loss {s['final_loss']:.4f}, {s['seconds']:.0f}s")
    print(format_router_accuracy(router_summary))

    # 3. generate over a local swarm (bootstrap + K peer processes on 127.0.0.1): a per-class grid,
    #    then class-conditional samples for scoring (--local-generation: in this process instead)
    torch.set_num_threads(os.cpu_count() or 1)
    routing = RoutingConfig("top-k", 2)
    expert_paths = [d / "expert.safetensors" for d in expert_dirs]
    shape = ds.shape
    classes = list(range(ds.num_classes)) or [-1]
    with contextlib.ExitStack() as stack:
        if getattr(args, "local_generation", False):
            model = load_local_ensemble(expert_paths, out / "router.safetensors", routing, dev, seed=args.seed)
            where = "in this process"
        else:
            from .peer.launch import local_swarm

            t0 = time.perf_counter()
            print(f"[3/4] starting a local swarm: bootstrap (router) + {args.k} expert peers on 127.0.0.1 "
                  f"(logs in {out / 'swarm' / 'logs'})")
            swarm = stack.enter_context(local_swarm(expert_paths, out / "router.safetensors", run_dir=out / "swarm",
                                                    log=print))
            model = stack.enter_context(swarm.client(routing, seed=args.seed, device=dev))
            timings["swarm_up_s"] = time.perf_counter() - t0
            where = f"over the swarm ({' '.join(swarm.initial_peers)})"
        t0 = time.perf_counter()
        grid_labels = torch.tensor([c for c in classes for _ in range(preset.per_class)])
        print(f"[3/4] sampling a {len(classes)}x{preset.per_class} grid {where} ({preset.sample_steps} Euler steps, "
              f"top-2, CFG {preset.guidance})")
        grid = generate(model, grid_labels, shape, preset.sample_steps, "euler", preset.guidance, args.seed, dev,
                        callback=ProgressCallback("grid"))
        grid_path = save_grid(grid, out / "grid.png", preset.per_class)
        timings["grid_s"] = time.perf_counter() - t0
        eval_labels = torch.tensor([classes[i % len(classes)] for i in range(preset.eval_n)])
        t0 = time.perf_counter()
        model.calls.zero_()
        samples = generate(model, eval_labels, shape, preset.sample_steps, "euler", preset.guidance, args.seed + 1,
                           dev, callback=ProgressCallback("eval samples"))
        save_samples(out / "samples.npz", samples, eval_labels)
        timings["eval_sampling_s"] = time.perf_counter() - t0
        model_calls = model.calls.clone()

    # 4. quality
    clf = get_classifier(ds, epochs=preset.classifier_epochs, progress=False, test_ds=test)
    rep = quality_report(samples, eval_labels if ds.num_classes else None, ds, test, clf, part, seed=args.seed)
    timings["total_s"] = time.perf_counter() - t_start
    calls = (model_calls.float() / model_calls.sum().clamp_min(1)).tolist()
    report = {"dataset": ds.dataset_id, "k": args.k, "preset": preset.__dict__, "objectives": objectives,
              "experts": expert_summaries, "router": router_summary, "classifier": clf_info,
              "quality": rep.to_dict(), "routing": "top-2", "expert_call_share": calls, "timings": timings,
              "generation": "local" if getattr(args, "local_generation", False) else "swarm",
              "grid": str(grid_path)}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print("[4/4] quality (classifier features, top-2 routing):")
    print(rep.format())
    print("  expert call share (rows evaluated): " + ", ".join(f"c{k} {s:.2f}" for k, s in enumerate(calls)))
    print(f"grid -> {grid_path}\nreport -> {out / 'report.json'}\ntotal {timings['total_s']:.0f}s")
    return report
