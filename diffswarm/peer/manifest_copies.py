"""Which peers keep a copy of the owner's manifest in the DHT (version 6), and how often a peer reads it.

A DHT ``get`` returns the whole ``{swarm}_manifest`` dictionary in one message, so every peer re-announcing its copy
(~6.5 KB at K = 64) would make the key 6.5 MB at 1,000 volunteers, past p2pd's 4 MiB message cap, and every peer's
read of it (to follow a newer manifest) would pull that much. Instead the owner's peer always announces it, and so do
the first ``per_cluster(K)`` live peers of each of the first ``MANIFEST_CLUSTERS`` clusters, ranked by a hash of
their peer id (rendezvous hashing): a peer reads its own cluster's expert key and announces if it ranks among them.
The rule is deterministic (no herd of peers announcing at once), needs no estimate of the swarm's size, and heals
itself: when a copy-holder leaves, its record expires and the next peer of its cluster ranks first. Copies:
max(MIN_COPIES, min(K, MANIFEST_CLUSTERS)) at most, plus the owner's (8 + 1 at K = 64: ~60 KB). Limit: if no peer
serves one of the first ``MANIFEST_CLUSTERS`` clusters and the founder is gone, nobody keeps a copy.

A peer re-checks its place, and re-reads the manifest key to follow a newer manifest, every ``CHECK_S`` seconds
rather than at each heartbeat (``ManifestCopies``): a newer manifest reaches the peers within a minute.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterable

from diffswarm.dht.node import SwarmDHT
from diffswarm.dht.records import SwarmManifest

logger = logging.getLogger(__name__)

MANIFEST_CLUSTERS = 8  # the clusters whose peers keep copies
MIN_COPIES = 4  # copies kept besides the owner's when K is small (more peers per cluster)
CHECK_S = 60.0  # seconds between a peer's checks of its place, and between its reads of the manifest key


def per_cluster(num_clusters: int) -> int:
    """How many peers of each copy-keeping cluster announce the manifest."""
    return max(1, math.ceil(MIN_COPIES / max(1, min(num_clusters, MANIFEST_CLUSTERS))))


def rank(swarm: str, peer_id: str) -> bytes:
    """A peer's place in its cluster's order (lowest first); fixed for a swarm, so copy-holders stay put."""
    return hashlib.sha256(f"{swarm}/{peer_id}".encode()).digest()


def copy_clusters(manifest: SwarmManifest, clusters: Iterable[int | None]) -> list[int]:
    """Those of ``clusters`` (a peer's) whose peers keep copies."""
    top = min(manifest.num_clusters, MANIFEST_CLUSTERS)
    return sorted({k for k in clusters if k is not None and 0 <= k < top})


def announces_manifest(peer_id: str, clusters: Iterable[int | None], manifest: SwarmManifest,
                       peers: dict[int, set[str]], owner: bool) -> bool:
    """Whether this peer re-announces ``manifest``: always when it holds the owner key (``owner``); else when, in
    one of the ``clusters`` it serves that keeps copies, it ranks among the first ``per_cluster(K)`` of that
    cluster's live peers ``peers[k]`` (itself included: its record may not be visible yet)."""
    if owner:
        return True
    n = per_cluster(manifest.num_clusters)
    for k in copy_clusters(manifest, clusters):
        order = sorted(peers.get(k, set()) | {peer_id}, key=lambda p: rank(manifest.swarm, p))
        if peer_id in order[:n]:
            return True
    return False


async def keeps_manifest_copy(dht: SwarmDHT, manifest: SwarmManifest, clusters: Iterable[int | None],
                              owner: bool) -> bool:
    """``announces_manifest`` for this peer, reading its copy-keeping clusters' expert keys (a failed lookup:
    announce, one extra copy is harmless)."""
    mine = copy_clusters(manifest, clusters)
    if owner or not mine:
        return owner
    try:
        recs, _ = await dht.get_experts(mine)
    except Exception as e:  # the DHT briefly unreachable
        logger.debug(f"manifest copy check failed: {e!r}")
        return True
    peers: dict[int, set[str]] = {}
    for r in recs:
        if r.state != "offline" and r.cluster is not None:
            peers.setdefault(r.cluster, set()).add(r.peer_id)
    return announces_manifest(dht.peer_id.to_base58(), mine, manifest, peers, owner)


class ManifestCopies:
    """One peer's copy decision and manifest reads, redone every ``check_s`` seconds (or when what it depends on
    changes: the manifest, the peer's clusters, owning the key)."""

    def __init__(self, check_s: float = CHECK_S, clock=time.monotonic):
        self.check_s, self.clock = check_s, clock
        self._decided: tuple[tuple, bool, float] | None = None  # (inputs, keep, when)
        self._read: float | None = None  # when the manifest key was last read

    def read_due(self) -> bool:
        """Whether to read the manifest key now (to follow a newer manifest); counts the read."""
        now = self.clock()
        if self._read is not None and now - self._read < self.check_s:
            return False
        self._read = now
        return True

    async def copy_of(self, dht: SwarmDHT, manifest: SwarmManifest | None, records, owner: bool
                      ) -> SwarmManifest | None:
        """``manifest`` if this peer, announcing expert ``records``, keeps a copy of it this heartbeat, else None."""
        if manifest is None or not await self.keep(dht, manifest, {r.cluster for r in records}, owner):
            return None
        return manifest

    async def keep(self, dht: SwarmDHT, manifest: SwarmManifest, clusters: Iterable[int | None], owner: bool) -> bool:
        inputs = (manifest.issued, manifest.signature, tuple(copy_clusters(manifest, clusters)), owner)
        now = self.clock()
        if self._decided is not None and self._decided[0] == inputs and now - self._decided[2] < self.check_s:
            return self._decided[1]
        keep = await keeps_manifest_copy(dht, manifest, clusters, owner)
        self._decided = (inputs, keep, now)
        return keep
