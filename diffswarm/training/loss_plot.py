"""The loss by flow time t of one expert's training, as a picture: ``loss_by_t.png`` beside its checkpoint.

``experts.train`` logs, per log interval, the mean loss in each of ``T_BINS`` bins of t (``train_log.jsonl``,
``loss_by_t``; t in [0, 1], t=0 data, t=1 noise). ``loss_curves`` averages those lines over consecutive stretches of
the run (early ... late), ``write_loss_plot`` draws them (matplotlib's Agg backend, imported only here) and writes
the same numbers to ``loss_by_t.json``, so the picture can be checked and redrawn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from diffswarm.utils.fileio import atomic_write

PLOT_FILE, CURVES_FILE = "loss_by_t.png", "loss_by_t.json"
MAX_LOG_BYTES = 64 << 20  # a training log larger than this is not read for the plot


def read_log(path: str | Path) -> list[dict]:
    """The lines of a ``train_log.jsonl`` that carry a ``loss_by_t`` list (a torn last line is skipped)."""
    path = Path(path)
    if path.stat().st_size > MAX_LOG_BYTES:
        raise ValueError(f"{path} is larger than {MAX_LOG_BYTES >> 20} MiB; not plotted")
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("loss_by_t"), list) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def loss_curves(lines: list[dict], parts: int = 4) -> dict:
    """``{"t": bin centres, "curves": [{"steps": [after, last], "loss": per bin (None: no sample)}, ...]}``: the
    log's intervals split into up to ``parts`` consecutive stretches, each bin averaged over a stretch's lines."""
    if not lines:
        return {"t": [], "curves": []}
    bins = len(lines[0]["loss_by_t"])
    lines = [rec for rec in lines if len(rec["loss_by_t"]) == bins]
    parts = max(1, min(parts, len(lines)))
    curves = []
    for i in range(parts):
        start, end = i * len(lines) // parts, (i + 1) * len(lines) // parts
        chunk = lines[start:end]
        loss = []
        for b in range(bins):
            vals = [float(rec["loss_by_t"][b]) for rec in chunk if isinstance(rec["loss_by_t"][b], (int, float))]
            vals = [v for v in vals if math.isfinite(v)]
            loss.append(sum(vals) / len(vals) if vals else None)
        after = lines[start - 1]["step"] if start else 0  # the stretch covers steps after..last
        curves.append({"steps": [after, chunk[-1]["step"]], "loss": loss})
    return {"t": [(b + 0.5) / bins for b in range(bins)], "curves": curves}


def write_loss_plot(out_dir: str | Path, title: str = "") -> Path | None:
    """Draw ``out_dir/train_log.jsonl`` as ``out_dir/loss_by_t.png`` (and ``loss_by_t.json``); None if the log
    has no per-t losses yet."""
    out_dir = Path(out_dir)
    curves = loss_curves(read_log(out_dir / "train_log.jsonl"))
    if not curves["curves"]:
        return None
    atomic_write(out_dir / CURVES_FILE, lambda tmp: Path(tmp).write_text(json.dumps(curves)), durable=False)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    cmap = plt.get_cmap("viridis")
    n = len(curves["curves"])
    for i, c in enumerate(curves["curves"]):
        pts = [(t, v) for t, v in zip(curves["t"], c["loss"], strict=True) if v is not None and v > 0]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, color=cmap(i / max(1, n - 1)),
                    label=f"steps {c['steps'][0]}-{c['steps'][1]}")
    ax.set_yscale("log")
    ax.set_xlabel("flow time t  (0 = data, 1 = noise)")
    ax.set_ylabel("training loss (mean per bin)")
    ax.set_xlim(0, 1)
    ax.set_title(title or "loss by t", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(out_dir / PLOT_FILE, lambda tmp: fig.savefig(tmp, format="png"), durable=False)
    finally:
        plt.close(fig)
    return out_dir / PLOT_FILE
