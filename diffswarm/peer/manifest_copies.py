"""Which peers keep a copy of the owner's manifest in the DHT (version 6).

A DHT ``get`` returns the whole ``{swarm}_manifest`` dictionary in one message, so every peer re-announcing its copy
(~6.5 KB at K = 64) would make the key 6.5 MB at 1,000 volunteers, past p2pd's 4 MiB message cap. Instead the
owner's peer always announces it, and so do the first ``per_cluster(K)`` peers of each of the first
``MANIFEST_CLUSTERS`` clusters, ranked by a hash of their peer id (rendezvous hashing): each peer reads its own
cluster's expert key (~16 entries at that scale) and announces if it ranks among them. The rule is deterministic
(no herd of peers announcing at once), needs no estimate of the swarm's size, and heals itself: when a copy-holder
leaves, its record expires and the next peer of its cluster ranks first. Copies: about max(MIN_COPIES, min(K,
MANIFEST_CLUSTERS)) plus the owner's, so at most ~64 x 17 KB (``MAX_MANIFEST_BYTES`` plus the DHT's subkey and
signature) ~ 1.1 MB, and the swarm outlives its founder while any peer serves one of those clusters.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable

from diffswarm.dht.node import SwarmDHT
from diffswarm.dht.records import SwarmManifest

logger = logging.getLogger(__name__)

MANIFEST_CLUSTERS = 64  # the clusters whose peers keep copies
MIN_COPIES = 4  # copies kept (besides the owner's) when every cluster has enough peers; small K: more per cluster


def per_cluster(num_clusters: int) -> int:
    """How many peers of each copy-keeping cluster announce the manifest."""
    return max(1, math.ceil(MIN_COPIES / max(1, min(num_clusters, MANIFEST_CLUSTERS))))


def rank(swarm: str, peer_id: str) -> bytes:
    """A peer's place in its cluster's order (lowest first); fixed for a swarm, so copy-holders stay put."""
    return hashlib.sha256(f"{swarm}/{peer_id}".encode()).digest()


def announces_manifest(peer_id: str, clusters: Iterable[int | None], manifest: SwarmManifest,
                       peers: dict[int, set[str]], owner: bool) -> bool:
    """Whether this peer re-announces ``manifest``: always when it holds the owner key (``owner``); else when, in
    one of the ``clusters`` it serves that keeps copies, it ranks among the first ``per_cluster(K)`` of that
    cluster's live peers ``peers[k]`` (itself included, its record may not be visible yet)."""
    if owner:
        return True
    k_max, n = min(manifest.num_clusters, MANIFEST_CLUSTERS), per_cluster(manifest.num_clusters)
    for k in clusters:
        if k is None or not 0 <= k < k_max:
            continue
        order = sorted(peers.get(k, set()) | {peer_id}, key=lambda p: rank(manifest.swarm, p))
        if peer_id in order[:n]:
            return True
    return False


async def keeps_manifest_copy(dht: SwarmDHT, manifest: SwarmManifest, clusters: Iterable[int | None],
                              owner: bool) -> bool:
    """``announces_manifest`` for this peer, reading its clusters' expert keys (a failed lookup: announce)."""
    mine = sorted({k for k in clusters if k is not None and 0 <= k < min(manifest.num_clusters, MANIFEST_CLUSTERS)})
    if owner or not mine:
        return owner
    try:
        recs, _ = await dht.get_experts(mine)
    except Exception as e:  # the DHT briefly unreachable: one extra copy is harmless
        logger.debug(f"manifest copy check failed: {e!r}")
        return True
    peers: dict[int, set[str]] = {}
    for r in recs:
        if r.state != "offline" and r.cluster is not None:
            peers.setdefault(r.cluster, set()).add(r.peer_id)
    return announces_manifest(dht.peer_id.to_base58(), mine, manifest, peers, owner)
