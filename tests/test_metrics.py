"""Feature-space metrics: KID, improved precision/recall, diversity, seed summaries, full reports."""

import json

import numpy as np
import pytest
import torch

import diffswarm.eval.metrics as metrics
from diffswarm.data import load_dataset, make_partition
from diffswarm.eval.classifier import Classifier, ClassifierConfig, SmallCNN
from diffswarm.eval.metrics import (
    feature_metrics,
    kid,
    knn_radii,
    metric_report,
    nearest_neighbor_distance,
    per_sample_quality,
    precision_recall,
    summarize,
    summarize_runs,
    within_class_diversity,
)
from diffswarm.eval.quality import quality_report


@pytest.fixture(autouse=True)
def one_blas_thread():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def _poly(x, y):
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _naive_mmd_u(x, y):
    """Unbiased MMD^2 written out pair by pair (Binkowski et al. 2018, Eq. 2)."""
    m = len(x)
    kxx = sum(_poly(x[i : i + 1], x[j : j + 1])[0, 0] for i in range(m) for j in range(m) if i != j)
    kyy = sum(_poly(y[i : i + 1], y[j : j + 1])[0, 0] for i in range(m) for j in range(m) if i != j)
    kxy = sum(_poly(x[i : i + 1], y[j : j + 1])[0, 0] for i in range(m) for j in range(m))
    return kxx / (m * (m - 1)) + kyy / (m * (m - 1)) - 2 * kxy / m**2


# ---------------------------------------------------------------------------------------------- KID


def test_kid_matches_the_pairwise_formula():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 5)), rng.normal(0.3, 1.2, size=(30, 5))
    mean, std = kid(x, y, subsets=7, subset_size=30)  # subsets are the whole sets
    assert mean == pytest.approx(_naive_mmd_u(x, y), rel=1e-10)
    assert std == 0.0
    # torch input of any dtype gives the same number
    assert kid(torch.from_numpy(x).float(), torch.from_numpy(y).float(), 1, 30)[0] == pytest.approx(mean, rel=1e-5)


def test_kid_of_a_set_with_itself_is_the_small_negative_closed_form():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 16))
    k = _poly(a, a)
    m = len(a)
    want = -2 * (np.trace(k) / m - (k.sum() - np.trace(k)) / (m * (m - 1))) / m
    mean, _ = kid(a, a, subset_size=m)
    assert mean == pytest.approx(want, rel=1e-8)
    assert mean < 0
    assert abs(mean) < 0.2 * kid(a, a + 0.5, subset_size=m)[0]  # small next to a modest shift


def test_kid_is_unbiased_near_zero_for_one_distribution_and_grows_with_the_shift():
    rng = np.random.default_rng(2)
    # independent samples of one distribution: ~0, of either sign (a biased MMD would be > 0 every time)
    same = [kid(rng.normal(size=(200, 16)), rng.normal(size=(200, 16)), subsets=1, subset_size=200)[0]
            for _ in range(12)]
    assert min(same) < 0 < max(same)
    assert abs(np.mean(same)) < 0.005
    a, b = rng.normal(size=(1000, 16)), rng.normal(size=(1000, 16))
    vals = [kid(a, b + s, subsets=10, subset_size=500, seed=0)[0] for s in (0.0, 0.1, 0.3, 1.0)]
    assert abs(vals[0]) < 0.005
    assert vals[0] < vals[1] < vals[2] < vals[3]
    assert vals[1] > 0.02 and vals[3] > 5


def test_kid_is_deterministic_for_a_seed():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300, 8)), rng.normal(0.2, 1.0, size=(250, 8))
    assert kid(a, b, 20, 100, seed=5) == kid(a, b, 20, 100, seed=5)
    assert kid(a, b, 20, 100, seed=5) != kid(a, b, 20, 100, seed=6)
    mean, std = kid(a, b, 20, 100, seed=5)
    assert std > 0  # real subsets of 100 out of 250-300 differ
    with pytest.raises(ValueError):
        kid(a, b[:, :4])
    with pytest.raises(ValueError):
        kid(a[:1], b)


# ----------------------------------------------------------------------------- precision and recall


def test_knn_radii_exclude_the_point_itself_but_not_duplicates():
    f = np.array([[0.0], [0.0], [0.0], [5.0]])
    assert knn_radii(f, 1).tolist() == [0.0, 0.0, 0.0, 5.0]
    assert knn_radii(f, 3).tolist() == [5.0, 5.0, 5.0, 5.0]
    with pytest.raises(ValueError):
        knn_radii(f, 4)


