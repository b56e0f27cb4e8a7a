"""The statistics behind every verdict of ``diffswarm eval``: one module, stated tests, tested against scipy.

Unit of replication
    The training seed. Sampling seeds are nested in a training seed (same weights, and the sampling
    seed also fixes the real reference subsets), so they are averaged first: :func:`seed_means` turns a
    cell summary's ``per_run`` ({"s<train seed>/r<sampling seed>": {metric: value}}) into one value per
    training seed, and :func:`paired_test` compares two settings on the training seeds both have, over
    the sampling seeds both have.

Tests (all two-sided at ``ALPHA`` unless stated)
    - difference: paired t test on the per-training-seed mean differences d_i (df = n - 1), with the
      mean difference, its 95% t confidence interval and the standardised effect d_z = mean / sd; the
      exact sign-flip permutation p (all 2^n sign patterns) is reported beside it as a check that does
      not assume normality (with n = 3 seeds its smallest possible value is 0.25, so it cannot carry a
      verdict alone: the t test does, and the report says so).
    - equivalence (TOST, Schuirmann 1987) with a stated margin m: p_equiv = max of the two one-sided t
      tests of H0: mu <= -m and H0: mu >= m. "Different by more than the margin" is the one-sided test
      of |mu| > m on the side of the observed mean. The two are exclusive, so the test's p for the
      multiple-comparison step is twice the smaller one (Bonferroni over the two directions).
    - :func:`holm`: Holm's step-down adjustment over the m hypotheses of one report.

Verdicts (:func:`verdict`), four words only
    ``agrees`` / ``disagrees``: the Holm-adjusted p is below ALPHA and the effect has (has not) the
    claimed sign, or for an equivalence claim the TOST (the "outside the margin" test) is significant;
    ``no evidence either way``: a test ran and is not significant after Holm; ``not tested``: the
    settings were not run, or fewer than 2 training seeds exist (no variance between seeds, no test).
    Non-significance is never read as agreement.
"""

from __future__ import annotations

import math
from itertools import product
from typing import Sequence

import numpy as np

ALPHA = 0.05
VERDICTS = ("agrees", "disagrees", "no evidence either way", "not tested")
RULE_TEXT = ("paired t test on per-training-seed means (sampling seeds averaged first), two-sided, Holm-adjusted "
             f"over the report's tests, alpha {ALPHA}; equivalence only by TOST with the stated margin")


def _t():
    from scipy import stats  # on the eval path only: CLI start does not pay for scipy

    return stats.t


def seed_means(per_run: dict, key: str, runs: set[str] | None = None) -> dict[int, float]:
    """{training seed: mean of ``key`` over its sampling seeds} from a ``per_run`` dict keyed "s<ts>/r<s>".

    ``runs``: only these run keys (the ones both sides of a pair have). Missing or non-finite values are skipped.
    """
    by: dict[int, list[float]] = {}
    for run, vals in per_run.items():
        if runs is not None and run not in runs:
            continue
        v = (vals or {}).get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            continue
        ts = int(run.split("/")[0].removeprefix("s"))
        by.setdefault(ts, []).append(float(v))
    return {ts: float(np.mean(v)) for ts, v in sorted(by.items())}


def sign_flip_p(d: Sequence[float]) -> float:
    """Exact two-sided sign-flip permutation p of the mean of ``d`` (all 2^n sign patterns; n <= 16)."""
    d = np.asarray(d, dtype=np.float64)
    n = len(d)
    if n == 0 or n > 16:
        return float("nan")
    obs = abs(d.mean())
    means = np.array([abs((d * np.array(s)).mean()) for s in product((1.0, -1.0), repeat=n)])
    return float((means >= obs - 1e-12 * max(1.0, obs)).mean())


def describe(d: Sequence[float], conf: float = 0.95) -> dict:
    """n, mean, sd, t, df, two-sided p, CI of the mean and d_z of one-sample differences ``d``."""
    d = np.asarray(d, dtype=np.float64)
    n = len(d)
    out = {"n": n, "mean": float(d.mean()) if n else float("nan"), "sd": float("nan"), "t": float("nan"),
           "df": n - 1, "p": float("nan"), "ci": [float("nan"), float("nan")], "dz": float("nan"),
           "p_sign_flip": sign_flip_p(d) if n else float("nan")}
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    t = _t()
    half = float(t.ppf(0.5 + conf / 2, n - 1)) * se
    out.update(sd=sd, ci=[out["mean"] - half, out["mean"] + half])
    if se == 0.0:  # identical differences: a zero effect is no evidence; a constant nonzero one is exact
        out.update(t=0.0 if out["mean"] == 0 else math.copysign(math.inf, out["mean"]),
                   p=1.0 if out["mean"] == 0 else 0.0, dz=0.0 if out["mean"] == 0 else math.copysign(math.inf,
                                                                                                  out["mean"]))
        return out
    tt = out["mean"] / se
    out.update(t=tt, p=float(2 * t.sf(abs(tt), n - 1)), dz=out["mean"] / sd)
    return out


