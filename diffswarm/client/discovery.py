"""The client's picture of the swarm, rebuilt from DHT records (pure: no network, no clock).

``SwarmView.update(records)`` keeps, per cluster of the router, the online replicas whose records
match the router (partition, image shape, classes, protocol); everything else is skipped with a
reason. The router itself is the one the owner's manifest names (``dht.names.choose_manifest``):
``router_sources`` lists the peers serving exactly those bytes, ``router_mismatch`` checks a loaded
router against the manifest, so the router's config (hence ``SwarmTarget``) is the owner's word.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from diffswarm.client.selection import Replica
from diffswarm.dht.records import ClusterStatsRecord, ExpertRecord, RouterProvider, SwarmManifest
from diffswarm.protocol.wire import PROTOCOL_VERSION


@dataclass(frozen=True)
class SwarmTarget:
    """What the client's router expects of the experts it routes to."""

    num_clusters: int
    partition_hash: str  # "" = do not check
    image_shape: tuple[int, int, int]
    num_classes: int


def skip_reason(rec: ExpertRecord, target: SwarmTarget) -> str | None:
    """Why ``rec`` cannot serve this client's router (None: usable, apart from its state)."""
    if rec.protocol != PROTOCOL_VERSION:
        return f"speaks protocol {rec.protocol}, this client {PROTOCOL_VERSION}"
    if rec.cluster is None or not 0 <= rec.cluster < target.num_clusters:
        return f"cluster {rec.cluster} is not one of the router's 0..{target.num_clusters - 1}"
    if target.partition_hash and rec.partition_hash != target.partition_hash:
        return f"partition {rec.partition_hash[:12]} differs from the router's {target.partition_hash[:12]}"
    if tuple(rec.image_shape) != tuple(target.image_shape):
        return f"image shape {tuple(rec.image_shape)} differs from the router's {tuple(target.image_shape)}"
    if rec.num_classes != target.num_classes:
        return f"{rec.num_classes} classes, the router has {target.num_classes}"
    return None


GRACE_S = 20.0  # an online replica missing from one lookup stays in the view this long (see SwarmView.update)


class SwarmView:
    """Online replicas per cluster, from the latest sets of records."""

    def __init__(self, target: SwarmTarget, grace: float = GRACE_S):
        self.target, self.grace = target, grace
        self.by_cluster: list[list[Replica]] = [[] for _ in range(target.num_clusters)]
        self.joining: list[ExpertRecord] = []
        self.skipped: dict[str, str] = {}  # "peer/expert" -> reason
        self.probation: dict[str, str] = {}  # "peer/expert" -> why its checkpoint is not admitted (yet)
        self.probation_clusters: dict[str, int] = {}  # "peer/expert" -> the cluster it announces (for messages)
        # (checkpoint sha256, cluster) -> Verdict under the owner's admission rule; None: admission off (all used)
        self.admission: dict | None = None
        self._seen: dict[tuple[str, str], tuple[float, float, ExpertRecord]] = {}  # online: seen, kept until, record

    def update(self, records: list[ExpertRecord], now: float | None = None,
               lifetimes: dict[tuple[str, str], float] | None = None) -> list[str]:
        """Rebuild the view from ``records``; returns events (replicas that appeared or left).

        A DHT lookup on a loaded network can miss a record (a reply past its deadline, a heartbeat a little
        late): an online replica seen within ``grace`` seconds stays in the view until a lookup shows it
        offline, the grace runs out, or its DHT record expires (``lifetimes``: seconds each record had left
        when looked up; a peer that stops re-announcing is gone once its record lapses, as for any other
        reader of the DHT). A lookup that finds no record at all is taken for a failed lookup (an overloaded
        or unreachable DHT node answers nothing), not for every peer's death: it keeps what was seen for the
        grace period, lifetimes aside. A peer that really died is noticed at its first failed call anyway."""
        now = time.monotonic() if now is None else now
        old = {(r.peer_id, r.expert_id) for reps in self.by_cluster for r in reps}
        by_cluster: list[list[Replica]] = [[] for _ in range(self.target.num_clusters)]
        latest: dict[tuple[str, str], ExpertRecord] = {}
        for rec in records:  # one record per (peer, expert): the most recent
            key = (rec.peer_id, rec.expert_id)
            if key not in latest or rec.updated > latest[key].updated:
                latest[key] = rec
        for key, rec in latest.items():
            if rec.state == "online":
                left = (lifetimes or {}).get(key)
                until = now + self.grace if left is None else now + min(self.grace, max(0.0, left))
                self._seen[key] = (now, until, rec)
            else:
                self._seen.pop(key, None)
        empty = not records
        for key, (seen, until, rec) in list(self._seen.items()):
            if now > (seen + self.grace if empty else until):
                del self._seen[key]
            elif key not in latest:
                latest[key] = rec  # missed by this lookup: kept for the grace period
        joining, skipped, probation, probation_clusters = [], {}, {}, {}
        for (peer, eid), rec in sorted(latest.items()):
            reason = skip_reason(rec, self.target)
            if reason is not None:
                skipped[f"{peer}/{eid}"] = reason
                continue
            if rec.state == "joining":
                joining.append(rec)
            if rec.state != "online":
                continue
            verdict = None if self.admission is None else self.admission.get((rec.checkpoint_sha256, rec.cluster))
            if self.admission is not None and (verdict is None or not verdict.admitted):
                probation[f"{peer}/{eid}"] = verdict.reason if verdict else "on probation: no attestation yet"
                probation_clusters[f"{peer}/{eid}"] = rec.cluster
                continue
            by_cluster[rec.cluster].append(Replica(rec.peer_id, rec.expert_id, rec.checkpoint_sha256, rec.cluster,
                                                   rec.throughput, rec.load, tuple(rec.addrs),
                                                   relayed=bool(rec.relayed)))
        self.by_cluster, self.joining, self.skipped, self.probation = by_cluster, joining, skipped, probation
        self.probation_clusters = probation_clusters
        new = {(r.peer_id, r.expert_id) for reps in by_cluster for r in reps}
        events = [f"{eid} online at {p[:12]}" for p, eid in sorted(new - old)]
        events += [f"{eid} at {p[:12]} left" for p, eid in sorted(old - new)]
        return events

    def score(self, sha256: str, cluster: int) -> float:
        """The admitted score of a checkpoint for ``cluster`` (lower is better; 0 with admission off)."""
        v = None if self.admission is None else self.admission.get((sha256, cluster))
        return v.score if v is not None and v.score is not None else 0.0

    def replicas(self, cluster: int) -> list[Replica]:
        return self.by_cluster[cluster]

    def all_replicas(self) -> list[Replica]:
        return [r for reps in self.by_cluster for r in reps]

    def coverage(self) -> list[int]:
        """Number of online replicas per cluster."""
        return [len(r) for r in self.by_cluster]


