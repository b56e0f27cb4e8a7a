"""The contributors view: what each peer, and each cluster's peers together, say they served (pure).

From expert records (``ExpertRecord.served_rows`` / ``served_images`` / ``served_clients`` / ``uptime`` and
``relayed``, version 5; older records count as 0 and unknown). Every figure is the peer's own claim: nothing
here is measured or checked, and ``swarm status`` and the dashboard label it so. Used by both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from diffswarm.utils.log import format_duration


@dataclass(frozen=True)
class PeerContribution:
    """One peer's claims, summed over the experts it announces (``clients``: the most of any one expert, a lower
    bound of its distinct clients)."""

    peer_id: str
    experts: tuple[str, ...]
    clusters: tuple[int, ...]
    state: str  # online if any of its experts is online
    rows: int
    images: int
    clients: int
    uptime: float | None  # seconds online (None: an older peer that does not say)
    relayed: bool | None

    def cells(self, peer_chars: int = -8) -> tuple[str, ...]:
        """The table row; the peer id shortened to its last 8 characters (``peer_chars`` < 0, the dashboard's
        habit) or its first ``peer_chars`` (> 0, `swarm status`'s)."""
        reach = "relayed" if self.relayed else ("direct" if self.relayed is False else "-")
        pid = self.peer_id[peer_chars:] if peer_chars < 0 else self.peer_id[:peer_chars]
        return (pid, ",".join(self.experts), self.state, reach, str(self.rows), str(self.images),
                str(self.clients), "-" if self.uptime is None else format_duration(self.uptime))


PEER_COLUMNS = ("peer", "experts", "state", "reach", "rows", "images", "clients", "uptime")


@dataclass(frozen=True)
class ClusterContribution:
    """A cluster's serving peers together."""

    cluster: int | None
    peers: int
    online: int
    rows: int
    images: int


def latest_by_key(records: Sequence) -> dict[tuple[str, str], object]:
    """The newest record of each (peer, expert)."""
    out: dict[tuple[str, str], object] = {}
    for r in records:
        key = (r.peer_id, r.expert_id)
        if key not in out or r.updated > out[key].updated:
            out[key] = r
    return out


def contributors(records: Sequence) -> tuple[list[PeerContribution], list[ClusterContribution]]:
    """(per peer, most rows first; per cluster, by cluster) from expert records."""
    latest = list(latest_by_key(records).values())
    peers: dict[str, list] = {}
    for r in latest:
        peers.setdefault(r.peer_id, []).append(r)
    by_peer = []
    for pid, recs in peers.items():
        ups = [r.uptime for r in recs if getattr(r, "uptime", None) is not None]
        relayed = [r.relayed for r in recs if getattr(r, "relayed", None) is not None]
        by_peer.append(PeerContribution(
            pid, tuple(sorted(r.expert_id for r in recs)),
            tuple(sorted({r.cluster for r in recs if r.cluster is not None})),
            "online" if any(r.state == "online" for r in recs) else recs[0].state,
            sum(_count(r, "served_rows") for r in recs), sum(_count(r, "served_images") for r in recs),
            max(_count(r, "served_clients") for r in recs), max(ups) if ups else None,
            any(relayed) if relayed else None))
    by_peer.sort(key=lambda p: (-p.rows, p.peer_id))
    clusters: dict[int | None, list] = {}
    for r in latest:
        clusters.setdefault(r.cluster, []).append(r)
    by_cluster = [ClusterContribution(k, len({r.peer_id for r in rs}),
                                      len({r.peer_id for r in rs if r.state == "online"}),
                                      sum(_count(r, "served_rows") for r in rs),
                                      sum(_count(r, "served_images") for r in rs))
                  for k, rs in sorted(clusters.items(), key=lambda kv: -1 if kv[0] is None else kv[0])]
    return by_peer, by_cluster


def _count(r, name: str) -> int:
    v = getattr(r, name, None)
    return int(v) if v is not None else 0


def contributor_lines(records: Sequence) -> list[str]:
    """The contributors view as text lines (``swarm status``)."""
    by_peer, by_cluster = contributors(records)
    if not by_peer:
        return []
    lines = ["contributors (what each peer says it served; claims, not checked):"]
    lines.append("  " + "  ".join(f"{c:>12s}" for c in PEER_COLUMNS))
    lines += ["  " + "  ".join(f"{c:>12s}" for c in p.cells(12)) for p in by_peer]
    lines.append("per cluster:")
    lines += [f"  cluster {'-' if c.cluster is None else c.cluster}: {c.online}/{c.peers} peer(s) online, "
              f"{c.rows} rows, {c.images} images served" for c in by_cluster]
    return lines
