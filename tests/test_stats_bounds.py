"""Every field of a cluster-statistics blob is bounded by what a real cluster of images in [-1, 1] can produce
(router/stats/blob.py, ``_check_cluster_scale``): forged counts, means and variances are refused with a message
naming the field."""

import msgpack
import numpy as np
import pytest
import torch

from diffswarm.router.stats.basis import DCTBasis
from diffswarm.router.stats.blob import MAX_COUNT, ClusterStats, StatsFormatError
from diffswarm.router.stats.publish import cluster_stats
from diffswarm.router.stats.router import StatsRouter

SHAPE, DF, NC = (1, 8, 8), 16, 4
D = 64


def stats(x=None, n=200, per_class=True, seed=0, cluster=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g) * 2 - 1 if x is None else x
    labels = torch.randint(0, NC, (len(x),), generator=g)
    return cluster_stats(x, labels, NC, DCTBasis(SHAPE, DF), per_class=per_class, cluster=cluster)


def mutated(**changes) -> bytes:
    d = msgpack.unpackb(stats().to_bytes(), raw=False)
    d.update(changes)
    return msgpack.packb(d, use_bin_type=True)


def arr(values, dtype) -> dict:
    return {"dtype": dtype, "data": np.asarray(values, dtype=dtype).tobytes()}


def triu(m):
    return np.asarray(m)[np.triu_indices(len(m))]


def refused(blob, match):
    with pytest.raises(StatsFormatError, match=match):
        ClusterStats.from_bytes(blob)


def test_extreme_real_clusters_are_accepted():
    """The largest variance images in [-1, 1] can have (half the pixels -1, half +1 at random), a constant cluster,
    one image alone and a cluster of two: all real, all accepted."""
    g = torch.Generator().manual_seed(1)
    binary = (torch.rand(300, *SHAPE, generator=g) < 0.5).float() * 2 - 1
    for x in (binary, torch.full((50, *SHAPE), 0.7), torch.full((1, *SHAPE), -1.0), binary[:2]):
        s = stats(x, per_class=len(x) > 4)
        r = ClusterStats.from_bytes(s.to_bytes())
        assert r.count == len(x)


def test_count_is_at_least_one_and_at_most_the_bound():
    refused(mutated(count=0, class_hist=[0] * NC), "count must be an int in 1")
    refused(mutated(count=MAX_COUNT + 1, class_hist=[MAX_COUNT + 1, 0, 0, 0]), "count must be an int in 1")
    refused(mutated(class_hist=[10**6, 0, 0, 0]), "class_hist")  # a histogram that is not the count's
    refused(mutated(count=10**6), "sums to")


def test_means_lie_in_the_data_range():
    refused(mutated(mean=arr(np.full(D, 1.5), "<f2")), "outside the data range")
    refused(mutated(mean=arr(np.r_[np.zeros(D - 1), -3.0], "<f2")), "pixel 63")
    refused(mutated(class_means=arr(np.full(NC * DF, 3.0), "<f2")), "class_means: class 0 .* norm")


def test_variances_are_within_the_data_ranges_scale():
    s = stats()
    refused(mutated(feat_cov=arr(triu(s.feat_cov * 50), "<f4")), "feat_cov: total variance")
    refused(mutated(resid_var=arr(np.full(D - DF, 5.0), "<f2")), "feat_cov: total variance")
    refused(mutated(feat_cov=arr(triu(np.eye(DF) * 80), "<f4")), "exceeds")  # one huge direction
    refused(mutated(within_cov=arr(triu(s.within_cov * 50), "<f4")), "within_cov: total variance")
    # a mean at the edge of the range leaves no room for variance: a constant -1 cluster cannot vary
    refused(mutated(mean=arr(np.full(D, -1.0), "<f2")), "exceeds")
    # one image has no variance at all
    one = stats(torch.zeros(1, *SHAPE), per_class=False)
    d = msgpack.unpackb(one.to_bytes(), raw=False)
    d["resid_var"] = arr(np.full(D - DF, 0.1), "<f2")
    refused(msgpack.packb(d, use_bin_type=True), "1 image")
    # non-finite and negative values are refused too
    refused(mutated(resid_var=arr(np.full(D - DF, np.inf), "<f2")), "non-finite")
    refused(mutated(resid_var=arr(np.full(D - DF, -0.5), "<f2")), "negative")
    refused(mutated(feat_cov=arr(triu(-np.eye(DF)), "<f4")), "semi-definite")


def test_priors_from_accepted_blobs_are_probabilities():
    """The router's priors come from counts and histograms only: for blobs within bounds they lie in [0, 1] and
    sum to 1, whatever the (bounded) counts claim."""
    blobs = [stats(seed=k, cluster=k, n=n) for k, n in enumerate([3, 200, 40])]
    big = msgpack.unpackb(blobs[0].to_bytes(), raw=False)
    big.update(count=MAX_COUNT, class_hist=[MAX_COUNT - 3, 1, 1, 1])
    blobs[0] = ClusterStats.from_bytes(msgpack.packb(big, use_bin_type=True))
    router = StatsRouter(blobs)
    x = torch.randn(6, *SHAPE)
    for labels in (torch.full((6,), -1), torch.tensor([0, 1, 2, 3, 0, 1])):
        p = router.probs(x, torch.ones(6), labels).double()  # t = 1: the prior exactly
        assert ((p >= 0) & (p <= 1)).all() and torch.allclose(p.sum(-1), torch.ones(6, dtype=torch.float64))
