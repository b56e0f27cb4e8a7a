"""Pure decisions of the swarm client: which replica to call, and whom to avoid for how long.

No network and no clock here: callers pass ``now`` (``time.monotonic()``) and measured latencies,
so every rule is unit-tested offline (Petals' ``block_selection`` habit).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

DEFAULT_LATENCY = 0.010  # seconds assumed for a peer never called yet (loopback RPC ~ 6 ms)


@dataclass
class Blacklist:
    """Bans peers with exponential backoff: ``base``, ``base*factor``, ... capped at ``max_ban``
    seconds for successive failures; a success clears the strikes."""

    base: float = 1.0
    factor: float = 2.0
    max_ban: float = 60.0
    until: dict[str, float] = field(default_factory=dict)
    strikes: dict[str, int] = field(default_factory=dict)

    def ban(self, peer: str, now: float) -> float:
        """Ban ``peer`` from ``now``; returns the ban's length in seconds."""
        n = self.strikes.get(peer, 0) + 1
        self.strikes[peer] = n
        length = min(self.max_ban, self.base * self.factor ** (n - 1))
        self.until[peer] = now + length
        return length

    def ban_for(self, peer: str, seconds: float, now: float) -> None:
        """Ban ``peer`` for ``seconds`` (a peer caught misbehaving; no backoff)."""
        self.until[peer] = max(self.until.get(peer, now), now + seconds)

    def is_banned(self, peer: str, now: float) -> bool:
        return self.until.get(peer, float("-inf")) > now

    def success(self, peer: str) -> None:
        self.strikes.pop(peer, None)
        self.until.pop(peer, None)

    def next_release(self, peers: Iterable[str], now: float) -> float | None:
        """Earliest time one of ``peers`` stops being banned (None if none is banned)."""
        times = [self.until[p] for p in peers if self.is_banned(p, now)]
        return min(times) if times else None


@dataclass(frozen=True)
class Replica:
    """One peer serving an expert for a cluster, as announced (``ExpertRecord``) plus fresher load."""

    peer_id: str
    expert_id: str
    checkpoint_sha256: str
    cluster: int
    throughput: float  # rows per second (announced or from the last response)
    load: float  # rows queued at the peer (announced or from the last response)
    addrs: tuple[str, ...] = ()


def expected_seconds(rep: Replica, rows: int, latency: float | None) -> float:
    """Rough time for ``rows`` rows at ``rep``: round-trip latency plus the queue and our rows at its
    throughput (an unknown throughput counts as slow, an unknown latency as ``DEFAULT_LATENCY``)."""
    rate = rep.throughput if rep.throughput > 0 else 100.0
    return (DEFAULT_LATENCY if latency is None else latency) + (max(rep.load, 0.0) + rows) / rate


def pick_replica(replicas: Sequence[Replica], latency_ema: dict[str, float], bans: Blacklist, now: float,
                 rows: int = 1, exclude: Iterable[str] = (), prefer_sha: str | None = None,
                 current: str | None = None, hysteresis: float = 0.25) -> Replica | None:
    """The replica expected to answer ``rows`` rows soonest, among those not banned nor excluded.

    ``prefer_sha``: a checkpoint to stay with while any replica of it is usable (keeps a trajectory on
    one expert's weights when a cluster has several different experts). ``current``: the peer used
    last for this cluster; another replica must be expected ``hysteresis`` (25%) faster to replace
    it, so that latency noise does not make the client flip between replicas. Ties break on peer id,
    so the choice is deterministic.
    """
    excluded = set(exclude)
    usable = [r for r in replicas if r.peer_id not in excluded and not bans.is_banned(r.peer_id, now)]
    if prefer_sha is not None and any(r.checkpoint_sha256 == prefer_sha for r in usable):
        usable = [r for r in usable if r.checkpoint_sha256 == prefer_sha]
    if not usable:
        return None
    def score(r: Replica) -> tuple[float, str]:
        s = expected_seconds(r, rows, latency_ema.get(r.peer_id))
        return (s * (1 - hysteresis) if r.peer_id == current else s), r.peer_id

    return min(usable, key=score)


def update_ema(old: float | None, new: float, alpha: float = 0.3) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new
