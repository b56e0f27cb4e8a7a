"""The statistics router: basis, closed-form posterior against exact Bayes, wire format, real data."""

import math
from dataclasses import replace

import msgpack
import numpy as np
import pytest
import scipy.fft
import torch

from diffswarm.experts.schedules import flow_point
from diffswarm.router.ensemble import RoutedEnsemble
from diffswarm.router.routing import RoutingConfig
from diffswarm.router.stats.basis import DCTBasis, frequency_order
from diffswarm.router.stats.blob import MAX_STATS_BYTES, ClusterStats, StatsFormatError
from diffswarm.router.stats.publish import cluster_stats, partition_cluster_stats
from diffswarm.router.stats.router import StatsRouter, StatsRouterOptions
from diffswarm.sampling.loop import sample

EXACT = StatsRouterOptions(var_floor=1e-12, var_floor_rel=0.0, class_shrinkage=0.0)
SHAPE = (1, 8, 8)
D, DF = 64, 16  # pixels, features
K, NC = 3, 4  # clusters, classes
MEAN_SCALE = 0.1  # cluster means close enough that posteriors overlap at moderate t


# ------------------------------------------------------------------------------- the basis


def full_basis_scipy(shape) -> np.ndarray:
    """(D, D) columns = orthonormal 2-D DCT-II functions per channel, built with scipy, in the library's order."""
    c, h, w = shape
    cols = []
    for idx in frequency_order(c, h, w):
        coef = np.zeros(shape)
        coef.reshape(-1)[idx] = 1.0
        img = np.stack([scipy.fft.idctn(coef[ch], norm="ortho") for ch in range(c)])
        cols.append(img.reshape(-1))
    return np.stack(cols, 1)


