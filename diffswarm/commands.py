"""Implementations of the CLI subcommands: thin I/O shells over the library."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .data import ImageDataset, Partition, default_dataset_name, load_dataset, make_partition


def dataset_from_args(args, split: str = "train") -> ImageDataset:
    name = args.dataset or default_dataset_name()
    return load_dataset(name, split, root=args.data_root, size=args.size, channels=args.channels)


def dataset_for_partition(part: Partition, split: str = "train") -> ImageDataset:
    """Reload the dataset a partition was made from (its manifest records the source) and check it."""
    src = part.source or {}
    if not src.get("name"):
        raise ValueError("the partition manifest does not name its dataset source; re-run `diffswarm partition`")
    ds = load_dataset(src["name"], split, root=src.get("root"), size=src.get("size"), channels=src.get("channels"))
    if split == part.split:
        part.check_dataset(ds)
    return ds


def cmd_partition(args) -> int:
    ds = dataset_from_args(args)
    t0 = time.perf_counter()
    part = make_partition(ds, args.k, seed=args.seed)
    part.source = {"name": ds.name, "root": args.data_root, "size": args.size, "channels": args.channels}
    part.save(args.out)
    print(f"partitioned {ds.dataset_id} ({len(ds)} images) into K={args.k} clusters in {time.perf_counter() - t0:.1f}s")
    print(describe_partition(part, ds))
    print(f"manifest: {args.out}  partition hash: {part.partition_hash[:16]}")
    return 0


def describe_partition(part: Partition, ds: ImageDataset | None = None) -> str:
    lines = []
    names = ds.class_names if ds is not None else []
    for k, st in enumerate(part.cluster_stats):
        hist = st.get("class_hist") or []
        top = sorted(range(len(hist)), key=lambda c: -hist[c])[:3]
        desc = ", ".join(f"{names[c] if c < len(names) else c} {hist[c] / max(1, st['count']):.0%}" for c in top if hist[c])
        lines.append(f"  cluster {k}: {st['count']:6d} images ({st['share']:.1%})  {desc}")
    return "\n".join(lines)


def cmd_train(args) -> int:
    from .experts.config import ExpertConfig
    from .experts.networks import NetConfig
    from .experts.schedules import ScheduleConfig
    from .experts.train import TrainConfig, train_expert

    part = Partition.load(args.partition)
    ds = dataset_for_partition(part)
    if not 0 <= args.cluster < part.k:
        raise ValueError(f"--cluster must be in 0..{part.k - 1}")
    idx = torch.from_numpy(part.indices(args.cluster))
    c, h, _ = ds.shape
    net = NetConfig(kind=args.net, channels=c, size=h, num_classes=0 if args.unconditional else ds.num_classes)
    if args.width:
        net.width = args.width
    if args.depth:
        net.depth = args.depth
    cfg = ExpertConfig(objective=args.objective, net=net, schedule=ScheduleConfig(kind=args.schedule),
                       cluster=args.cluster, num_clusters=part.k, partition_hash=part.partition_hash,
                       dataset_id=ds.dataset_id)
    tc = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, ckpt_every=args.ckpt_every,
                     threads=args.threads)
    print(f"training {cfg.expert_id} on {len(idx)} images of cluster {args.cluster} ({args.net}, {args.objective})")
    summary = train_expert(cfg, tc, ds.images[idx], ds.labels[idx], args.out, device=args.device,
                           resume=args.resume, init_from=args.init_from)
    print(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f} -> {Path(args.out) / 'expert.safetensors'}")
    return 0


def cmd_train_router(args) -> int:
    from .router.model import RouterConfig
    from .router.train import RouterTrainConfig, train_router

    part = Partition.load(args.partition)
    ds = dataset_for_partition(part)
    test = dataset_for_partition(part, "test")
    c, h, _ = ds.shape
    cfg = RouterConfig(num_clusters=part.k, num_classes=0 if args.unconditional else ds.num_classes, channels=c,
                       size=h, width=args.width, partition_hash=part.partition_hash)
    router = train_router(cfg, RouterTrainConfig(steps=args.steps, batch=args.batch, seed=args.seed),
                          ds.images, ds.labels, torch.from_numpy(part.assignments), args.out,
                          eval_set=(test.images, test.labels, torch.from_numpy(part.assign(test.images))),
                          device=args.device)
    print(format_router_accuracy(router.summary))
    print(f"router -> {args.out}")
    return 0


def format_router_accuracy(summary: dict) -> str:
    rows = summary.get("accuracy_by_t", [])
    unc = {r["t"]: r for r in summary.get("accuracy_by_t_uncond", [])}
    out = ["router accuracy on the test split (true cluster of x0):",
           "     t   top1   top2" + ("   top1 (no class)" if unc else "")]
    for r in rows:
        extra = f"   {unc[r['t']]['top1']:.3f}" if r["t"] in unc else ""
        out.append(f"  {r['t']:4.1f}  {r['top1']:.3f}  {r['top2']:.3f}{extra}")
    return "\n".join(out)


def parse_classes(classes: list[str] | None, ds_names: list[str]) -> list[int] | None:
    if not classes:
        return None
    out: list[int] = []
    for c in classes:
        if c == "all":
            out.extend(range(len(ds_names)))
        elif c.lstrip("-").isdigit():
            out.append(int(c))
        elif c in ds_names:
            out.append(ds_names.index(c))
        else:
            raise ValueError(f"unknown class {c!r}; use an id or one of {ds_names}")
    return out


def cmd_generate(args) -> int:
    from .experts.train import pick_device
    from .images import save_grid, save_samples
    from .router.local import ProgressCallback, generate, load_local_ensemble, make_labels
    from .router.routing import RoutingConfig

    if not args.local:
        raise ValueError("swarm generation is not available yet: pass expert checkpoints with --local")
    dev = pick_device(args.device)
    routing = RoutingConfig(args.routing, args.k, args.threshold, args.full_above)
    model = load_local_ensemble(args.local, args.router, routing, dev, seed=args.seed)
    ncfg = model.experts[0].config.net
    names = [str(i) for i in range(ncfg.num_classes)]
    labels = make_labels(args.n, parse_classes(args.classes, names), ncfg.num_classes)
    t0 = time.perf_counter()
    x = generate(model, labels, (ncfg.channels, ncfg.size, ncfg.size), args.steps, args.sampler, args.guidance,
                 args.seed, dev, callback=ProgressCallback())
    dt = time.perf_counter() - t0
    nrow = args.nrow or (len(set(labels.tolist())) if args.classes else int(max(1, round(args.n**0.5))))
    print(f"generated {args.n} images in {dt:.1f}s -> {save_grid(x, args.output, nrow)}")
    if args.save_samples:
        print(f"samples -> {save_samples(args.save_samples, x, labels)}")
    return 0


def cmd_quality(args) -> int:
    import numpy as np

    from .eval import get_classifier, quality_report

    data = np.load(args.samples)
    samples, labels = torch.from_numpy(data["samples"]), torch.from_numpy(data["labels"])
    part = Partition.load(args.partition) if args.partition else None
    if part is not None and args.dataset is None:
        train, test = dataset_for_partition(part), dataset_for_partition(part, "test")
    else:
        train, test = dataset_from_args(args), dataset_from_args(args, "test")
    clf = get_classifier(train)
    rep = quality_report(samples, labels if (labels >= 0).any() else None, train, test, clf, part)
    print(rep.format())
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args)
    return 0