def test_precision_recall_on_a_hand_example():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])  # k=1 radii all 1
    fake = np.array([[0.5], [10.0]])  # k=1 radii both 9.5
    p, r = precision_recall(real, fake, k=1)
    assert p == 0.5  # 0.5 is inside real balls, 10 is not
    assert r == 1.0  # every real point lies within 9.5 of 0.5


def test_precision_recall_same_distribution_is_near_one():
    rng = np.random.default_rng(4)
    p, r = precision_recall(rng.normal(size=(1000, 2)), rng.normal(size=(1000, 2)), k=3)
    assert p > 0.95 and r > 0.95


def _mixture(rng, n, modes, d=8, spread=0.3):
    centers = np.eye(d)[: len(modes)] * 4.0
    idx = rng.choice(modes, n)
    return centers[idx] + spread * rng.normal(size=(n, d))


def test_mode_collapse_keeps_precision_and_loses_recall():
    rng = np.random.default_rng(5)
    real = _mixture(rng, 1000, [0, 1, 2, 3])
    collapsed = _mixture(rng, 1000, [0])  # fake covers one mode of four
    p, r = precision_recall(real, collapsed)
    assert p > 0.8 and r < 0.3
    p_same, r_same = precision_recall(real, _mixture(rng, 1000, [0, 1, 2, 3]))
    assert r_same > 0.7 and r < r_same - 0.4


def test_broader_fake_loses_precision_and_keeps_recall():
    rng = np.random.default_rng(6)
    real = rng.normal(size=(1000, 8))
    broad = 2.5 * rng.normal(size=(1000, 8))
    p, r = precision_recall(real, broad)
    assert p < 0.3 and r > 0.9


def test_blocked_distances_give_the_same_answers(monkeypatch):
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(300, 6)), rng.normal(0.3, 1.3, size=(250, 6))
    want = precision_recall(real, fake), knn_radii(real, 3), nearest_neighbor_distance(fake, real)
    div = within_class_diversity(real, np.arange(300) % 3)["mean"]
    monkeypatch.setattr(metrics, "BLOCK_ENTRIES", 7)  # one row per block
    assert precision_recall(real, fake) == want[0]
    np.testing.assert_allclose(knn_radii(real, 3), want[1], rtol=1e-12)
    np.testing.assert_allclose(nearest_neighbor_distance(fake, real), want[2], rtol=1e-12)
    assert within_class_diversity(real, np.arange(300) % 3)["mean"] == pytest.approx(div, rel=1e-12)


def test_nearest_neighbor_distance():
    ref = np.array([[0.0, 0.0], [3.0, 4.0]])
    q = np.array([[0.0, 1.0], [3.0, 4.0], [6.0, 8.0]])
    np.testing.assert_allclose(nearest_neighbor_distance(q, ref), [1.0, 0.0, 5.0], atol=1e-12)


# -------------------------------------------------------------------------------------- diversity


