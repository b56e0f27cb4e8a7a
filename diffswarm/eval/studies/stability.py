"""The stability study: local Lipschitz estimate of one sampler step and the refinement gap
(:mod:`diffswarm.eval.diagnostics`) per strategy on the first ``stability_n`` samples of a cell, next to
its quality; its report section and plots."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from diffswarm.eval.context import Context
from diffswarm.eval.diagnostics.tracing import LipschitzConfig, trace_sampling
from diffswarm.eval.metrics import per_sample_quality, summarize
from diffswarm.eval.report_common import (
    NOISE_RULE,
    claim,
    diff_text,
    find_row,
    finite,
    fmt,
    mean,
    paired,
    pyplot,
    save_plot,
    table,
)
from diffswarm.eval.scoring import summarize_cells
from diffswarm.eval.settings import Cell, runs
from diffswarm.eval.stats import paired_test
from diffswarm.sampling.loop import sample


def _spearman(a, b) -> float | None:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return None
    return float(spearmanr(a[ok], b[ok]).statistic)


def study_stability(ctx: Context) -> dict:
    """Local Lipschitz and refinement gap per strategy (FM experts, conditional router) and the monolith."""
    cfg = ctx.cfg
    s = cfg.sampling
    lip = LipschitzConfig(directions=cfg.lipschitz_directions, every=cfg.lipschitz_every)
    rows = []
    settings = [("fm", "cond", st) for st in ctx.strategies] + [("fm", "uncond", st) for st in ("full", "top-1")]
    settings.append(("monolith-fm", None, None))
    for ens, router, strat in settings:
        traces = []
        for ts, seed in runs(cfg):
            cell = Cell(ts, seed, ens, router, strat)

            def compute(key, cell=cell):
                m = cfg.stability_n
                labels = ctx.labels()[:m].to(ctx.device)
                noise = ctx.noise(cell.seed)[:m].to(ctx.device)
                model = ctx.models.monolith(cell.train_seed) if cell.router is None else ctx.ensemble(cell)
                tr = trace_sampling(model, noise, labels, s.steps, s.sampler, s.guidance, ctx.partition,
                                    lipschitz=replace(lip, seed=1000 * cell.seed), disagreement=True)
                fine = sample(model, noise, labels, 2 * s.steps, s.sampler, s.guidance)
                dim = tr.x0[0].numel()
                gap = ((tr.x0 - fine).flatten(1).norm(dim=1) / math.sqrt(dim)).cpu()  # (m,)
                x0 = tr.x0.clamp(-1, 1).cpu()
                q = per_sample_quality(ctx.scoring.classifier, x0, labels.cpu(), ctx.scoring.real_feats())
                ps = tr.per_sample()
                summ = tr.summary()
                out = {"lipschitz": summ["lipschitz_mean"], "lipschitz_per_step": summ["lipschitz_per_step"],
                       "t": summ["t"], "refinement_gap": float(gap.mean()), "step_change": summ["step_change_mean"],
                       "experts_per_step": summ["experts_per_step"], "confidence": float(q["confidence"].mean()),
                       "nn_distance": float(q["nn_distance"].mean()),
                       "spearman_lipschitz_confidence": _spearman(ps["lipschitz"], q["confidence"]),
                       "spearman_gap_confidence": _spearman(gap, q["confidence"])}
                if "disagreement" in ps:
                    out.update(disagreement=summ["disagreement_mean"],
                               disagreement_per_step=summ["disagreement_per_step"],
                               spearman_disagreement_confidence=_spearman(ps["disagreement"], q["confidence"]),
                               spearman_disagreement_nn=_spearman(ps["disagreement"], q["nn_distance"]))
                for key2 in ("centroid_selected", "centroid_other", "centroid_best_selected"):
                    if key2 in summ:
                        out[key2] = summ[key2]
                        out[key2 + "_per_step"] = summ[key2 + "_per_step"]
                out["centroid_nearest"] = summ.get("centroid_nearest")
                return out

            traces.append(ctx.cells.load_or("trace", cell, compute, {"stability_n": cfg.stability_n,
                                                                     "lipschitz": asdict(lip)}))
        keys = ("lipschitz", "refinement_gap", "step_change", "disagreement", "confidence", "nn_distance",
                "centroid_selected", "centroid_other", "centroid_best_selected",
                "spearman_disagreement_confidence", "spearman_disagreement_nn", "spearman_lipschitz_confidence")
        summ = {k: summarize([t.get(k) if t.get(k) is not None else float("nan") for t in traces]) for k in keys}
        summ["per_run"] = {t["run"]: {k: t.get(k) for k in ("lipschitz", "refinement_gap", "centroid_selected",
                                                            "centroid_other", "spearman_disagreement_confidence")}
                           for t in traces}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # steps that were not probed are NaN in every run
            per_step = {k: np.nanmean(np.array([[np.nan if v is None else v for v in t[k]] for t in traces],
                                               dtype=float), 0).tolist()
                        for k in ("lipschitz_per_step", "disagreement_per_step", "centroid_selected_per_step",
                                  "centroid_other_per_step") if all(t.get(k) is not None for t in traces)}
        quality = [ctx.cell(Cell(ts, sd, ens, router, strat), ("stability",)) for ts, sd in runs(cfg)]
        rows.append({"setting": Cell(0, 0, ens, router, strat).setting, "router": router, "strategy": strat,
                     "summary": summ, "per_step": per_step, "t": traces[0]["t"],
                     "quality": summarize_cells(quality, ("fd", "kid", "precision", "recall", "class_accuracy")),
                     "traces": [t["key"] for t in traces], "_traces": traces, "_quality": quality})
    # across strategies (conditional router, per run): does stability rank opposite to quality?
    cond = [r for r in rows if r["router"] == "cond"]
    per_run = []
    for i in range(len(runs(cfg))):
        lips = [r["_traces"][i]["lipschitz"] for r in cond]
        fds = [r["_quality"][i]["metrics"]["fd"] for r in cond]
        per_run.append(_spearman(lips, fds))
    for r in rows:
        del r["_traces"], r["_quality"]
    most_stable = min(cond, key=lambda r: r["summary"]["lipschitz"]["mean"])
    worst = max(cond, key=lambda r: r["quality"]["fd"]["mean"])
    return {"rows": rows, "lipschitz": asdict(lip), "stability_n": cfg.stability_n,
            "spearman_lipschitz_fd": summarize([v if v is not None else float("nan") for v in per_run]),
            "most_stable": most_stable["strategy"], "worst_fd": worst["strategy"]}


def plot_stability(stab: dict, out: Path) -> list[str]:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for r in stab["rows"]:
        x, y = mean(r["summary"]["lipschitz"]), mean(r["quality"]["fd"])
        if finite(x) and finite(y):
            ax.errorbar([x], [y], xerr=[r["summary"]["lipschitz"].get("std") or 0],
                        yerr=[r["quality"]["fd"].get("std") or 0], fmt="o", capsize=3, label=r["setting"])
    ax.set_xlabel("local Lipschitz estimate of one sampler step")
    ax.set_ylabel("FD")
    ax.set_title("Stability vs quality")
    ax.legend(fontsize=5)
    ax = axes[1]
    for r in stab["rows"]:
        lp = r["per_step"].get("lipschitz_per_step")
        if lp:
            pts = [(t, v) for t, v in zip(r["t"], lp, strict=False) if finite(v)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=r["setting"])
    ax.set_xlabel("flow time t (1 = noise)")
    ax.set_ylabel("Lipschitz estimate")
    ax.invert_xaxis()
    ax.set_title("Per step")
    ax.legend(fontsize=5)
    return [save_plot(fig, out / "stability.png")]



def section_stability(res: dict, out: Path) -> tuple[str, list[dict]]:
    st = res["studies"]["stability"]
    plots = plot_stability(st, out)
    lip = st["lipschitz"]
    lines = ["## 3. Stability vs quality", "",
             f"On the first {st['stability_n']} samples of each run's cell (same noise, labels and routing). "
             "Local Lipschitz: L = mean over random unit directions d of ||Phi(x + h d) - Phi(x)|| / h for one "
             f"sampler step Phi at the trajectory's state, h = 0.01 sqrt(D), {lip['directions']} directions, "
             f"every {lip['every']} steps, routing recomputed at the perturbed point. Refinement gap: "
             "||x0(N steps) - x0(2N steps)|| / sqrt(D) from the same noise. Quality (FD, class accuracy) is that "
             "of the full cells of the same settings.", "",
             table(["setting", "Lipschitz", "refinement gap", "step change", "FD", "class acc", "confidence",
                    "Spearman(L, confidence)"],
                   [[r["setting"], fmt(r["summary"]["lipschitz"], 3), fmt(r["summary"]["refinement_gap"], 4),
                     fmt(r["summary"]["step_change"], 4), fmt(r["quality"]["fd"]),
                     fmt(r["quality"]["class_accuracy"]), fmt(r["summary"]["confidence"]),
                     fmt(r["summary"]["spearman_lipschitz_confidence"])] for r in st["rows"]]), "",
             f"Across the conditional router's strategies, Spearman rank correlation between the Lipschitz "
             f"estimate and FD (per run, then mean ± std): {fmt(st['spearman_lipschitz_fd'])}. Lowest "
             f"mean Lipschitz: {st['most_stable']}; highest mean FD: {st['worst_fd']} (orderings of means, not "
             "tests: the tests are below and in section 7).", "", f"![stability]({plots[0]})", ""]
    rows = st["rows"]
    full = find_row(rows, router="cond", strategy="full")
    others = [r for r in rows if r["router"] == "cond" and r["strategy"] != "full"]
    if full and others:
        lines += ["Full ensemble against each other strategy (" + NOISE_RULE + "; not Holm-adjusted here):", "",
                  table(["strategy", "Lipschitz full - strategy", "FD full - strategy"],
                        [[r["strategy"], diff_text(paired(full["summary"], r["summary"], "lipschitz"), 3),
                          diff_text(paired(full["quality"], r["quality"], "fd"))] for r in others]), ""]
    claims = []
    # the claim is a conjunction (more stable AND worse), so it agrees only when every test agrees; it is tested
    # full vs top-1 (the comparison the papers make), with each router
    for router in ("uncond", "cond"):
        f, t1 = find_row(rows, router=router, strategy="full"), find_row(rows, router=router, strategy="top-1")
        if not (f and t1):
            continue
        tests = [paired_test(f["summary"], t1["summary"], "lipschitz", -1, label="Lipschitz"),
                 paired_test(f["quality"], t1["quality"], "fd", +1, label="FD"),
                 paired_test(f["quality"], t1["quality"], "kid", +1, label="KID")]
        claims.append({**claim(f"Alignment study: the full ensemble is more stable (lower Lipschitz) and worse than "
                               f"top-1 [{router} router; every test must agree]",
                               f"Lipschitz full {fmt(f['summary']['lipschitz'], 3)} vs top-1 "
                               f"{fmt(t1['summary']['lipschitz'], 3)}; FD {fmt(f['quality']['fd'])} vs "
                               f"{fmt(t1['quality']['fd'])}", tests), "all": True})
    return "\n".join(lines), claims



__all__ = ["plot_stability", "section_stability", "study_stability"]
