"""The routing study: full, top-1/2/3, threshold, sample-1 and time-scheduled routing (full above
``switch_t``, top-1 below) with the conditional and the unconditional trained router, top-2 with the
statistics router, and the FM monolith of equal training compute: quality, cluster shares against the
target share (with total variation), expert calls and FLOPs per image; its report section and plots."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from diffswarm.eval.context import Context
from diffswarm.eval.report_common import (
    NOISE_RULE,
    QUALITY_HEADER,
    claim,
    diff_text,
    find_row,
    finite,
    fmt,
    mean,
    paired,
    pyplot,
    quality_rows,
    save_plot,
    shares,
    table,
)
from diffswarm.eval.scoring import summarize_cells
from diffswarm.eval.settings import Cell, runs
from diffswarm.eval.stats import paired_test


def study_routing(ctx: Context) -> dict:
    """Routing strategies x routers (FM experts), the stats router's top-2 and the FM monolith."""
    cfg = ctx.cfg
    mono = [("monolith-fm", None, None, "flow"), ("monolith-fm", None, None, "steps-x2")]  # top-1's, top-2's cost
    settings: list[tuple[str, str | None, str | None, str]] = [("fm", r, s, "flow") for r in ("cond", "uncond")
                                                               for s in ctx.strategies]
    settings += [("fm", "stats", "top-2", "flow"), ("fm", "stats-uncond", "top-2", "flow"), *mono]
    # unconditional generation (no class anywhere, no CFG): where argmax routing collapsed in the CPU prototype
    uncond = [("fm", "uncond", s, "flow") for s in ctx.strategies] + [("fm", "stats-uncond", "top-2", "flow"), *mono]
    out: dict = {"data_share": ctx.partition.shares().tolist(),
                 "strategies": {k: asdict(v) for k, v in ctx.strategies.items()}}
    for name, gen, group in (("rows", "class", settings), ("rows_uncond_gen", "none", uncond)):
        out[name] = []
        for ens, router, strat, method in group:
            cells = [ctx.cell(Cell(ts, s, ens, router, strat, method, generation=gen), ("routing",))
                     for ts, s in runs(cfg)]
            out[name].append({"setting": cells[0]["setting"], "ensemble": ens, "router": router, "strategy": strat,
                              "method": method, "generation": gen, "summary": summarize_cells(cells),
                              "cells": [c["key"] for c in cells]})
    return out


