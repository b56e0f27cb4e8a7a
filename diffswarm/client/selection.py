"""Pure decisions of the swarm client: which replica to call, and whom to avoid for how long.

No network and no clock here: callers pass ``now`` (``time.monotonic()``) and measured latencies,
so every rule is unit-tested offline (Petals' ``block_selection`` habit).

Trust: a peer's announced ``throughput`` and ``load`` (in its record, or in its answers' metadata) are
claims. The client ranks replicas by what it measured itself (round trips of its own velocity calls)
and uses claims only for peers it has not called yet, and then only within plausible bounds
(``plausible_throughput``, ``plausible_load``) and never above the measured peers (``pick_replica``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

DEFAULT_LATENCY = 0.010  # seconds assumed for a peer never called yet (loopback RPC ~ 6 ms)
MAX_THROUGHPUT = 1e5  # rows/s; above this an announced figure is implausible (a 28x28 DiT expert does ~1e3 on a CPU
#                       core and ~5e4 on an H100): it counts as unknown, not as fast
UNKNOWN_THROUGHPUT = 100.0  # rows/s assumed for a missing, non-finite, zero or implausible figure (slow)
MAX_LOAD = 1e5  # rows; an announced queue above this is clipped to it, a non-finite one counts as this
RELAY_PENALTY = 5.0  # a replica reachable only through a relay counts as this many times slower (Petals announces
#                      relayed servers at 0.2x throughput): direct replicas win unless much faster


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
    relayed: bool = False  # reachable only through a libp2p circuit relay (its record says so)


def plausible_throughput(thr: float) -> float:
    """An announced throughput (rows/s) as the client uses it: finite values in (0, ``MAX_THROUGHPUT``] as they
    are; anything else (0, negative, NaN, inf, 1e300) is ``UNKNOWN_THROUGHPUT``, so it can never win."""
    return thr if math.isfinite(thr) and 0 < thr <= MAX_THROUGHPUT else UNKNOWN_THROUGHPUT


def plausible_load(load: float) -> float:
    """An announced load (rows queued) clipped to [0, ``MAX_LOAD``]; non-finite counts as ``MAX_LOAD``."""
    return min(max(load, 0.0), MAX_LOAD) if math.isfinite(load) else MAX_LOAD


def expected_seconds(rep: Replica, rows: int, latency: float | None) -> float:
    """Rough time for ``rows`` rows at ``rep`` from its announced figures: round-trip latency plus the
    queue and our rows at its throughput, both made plausible first (an unknown throughput counts as
    slow, an unknown latency as ``DEFAULT_LATENCY``)."""
    rate = plausible_throughput(rep.throughput)
    return (DEFAULT_LATENCY if latency is None else latency) + (plausible_load(rep.load) + rows) / rate


def pick_replica(replicas: Sequence[Replica], latency_ema: dict[str, float], bans: Blacklist, now: float,
                 rows: int = 1, exclude: Iterable[str] = (), prefer_sha: str | None = None,
                 current: str | None = None, hysteresis: float = 0.25) -> Replica | None:
    """The replica expected to answer ``rows`` rows soonest, among those not banned nor excluded.

    ``latency_ema``: round trips this client measured on its own velocity calls, per peer. A measured
    peer is ranked by that alone (its announced throughput and load are ignored). A peer not called yet
    is ranked by ``expected_seconds`` of its plausible announced figures, but never ahead of the best
    measured peer: its score is at least that peer's and a tie goes to the measured one. So claims only
    order the peers this client knows nothing about (a new client's first calls, or when every measured
    replica is banned, excluded or failing), an announced ``inf`` or 1e300 counts as slow, and a crowd
    of new ids claiming top speed takes no traffic from a measured replica that works.

    ``prefer_sha``: a checkpoint to stay with while any replica of it is usable (keeps a trajectory on
    one expert's weights when a cluster has several different experts). ``current``: the peer used
    last for this cluster; another replica must be expected ``hysteresis`` (25%) faster to replace it,
    so that latency noise does not make the client flip between replicas. Ties break on peer id, so
    the choice is deterministic. A relayed replica's score (measured or estimated) counts ``RELAY_PENALTY``
    times: clients prefer direct peers, and a relay's bandwidth is someone else's.
    """
    excluded = set(exclude)
    usable = [r for r in replicas if r.peer_id not in excluded and not bans.is_banned(r.peer_id, now)]
    if prefer_sha is not None and any(r.checkpoint_sha256 == prefer_sha for r in usable):
        usable = [r for r in usable if r.checkpoint_sha256 == prefer_sha]
    if not usable:
        return None

    def measured_score(r: Replica) -> float:
        s = latency_ema[r.peer_id]
        s = s if math.isfinite(s) and s >= 0 else float("inf")
        s *= RELAY_PENALTY if r.relayed else 1.0
        return s * (1 - hysteresis) if r.peer_id == current else s

    measured = [measured_score(r) for r in usable if r.peer_id in latency_ema]
    floor = min(measured, default=0.0)

    def score(r: Replica) -> tuple[float, int, float, str]:
        if r.peer_id in latency_ema:
            s = measured_score(r)
            return s, 0, s, r.peer_id
        est = expected_seconds(r, rows, None) * (RELAY_PENALTY if r.relayed else 1.0)
        return max(est, floor), 1, est, r.peer_id  # never ahead of a measured peer; claims order the unmeasured

    return min(usable, key=score)


def update_ema(old: float | None, new: float, alpha: float = 0.3) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new
