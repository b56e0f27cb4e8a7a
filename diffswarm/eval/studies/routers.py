"""The routers study: statistics vs trained routers: routing accuracy against t, cluster shares and
quality under top-2; its report section and plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffswarm.eval.context import Context
from diffswarm.eval.metrics import summarize
from diffswarm.eval.report_common import (
    QUALITY_HEADER,
    claim,
    finite,
    fmt,
    mean,
    pyplot,
    quality_rows,
    save_plot,
    table,
)
from diffswarm.eval.scoring import summarize_cells
from diffswarm.eval.settings import ROUTERS, Cell, runs
from diffswarm.eval.stats import paired_test
from diffswarm.router.train import EVAL_TIMES, router_accuracy_by_t


def study_routers(ctx: Context) -> dict:
    """Statistics router vs trained routers: accuracy against t on the test split, shares and quality at top-2."""
    cfg = ctx.cfg
    rng = np.random.default_rng(4242)
    m = min(cfg.router_eval_n, len(ctx.test_ds))
    idx = torch.from_numpy(rng.choice(len(ctx.test_ds), m, replace=False))
    images, labels = ctx.test_ds.images[idx], ctx.test_ds.labels[idx]
    clusters = torch.from_numpy(ctx.partition.assign(images))
    variants = [("cond", "cond", True), ("cond router, no class", "cond", False), ("uncond", "uncond", False),
                ("stats", "stats", True), ("stats, no class", "stats", False)]
    acc_runs = []
    for ts, seed in runs(cfg):
        cell = Cell(ts, seed, "fm", "stats", "top-2")

        def compute(key, ts=ts, seed=seed):
            out = {}
            for name, rname, conditional in variants:
                router = ctx.models.router(ts, rname)
                # images stay on the CPU: the function draws the noise there and moves each chunk to the router
                out[name] = router_accuracy_by_t(router, images, labels, clusters, EVAL_TIMES, seed=seed,
                                                 conditional=conditional)
            return {"accuracy": out}

        acc_runs.append(ctx.cells.load_or("routeracc", cell, compute, {"router_eval_n": m}))
    accuracy = {}
    for name, _, _ in variants:
        accuracy[name] = [{"t": tv, "top1": summarize([r["accuracy"][name][i]["top1"] for r in acc_runs]),
                           "top2": summarize([r["accuracy"][name][i]["top2"] for r in acc_runs])}
                          for i, tv in enumerate(EVAL_TIMES)]
    quality = []
    for rname in ROUTERS:
        cells = [ctx.cell(Cell(ts, s, "fm", rname, "top-2"), ("routers",)) for ts, s in runs(cfg)]
        quality.append({"router": rname, "summary": summarize_cells(cells), "cells": [c["key"] for c in cells]})
    ctx.pool.stats_router()
    return {"accuracy": accuracy, "quality": quality, "router_eval_n": m,
            "stats_blob_bytes": getattr(ctx.pool, "stats_bytes", None)}


def plot_routers(rt: dict, out: Path) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, rows in rt["accuracy"].items():
        ax.plot([r["t"] for r in rows], [mean(r["top1"]) for r in rows], marker="o", label=name)
    ax.set_xlabel("flow time t")
    ax.set_ylabel("top-1 routing accuracy (true cluster of x0)")
    ax.set_title("Routers against t (test split)")
    ax.legend(fontsize=7)
    return save_plot(fig, out / "routers_accuracy.png")



EQUIVALENCE_MARGIN = 0.10  # "as well as": FD within ±10% of the trained router's, stated before the run


def section_routers(res: dict, out: Path) -> tuple[str, list[dict]]:
    rt = res["studies"]["routers"]
    plot = plot_routers(rt, out)
    names = list(rt["accuracy"])
    times = [r["t"] for r in rt["accuracy"][names[0]]]
    rows = [[f"{t:.1f}"] + [fmt(rt["accuracy"][n][i]["top1"], 3) for n in names] for i, t in enumerate(times)]
    blob = rt.get("stats_blob_bytes")
    lines = ["## 5. A router without central data", "",
             "The statistics router is built from K blobs, each computed from one cluster's images only and "
             "passed through the wire format"
             + (f" ({min(blob) / 1024:.1f}-{max(blob) / 1024:.1f} KB each)" if blob else "")
             + "; p(k | x_t, t, class) is computed in closed form by noising each cluster's Gaussian to t. "
             f"Top-1 accuracy against the true cluster of x0 on {rt['router_eval_n']} test images:", "",
             table(["t", *names], rows), "", f"![router accuracy]({plot})", "",
             "Quality and shares under top-2 (FM experts):", "",
             table(QUALITY_HEADER, quality_rows([{**r, "setting": f"{r['router']} router"} for r in rt["quality"]])),
             ""]
    q = {r["router"]: r for r in rt["quality"]}
    claims = []
    if "stats" in q and "cond" in q:
        ref = q["cond"]["summary"]["fd"].get("mean")
        margin = EQUIVALENCE_MARGIN * ref if finite(ref) and ref > 0 else None
        tests = [paired_test(q["stats"]["summary"], q["cond"]["summary"], "fd", 0, margin, label="FD")] if margin \
            else []
        claims.append(claim("Ours: the statistics router (no central data) samples as well as the trained router "
                            f"under top-2 [equivalence by TOST, margin ±{100 * EQUIVALENCE_MARGIN:.0f}% of the trained "
                            "router's FD]",
                            f"FD stats {fmt(q['stats']['summary']['fd'])} vs trained {fmt(q['cond']['summary']['fd'])}",
                            tests))
    return "\n".join(lines), claims



__all__ = ["plot_routers", "section_routers", "study_routers"]