def test_frequency_order_is_zigzag_with_channels_interleaved():
    order = frequency_order(1, 4, 4)
    uv = [(int(i) // 4, int(i) % 4) for i in order[:6]]
    assert uv == [(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2)]  # JPEG zig-zag
    order3 = frequency_order(3, 4, 4)
    assert [int(i) for i in order3[:6]] == [0, 16, 32, 1, 17, 33]  # all channels of (0,0), then of (0,1)
    assert sorted(order3.tolist()) == list(range(48))


@pytest.mark.parametrize("shape,d", [((1, 8, 8), 20), ((3, 4, 6), 10)])
def test_basis_is_orthonormal_dct(shape, d):
    b = DCTBasis(shape, d)
    B = b.matrix()  # (D, d)
    assert torch.allclose(B.T @ B, torch.eye(d, dtype=torch.float64), atol=1e-12)
    ref = full_basis_scipy(shape)[:, :d]
    assert np.allclose(B.numpy(), ref, atol=1e-12)
    x = torch.randn(5, *shape, dtype=torch.float64)
    assert torch.allclose(b.features(x), x.reshape(5, -1) @ B, atol=1e-12)
    assert torch.allclose(b.from_coefficients(b.coefficients(x)), x, atol=1e-12)
    assert b.name == f"dct2d-v1:d={d}" and DCTBasis.from_name(b.name, shape) == b


# ------------------------------------------------------------------------------- a known Gaussian mixture


def make_mixture(seed=0, per_class=False):
    """K clusters, each one Gaussian that is full in the first DF DCT coefficients and diagonal after;
    with per_class, each (cluster, class) has its own feature mean and a shared within covariance."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.as_tensor(full_basis_scipy(SHAPE))  # (D, D)
    mix = []
    for _ in range(K):
        mu = MEAN_SCALE * torch.randn(D, generator=g, dtype=torch.float64)  # coefficient mean
        A = torch.randn(DF, DF, generator=g, dtype=torch.float64)
        S = 0.6 * A @ A.T / DF + 0.05 * torch.eye(DF, dtype=torch.float64)
        r = 0.02 + 0.2 * torch.rand(D - DF, generator=g, dtype=torch.float64)
        hist = torch.randint(50, 400, (NC,), generator=g)
        cmeans = mu[:DF] + 2 * MEAN_SCALE * torch.randn(NC, DF, generator=g, dtype=torch.float64) if per_class else None
        mix.append(dict(mu=mu, S=S, r=r, hist=hist, cmeans=cmeans))
    return Q, mix


def pixel_gaussian(Q, comp, cls=None):
    """Pixel-space mean (D,) and covariance (D, D) of one cluster (or one cluster-class)."""
    mu = comp["mu"].clone()
    if cls is not None:
        mu[:DF] = comp["cmeans"][cls]
    cov = torch.zeros(D, D, dtype=torch.float64)
    cov[:DF, :DF] = comp["S"]
    cov[DF:, DF:] = torch.diag(comp["r"])
    return Q @ mu, Q @ cov @ Q.T


def exact_log_posterior(Q, mix, xt, t, labels, per_class=False):
    """Bayes: log p(k | x_t, c) with each cluster's pixel Gaussian noised to N(a m, a^2 S + b^2 I)."""
    a, b = 1 - t, t
    hist = torch.stack([c["hist"] for c in mix]).double()  # (K, NC)
    flat = xt.reshape(len(xt), -1)  # (N, D)
    lab = labels.long()
    prior = torch.where((lab >= 0)[:, None], (hist / hist.sum(0))[:, lab.clamp_min(0)].T, hist.sum(1) / hist.sum())
    out = prior.log()  # (N, K)
    eye = torch.eye(D, dtype=torch.float64)
    for k, comp in enumerate(mix):
        for c in (range(-1, NC) if per_class else [None]):
            rows = (lab == c) if c is not None else torch.ones(len(lab), dtype=torch.bool)
            m, S = pixel_gaussian(Q, comp, c if (c is not None and c >= 0) else None)
            dist = torch.distributions.MultivariateNormal(a * m, a * a * S + b * b * eye)
            out[rows, k] += dist.log_prob(flat[rows])
    return out.log_softmax(-1)


def true_stats(Q, mix, per_class=False):
    basis = DCTBasis(SHAPE, DF)
    out = []
    for k, comp in enumerate(mix):
        cm = cw = None
        if per_class:
            cm, cw = comp["cmeans"].numpy(), comp["S"].numpy()
        out.append(ClusterStats(
            image_shape=SHAPE, basis=basis.name, num_classes=NC, count=int(comp["hist"].sum()),
            class_hist=comp["hist"].numpy(), mean=(Q @ comp["mu"]).numpy(), feat_cov=comp["S"].numpy(),
            resid_var=comp["r"].numpy(), class_means=cm, within_cov=cw, cluster=k,
        ))
    return out


def draw(Q, mix, n, seed, per_class=False):
    """(n, 1, 8, 8) images, labels, clusters drawn from the mixture (cluster and class by the histograms)."""
    g = torch.Generator().manual_seed(seed)
    hist = torch.stack([c["hist"] for c in mix]).double()
    cell = torch.multinomial(hist.reshape(-1) / hist.sum(), n, replacement=True, generator=g)
    ks, cs = cell // NC, cell % NC
    x = torch.empty(n, D, dtype=torch.float64)
    for k in range(K):
        for c in range(NC):
            rows = ((ks == k) & (cs == c)).nonzero(as_tuple=True)[0]
            m, S = pixel_gaussian(Q, mix[k], c if per_class else None)
            L = torch.linalg.cholesky(S)
            x[rows] = m + torch.randn(len(rows), D, generator=g, dtype=torch.float64) @ L.T
    return x.reshape(n, *SHAPE), cs, ks


def noised(x0, t, seed):
    g = torch.Generator().manual_seed(seed)
    return flow_point(x0, torch.randn(x0.shape, generator=g, dtype=x0.dtype), torch.full((len(x0),), t, dtype=x0.dtype))


@pytest.mark.parametrize("per_class", [False, True])
def test_closed_form_equals_exact_bayes(per_class):
    """With the true statistics the router's posterior is the exact Bayes posterior (float64 rounding)."""
    Q, mix = make_mixture(1, per_class)
    router = StatsRouter(true_stats(Q, mix, per_class), EXACT)
    x0, labels, _ = draw(Q, mix, 40, seed=2, per_class=per_class)
    labels = labels.clone()
    labels[::3] = -1  # some rows unconditional
    for t in (0.0, 0.05, 0.3, 0.7, 0.95, 1.0):
        xt = noised(x0, t, seed=3)
        got = router(xt, torch.full((40,), t, dtype=torch.float64), labels)
        want = exact_log_posterior(Q, mix, xt, t, labels, per_class)
        assert torch.allclose(got.exp(), want.exp(), rtol=0, atol=1e-9), t
        if 0.3 <= t < 1:
            assert want.exp().max(-1).values.mean() < 0.99  # the posteriors overlap: not a trivial check


def test_estimated_stats_match_exact_posterior():
    """Stats estimated from 1,000-ish samples per cluster (and sent through the float16 wire format)
    give a posterior close to exact Bayes at every t."""
    Q, mix = make_mixture(4)
    x, labels, clusters = draw(Q, mix, 3000, seed=5)
    basis = DCTBasis(SHAPE, DF)
    stats = partition_cluster_stats(x.float(), labels, clusters, K, NC, basis)
    stats = [ClusterStats.from_bytes(s.to_bytes()) for s in stats]
    router = StatsRouter(stats, StatsRouterOptions(var_floor_rel=0.0))
    x0, lab, _ = draw(Q, mix, 300, seed=6)
    lab[::2] = -1
    for t in (0.0, 0.2, 0.5, 0.8):
        xt = noised(x0, t, seed=7)
        p = router.probs(xt.float(), torch.full((300,), t), lab).double()
        q = exact_log_posterior(Q, mix, xt, t, lab).exp()
        err = (p - q).abs().sum(-1) / 2  # total variation per row
        assert err.mean() < 0.06 and err.max() < 0.35, (t, float(err.mean()), float(err.max()))


def test_t1_posterior_is_the_class_conditional_prior():
    Q, mix = make_mixture(8)
    router = StatsRouter(true_stats(Q, mix))
    x = torch.randn(6, *SHAPE)
    labels = torch.tensor([0, 1, 2, 3, -1, 7])  # 7 is out of range: unconditional
    p = router.probs(x, torch.ones(6), labels)
    hist = torch.stack([c["hist"] for c in mix]).double()  # (K, NC)
    want = torch.cat([(hist / hist.sum(0))[:, :4].T, (hist.sum(1) / hist.sum())[None].expand(2, -1)])
    assert torch.allclose(p.double(), want, atol=1e-7)


def test_probs_contract_dtype_device_and_drop_in_ensemble():
    Q, mix = make_mixture(9)
    router = StatsRouter(true_stats(Q, mix))
    assert (router.cfg.num_clusters, router.cfg.num_classes, router.cfg.channels, router.cfg.size) == (K, NC, 1, 8)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(5, *SHAPE, dtype=dtype)
        p = router.probs(x, torch.rand(5), torch.tensor([0, 1, -1, 2, 3]))
        assert p.dtype == torch.float32 and p.shape == (5, K) and p.device == x.device
        assert torch.allclose(p.sum(-1), torch.ones(5), atol=1e-6)
    p_scalar_t = router.probs(x, torch.tensor(0.4), torch.zeros(5, dtype=torch.long))
    assert torch.allclose(p_scalar_t, router.probs(x, torch.full((5,), 0.4), torch.zeros(5, dtype=torch.long)))

    class Shift:  # expert k pulls towards k
        def __init__(self, k):
            self.k = k

        def velocity(self, x, t, labels, guidance=1.0):
            return x - float(self.k)

    ens = RoutedEnsemble([Shift(k) for k in range(K)], router, RoutingConfig("top-k", 1))
    out = sample(ens, torch.randn(4, *SHAPE), torch.tensor([0, 1, 2, -1]), steps=4)
    assert out.shape == (4, *SHAPE) and torch.isfinite(out).all()


@pytest.mark.parametrize("options,margin", [(StatsRouterOptions(var_floor_rel=0.0), 0.25),
                                            (StatsRouterOptions(), 0.15)])
def test_beats_uniform_top1_at_moderate_t(options, margin):
    """At t = 0.5 the router's top-1 beats a uniform router (1/K) and the best constant guess, both
    with the exact model and with the default (regularising) variance floor."""
    Q, mix = make_mixture(10)
    x, labels, clusters = draw(Q, mix, 3000, seed=11)
    stats = partition_cluster_stats(x.float(), labels, clusters, K, NC, DCTBasis(SHAPE, DF))
    router = StatsRouter(stats, options)
    x0, lab, ks = draw(Q, mix, 1000, seed=12)
    unc = torch.full_like(lab, -1)
    p = router.probs(noised(x0, 0.5, 13).float(), torch.full((1000,), 0.5), unc)
    acc = float((p.argmax(1) == ks).float().mean())
    prior_acc = float((ks == torch.stack([c["hist"].sum() for c in mix]).argmax()).float().mean())
    assert acc > max(1 / K, prior_acc) + margin, (acc, prior_acc)


# ------------------------------------------------------------------------------- wire format


def example_stats(shape=SHAPE, d=DF, per_class=False, n=200, num_classes=NC):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, *shape, generator=g) * 2 - 1
    labels = torch.randint(0, max(num_classes, 1), (n,), generator=g)
    return cluster_stats(x, labels, num_classes, DCTBasis(shape, d), per_class=per_class, cluster=2,
                         partition_hash="ab" * 32, dataset_id="digits:8")


@pytest.mark.parametrize("per_class", [False, True])
def test_round_trip(per_class):
    s = example_stats(per_class=per_class)
    blob = s.to_bytes()
    r = ClusterStats.from_bytes(blob)
    assert (r.image_shape, r.basis, r.num_classes, r.count, r.cluster, r.partition_hash, r.dataset_id) == (
        s.image_shape, s.basis, s.num_classes, s.count, s.cluster, s.partition_hash, s.dataset_id)
    assert np.array_equal(r.class_hist, s.class_hist)
    assert np.allclose(r.mean, s.mean, atol=1e-3) and np.allclose(r.resid_var, s.resid_var, rtol=1e-3, atol=1e-6)
    assert np.allclose(r.feat_cov, s.feat_cov, rtol=1e-6, atol=1e-7)
    assert (r.class_means is None) == (not per_class)
    assert r.to_bytes() == blob  # the wire form is a fixed point


def test_unknown_fields_are_ignored_and_newer_versions_parse():
    d = msgpack.unpackb(example_stats().to_bytes(), raw=False)
    d.update(version=7, future_field=[1, 2, 3])
    r = ClusterStats.from_bytes(msgpack.packb(d, use_bin_type=True))
    assert r.extra == {"future_field": [1, 2, 3]}


def _mutated(**changes) -> bytes:
    d = msgpack.unpackb(example_stats().to_bytes(), raw=False)
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k)
        else:
            d[k] = v
    return msgpack.packb(d, use_bin_type=True)


