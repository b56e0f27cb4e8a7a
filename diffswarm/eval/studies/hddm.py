"""The HDDM study as published: DDPM experts trained with the standard epsilon loss at uniform steps (pool
objective ``ddpm-eps``; the objectives study's DDPM experts use this project's flow-weighted recipe, which is the
FM loss of the translated prediction and so removes the mechanism HDDM relies on: eps weights low noise, v high
noise). K FM vs K eps-DDPM vs K/4 eps-DDPM + the rest FM at two placements of the DDPM experts (evenly spaced
clusters, then the same shifted by one), every expert trained for the same steps at the same batch (equal
compute), top-2 with the conditional router, translator + the run's sampler. Quality on FD and KID against the
held-out reference; diversity in classifier features and in pixels."""

from __future__ import annotations

from pathlib import Path

from diffswarm.eval.context import Context
from diffswarm.eval.report_common import QUALITY_HEADER, claim, find_row, fmt, quality_rows, table
from diffswarm.eval.scoring import summarize_cells
from diffswarm.eval.settings import Cell, ensemble_objectives, runs
from diffswarm.eval.stats import paired_test


def hddm_ensembles(k: int) -> dict[str, str]:
    """{ensemble name: display name}: K FM, K eps-DDPM, and the K/4 + 3K/4 mix at two placements."""
    q = max(1, k // 4)
    out = {"fm": f"{k} FM", "ddpm-eps": f"{k} DDPM (eps loss)"}
    for shift in (0, 1):
        name = f"hmix-{q}" + (f"@{shift}" if shift else "")
        dd = [c for c, o in enumerate(ensemble_objectives(name, k)) if o != "fm"]
        out[name] = f"{q} DDPM (eps loss) + {k - q} FM, DDPM at clusters {dd}"
    return out


def study_hddm(ctx: Context) -> dict:
    rows = []
    for ens, name in hddm_ensembles(ctx.k).items():
        cells = [ctx.cell(Cell(ts, s, ens, "cond", "top-2"), ("hddm",)) for ts, s in runs(ctx.cfg)]
        rows.append({"setting": name, "ensemble": ens, "summary": summarize_cells(cells),
                     "cells": [c["key"] for c in cells]})
    return {"rows": rows}


def section_hddm(res: dict, out: Path) -> tuple[str, list[dict]]:
    rows = res["studies"]["hddm"]["rows"]
    lines = ["## 2b. HDDM as published", "",
             "DDPM experts trained with the standard eps loss at uniform steps (as HDDM), equal steps and batch for "
             "every expert; top-2, conditional router, translator.", "", table(QUALITY_HEADER, quality_rows(rows)),
             ""]
    fm, dd = find_row(rows, ensemble="fm"), find_row(rows, ensemble="ddpm-eps")
    claims = []
    for r in [r for r in rows if r["ensemble"].startswith("hmix")]:
        where = r["setting"].partition(" FM, ")[2] or r["setting"]  # "DDPM at clusters [0, 4]"
        if fm:
            claims.append(claim(f"HDDM: 2 DDPM + 6 FM beats 8 FM (FID 11.88 vs 12.45) [eps-loss DDPM, {where}]",
                                f"FD {fmt(r['summary']['fd'])} vs {fmt(fm['summary']['fd'])}",
                                [paired_test(r["summary"], fm["summary"], m, -1, label=m.upper())
                                 for m in ("fd", "kid")]))
            claims.append(claim(f"HDDM: ... and is more diverse (LPIPS 0.631 vs 0.617) [{where}]",
                                "within-class diversity, classifier features and pixels",
                                [paired_test(r["summary"], fm["summary"], m, +1, label=m)
                                 for m in ("diversity", "pixel_diversity")]))
        if dd:
            claims.append(claim(f"HDDM: the mix beats all-DDPM [eps-loss DDPM, {where}]",
                                f"FD {fmt(r['summary']['fd'])} vs {fmt(dd['summary']['fd'])}",
                                [paired_test(r["summary"], dd["summary"], m, -1, label=m.upper())
                                 for m in ("fd", "kid")]))
    return "\n".join(lines), claims


__all__ = ["hddm_ensembles", "section_hddm", "study_hddm"]
