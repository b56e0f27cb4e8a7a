"""Runners of the swarm's clients: `generate`, `dashboard`, `swarm status` (the I/O halves of ``client_plans``)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from diffswarm.cli.client_plans import DashboardPlan, GeneratePlan, SwarmSource, SwarmStatusPlan

logger = logging.getLogger(__name__)


def parse_classes(classes, ds_names: list[str]) -> list[int] | None:
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


def _connect(src: SwarmSource, routing=None, *, router_path=None, device="cpu", seed=0):
    from diffswarm.client.ensemble import SwarmEnsemble

    logger.info(f"joining swarm {src.config.swarm!r} via {src.initial_peers[0]}")
    return SwarmEnsemble.connect(list(src.initial_peers), routing, seed=seed, router_path=router_path,
                                 config=src.config, device=device)


def run_generate(p: GeneratePlan) -> int:
    from diffswarm.experts.train import pick_device
    from diffswarm.router.local import ProgressCallback, generate, load_local_ensemble, make_labels
    from diffswarm.utils.images import save_grid, save_samples

    dev = pick_device(p.device)
    if p.local:
        model = load_local_ensemble(p.local, p.router, p.routing, dev, seed=p.sampling.seed, router_kind=p.router_kind)
        ncfg = model.experts[0].config.net
        shape, num_classes = (ncfg.channels, ncfg.size, ncfg.size), ncfg.num_classes
        where = "locally"
    else:
        model = _connect(p.swarm, p.routing, router_path=p.router, device=dev, seed=p.sampling.seed)
        shape, num_classes = model.image_shape, model.num_classes
        cov = model.client.view.coverage()
        print("experts: " + ", ".join(f"{model.expert_ids[k]} x{n}" for k, n in enumerate(cov)))
        where = "over the swarm"
    try:
        labels = make_labels(p.n, parse_classes(p.classes, [str(i) for i in range(num_classes)]), num_classes)
        t0 = time.perf_counter()
        x = generate(model, labels, shape, p.sampling, dev, callback=ProgressCallback())
        dt = time.perf_counter() - t0
    finally:
        if not p.local:
            model.close()
    nrow = p.nrow or (len(set(labels.tolist())) if p.classes else int(max(1, round(p.n**0.5))))
    print(f"generated {p.n} images {where} in {dt:.1f}s -> {save_grid(x, p.output, nrow)}")
    if p.save_samples:
        print(f"samples -> {save_samples(p.save_samples, x, labels)}")
    return 0


def run_dashboard(p: DashboardPlan) -> int:
    from diffswarm.tui.app import make_app

    make_app(initial_peers=list(p.swarm.initial_peers), out_dir=p.out, config=p.swarm.config, device=p.device).run()
    return 0


def run_swarm_status(p: SwarmStatusPlan) -> int:
    import asyncio

    from diffswarm.client.discovery import router_sources
    from diffswarm.dht.names import choose_manifest, parse_swarm_name
    from diffswarm.dht.node import SwarmDHT

    if p.run_dir is not None:
        from diffswarm.swarm.local import running_procs

        live = running_procs(p.run_dir)
        print(f"local processes of {p.run_dir} (swarm.json): "
              + (", ".join(f"{q.name} (pid {q.pid})" for q in live) or "none running")
              + (f"; stop them with `diffswarm swarm down --run-dir {p.run_dir}`" if live else ""), flush=True)
    net = replace(p.swarm.config.net, initial_peers=list(p.swarm.initial_peers))
    name = parse_swarm_name(p.swarm.config.swarm)

    async def query():
        node = await SwarmDHT.create(net, str(name))
        try:
            return await node.get_experts(), await node.get_manifests(), await node.get_providers()
        finally:
            await node.shutdown()

    (experts, errs), (manifests, merrs), (providers, perrs) = asyncio.run(query())
    m, notes = choose_manifest(manifests, name)
    if m is None:
        print(f"swarm {name}: no manifest signed by its owner is announced")
    else:
        n = len(router_sources(providers, m))
        print(f"swarm {name}: router {m.router_sha256[:12]} K={m.num_clusters} partition {m.partition_hash[:12]} "
              f"dataset {m.dataset_id or '?'} (signed by the owner, issued {m.issued:.0f}; {n} peer(s) serve it)")
    for r in sorted(experts, key=lambda r: (r.cluster if r.cluster is not None else -1, r.peer_id)):
        print(f"{r.expert_id:10s} {r.state:8s} {r.peer_id[:12]} {r.throughput:8.0f} rows/s  load {r.load:.0f}"
              + (f"  training {r.progress:.0%}" if r.state == "joining" else "")
              + (f", about {r.eta_s / 60:.1f} min left" if r.state == "joining" and r.eta_s is not None else ""))
    for e in errs + merrs + perrs + notes:
        print(f"invalid record skipped: {e}")
    return 0
