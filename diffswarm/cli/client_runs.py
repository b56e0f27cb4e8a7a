"""Runners of the swarm's clients: `generate`, `dashboard`, `swarm status` (the I/O halves of ``client_plans``)."""

from __future__ import annotations

import logging
from dataclasses import replace

from diffswarm.cli.client_plans import DashboardPlan, ExportPlan, GeneratePlan, SwarmStatusPlan

logger = logging.getLogger(__name__)


def run_generate(p: GeneratePlan) -> int:
    """``diffswarm generate`` through the Python API (``diffswarm.api``): a local session or a swarm session."""
    from diffswarm.api import connect, load_local
    from diffswarm.experts.train import pick_device
    from diffswarm.router.local import ProgressCallback

    dev = pick_device(p.device)
    if p.local:
        session = load_local(p.local, p.router, router_kind=p.router_kind, device=dev)
    else:
        logger.info(f"joining swarm {p.swarm.config.swarm!r} via {p.swarm.initial_peers[0]}")
        session = connect(p.swarm.config.swarm, p.swarm.initial_peers, router=p.router, device=dev,
                          config=p.swarm.config)
    s = p.sampling
    with session:
        if session.is_swarm:
            print("experts: " + ", ".join(f"{session.expert_ids[k]} x{n}" for k, n in enumerate(session.coverage())))
        out = session.generate([str(c) for c in p.classes] if p.classes else None, p.n, steps=s.steps,
                               sampler=s.sampler, guidance=s.guidance, seed=s.seed, routing=p.routing,
                               batch=s.batch, callback=ProgressCallback())
    nrow = p.nrow or (len(set(out.labels.tolist())) if p.classes else int(max(1, round(p.n**0.5))))
    print(f"generated {p.n} images {session.where} in {out.wall_s:.1f}s -> {out.save_grid(p.output, nrow)}")
    if p.save_samples:
        print(f"samples -> {out.save_samples(p.save_samples)}")
    return 0


def run_export(p: ExportPlan) -> int:
    """``diffswarm export``: the diffusers pipeline folder of a run directory or of a swarm (``diffswarm.api``)."""
    from diffswarm.api import connect, export_pipeline

    if p.run:
        out = export_pipeline(p.out, run=p.run, routing=p.routing, router_kind=p.router_kind)
    else:
        logger.info(f"joining swarm {p.swarm.config.swarm!r} via {p.swarm.initial_peers[0]}")
        with connect(p.swarm.config.swarm, p.swarm.initial_peers, config=p.swarm.config) as session:
            out = export_pipeline(p.out, session=session, routing=p.routing)
    print(f"pipeline -> {out} (load it with `from diffswarm.api import DiffswarmPipeline; "
          f"DiffswarmPipeline.from_pretrained({str(out)!r})`)")
    return 0


def run_dashboard(p: DashboardPlan) -> int:
    if p.web is not None:
        from diffswarm.tui.web import serve

        serve(p.web.command, p.web.host, p.web.port)
        return 0
    from diffswarm.tui.app import make_app

    app = make_app(initial_peers=list(p.swarm.initial_peers), out_dir=p.out, config=p.swarm.config, device=p.device)
    try:
        app.run()
    finally:
        app.restore_signal_handlers()
        _stop_terminal_threads(app)
    if app.stopped_by is not None:
        from diffswarm.utils.signals import Stopped

        raise Stopped(app.stopped_by)  # reported and exited with as for every command (128 + the signal)
    return 0


def _stop_terminal_threads(app) -> None:
    """Stop the Textual driver's input and output threads if the app did not (a signal before the app took its
    signals over raises ``Stopped`` wherever the main thread is, and one that lands outside the app's own shutdown
    leaves both threads running: they are not daemons, so the process would never exit). Both stops are bounded:
    the input thread polls its exit flag every 0.1 s."""
    driver = getattr(app, "_driver", None)
    if driver is None:
        return
    for stop in ("disable_input", "close"):
        try:
            getattr(driver, stop)()
        except Exception:  # a terminal that is gone: nothing left to restore
            pass


def run_swarm_status(p: SwarmStatusPlan) -> int:
    import asyncio

    from diffswarm.client.admission import describe, verdicts
    from diffswarm.client.contributors import contributor_lines
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
            return (await node.get_experts(), await node.get_manifests(), await node.get_providers(),
                    await node.get_attestations())
        finally:
            await node.shutdown()

    (experts, errs), (manifests, merrs), (providers, perrs), (atts, aerrs) = asyncio.run(query())
    m, notes = choose_manifest(manifests, name)
    admission, anotes = verdicts(m, atts, experts)
    if m is None:
        print(f"swarm {name}: no manifest signed by its owner is announced")
    else:
        n = len(router_sources(providers, m))
        print(f"swarm {name}: router {m.router_sha256[:12]} K={m.num_clusters} partition {m.partition_hash[:12]} "
              f"dataset {m.dataset_id or '?'} (signed by the owner, issued {m.issued:.0f}; {n} peer(s) serve it)")
        rule = m.admission
        vals = ", ".join(rule.validators) if rule else ""
        print("admission: " + (f"on ({rule.quorum} of {len(rule.validators)} validator(s) {vals}; "
                               f"score <= {rule.ratio:g}x the cluster's best and <= {rule.ceiling:g}x the v=0 loss)"
                               if rule else "off (the owner's manifest names no validators: every expert is used)"))
    for r in sorted(experts, key=lambda r: (r.cluster if r.cluster is not None else -1, r.peer_id)):
        adm = ""
        if admission is not None and r.state == "online":
            adm = "  " + describe(admission.get((r.checkpoint_sha256, r.cluster)))
        print(f"{r.expert_id:10s} {r.state:8s} {r.peer_id[:12]} {r.throughput:8.0f} rows/s  load {r.load:.0f}"
              + (f"  training {r.progress:.0%}" if r.state == "joining" else "")
              + (f", about {r.eta_s / 60:.1f} min left" if r.state == "joining" and r.eta_s is not None else "")
              + ("  (relayed)" if r.relayed else "") + adm)
    for line in contributor_lines(experts):
        print(line)
    for e in errs + merrs + perrs + notes + aerrs + anotes:
        print(f"invalid record skipped: {e}")
    if p.chart:
        from diffswarm.tui.charts import coverage, coverage_chart

        print("\n".join(coverage_chart(coverage(experts, m.num_clusters if m is not None else None))))
    return 0
