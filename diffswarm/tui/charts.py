"""Small unicode charts for a plain terminal: the swarm's coverage by cluster (``swarm status --chart``).

Pure functions of expert records (``ExpertRecord``-like: cluster, state, throughput, progress, peer_id), no
Textual: the CLI prints their lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

EIGHTHS = " \u258f\u258e\u258d\u258c\u258b\u258a\u2589\u2588"  # horizontal bar: 0/8 .. 8/8 of a cell
EMPTY = "\u00b7"  # an uncovered cluster's (empty) bar


@dataclass(frozen=True)
class ClusterCoverage:
    """One cluster as the swarm covers it now."""

    cluster: int
    online: int  # online replicas (peer, expert) of the cluster
    rows_per_s: float  # their announced throughput, summed
    joining: tuple[float, ...] = ()  # training progress of the cluster's joining experts


def coverage(records: Sequence, num_clusters: int | None = None) -> list[ClusterCoverage]:
    """Per cluster 0..K-1 (K: ``num_clusters``, else what the records announce), the newest record of
    each (peer, expert) counted: online replicas, their throughput, the progress of joining ones. Records without a
    cluster or outside 0..K-1 are left out."""
    latest: dict[tuple[str, str], object] = {}
    for r in records:
        key = (r.peer_id, r.expert_id)
        if key not in latest or r.updated >= latest[key].updated:
            latest[key] = r
    if num_clusters is None:  # no manifest: the K the records name, at least one past the largest cluster
        k = max([int(getattr(r, "num_clusters", 0)) for r in latest.values()]
                + [r.cluster + 1 for r in latest.values() if r.cluster is not None], default=0)
    else:
        k = num_clusters
    online = {c: [0, 0.0] for c in range(k)}
    joining: dict[int, list[float]] = {c: [] for c in range(k)}
    for r in latest.values():
        if r.cluster is None or not 0 <= r.cluster < k:
            continue
        if r.state == "online":
            online[r.cluster][0] += 1
            online[r.cluster][1] += max(0.0, float(r.throughput))
        elif r.state == "joining":
            joining[r.cluster].append(float(r.progress))
    return [ClusterCoverage(c, online[c][0], online[c][1], tuple(sorted(joining[c], reverse=True)))
            for c in range(k)]


def bar(value: float, top: float, width: int) -> str:
    """``value`` out of ``top`` as a bar of ``width`` cells in eighths (a nonzero value shows at least 1/8)."""
    if top <= 0 or value <= 0:
        return ""
    eighths = max(1, round(min(1.0, value / top) * width * 8))
    full, part = divmod(eighths, 8)
    return EIGHTHS[8] * full + (EIGHTHS[part] if part else "")


def coverage_chart(rows: Sequence[ClusterCoverage], width: int = 30) -> list[str]:
    """Lines of the chart: per cluster a bar of its online throughput (scaled to the busiest cluster), its
    replicas, rows/s and joining experts; uncovered clusters say so. ``width``: bar cells."""
    if not rows:
        return ["coverage: the swarm announces no clusters"]
    top = max(r.rows_per_s for r in rows)
    covered = sum(1 for r in rows if r.online)
    out = [f"coverage by cluster ({covered}/{len(rows)} covered; bar: online rows/s, longest = {top:.0f}):"]
    for r in rows:
        b = bar(r.rows_per_s, top, width) if r.online else EMPTY * width
        what = f"{r.online} online, {r.rows_per_s:7.0f} rows/s" if r.online else "UNCOVERED"
        if r.joining:
            what += "  joining " + " ".join(f"{p:.0%}" for p in r.joining)
        out.append(f"  c{r.cluster:<3d}{b:<{width}s}  {what}")
    return out
