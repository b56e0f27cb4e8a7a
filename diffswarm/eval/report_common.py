"""What every study's report section shares: number and table formatting, paired differences over
the runs and their verdicts, the quality table, row look-ups, and matplotlib's Agg backend."""

from __future__ import annotations

import math
from pathlib import Path

from diffswarm.eval.stats import ALPHA, RULE_TEXT, paired_test, result_text

NOISE_RULE = RULE_TEXT  # how every difference below is tested (diffswarm.eval.stats)


# ---------------------------------------------------------------------------------------------
# formatting


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt(s, digits: int = 2, scale: float = 1.0) -> str:
    """'mean ± std' of a summarize() dict (or a plain number); '-' when missing."""
    if s is None:
        return "-"
    if isinstance(s, dict):
        m, sd = s.get("mean"), s.get("std")
        if not finite(m):
            return "-"
        if finite(sd):
            return f"{m * scale:.{digits}f} ± {sd * scale:.{digits}f}"
        return f"{m * scale:.{digits}f}"
    return f"{s * scale:.{digits}f}" if finite(s) else "-"


def fmt_g(s, sig: int = 3) -> str:
    """Like :func:`fmt` with ``sig`` significant digits (for values of any magnitude, e.g. KID)."""
    if isinstance(s, dict):
        m, sd = s.get("mean"), s.get("std")
        if not finite(m):
            return "-"
        return f"{m:.{sig}g} ± {sd:.{sig}g}" if finite(sd) else f"{m:.{sig}g}"
    return f"{s:.{sig}g}" if finite(s) else "-"


def mean(s):
    return s.get("mean") if isinstance(s, dict) else s


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]  # names hold " | "
    return "\n".join(out)


def shares(v) -> str:
    return " ".join(f"{x:.2f}" for x in v) if v else "-"


def paired(a: dict, b: dict, key: str = "fd", claimed: int = 0, margin: float | None = None) -> dict:
    """The test of ``key`` of a - b over the training seeds both summaries have
    (:func:`diffswarm.eval.stats.paired_test`), with ``clear``: significant at ALPHA before any
    multiple-comparison correction (descriptive tables only; section 7's claims are Holm-adjusted)."""
    t = paired_test(a, b, key, claimed, margin)
    return {**t, "clear": bool(t["n"] >= 2 and finite(t["p"]) and t["p"] < ALPHA and t["mean"] != 0)}


def diff_text(d: dict, digits: int = 2) -> str:
    return result_text(d, digits)


def claim(text: str, ours: str, tests: list[dict | None], note: str = "") -> dict:
    """A claim of the last section: its tests (FD and KID, ...) get their verdict after Holm over the report."""
    return {"claim": text, "ours": ours, "tests": [t for t in tests if t], "note": note}


# ---------------------------------------------------------------------------------------------
# plots


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path.name


# ---------------------------------------------------------------------------------------------
# tables and claims


def quality_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        s = r["summary"]
        out.append([r["setting"], f"{fmt(s['fd'])} ({fmt(s['fd_floor'])})",
                    f"{fmt_g(s['kid'])} ({fmt_g(s['kid_floor'])})",
                    f"{fmt(s['precision'])} ({fmt(s['precision_floor'])})",
                    f"{fmt(s['recall'])} ({fmt(s['recall_floor'])})", fmt(s["class_accuracy"]),
                    f"{fmt(s['diversity'])} ({fmt(s['diversity_real'])})", fmt(s["share_tv"], 3),
                    fmt(s["calls_per_image"], 0), fmt(s["gflops_per_image"], 2)])
    return out


QUALITY_HEADER = ["setting", "FD (floor)", "KID (floor)", "precision (floor)", "recall (floor)", "class acc",
                  "diversity (real)", "share TV", "expert calls/img", "GFLOPs/img"]


def find_row(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def best_fd(rows, router):
    """The row of ``router`` with the lowest mean FD (rows without an FD last)."""
    return min((r for r in rows if r["router"] == router), key=lambda r: mean(r["summary"]["fd"]) or 1e9)


__all__ = ["NOISE_RULE", "QUALITY_HEADER", "best_fd", "claim", "diff_text", "find_row", "finite", "fmt",
           "fmt_g", "mean", "paired", "pyplot", "quality_rows", "save_plot", "shares", "table"]