def router_sources(providers: list[RouterProvider], manifest: SwarmManifest) -> list[RouterProvider]:
    """The providers announcing the manifest's router file (same sha256 and size), one per peer (its
    newest entry). Who they are does not matter: their bytes are checked against the sha256."""
    best: dict[str, RouterProvider] = {}
    for p in providers:
        if p.router_sha256 == manifest.router_sha256 and p.router_bytes == manifest.router_bytes:
            if p.peer_id not in best or p.updated > best[p.peer_id].updated:
                best[p.peer_id] = p
    return [best[k] for k in sorted(best)]


def router_mismatch(manifest: SwarmManifest, router_cfg, weights_sha256: str) -> str | None:
    """Why a loaded router (its ``RouterConfig`` and weights hash) is not the one ``manifest`` describes;
    None if it is. The dataset id is compared only when the router records one (older routers do not)."""
    rc = router_cfg
    checks = [
        ("weights sha256", weights_sha256, manifest.router_weights_sha256),
        ("K", rc.num_clusters, manifest.num_clusters),
        ("partition", rc.partition_hash or "", manifest.partition_hash),
        ("image shape", [rc.channels, rc.size, rc.size], list(manifest.image_shape)),
        ("classes", rc.num_classes, manifest.num_classes),
    ]
    if getattr(rc, "dataset_id", ""):
        checks.append(("dataset", rc.dataset_id, manifest.dataset_id))
    for what, have, want in checks:
        if have != want:
            return f"{what} {have!r}, the manifest says {want!r}"
    return None


# choose_stats' note on a record the owner's manifest (or its validators) refute
NOT_SIGNED = "not the statistics the owner signed (or its validators attested)"


def choose_stats(records: list[ClusterStatsRecord], manifest: SwarmManifest,
                 serving: set[tuple[str, int]] | None = None, *, allow_unsigned: bool,
                 attested: list[set[str]] | None = None) -> tuple[list[list[ClusterStatsRecord]], list[str]]:
    """Candidate statistics per cluster of ``manifest`` (best first), and why records were passed over.

    A record counts only if it is for a cluster 0..K-1 of the manifest's partition. Where the owner signed the
    cluster's hash (``SwarmManifest.signed_stats``), or its admission rule's validators attested blobs (``attested``:
    per cluster, the sha256 they recomputed from the data, ``dht.attestations.attested_stats``), only those blobs are
    accepted, from any announcer (their hash is what is trusted, as for router bytes). Elsewhere, only with
    ``allow_unsigned`` (the client passes its ``ClientConfig.allow_unsigned_stats``): records of peers serving an
    expert of that cluster (``serving``: the (peer id, cluster) pairs of online expert records), ranked by how many
    distinct peers announce the same blob (ties: by sha256), so one peer cannot outvote a cluster's replicas, but a
    crowd of Sybils serving the cluster's checkpoint can. Each candidate list holds one record per distinct blob."""
    k = manifest.num_clusters
    signed = manifest.signed_stats
    notes: list[str] = []
    by_sha: list[dict[str, dict[str, ClusterStatsRecord]]] = [{} for _ in range(k)]
    vouched = [({signed[c]} if signed[c] else set()) | (attested[c] if attested else set()) for c in range(k)]
    for r in records:
        who = f"stats of {r.peer_id[:12]} for cluster {r.cluster}"
        if r.num_clusters != k or not 0 <= r.cluster < k:
            notes.append(f"{who}: K={r.num_clusters}, the manifest's is {k}")
        elif r.partition_hash != manifest.partition_hash:
            notes.append(f"{who}: partition {r.partition_hash[:12]}, not the manifest's")
        elif vouched[r.cluster] and r.stats_sha256 not in vouched[r.cluster]:
            notes.append(f"{who}: {NOT_SIGNED}")
        elif not vouched[r.cluster] and not allow_unsigned:
            notes.append(f"{who}: the owner signed no statistics for that cluster (unsigned ones not allowed)")
        elif not vouched[r.cluster] and serving is not None and (r.peer_id, r.cluster) not in serving:
            notes.append(f"{who}: the peer serves no online expert of that cluster")
        else:
            by_sha[r.cluster].setdefault(r.stats_sha256, {})[r.peer_id] = r
    out = []
    for cands in by_sha:
        ranked = sorted(cands.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        out.append([next(iter(peers.values())) for _, peers in ranked])
    return out, notes