def test_within_class_diversity():
    f = np.array([[0.0], [1.0], [3.0], [7.0], [7.0], [9.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    d = within_class_diversity(f, labels)
    assert d["per_class"] == {0: pytest.approx(2.0), 1: 0.0}  # pairs (1, 3, 2); identical pair
    assert d["count"] == {0: 3, 1: 2, 2: 1}  # class 2 has no pair, so no value
    assert d["mean"] == pytest.approx(1.0)
    same = within_class_diversity(np.ones((50, 16)) * 3.0, np.zeros(50))
    assert same["mean"] == 0.0
    assert np.isnan(within_class_diversity(f[:1], [0])["mean"])
    with pytest.raises(ValueError):
        within_class_diversity(f, [0, 1])


# -------------------------------------------------------------------------------- seeds and spread


def test_summarize():
    assert summarize([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    one = summarize([4.0])
    assert one["mean"] == 4.0 and np.isnan(one["std"]) and one["n"] == 1
    assert summarize([1.0, float("nan"), 3.0])["n"] == 2
    runs = [{"fd": 1.0, "kid": 0.1, "name": "a", "ok": True}, {"fd": 3.0, "kid": 0.3, "name": "b", "ok": False}]
    s = summarize_runs(runs)
    assert set(s) == {"fd", "kid"}
    assert s["fd"]["mean"] == 2.0 and s["kid"]["std"] == pytest.approx(np.std([0.1, 0.3], ddof=1))


# ------------------------------------------------------------------------------ full metric dicts


def test_feature_metrics_floors_and_sizes():
    rng = np.random.default_rng(8)
    ref, floor = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))  # held-out reference, real train subset
    good = rng.normal(size=(400, 8))
    bad = 0.2 * rng.normal(size=(400, 8)) + 1.0
    m_good = feature_metrics(good, None, ref, None, floor, kid_subsets=5, kid_subset_size=200)
    m_bad = feature_metrics(bad, None, ref, None, floor, kid_subsets=5, kid_subset_size=200)
    assert m_good["n"] == 400 and m_good["n_floor"] == 300
    assert m_good["fd_floor"] == m_bad["fd_floor"] and m_good["precision_floor"] == m_bad["precision_floor"]
    assert m_good["fd"] < 3 * m_good["fd_floor"] + 0.1 < m_bad["fd"]
    assert abs(m_good["kid"]) < 0.02 and m_bad["kid"] > 0.5
    assert abs(m_good["recall"] - m_good["recall_floor"]) < 0.15 and m_bad["recall"] < 0.1
    assert m_bad["diversity"] < 0.3 * m_bad["diversity_real"]
    with pytest.raises(ValueError, match="floor_feats"):
        feature_metrics(good, None, ref, None, floor[:10])  # the floor must match the reference's size
    with pytest.raises(ValueError, match="outnumber"):
        feature_metrics(good[:100], None, ref, None, floor)


@pytest.fixture(scope="module")
def digits():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    torch.manual_seed(0)
    c, h, w = tr.shape
    # an untrained network is enough to check the plumbing; its features still tell noise from digits
    clf = Classifier(SmallCNN(c, tr.num_classes), ClassifierConfig(c, h, w, tr.num_classes, tr.dataset_id,
                                                                   tr.content_hash, epochs=0, seed=0))
    return tr, te, clf


def test_metric_report_matches_quality_report_and_separates_noise(digits):
    tr, te, clf = digits
    part = make_partition(tr, 3, seed=0)
    n = 300
    real = tr.images[-n:]
    rep = metric_report(real, tr.labels[-n:], tr, te, clf, part, seed=1, kid_subsets=5)
    q = quality_report(real, tr.labels[-n:], tr, te, clf, part, seed=1)
    assert rep["fd"] == pytest.approx(q.fd, rel=1e-12) and rep["fd_floor"] == pytest.approx(q.fd_floor, rel=1e-12)
    assert rep["class_accuracy"] == pytest.approx(q.class_accuracy, abs=1e-6)
    assert rep["cluster_share"] == q.cluster_share and rep["data_share"] == q.data_share
    for key in ("kid", "kid_floor", "precision", "recall", "precision_floor", "recall_floor", "diversity",
                "diversity_real", "mean_confidence"):
        assert np.isfinite(rep[key]), key
    json.dumps(rep)  # JSON-ready
    # real images score at their floor; noise far from it
    noise = torch.rand(n, *tr.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = metric_report(noise, None, tr, te, clf, seed=1, kid_subsets=5)
    assert bad["class_accuracy"] is None and "cluster_share" not in bad
    assert bad["fd_floor"] == rep["fd_floor"]
    assert bad["fd"] > 5 * rep["fd"] and bad["kid"] > 100 * abs(rep["kid"])
    assert bad["precision"] < 0.05 and rep["precision"] > 0.7
    assert abs(rep["recall"] - rep["recall_floor"]) < 0.15


def test_per_sample_quality(digits):
    tr, te, clf = digits
    x, y = te.images[:20], te.labels[:20]
    ref = clf.features(tr.images[:200])
    q = per_sample_quality(clf, x, y, ref)
    assert q["confidence"].shape == (20,) and ((q["confidence"] > 0) & (q["confidence"] < 1)).all()
    probs = clf.logits(x).double().softmax(1)
    np.testing.assert_allclose(q["confidence"], probs[torch.arange(20), y].numpy(), rtol=1e-6)
    q_self = per_sample_quality(clf, tr.images[:20], None, ref)  # members of ref: distance 0
    np.testing.assert_allclose(q_self["nn_distance"], 0.0, atol=1e-3)
    np.testing.assert_allclose(q_self["confidence"], clf.logits(tr.images[:20]).double().softmax(1).amax(1), rtol=1e-6)
