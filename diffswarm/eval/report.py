"""``report.md`` and its PNG plots from the results of :func:`diffswarm.eval.run.run_study`.

Pure rendering: every number shown is read from the results dict (``results.json``), and every
verdict in the last section is computed from those numbers by the rule stated there. The header and
the last section are written here; each study's section and plots by its module under
``eval/studies/`` (:data:`diffswarm.eval.studies.TABLE`). Plots are drawn with matplotlib's Agg
backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path

from diffswarm.eval.report_common import fmt, table
from diffswarm.eval.stats import RULE_TEXT, VERDICTS, holm, result_text, verdict, word_of
from diffswarm.eval.studies import TABLE
from diffswarm.utils.fileio import atomic_write


def render(res: dict, out: Path) -> str:
    cfg = res["config"]
    m = res.get("machine", {})
    tm = res.get("timings", {})
    pool = res.get("pool")
    data = res.get("data", {})
    prog = res.get("progress", {})
    partial = ([f"**Partial report: training seeds {prog['train_seeds_done']} of {cfg['train_seeds']} done; the run "
                "continues and rewrites this file.**", ""] if prog and not prog.get("complete") else [])
    head = ["# diffswarm eval report", "", *partial,
            f"- command: `{res.get('command') or 'run_study(...)'}`",
            f"- mode: {'quick (toy sizes: numbers are smoke tests, not findings)' if cfg['quick'] else 'full'}; "
            f"studies: {', '.join(cfg['studies'])}",
            f"- training seeds {cfg['train_seeds']} (the unit of replication), sampling seeds {cfg['seeds']} (averaged "
            f"within a training seed); N = {cfg['n']} samples per cell, scored against N held-out test images (the "
            "floor: N real train images against the same test images); "
            f"{cfg['sampling']['steps']} {cfg['sampling']['sampler']} steps, CFG {cfg['sampling']['guidance']:g}"]
    if data:
        p = cfg["pool"]
        head += [f"- data: {data['dataset']} ({data['train']} train / {data['test']} test images), K={data['k']} "
                 f"clusters (partition {data['partition_hash'][:12]}, seed {p['partition_seed']}); classifier test "
                 f"accuracy {fmt(data.get('classifier_test_accuracy'), 3)}",
                 f"- experts: {p['net']} width {p['width']} depth {p['depth']}, {p['expert_steps']} steps at batch "
                 f"{p['batch']}, lr {p['lr']:g}; monolith {p['expert_steps'] * (p['monolith_factor'] or p['k'])} "
                 f"steps; routers {p['router_steps']} steps (width {p['router_width']})"]
    if pool:
        head.append(f"- pool: `{pool['root']}`: trained {len(pool['trained'])} model(s) this run, reused "
                    f"{len(pool['reused'])}")
    if "cells" in res:
        c = res["cells"]
        head.append(f"- cells (sample sets, traces): {c['computed']} computed this run ({c['sampling_s']:.0f} s), "
                    f"{c['reused']} served from OUT/cells (shared between studies or cached by an earlier run)")
    if pool and "all_cells_s" in res.get("cells", {}):
        # what the numbers cost, whichever invocation of a resumed run computed each piece
        secs = [v.get("seconds") or 0.0 for v in pool["models"].values()]
        head.append(f"- compute behind these numbers, over every invocation: training {sum(secs):.0f} s summed over "
                    f"{len(secs)} pool models (run {cfg.get('jobs') or 'one per core'} at a time), sampling and "
                    f"scoring {res['cells']['all_cells_s']:.0f} s over {res['cells']['distinct']} cells")
    load = m.get("load_average_at_start")
    head += [f"- machine: {m.get('processor')} x{m.get('cpu_count')} ({m.get('platform')}), torch {m.get('torch')}, "
             f"device {m.get('device')}{', ' + m['gpu'] if m.get('gpu') else ''}, {m.get('torch_threads')} "
             f"thread(s)" + (f"; load average at start {load[0]:.1f}" if load else ""),
             "- reproduce: run the command again (same seeds, step-count training: the same numbers on the same "
             "kind of device); the pool and OUT/cells are reused, delete them to recompute from scratch",
             f"- run time: {tm.get('total_s', 0):.0f} s ("
             + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in tm.items()
                         if k not in ("total_s", "classifier_s")) + ")", ""]
    if data.get("clusters"):
        head += ["Clusters (train split: size, share, top classes):", "", "```", *data["clusters"], "```", ""]
    if res.get("grids"):
        head += ["Samples (first run; 4 per class):", ""]
        head += [f"- {name}: ![{name}]({path})" for name, path in res["grids"].items()]
        head.append("")
    seeds_done = prog.get("train_seeds_done", cfg["train_seeds"]) if partial else cfg["train_seeds"]
    body, claims = [], []
    for study in TABLE:
        if study.name in res["studies"]:
            text, cl = study.section(res, out)
            body.append(text)
            claims += cl
    n_seeds = len(seeds_done)
    tail = ["## 7. Against the papers", "",
            "Each claim of the papers (science sheet numbers) next to ours. Test: " + RULE_TEXT + ". Each claim "
            "is tested on FD and on KID (unbiased) where both exist; a claim agrees when a test agrees and none "
            "disagrees. Verdicts: " + ", ".join(VERDICTS) + " (fewer than 2 training seeds: not tested). "
            + ("This is a quick run: toy sizes, one training seed, so nothing here is tested; it checks that the "
               "machinery works." if cfg["quick"] else
               f"{n_seeds} training seed(s) x {len(cfg['seeds'])} sampling seeds"
               + (f" (partial: {n_seeds} of {len(cfg['train_seeds'])} training seeds done, so these verdicts are "
                  "provisional)." if partial else ".")), "",
            table(["claim", "ours", "tests (effect a - b, 95% CI, p, Holm p)", "verdict"], judge(claims)), ""]
    reading = out / "reading.md"
    if reading.exists():  # a person's reading of these numbers, kept beside the report and appended to it
        tail += ["## 8. Reading", "", reading.read_text().strip(), ""]
    return "\n".join(head + body + tail)


def judge(claims: list[dict]) -> list[list[str]]:
    """Rows of the claims table: Holm's adjustment over every test of every claim, then each claim's verdict.

    Sets ``claim["verdict"]`` and each test's ``p_holm`` (claims that carry a fixed ``verdict`` and no tests,
    e.g. "not tested", keep it)."""
    tests = [t for c in claims for t in c.get("tests", [])]
    for t, p in zip(tests, holm([t["p"] if t.get("n", 0) >= 2 else float("nan") for t in tests]), strict=True):
        t["p_holm"] = p
    rows = []
    for c in claims:
        if c.get("tests"):
            c["verdict"] = verdict([word_of(t, t["p_holm"]) for t in c["tests"]], c.get("all", False))
        c.setdefault("verdict", "not tested")
        text = "; ".join(f"{t['label'] or t['metric']}: {result_text(t, 3 if t['metric'] == 'kid' else 2, t['p_holm'])}"
                         for t in c.get("tests", [])) or "-"
        rows.append([c["claim"], c["ours"], text + (f" ({c['note']})" if c.get("note") else ""), c["verdict"]])
    return rows


def rerender(out: str | Path) -> Path:
    """Rewrite OUT/report.md and its plots from OUT/results.json (e.g. after adding OUT/reading.md)."""
    import json

    out = Path(out)
    try:
        res = json.loads((out / "results.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{out / 'results.json'} does not exist: run `diffswarm eval --out {out}` "
                                "first") from None
    return write_report(res, out)


def write_report(res: dict, out: str | Path) -> Path:
    out = Path(out)
    text = render(res, out)
    return atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text))


__all__ = ["judge", "render", "rerender", "write_report"]