def plot_routing(routing: dict, out: Path) -> list[str]:
    plt = pyplot()
    names = []
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    markers = {"cond": "o", "uncond": "s", "stats": "^", "stats-uncond": "v", None: "*"}
    for r in routing["rows"]:
        s = r["summary"]
        x, y = mean(s["gflops_per_image"]), mean(s["fd"])
        if not (finite(x) and finite(y)):
            continue
        err = s["fd"]["std"] if finite(s["fd"].get("std")) else 0
        ax.errorbar([x], [y], yerr=[err], fmt=markers.get(r["router"], "o"), ms=8 if r["router"] else 13,
                    capsize=3, label=r["setting"])
    floor = [mean(r["summary"]["fd_floor"]) for r in routing["rows"] if finite(mean(r["summary"]["fd_floor"]))]
    if floor:
        ax.axhline(sum(floor) / len(floor), color="gray", ls=":", label="real train-vs-test floor")
    ax.set_xscale("log")
    ax.set_xlabel("GFLOPs per image (FlopCounterMode)")
    ax.set_ylabel("FD (classifier features)")
    ax.set_title("Routing: quality against cost (mean ± std over runs)")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    names.append(save_plot(fig, out / "routing_fd_vs_flops.png"))

    rows = [r for r in routing["rows"] if r["router"] in ("cond", "uncond") or r["router"] is None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    k = len(routing["data_share"])
    w = 0.8 / (len(rows) + 1)
    for i, r in enumerate(rows):
        ax.bar([c + i * w for c in range(k)], r["summary"]["cluster_share"], w, label=r["setting"])
    ax.bar([c + len(rows) * w for c in range(k)], rows[0]["summary"]["target_share"] if rows else [], w,
           color="black", label="target (real share of the requested classes)")
    ax.set_xticks([c + 0.4 for c in range(k)], [f"c{c}" for c in range(k)])
    ax.set_ylabel("share of samples")
    ax.set_title("Samples per cluster")
    ax.legend(fontsize=5, ncol=3)
    names.append(save_plot(fig, out / "routing_cluster_shares.png"))
    return names



def section_routing(res: dict, out: Path) -> tuple[str, list[dict]]:
    rt = res["studies"]["routing"]
    plots = plot_routing(rt, out)
    lines = ["## 1. Routing strategies", "",
             "FM experts, class-conditional samples (labels cycling through the classes, CFG per expert). "
             "`cond` router: the trained router that sees the class; `uncond`: same network without the class "
             "(the papers' kind); `stats`: the statistics router built from per-cluster statistics only "
             "(`stats-uncond`: the same, not given the class). The monolith is one FM model of the same "
             "network trained on all data for K times one expert's steps. Real floors in parentheses: the "
             "same metric between a real train subset and the same held-out test images the samples are scored "
             "against, at the same n, i.e. what an independent real sample scores. No model trained on the test "
             "images, so reproducing training images gains nothing; KID is unbiased and may be negative. Expert "
             "calls count guided velocity rows (2 network rows each under CFG); GFLOPs per image are those calls "
             "times each network's forward FLOPs plus the router's "
             "at every step, counted once per network with torch's FlopCounterMode (matmuls, convolutions and "
             "attention; elementwise ops not counted).", "",
             table(QUALITY_HEADER, quality_rows(rt["rows"])), "", f"![FD against cost]({plots[0]})", "",
             "Share of samples per cluster (mean over runs) against the target (the share of real images of the "
             "requested classes in each cluster):", ""]
    ug = rt.get("rows_uncond_gen", [])
    lines.append(table(["setting", "cluster shares", "target", "TV"],
                       [[r["setting"], shares(r["summary"]["cluster_share"]), shares(r["summary"]["target_share"]),
                         fmt(r["summary"]["share_tv"], 3)] for r in rt["rows"] + ug]))
    lines += ["", f"![cluster shares]({plots[1]})", ""]
    if ug:
        lines += ["Unconditional generation (no class for the experts or the router, no CFG; target = the data's "
                  "cluster shares): the setting in which argmax routing collapsed onto the largest cluster in the "
                  "CPU prototype.", "", table(QUALITY_HEADER, quality_rows(ug)), ""]
    rows = rt["rows"]
    # (router, the rows, label): class-conditional samples with each router, and unconditional generation
    # (no class anywhere), the setting of the papers' class-blind routers
    groups = [("cond", rows, "cond"), ("uncond", rows, "uncond")] + ([("uncond", ug, "uncond gen")] if ug else [])
    lines += ["Paired differences (" + NOISE_RULE + "; not Holm-adjusted here, section 7 adjusts the claims). The "
              "monolith is compared at matched inference compute, with the strategy fixed before the run: top-1 "
              "(one network per step) against the monolith, top-2 (two) against the monolith with twice the steps:",
              "", table(["comparison", "FD difference", "KID difference"], _paired_rows(rt["strategies"], groups)), ""]
    return "\n".join(lines), _strategy_claims(groups, ug) + _collapse_claims(rows, ug)


def _monoliths(group: list) -> tuple[dict | None, dict | None]:
    """The monolith row at the run's steps and at twice the steps (matched to top-2's network evaluations)."""
    rs = [r for r in group if r["router"] is None]
    return (next((r for r in rs if r.get("method", "flow") == "flow"), None),
            next((r for r in rs if r.get("method") == "steps-x2"), None))


def _pairs(strategies: dict, group: list, router: str) -> list[tuple[str, dict, dict, int]]:
    """(name, row a, row b, claimed sign of a - b) of every comparison of a router group."""
    full = find_row(group, router=router, strategy="full")
    out = []
    for st in [k for k in strategies if k != "full"]:
        r = find_row(group, router=router, strategy=st)
        if r and full:
            out.append((f"{st} - full", r, full, +1 if st.startswith("sample-") else -1))
    mono, mono2 = _monoliths(group)
    t1, t2 = find_row(group, router=router, strategy="top-1"), find_row(group, router=router, strategy="top-2")
    if mono and t1:
        out.append(("top-1 - monolith", t1, mono, -1))
    if mono2 and t2:
        out.append(("top-2 - monolith (2x steps)", t2, mono2, -1))
    return out


def _paired_rows(strategies: dict, groups: list) -> list[list[str]]:
    return [[f"{label}: {name}", diff_text(paired(a["summary"], b["summary"])),
             diff_text(paired(a["summary"], b["summary"], "kid"))]
            for router, group, label in groups for name, a, b, _ in _pairs(strategies, group, router)]


CLAIMS = {"top-1 - full": "DDM: top-1 routing beats the full ensemble (FID 9.84 vs 10.52)",
          "top-2 - full": "Paris: top-2 beats the full ensemble (FID 22.60 vs 47.89)",
          "sample-1 - full": "DDM: Sample-1 is catastrophic (FID 157) [ours: the expert drawn once per trajectory]",
          "sample-1/step - full": "DDM: Sample-1 is catastrophic (FID 157) [as DDM: redrawn at every step]",
          "top-1 - monolith": "DDM: the ensemble beats a monolith (FID 10.5 vs 12.8) [top-1 vs monolith, "
                              "equal training and inference compute]",
          "top-2 - monolith (2x steps)": "DDM/Paris: the ensemble beats a monolith [top-2 vs the monolith with "
                                         "twice the steps: equal inference compute]"}


def _strategy_claims(groups: list, ug: list) -> list[dict]:
    """The papers' claims on sparse strategies and on the monolith, for each router group, on FD and KID."""
    out = []
    strategies = {k: None for k in ("top-1", "top-2", "sample-1", "sample-1/step")}
    for router, group, _label in [groups[1], groups[0], *groups[2:]]:
        tag = f"{router} router" + (", unconditional generation" if group is ug else "")
        for name, a, b, sign in _pairs(strategies, group, router):
            if name not in CLAIMS:
                continue
            tests = [paired_test(a["summary"], b["summary"], m, sign, label=m.upper()) for m in ("fd", "kid")]
            out.append(claim(f"{CLAIMS[name]} [{tag}]", f"FD {fmt(a['summary']['fd'])} vs "
                             f"{fmt(b['summary']['fd'])} (mean ± sd over runs)", tests))
    return out


COLLAPSE_MARGIN = 0.05  # share TV: a difference below 5 points of cluster share counts as "no collapse"


def _collapse_claims(rows: list, ug: list) -> list[dict]:
    """The prototype's claim: argmax routing collapses the cluster shares with a class-blind router (a
    difference test, claimed +) and not with a conditional one (an equivalence test, margin COLLAPSE_MARGIN)."""
    claims = []
    for router, group, what in (("uncond", ug, "unconditional generation"), ("cond", rows, "class-conditional")):
        t1, full = find_row(group, router=router, strategy="top-1"), find_row(group, router=router, strategy="full")
        if t1 and full:
            if router == "uncond":
                d = paired_test(t1["summary"], full["summary"], "share_tv", +1, label="share TV")
                text = "Prototype: argmax (top-1) routing collapses cluster shares with an unconditional router"
            else:
                d = paired_test(t1["summary"], full["summary"], "share_tv", 0, COLLAPSE_MARGIN, label="share TV")
                text = ("Prototype: ... and not with a conditional one (equivalence of top-1's and full's share TV "
                        f"within ±{COLLAPSE_MARGIN})")
            claims.append(claim(f"{text} [{router} router, {what}]",
                                f"share TV top-1 {fmt(t1['summary']['share_tv'], 3)} vs full "
                                f"{fmt(full['summary']['share_tv'], 3)}", [d]))
    return claims


__all__ = ["plot_routing", "section_routing", "study_routing"]
