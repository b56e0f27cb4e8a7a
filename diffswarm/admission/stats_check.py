"""Statistics attested like experts (issue 18, item 5): a validator recomputes a cluster's routing statistics
from the data and vouches for an announced blob that matches them (pure; the validator is ``peer/validator.py``).

The statistics router (``router/stats``) uses only cluster statistics the owner signed in its manifest; with an
admission rule, also blobs that its named validators attested (``subject = "stats"`` attestations), so a swarm
whose clusters join after the owner signed, or whose owner is offline, still routes by checked statistics.
The recomputation is ``publish.cluster_stats`` over the partition's **train** split of the cluster (what the
cluster's expert trained on, as ``write_cluster_stats`` does beside its checkpoint), rounded through the wire
format; an announced blob agrees when its counts and class histogram are equal and every array is within
``STATS_TOLERANCE`` of the recomputation (relative to the array's largest magnitude: the wire stores means and
variances as float16).
"""

from __future__ import annotations

import numpy as np

from diffswarm.data.datasets import ImageDataset
from diffswarm.data.partition import Partition
from diffswarm.router.stats.basis import DCTBasis
from diffswarm.router.stats.blob import ClusterStats
from diffswarm.router.stats.publish import cluster_stats

STATS_TOLERANCE = 2e-3


def recompute_stats(part: Partition, train: ImageDataset, k: int, like: ClusterStats) -> ClusterStats:
    """Cluster k's statistics from ``train`` (the partition's own split) in the basis of ``like`` (the announced
    blob: its basis and whether it carries per-class moments), rounded through the wire format."""
    import torch

    part.check_dataset(train)
    rows = torch.from_numpy(part.indices(k))
    basis = DCTBasis.from_name(like.basis, tuple(part.image_shape))
    mine = cluster_stats(train.images[rows], train.labels[rows], train.num_classes, basis,
                         per_class=like.class_means is not None, cluster=k, partition_hash=part.partition_hash,
                         dataset_id=part.dataset_id)
    return ClusterStats.from_bytes(mine.to_bytes())


def stats_disagree(announced: ClusterStats, mine: ClusterStats, tol: float = STATS_TOLERANCE) -> str | None:
    """Why ``announced`` is not the recomputed ``mine`` (None: it agrees)."""
    same = [("cluster", announced.cluster, mine.cluster), ("partition", announced.partition_hash,
                                                            mine.partition_hash),
            ("image shape", tuple(announced.image_shape), tuple(mine.image_shape)),
            ("count", announced.count, mine.count), ("classes", announced.num_classes, mine.num_classes),
            ("class histogram", list(announced.class_hist), list(mine.class_hist))]
    for what, a, b in same:
        if a != b:
            return f"{what} {a!r}, recomputed {b!r}"
    for what in ("mean", "feat_cov", "resid_var", "class_means", "within_cov"):
        a, b = getattr(announced, what), getattr(mine, what)
        if a is None and b is None:
            continue
        if a is None or b is None or a.shape != b.shape:
            return f"{what} is missing or of another shape"
        scale = float(np.abs(b).max()) if b.size else 0.0
        err = float(np.abs(a - b).max()) if b.size else 0.0
        if not err <= tol * max(scale, 1e-6):
            return f"{what} differs by {err:.3g} (largest magnitude {scale:.3g})"
    return None