_DROP = object()
_NAN16 = {"dtype": "<f2", "data": np.full(D, np.nan, dtype="<f2").tobytes()}
_NEG_RESID = {"dtype": "<f2", "data": np.full(D - DF, -1.0, dtype="<f2").tobytes()}
_BAD_COV = -np.eye(DF)[np.triu_indices(DF)]


@pytest.mark.parametrize("blob,match", [
    (b"", "msgpack"),
    (b"\xc1garbage", "msgpack"),
    (example_stats().to_bytes()[:-10], "msgpack"),
    (msgpack.packb([1, 2, 3]), "map"),
    (b"\x91" * 5000, "msgpack|map"),  # deeply nested arrays
    (b"\xdd\xff\xff\xff\xff", "msgpack"),  # array header claiming 2^32 items
    (_mutated(format="other"), "format"),
    (_mutated(version=0), "version"),
    (_mutated(version=True), "version"),
    (_mutated(count=-1), "count"),
    (_mutated(count=3.0), "count"),
    (_mutated(count=_DROP), "count"),
    (_mutated(class_hist=[1, 2, 3]), "class_hist"),
    (_mutated(class_hist=[1, 1, 1, 1]), "sums"),
    (_mutated(image_shape=[1, 8]), "image_shape"),
    (_mutated(image_shape=[3, 1000, 1000]), "bound"),
    (_mutated(image_shape=[1, 4, 4]), "basis|bytes"),
    (_mutated(basis="pca:d=16"), "basis"),
    (_mutated(basis="dct2d-v1:d=65"), "basis"),
    (_mutated(mean=_NAN16), "non-finite"),
    (_mutated(mean={"dtype": "<f8", "data": b"\x00" * 8 * D}), "array"),
    (_mutated(mean={"dtype": "<f2", "data": b"\x00" * 10}), "bytes"),
    (_mutated(mean=[0.0] * D), "array"),
    (_mutated(resid_var=_NEG_RESID), "negative"),
    (_mutated(feat_cov={"dtype": "<f4", "data": _BAD_COV.astype("<f4").tobytes()}), "semi-definite"),
    (_mutated(cluster=-2), "cluster"),
    (_mutated(dataset_id="x" * 1000), "dataset_id"),
    (_mutated(class_means={"dtype": "<f2", "data": b"\x00" * 2 * NC * DF}), "within_cov"),
    (b"\x00" * (MAX_STATS_BYTES + 1), "exceeds"),
])
def test_malformed_blobs_are_refused(blob, match):
    with pytest.raises(StatsFormatError, match=match):
        ClusterStats.from_bytes(blob)


