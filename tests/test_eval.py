import numpy as np
import pytest
import torch

import diffswarm.eval.classifier as clf_mod
from diffswarm.data import load_dataset, make_partition
from diffswarm.eval import Classifier, QualityReport, frechet_distance, get_classifier, quality_report


def _with_moments(z: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Rescale samples so their empirical mean and (ddof=1) covariance are exactly mean, diag(var)."""
    z = z - z.mean(0)
    chol = np.linalg.cholesky(np.cov(z, rowvar=False))
    white = z @ np.linalg.inv(chol).T  # empirical covariance exactly I
    return white * np.sqrt(var) + mean


def test_fd_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu_a, mu_b = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.0])
    var_a, var_b = np.array([1.0, 2.0, 0.5, 3.0]), np.array([4.0, 0.5, 0.5, 1.0])
    a = _with_moments(rng.normal(size=(500, 4)), mu_a, var_a)
    b = _with_moments(rng.normal(size=(700, 4)), mu_b, var_b)
    want = np.sum((mu_a - mu_b) ** 2) + np.sum(var_a + var_b - 2 * np.sqrt(var_a * var_b))
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_fd_handles_singular_covariance_and_bad_input():
    rng = np.random.default_rng(1)
    a = np.concatenate([rng.normal(size=(50, 3)), np.zeros((50, 2))], 1)  # two dead features
    b = np.concatenate([rng.normal(size=(60, 3)), np.zeros((60, 2))], 1)
    fd = frechet_distance(a, b)
    assert np.isfinite(fd) and fd >= 0
    with pytest.raises(ValueError):
        frechet_distance(a[:1], b)
    with pytest.raises(ValueError):
        frechet_distance(a, b[:, :3])


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("clf-cache")


@pytest.fixture(scope="module")
def classifier(digits, cache_dir):
    tr, te = digits
    return get_classifier(tr, cache_dir=cache_dir, progress=False, test_ds=te)


def test_classifier_trains_and_is_cached(digits, cache_dir, classifier, monkeypatch):
    tr, te = digits
    assert classifier.test_accuracy > 0.85 and classifier.accuracy(te) > 0.85
    x = te.images[:7]
    assert classifier.features(x).shape == (7, 128)
    assert classifier.predict(x).shape == (7,) and classifier.predict(x).dtype == torch.int64
    path = clf_mod.classifier_path(tr, cache_dir)
    assert path.exists()

    def no_training(*args, **kwargs):
        raise AssertionError("should have loaded from the cache")

    monkeypatch.setattr(clf_mod, "train_classifier", no_training)
    cached = get_classifier(tr, cache_dir=cache_dir, progress=False)
    assert cached.test_accuracy == pytest.approx(classifier.test_accuracy)
    assert torch.equal(cached.predict(te.images), classifier.predict(te.images))


def test_corrupt_cache_is_retrained(digits, classifier, tmp_path, monkeypatch):
    tr, _ = digits
    path = clf_mod.classifier_path(tr, tmp_path)
    classifier.save(path)
    blob = bytearray(path.read_bytes())
    blob[-8:] = b"\x00" * 8  # flip weight bytes: the stored sha256 no longer matches
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="sha256"):
        Classifier.load(path)
    calls = []
    monkeypatch.setattr(clf_mod, "train_classifier", lambda *a, **k: calls.append(1) or classifier)
    with pytest.warns(UserWarning, match="retraining"):
        get_classifier(tr, cache_dir=tmp_path, progress=False)
    assert calls == [1] and Classifier.load(path).config.content_hash == tr.content_hash


def test_unlabeled_dataset_is_refused(tmp_path):
    from diffswarm.data.datasets import ImageDataset

    ds = ImageDataset("folder", "train", torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64), 0, [], "x")
    with pytest.raises(ValueError, match="unlabeled"):
        get_classifier(ds, cache_dir=tmp_path)


def test_quality_report_real_vs_noise(digits, classifier):
    tr, te = digits
    part = make_partition(tr, k=3)
    n = 300
    labels = te.labels[:n].clone()
    labels[::2] = -1  # half unconditional
    real = quality_report(te.images[:n], labels, tr, te, classifier, part)
    noise = quality_report(torch.rand(n, 1, 8, 8) * 2 - 1, None, tr, te, classifier, part)
    assert isinstance(real, QualityReport) and real.n == n
    assert real.class_accuracy > 0.85 and noise.class_accuracy is None
    assert real.fd < 3 * real.fd_floor and noise.fd > 10 * real.fd
    assert real.fd_floor == noise.fd_floor  # same seed, same real subsets
    assert len(real.cluster_share) == 3 and np.isclose(sum(real.cluster_share), 1.0)
    assert real.data_share == pytest.approx(part.shares().tolist())
    text = real.format()
    assert "FD" in text and "class accuracy" in text and "c2" in text
    assert real.to_dict()["n"] == n
    with pytest.raises(ValueError, match="samples must be"):
        quality_report(te.images[:n, :, :4], None, tr, te, classifier)