def tost(d: Sequence[float], margin: float) -> dict:
    """Equivalence (TOST) of one-sample differences ``d`` within (-margin, margin), and the opposite test.

    Returns ``p_equiv`` (max of the one-sided p of H0: mu <= -m and H0: mu >= m), ``p_outside`` (one-sided p of
    H0: |mu| <= m on the observed side) and ``p`` = min(1, 2 min(p_equiv, p_outside)).
    """
    if not margin > 0:
        raise ValueError(f"an equivalence margin must be > 0, got {margin}")
    d = np.asarray(d, dtype=np.float64)
    n = len(d)
    if n < 2:
        return {"p_equiv": float("nan"), "p_outside": float("nan"), "p": float("nan"), "margin": margin}
    se = float(d.std(ddof=1)) / math.sqrt(n)
    m = float(d.mean())
    t = _t()
    if se == 0.0:
        inside = abs(m) < margin
        return {"p_equiv": 0.0 if inside else 1.0, "p_outside": 1.0 if inside else 0.0, "p": 0.0, "margin": margin}
    p_lo = float(t.sf((m + margin) / se, n - 1))  # H0: mu <= -m
    p_hi = float(t.cdf((m - margin) / se, n - 1))  # H0: mu >= m
    p_out = float(t.sf((abs(m) - margin) / se, n - 1))  # H0: |mu| <= m, on the side of the mean
    p_eq = max(p_lo, p_hi)
    return {"p_equiv": p_eq, "p_outside": p_out, "p": min(1.0, 2 * min(p_eq, p_out)), "margin": margin}


def holm(p: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and is not counted among the hypotheses)."""
    p = list(p)
    idx = [i for i, v in enumerate(p) if isinstance(v, (int, float)) and math.isfinite(v)]
    m = len(idx)
    out = [float("nan")] * len(p)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def paired_test(a: dict, b: dict, key: str, claimed: int = 0, margin: float | None = None,
                label: str = "") -> dict:
    """Test ``key`` of setting a minus setting b (two :func:`~diffswarm.eval.scoring.summarize_cells` summaries).

    ``claimed``: the sign of a - b the claim predicts (-1, +1; 0: none, a descriptive difference); with
    ``margin`` the test is an equivalence test (TOST) instead.
    Returns a JSON-able dict: the per-seed differences, :func:`describe`'s numbers, the runs and
    training seeds used, the test's ``p`` (the one Holm adjusts) and what the verdict needs.
    """
    ra, rb = (a or {}).get("per_run", {}), (b or {}).get("per_run", {})
    both = {r for r in ra if r in rb and _ok(ra[r].get(key)) and _ok(rb[r].get(key))}
    ma, mb = seed_means(ra, key, both), seed_means(rb, key, both)
    seeds = sorted(set(ma) & set(mb))
    d = [ma[s] - mb[s] for s in seeds]
    out = {"label": label, "metric": key, "claimed": claimed, "train_seeds": seeds, "runs": len(both),
           "diffs": d, **describe(d)}
    if margin is not None:
        out.update({"kind": "equivalence", **tost(d, margin)})
    else:
        out["kind"] = "difference"
    return out


def _ok(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def word_of(t: dict | None, p_adj: float | None = None) -> str:
    """The verdict word of one test dict from :func:`paired_test` at its Holm-adjusted p (default: its own p)."""
    if not t or t.get("n", 0) < 2:
        return "not tested"
    p = t["p"] if p_adj is None else p_adj
    if not _ok(p) or p >= ALPHA:
        return "no evidence either way"
    if t["kind"] == "equivalence":
        return "agrees" if t["p_equiv"] <= t["p_outside"] else "disagrees"
    if t["mean"] == 0 or not t.get("claimed"):
        return "no evidence either way"
    return "agrees" if (t["mean"] > 0) == (t["claimed"] > 0) else "disagrees"


def verdict(words: Sequence[str], need_all: bool = False) -> str:
    """One claim's word from its tests' words (e.g. FD and KID): agreement needs no test against it; a
    conjunction (``need_all``: "more stable AND worse") agrees only when every test agrees."""
    words = list(words)
    if not words or all(w == "not tested" for w in words):
        return "not tested"
    if need_all:
        if all(w == "agrees" for w in words):
            return "agrees"
        return "disagrees" if "disagrees" in words else "no evidence either way"
    if "agrees" in words and "disagrees" not in words:
        return "agrees"
    if "disagrees" in words and "agrees" not in words:
        return "disagrees"
    return "no evidence either way"


def result_text(t: dict | None, digits: int = 2, p_adj: float | None = None) -> str:
    """One line: effect with its CI, n, test and p (Holm-adjusted when given). KID is shown to 3 significant digits."""
    if not t or t.get("n", 0) == 0:
        return "not run"

    def f(x: float) -> str:
        return f"{x:+.3g}" if t.get("metric") == "kid" else f"{x:+.{digits}f}"

    if t["n"] < 2:
        return f"{f(t['mean'])} (1 training seed: no test)"
    lo, hi = t["ci"]
    s = (f"{f(t['mean'])} [95% CI {f(lo)}, {f(hi)}], d_z {t['dz']:+.2f}, "
         f"n = {t['n']} seeds ({t['runs']} runs); t({t['df']}) p = {t['p']:.3g}")
    if t["kind"] == "equivalence":
        s += f"; TOST margin ±{abs(t['margin']):.3g}: p_equiv = {t['p_equiv']:.3g}"
    if p_adj is not None and _ok(p_adj):
        s += f"; Holm p = {p_adj:.3g}"
    return s + f"; sign-flip p = {t['p_sign_flip']:.3g}"


__all__ = ["ALPHA", "RULE_TEXT", "VERDICTS", "describe", "holm", "paired_test", "seed_means", "sign_flip_p",
           "result_text", "word_of", "tost", "verdict"]