def test_oversized_blob_is_refused_before_parsing():
    d = msgpack.unpackb(example_stats().to_bytes(), raw=False)
    d["padding"] = b"\x00" * MAX_STATS_BYTES
    with pytest.raises(StatsFormatError, match="exceeds"):
        ClusterStats.from_bytes(msgpack.packb(d, use_bin_type=True))
    with pytest.raises(StatsFormatError, match="bytes"):
        ClusterStats.from_bytes("not bytes")
    assert issubclass(StatsFormatError, ValueError)


@pytest.mark.parametrize("shape,per_class,limit", [
    ((1, 28, 28), False, 9_000),
    ((1, 28, 28), True, 15_000),
    ((3, 32, 32), False, 18_000),
    ((3, 32, 32), True, 24_000),
])
def test_size_bound_at_d48(shape, per_class, limit):
    s = example_stats(shape, 48, per_class, n=64, num_classes=10)
    blob = s.to_bytes()
    assert len(blob) <= limit <= MAX_STATS_BYTES
    assert ClusterStats.from_bytes(blob).d == 48


def test_to_bytes_refuses_over_the_bound():
    s = example_stats((1, 64, 64), 128, per_class=True, n=16, num_classes=100)
    with pytest.raises(ValueError, match="bound"):
        s.to_bytes()


