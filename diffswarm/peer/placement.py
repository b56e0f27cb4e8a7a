"""Where a volunteer's expert is most useful: which cluster to join, which objective, and when a serving peer should
move (pure: records in, decisions out; no network, no clock).

Petals' ``block_selection.py`` is the model: a joining server takes the span the swarm serves worst, and a serving one
moves only when the swarm's balance quality is below 0.75 and its move improves it; users asked for a confirmation
delay before moving (Petals PR #493), which ``RebalanceWatch`` adds.

Coverage of cluster k (``ClusterCover``): the live, usable experts announced for it (``online`` or ``joining``: a
joining expert is one somebody already chose; usable: it fits the owner's manifest), relative to the cluster's share
of the data, and the throughput its online experts announce (a claim, used only to break ties).

Balance quality (``balance_quality``): with N live experts in all, cluster k deserves N * share_k of them; the quality
is the share of the data whose cluster has what it deserves, a cluster with less counting in proportion:
sum_k share_k * min(1, experts_k / (N * share_k)). 1: every cluster has at least its fair number; a cluster without a
live expert takes its whole share off. (Petals' quality is the throughput of its chain of blocks, set by the worst
block; a mixture's clusters are not a chain: each serves its own share of the images, so the shares add up.)
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from diffswarm.dht.records import ExpertRecord, SwarmManifest
from diffswarm.experts.config import OBJECTIVES
from diffswarm.protocol.wire import PROTOCOL_VERSION

LIVE_STATES = ("online", "joining")
BALANCE_THRESHOLD = 0.75  # Petals' ``balance_quality`` below which a server moves
BALANCE_MARGIN = 0.1  # a move must raise the balance quality by at least this much


@dataclass(frozen=True)
class ClusterCover:
    """How well one cluster is served."""

    cluster: int
    share: float  # the cluster's share of the partition's data
    experts: int  # live usable experts (online or joining)
    throughput: float  # rows/s its online experts announce together (a claim)

    @property
    def need(self) -> tuple[float, float]:
        """Sort key, smallest first: experts per data share, then throughput per share (Petals' ``choose_best_blocks``
        takes the span of least throughput)."""
        return (self.experts / self.share, self.throughput / self.share)


def fits(rec: ExpertRecord, manifest: SwarmManifest) -> bool:
    """Whether ``rec``'s expert can serve the swarm of ``manifest`` (protocol, cluster, partition, shape, classes)."""
    return (rec.protocol == PROTOCOL_VERSION and rec.cluster is not None and 0 <= rec.cluster < manifest.num_clusters
            and rec.num_clusters == manifest.num_clusters and rec.partition_hash == manifest.partition_hash
            and list(rec.image_shape) == list(manifest.image_shape) and rec.num_classes == manifest.num_classes)


def live_records(records: Iterable[ExpertRecord], manifest: SwarmManifest,
                 exclude_peer: str | None = None) -> list[ExpertRecord]:
    """The newest record of each (peer, expert) that is live and fits ``manifest``; ``exclude_peer``: leave out that
    peer's records (a restarted volunteer's own, older ones)."""
    latest: dict[tuple[str, str], ExpertRecord] = {}
    for r in records:
        key = (r.peer_id, r.expert_id)
        if key not in latest or r.updated > latest[key].updated:
            latest[key] = r
    return [r for r in latest.values()
            if r.state in LIVE_STATES and r.peer_id != exclude_peer and fits(r, manifest)]


def coverage(records: Iterable[ExpertRecord], manifest: SwarmManifest, shares: Sequence[float],
             exclude_peer: str | None = None) -> list[ClusterCover]:
    """Per cluster 0..K-1 of ``manifest``, its ``ClusterCover`` from the announced ``records``; ``shares``: the
    partition's cluster shares (K of them)."""
    k = manifest.num_clusters
    if len(shares) != k:
        raise ValueError(f"{len(shares)} cluster shares for K={k}")
    experts, thr = [0] * k, [0.0] * k
    for r in live_records(records, manifest, exclude_peer):
        experts[r.cluster] += 1
        if r.state == "online":
            thr[r.cluster] += max(0.0, r.throughput)
    return [ClusterCover(c, float(shares[c]), experts[c], thr[c]) for c in range(k)]


