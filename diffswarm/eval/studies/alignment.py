"""The alignment study: per step, predicted-x0 distance to selected vs other centroids and angular
disagreement (from the stability traces), their per-sample Spearman correlation with quality; on real
test images noised to x_t, the selected vs non-selected experts' errors; its report section and plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffswarm.eval.context import Context
from diffswarm.eval.diagnostics.alignment import expert_errors, split_by_selection
from diffswarm.eval.metrics import summarize
from diffswarm.eval.report_common import claim, fmt, mean, pyplot, save_plot, table
from diffswarm.eval.settings import Cell, runs
from diffswarm.eval.stats import paired_test
from diffswarm.experts.schedules import flow_point
from diffswarm.router.routing import choose_experts


def study_alignment(ctx: Context, stability: dict | None = None) -> dict:
    """Centroid distances and disagreement from the stability traces; real-data errors of selected experts."""
    cfg = ctx.cfg
    rng = np.random.default_rng(777)
    m = min(cfg.align_n, len(ctx.test_ds))
    idx = torch.from_numpy(rng.choice(len(ctx.test_ds), m, replace=False))
    x0 = ctx.test_ds.images[idx].to(ctx.device)
    labels = ctx.test_ds.labels[idx].to(ctx.device)
    clusters = torch.from_numpy(ctx.partition.assign(x0.cpu()))
    routings = [("cond", "top-1"), ("cond", "top-2"), ("uncond", "top-1"), ("uncond", "top-2"), ("stats", "top-2")]
    per_run = []
    for ts, seed in runs(cfg):
        cell = Cell(ts, seed, "fm", "cond", "top-2")

        def compute(key, ts=ts, seed=seed):
            experts = ctx.models.experts(ts, "fm")
            gen = torch.Generator(device="cpu").manual_seed(seed)
            rows = []
            for tv in cfg.align_times:
                eps = torch.randn(x0.shape, generator=gen).to(ctx.device)
                t = torch.full((m,), float(tv), device=ctx.device)
                err = expert_errors(experts, x0, eps, t, labels, guidance=1.0).cpu()  # (m, K)
                own = err.gather(1, clusters[:, None]).squeeze(1)
                x_t = flow_point(x0, eps, t)
                row = {"t": tv, "own_error": float(own.mean()), "mean_error": float(err.mean()),
                       "own_is_best": float((err.argmin(1) == clusters).double().mean())}
                for rname, strat in routings:
                    router = ctx.models.router(ts, rname)
                    y = labels if rname in ("cond", "stats") else torch.full_like(labels, -1)
                    w = choose_experts(router.probs(x_t, t, y), torch.ones(ctx.k, dtype=torch.bool),
                                       ctx.strategies[strat], float(tv)).cpu()
                    sp = split_by_selection(err, w)
                    row[f"{rname}/{strat}"] = {"selected": sp["selected"], "other": sp["other"],
                                               "best_selected": sp["best_selected"],
                                               "own_selected": float(w.gather(1, clusters[:, None]).gt(0).double()
                                                                     .mean())}
                rows.append(row)
            return {"rows": rows}

        per_run.append(ctx.cells.load_or("align", cell, compute, {"align_n": m, "times": list(cfg.align_times)}))
    real_rows = []
    for i, tv in enumerate(cfg.align_times):
        row = {"t": tv}
        for k in ("own_error", "mean_error", "own_is_best"):
            row[k] = summarize([r["rows"][i][k] for r in per_run])
        for rname, strat in routings:
            key = f"{rname}/{strat}"
            row[key] = {k: summarize([r["rows"][i][key][k] if r["rows"][i][key][k] is not None else float("nan")
                                      for r in per_run]) for k in ("selected", "other", "best_selected",
                                                                   "own_selected")}
        real_rows.append(row)
    out = {"real_data": real_rows, "routings": [f"{a}/{b}" for a, b in routings], "align_n": m,
           # per run, the mean over t of (selected - other) error of each routing: the unit the claim is tested on
           "gap_per_run": {f"s{ts}/r{seed}": {key: _gap(r, key) for key in (f"{a}/{b}" for a, b in routings)}
                           for (ts, seed), r in zip(runs(cfg), per_run, strict=True)}}
    if stability is not None:
        out["sampling"] = [{"setting": r["setting"], "strategy": r["strategy"], "router": r["router"],
                            **{k: r["summary"][k] for k in ("centroid_selected", "centroid_other",
                                                            "centroid_best_selected", "disagreement",
                                                            "spearman_disagreement_confidence",
                                                            "spearman_disagreement_nn")},
                            "per_step": r["per_step"], "t": r["t"], "per_run": r["summary"].get("per_run", {})}
                           for r in stability["rows"] if r["router"] is not None]
    return out


def _gap(run: dict, key: str) -> float:
    """Mean over the probed times of one run's selected-minus-other expert error under routing ``key``."""
    d = [r[key]["selected"] - r[key]["other"] for r in run["rows"]
         if r[key]["selected"] is not None and r[key]["other"] is not None]
    return float(np.mean(d)) if d else float("nan")


