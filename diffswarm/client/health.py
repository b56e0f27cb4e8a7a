"""This client's verdict on each announcing peer (``PeerHealth``), for observers such as the dashboard."""

from __future__ import annotations

from dataclasses import dataclass

from diffswarm.client.discovery import SwarmView
from diffswarm.client.selection import Blacklist
from diffswarm.dht.records import ExpertRecord


@dataclass(frozen=True)
class PeerHealth:
    """This client's verdict on one peer (a copy for observers such as the dashboard)."""

    verdict: str  # ok (probe matched its record) | banned | skipped (serves another partition/protocol) | unverified
    #               | probation (its checkpoint is not admitted under the owner's admission rule; reason says why)
    banned_for: float = 0.0  # seconds of ban left (verdict banned)
    reason: str = ""  # last failure (banned) or why its record is not used (skipped, probation)
    latency: float | None = None  # EMA of round trips, seconds


def peer_health(records: list[ExpertRecord], view: SwarmView | None, bans: Blacklist, verified: dict[str, str],
                latency: dict[str, float], probe_latency: dict[str, float], last_error: dict[str, str],
                now: float) -> dict[str, PeerHealth]:
    """Per announcing peer, what this client makes of it (peers whose records are neither online nor
    skipped, e.g. joining, are left out)."""
    skipped = view.skipped if view is not None else {}  # "peer_id/expert_id" -> why
    probation = getattr(view, "probation", {})  # "peer_id/expert_id" -> why its checkpoint is not admitted
    out: dict[str, PeerHealth] = {}
    for r in records:
        p = r.peer_id
        lat = latency.get(p, probe_latency.get(p))
        if bans.is_banned(p, now):
            out[p] = PeerHealth("banned", bans.until[p] - now, last_error.get(p, ""), lat)
        elif verified.get(p) == "ok":
            out[p] = PeerHealth("ok", latency=lat)
        elif f"{p}/{r.expert_id}" in probation:
            out[p] = PeerHealth("probation", reason=probation[f"{p}/{r.expert_id}"], latency=lat)
        elif f"{p}/{r.expert_id}" in skipped:
            out[p] = PeerHealth("skipped", reason=skipped[f"{p}/{r.expert_id}"], latency=lat)
        elif r.state == "online":
            out[p] = PeerHealth("unverified", latency=lat)
    return out