def choose_cluster(cover: Sequence[ClusterCover], rng: random.Random | None = None) -> int:
    """The cluster the swarm needs most: the fewest live experts per data share, then the least announced throughput
    per share; exact ties go to a random one (``rng``; None: the lowest id), so volunteers joining together spread.
    Clusters without data are never chosen."""
    cands = [c for c in cover if c.share > 0]
    if not cands:
        raise ValueError("no cluster has any data")
    best = min(c.need for c in cands)
    tied = [c.cluster for c in cands if c.need == best]
    return tied[0] if rng is None else rng.choice(tied)


def choose_objective(records: Iterable[ExpertRecord], default: str = "fm") -> str:
    """The objective fewer live experts of ``records`` (already filtered, e.g. ``live_records``) train with; ``default``
    on a tie (the swarm mixes DDPM and FM experts: each adds what the other objective lacks)."""
    counts = {o: 0 for o in OBJECTIVES}
    for r in records:
        if r.objective in counts:
            counts[r.objective] += 1
    low = min(counts.values())
    return default if counts.get(default) == low else min(OBJECTIVES, key=lambda o: (counts[o], o))


def balance_quality(counts: Sequence[int], shares: Sequence[float]) -> float:
    """The share of the data whose cluster has its fair number of live experts (all experts times its data share),
    clusters below it counting in proportion, in [0, 1] (see the module docstring); 1.0 for a swarm without experts
    or data."""
    n, total = sum(counts), sum(s for s in shares if s > 0)
    if n == 0 or total <= 0:
        return 1.0
    return sum(s * min(1.0, c / (n * s)) for c, s in zip(counts, shares, strict=True) if s > 0) / total


@dataclass(frozen=True)
class Move:
    """A serving peer's move from cluster ``src`` to ``dst``, raising the balance quality from ``before`` to
    ``after``."""

    src: int
    dst: int
    before: float
    after: float

    def describe(self, cover: Sequence[ClusterCover]) -> str:
        return (f"cluster {self.src} has {cover[self.src].experts} live experts while cluster {self.dst} has "
                f"{cover[self.dst].experts} (balance quality {self.before:.2f}; {self.after:.2f} if this peer moved)")


def rebalance_move(cover: Sequence[ClusterCover], mine: int, threshold: float = BALANCE_THRESHOLD,
                   margin: float = BALANCE_MARGIN) -> Move | None:
    """The move of a peer serving cluster ``mine`` (counted in ``cover``) that the swarm needs, or None.

    It moves only when the balance quality is below ``threshold``, its own cluster keeps at least one live expert
    after it leaves, and the move raises the quality by at least ``margin``; it moves to the cluster
    ``choose_cluster`` picks once its own expert is left out."""
    counts = [c.experts for c in cover]
    shares = [c.share for c in cover]
    before = balance_quality(counts, shares)
    if before >= threshold or counts[mine] < 2:
        return None
    without = [ClusterCover(c.cluster, c.share, c.experts - (c.cluster == mine), c.throughput) for c in cover]
    dst = choose_cluster(without)
    if dst == mine:
        return None
    after_counts = list(counts)
    after_counts[mine] -= 1
    after_counts[dst] += 1
    after = balance_quality(after_counts, shares)
    return Move(mine, dst, before, after) if after - before >= margin else None


@dataclass(frozen=True)
class RebalanceConfig:
    """How a serving peer watches the swarm's balance (``--rebalance`` and its options)."""

    shares: tuple[float, ...]  # the partition's cluster shares
    interval: float = 120.0  # seconds between two checks
    confirmations: int = 3  # consecutive checks that must find the same move before it counts
    threshold: float = BALANCE_THRESHOLD
    margin: float = BALANCE_MARGIN
    move: bool = False  # act on a confirmed move (--rebalance); False: only say so in the log

    def __post_init__(self) -> None:
        if not self.interval > 0 or self.confirmations < 1 or not 0 < self.threshold <= 1 or not 0 < self.margin <= 1:
            raise ValueError(f"rebalancing needs interval > 0, confirmations >= 1, threshold and margin in (0, 1] "
                             f"(got {self.interval}, {self.confirmations}, {self.threshold}, {self.margin})")


class RebalanceWatch:
    """Confirms a move over several checks: ``observe`` returns the move once ``confirmations`` consecutive checks
    found the same one (same destination); a check without it starts the count again."""

    def __init__(self, confirmations: int):
        self.confirmations = confirmations
        self.seen: list[Move] = []

    def observe(self, move: Move | None) -> Move | None:
        if move is None or (self.seen and self.seen[-1].dst != move.dst):
            self.seen = []
        if move is not None:
            self.seen.append(move)
        return move if len(self.seen) >= self.confirmations else None