def plot_alignment(al: dict, out: Path) -> list[str]:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for r in al.get("sampling", []):
        ps = r["per_step"]
        if "centroid_selected_per_step" in ps and r["strategy"] in ("top-1", "top-2") and r["router"] == "cond":
            ax.plot(r["t"], ps["centroid_selected_per_step"], label=f"{r['strategy']} selected")
            ax.plot(r["t"], ps["centroid_other_per_step"], ls="--", label=f"{r['strategy']} other")
    ax.invert_xaxis()
    ax.set_xlabel("flow time t")
    ax.set_ylabel("distance of predicted x0 to centroid (whitened PCA)")
    ax.set_title("Centroid distance: selected vs other clusters")
    ax.legend(fontsize=6)
    ax = axes[1]
    ts = [r["t"] for r in al["real_data"]]
    for key in al["routings"]:
        sel = [mean(r[key]["selected"]) for r in al["real_data"]]
        oth = [mean(r[key]["other"]) for r in al["real_data"]]
        (line,) = ax.plot(ts, sel, marker="o", label=f"{key} selected")
        ax.plot(ts, oth, marker="x", ls="--", color=line.get_color(), label=f"{key} other")
    ax.plot(ts, [mean(r["own_error"]) for r in al["real_data"]], color="black", lw=2, label="own-cluster expert")
    ax.set_xlabel("flow time t")
    ax.set_ylabel("velocity MSE on real test images")
    ax.set_title("Real data noised to x_t")
    ax.legend(fontsize=5, ncol=2)
    return [save_plot(fig, out / "alignment.png")]



def section_alignment(res: dict, out: Path) -> tuple[str, list[dict]]:
    al = res["studies"]["alignment"]
    plots = plot_alignment(al, out)
    lines = ["## 4. Expert-data alignment", ""]
    claims = []
    if al.get("sampling"):
        lines += ["During sampling (the stability traces): distance from the predicted x0 = x_t - t u to the "
                  "centroids of the selected vs the other clusters (partition's whitened PCA space, mean over "
                  "steps), the share of steps where the nearest centroid's cluster is selected, and the angular "
                  "disagreement (weighted mean pairwise angle, radians) of the mixed experts' velocities with its "
                  "per-sample Spearman correlation with the classifier's confidence and with the distance to the "
                  "nearest real image.", "",
                  table(["setting", "centroid: selected", "centroid: other", "nearest selected", "disagreement",
                         "Spearman(dis., confidence)", "Spearman(dis., NN dist.)"],
                        [[r["setting"], fmt(r["centroid_selected"]), fmt(r["centroid_other"]),
                          fmt(r["centroid_best_selected"]), fmt(r["disagreement"], 3),
                          fmt(r["spearman_disagreement_confidence"]), fmt(r["spearman_disagreement_nn"])]
                         for r in al["sampling"]]), ""]
        picked = (("uncond", "top-1"), ("cond", "top-2"))
        for r in [r for r in al["sampling"] if (r["router"], r["strategy"]) in picked]:
            sel, oth = ({"per_run": {k: {"v": v.get(c)} for k, v in r.get("per_run", {}).items()}}
                        for c in ("centroid_selected", "centroid_other"))
            claims.append(claim(f"Alignment study: sparse routing picks the experts whose centroids are closest to "
                                f"the current state [{r['setting']}]",
                                f"centroid distance selected {fmt(r['centroid_selected'])} vs other "
                                f"{fmt(r['centroid_other'])}", [paired_test(sel, oth, "v", -1, label="distance")]))
        full = next((r for r in al["sampling"] if r["router"] == "uncond" and r["strategy"] == "full"), None)
        if full:
            runs_ = full.get("per_run", {})
            rho = {"per_run": {k: {"v": v.get("spearman_disagreement_confidence")} for k, v in runs_.items()}}
            zero = {"per_run": {k: {"v": 0.0} for k in runs_}}
            claims.append(claim("Alignment study: when the mixed experts disagree, quality drops [full ensemble, "
                                "uncond router: Spearman(disagreement, classifier confidence) < 0]",
                                f"Spearman {fmt(full['spearman_disagreement_confidence'])}",
                                [paired_test(rho, zero, "v", -1, label="Spearman")]))
    lines += ["On real test images noised to x_t: each expert's velocity MSE against eps - x0 (FM experts, no "
              "guidance), split into the experts the routing selects and the others; `own`: the expert of the "
              "image's own cluster; `own best`: share of images whose own-cluster expert has the lowest error.", ""]
    hdr = ["t", "own", "own best"] + [f"{k} sel / other" for k in al["routings"]]
    rows = [[f"{r['t']:.1f}", fmt(r["own_error"], 4), fmt(r["own_is_best"])]
            + [f"{fmt(r[k]['selected'], 4)} / {fmt(r[k]['other'], 4)}" for k in al["routings"]]
            for r in al["real_data"]]
    lines += [table(hdr, rows), "", f"![alignment]({plots[0]})", ""]
    gaps = al.get("gap_per_run", {})
    zero = {"per_run": {k: {"v": 0.0} for k in gaps}}
    for key in ("uncond/top-1", "cond/top-2"):
        if key in al["routings"] and gaps:
            g = {"per_run": {k: {"v": v.get(key)} for k, v in gaps.items()}}
            claims.append(claim(f"Alignment study: on real noised data the selected experts predict better than the "
                                f"others [{key}; experts answer absent classes unconditionally]",
                                "selected - other velocity MSE, mean over t", [paired_test(g, zero, "v", -1,
                                                                                          label="MSE gap")]))
    return "\n".join(lines), claims



__all__ = ["plot_alignment", "section_alignment", "study_alignment"]
