"""Implementations of the CLI subcommands: thin I/O shells over the library."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .clusters import cluster_expert, dataset_for_partition
from .data import ImageDataset, Partition, default_dataset_name, load_dataset, make_partition


def dataset_from_args(args, split: str = "train") -> ImageDataset:
    name = args.dataset or default_dataset_name()
    return load_dataset(name, split, root=args.data_root, size=args.size, channels=args.channels)


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
    from .experts.train import TrainConfig, train_expert

    part = Partition.load(args.partition)
    ds = dataset_for_partition(part)
    cfg, images, labels = cluster_expert(part, ds, args.cluster, args.objective, args.net, args.width, args.depth,
                                         args.schedule, args.unconditional)
    tc = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, ckpt_every=args.ckpt_every,
                     threads=args.threads)
    print(f"training {cfg.expert_id} on {len(images)} images of cluster {args.cluster} ({args.net}, {args.objective})")
    summary = train_expert(cfg, tc, images, labels, args.out, device=args.device,
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
                       size=h, width=args.width, partition_hash=part.partition_hash, dataset_id=ds.dataset_id)
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


def network_from_args(args, client: bool):
    """``NetworkConfig`` from the shared --loopback/--no-relay/--no-nat/... options."""
    from .dht.node import NetworkConfig

    peers = list(getattr(args, "initial_peers", None) or [])
    net = NetworkConfig.loopback(peers) if args.loopback else NetworkConfig(initial_peers=peers)
    if getattr(args, "no_relay", False):
        net.use_relay = False
    if getattr(args, "no_nat", False):
        net.auto_nat = net.nat_port_map = False
    if client:
        net.client_mode = True
        return net
    host = "127.0.0.1" if args.loopback and args.host == "0.0.0.0" else args.host
    proto = "ip6" if ":" in host else "ip4"
    net.host_maddrs = [f"/{proto}/{host}/tcp/{args.port}"]
    net.announce_maddrs = list(args.announce_maddrs or [])
    net.identity_path = args.identity
    if args.identity and args.no_identity_check:
        net.check_identity = False
    net.use_auto_relay = args.use_auto_relay
    return net


def _swarm_peers(args) -> list[str]:
    if args.initial_peers:
        return list(args.initial_peers)
    from .peer.launch import LocalSwarm

    sw = LocalSwarm.find(args.run_dir)
    if not args.loopback:  # a swarm from `swarm up` listens on 127.0.0.1 only
        args.loopback = True
    return sw.initial_peers


def cmd_generate(args) -> int:
    from .experts.train import pick_device
    from .images import save_grid, save_samples
    from .router.local import ProgressCallback, generate, load_local_ensemble, make_labels
    from .router.routing import RoutingConfig

    dev = pick_device(args.device)
    routing = RoutingConfig(args.routing, args.k, args.threshold, args.full_above)
    if args.local:
        model = load_local_ensemble(args.local, args.router, routing, dev, seed=args.seed)
        ncfg = model.experts[0].config.net
        shape, num_classes = (ncfg.channels, ncfg.size, ncfg.size), ncfg.num_classes
        where = "locally"
    else:
        from .client.client import ClientConfig
        from .client.ensemble import SwarmEnsemble

        peers = _swarm_peers(args)
        cfg = ClientConfig(swarm=args.swarm, net=network_from_args(args, client=True), call_timeout=args.timeout,
                           compression=args.compression, router_sha256=args.router_sha256)
        print(f"joining swarm {args.swarm!r} via {peers[0]}")
        model = SwarmEnsemble.connect(peers, routing, seed=args.seed, router_path=args.router, config=cfg,
                                      device=dev, log=print)
        shape, num_classes = model.image_shape, model.num_classes
        cov = model.client.view.coverage()
        print("experts: " + ", ".join(f"{model.expert_ids[k]} x{n}" for k, n in enumerate(cov)))
        where = "over the swarm"
    try:
        names = [str(i) for i in range(num_classes)]
        labels = make_labels(args.n, parse_classes(args.classes, names), num_classes)
        t0 = time.perf_counter()
        x = generate(model, labels, shape, args.steps, args.sampler, args.guidance, args.seed, dev,
                     callback=ProgressCallback())
        dt = time.perf_counter() - t0
    finally:
        if not args.local:
            model.close()
    nrow = args.nrow or (len(set(labels.tolist())) if args.classes else int(max(1, round(args.n**0.5))))
    print(f"generated {args.n} images {where} in {dt:.1f}s -> {save_grid(x, args.output, nrow)}")
    if args.save_samples:
        print(f"samples -> {save_samples(args.save_samples, x, labels)}")
    return 0


def cmd_dashboard(args) -> int:
    from .client.client import ClientConfig
    from .tui.app import make_app

    peers = None if args.local else _swarm_peers(args)
    cfg = None
    if peers is not None:
        cfg = ClientConfig(swarm=args.swarm, net=network_from_args(args, client=True), call_timeout=args.timeout,
                           connect_timeout=20.0)
    make_app(initial_peers=peers, run_dir=args.run_dir, out_dir=args.out, config=cfg, device=args.device).run()
    return 0


def cmd_peer(args) -> int:
    from .peer.server import PeerConfig, TrainSpec, run_peer

    train = None
    if args.checkpoint is None and args.cluster is not None:
        if not args.partition:
            raise ValueError("training a new expert needs --partition (and --cluster, --objective, --train-steps)")
        out = args.out or f"runs/peer-c{args.cluster}-{args.objective}"
        train = TrainSpec(partition=args.partition, cluster=args.cluster, objective=args.objective,
                          steps=args.train_steps, out=out, net=args.net, width=args.width, depth=args.depth,
                          batch=args.batch, lr=args.lr, seed=args.seed)
    elif args.checkpoint is None and args.router is None and args.initial_peers:
        print("no --checkpoint, --cluster or --router: running as a DHT node only")
    cfg = PeerConfig(net=network_from_args(args, client=False), swarm=args.swarm, checkpoint=args.checkpoint,
                     train=train, router=args.router, device=args.device, threads=args.threads,
                     max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                     announce_period=args.announce_period, info_file=args.info_file)
    return run_peer(cfg, log=lambda m: print(m, flush=True))


def cmd_swarm(args) -> int:
    from .peer import launch

    if args.swarm_command == "down":
        n = launch.stop_local_swarm(args.run_dir, args.timeout)
        print(f"stopped {n} process(es) of the swarm in {args.run_dir}")
        return 0
    if args.swarm_command == "status":
        return _swarm_status(args)
    return _swarm_up(args)


def _swarm_status(args) -> int:
    import asyncio

    from .dht.node import SwarmDHT

    peers = _swarm_peers(args)
    net = network_from_args(args, client=True)
    net.initial_peers = peers

    async def query():
        node = await SwarmDHT.create(net, args.swarm)
        try:
            return await node.get_experts(), await node.get_swarm()
        finally:
            await node.shutdown()

    (experts, errs), (swarms, serrs) = asyncio.run(query())
    for r in swarms:
        print(f"router {r.router_sha256[:12]} K={r.num_clusters} partition {r.partition_hash[:12]} at {r.peer_id[:12]}")
    for r in sorted(experts, key=lambda r: (r.cluster if r.cluster is not None else -1, r.peer_id)):
        print(f"{r.expert_id:10s} {r.state:8s} {r.peer_id[:12]} {r.throughput:8.0f} rows/s  load {r.load:.0f}"
              + (f"  training {r.progress:.0%}" if r.state == "joining" else ""))
    for e in errs + serrs:
        print(f"invalid record skipped: {e}")
    return 0


def _swarm_up(args) -> int:
    from .peer.launch import PeerSpec, start_local_swarm

    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    k = args.experts
    objectives = {"mixed": ["ddpm" if i % 2 == 0 else "fm" for i in range(k)], "ddpm": ["ddpm"] * k,
                  "fm": ["fm"] * k}[args.objectives]
    if args.checkpoints:
        if not args.router and len(args.checkpoints) > 1:
            raise ValueError("serving several --checkpoints needs their --router")
        specs = [PeerSpec(f"peer{i}-r{r}" if args.replicas > 1 else f"peer{i}", checkpoint=c)
                 for i, c in enumerate(args.checkpoints) for r in range(args.replicas)]
        router = args.router
    else:
        from .router.model import RouterConfig
        from .router.train import RouterTrainConfig, train_router

        if args.partition:
            part = Partition.load(args.partition)
            part_path = args.partition
            ds = dataset_for_partition(part)
        else:
            ds = dataset_from_args(args)
            part = make_partition(ds, k, seed=args.seed)
            part.source = {"name": ds.name, "root": args.data_root, "size": args.size, "channels": args.channels}
            part_path = str(run / "partition.json")
            part.save(part_path)
            print(f"partitioned {ds.dataset_id} into K={k} clusters -> {part_path}")
        if part.k != k:
            raise ValueError(f"--experts {k} but the partition has K={part.k}")
        router = str(run / "router.safetensors")
        c, h, _ = ds.shape
        print(f"training the router ({args.router_steps} steps)")
        train_router(RouterConfig(num_clusters=k, num_classes=ds.num_classes, channels=c, size=h,
                                  partition_hash=part.partition_hash, dataset_id=ds.dataset_id),
                     RouterTrainConfig(steps=args.router_steps, seed=args.seed), ds.images, ds.labels,
                     torch.from_numpy(part.assignments), router, progress=False)
        specs = []
        for i, obj in enumerate(objectives):
            for r in range(args.replicas):
                out = run / "experts" / (f"c{i}-{obj}" + (f"-r{r}" if args.replicas > 1 else ""))
                train_args = ["--partition", part_path, "--cluster", str(i), "--objective", obj,
                              "--train-steps", str(args.train_steps), "--out", str(out),
                              "--seed", str(args.seed + i), "--net", args.net]
                train_args += ["--width", str(args.width)] if args.width else []
                train_args += ["--depth", str(args.depth)] if args.depth else []
                specs.append(PeerSpec(f"peer{i}-r{r}" if args.replicas > 1 else f"peer{i}", train_args=train_args))
        if args.replicas > 1:
            print("note: replicas of a cluster each train their own expert (same data and seed)")
    print(f"starting a bootstrap node and {len(specs)} peer(s) on 127.0.0.1 (logs in {run / 'logs'})")
    sw = start_local_swarm(specs, router, run, swarm=args.swarm, threads=args.threads, timeout=args.timeout,
                           port=args.port, log=print)
    print(f"swarm {args.swarm!r} is up with {len(specs)} expert peer(s). Multiaddr:\n  {' '.join(sw.initial_peers)}")
    print(f"generate with: diffswarm generate --loopback --initial-peers {sw.initial_peers[0]} --class all")
    print(f"stop with:     diffswarm swarm down --run-dir {run}")
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