def test_router_refuses_inconsistent_stats():
    a, b = replace(example_stats(), cluster=0), replace(example_stats(d=8), cluster=1)
    with pytest.raises(ValueError, match="disagree"):
        StatsRouter([a, b])
    with pytest.raises(ValueError, match="order them"):
        StatsRouter([a, a])  # both say cluster 0
    with pytest.raises(ValueError, match="partitions"):
        StatsRouter([a, replace(a, cluster=1, partition_hash="cd" * 32)])


# ------------------------------------------------------------------------------- real data


def test_digits_top1_beats_uniform():
    """sklearn digits (8x8), K=4: stats from each cluster alone route held-out images to the
    partition's cluster of x0 far better than a uniform router (1/K) or the best constant guess.
    Measured with the trained router's own evaluation, ``router_accuracy_by_t``."""
    from diffswarm.data import load_dataset, make_partition
    from diffswarm.router.train import router_accuracy_by_t

    train, test = load_dataset("digits"), load_dataset("digits", "test")
    part = make_partition(train, 4)
    stats = partition_cluster_stats(train.images, train.labels, torch.as_tensor(part.assignments), 4,
                                    train.num_classes, DCTBasis(train.shape, 48))
    router = StatsRouter([ClusterStats.from_bytes(s.to_bytes()) for s in stats])
    clusters = torch.as_tensor(part.assign(test.images))
    best_constant = float(torch.bincount(clusters, minlength=4).max()) / len(clusters)
    times = (0.0, 0.2, 0.5, 1.0)
    rows = {cond: {r["t"]: r["top1"] for r in router_accuracy_by_t(router, test.images, test.labels, clusters,
                                                                     times=times, conditional=cond)}
            for cond in (False, True)}
    for t in (0.0, 0.2):
        assert rows[False][t] > 0.85 and rows[True][t] > 0.85, rows
    assert rows[False][0.5] > best_constant + 0.3, rows
    assert math.isclose(rows[False][1.0], float((clusters == int(np.argmax(part.shares()))).double().mean()))
