"""Offline sample-quality metrics in a feature space, each next to its real-vs-real floor.

Features are (N, D) arrays (numpy or torch, any float dtype), e.g. ``Classifier.features(images)``
(the small classifier's 128-d penultimate layer, :mod:`diffswarm.eval.classifier`). Every metric
computes in float64 numpy on the CPU and returns Python floats.

- :func:`kid`: Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs", Sec. 4):
  the unbiased estimate of MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3,
  averaged over random subsets as clean-fid and torchmetrics do. Unbiased, so it is ~0 (and may be
  slightly negative) for two samples of one distribution at any n, unlike FD.
- :func:`precision_recall`: improved precision and recall (Kynkaanniemi et al. 2019, Sec. 2):
  a k-NN ball around every point of a set estimates that set's support manifold.
- :func:`within_class_diversity`: mean pairwise feature distance within each class.
- :func:`nearest_neighbor_distance`, :func:`per_sample_quality`: per-sample quality to relate to
  per-sample diagnostics (:mod:`diffswarm.eval.diagnostics`).
- :func:`summarize`, :func:`summarize_runs`: mean and spread over sampling seeds.
- :func:`feature_metrics` (features in) and :func:`metric_report` (images in): the full metric
  dict against a **held-out reference** (real test images, which no model trained on), with the
  **real floors**: the same metric between a real train subset and the same reference at the same
  size, which is what a perfect sampler (an independent real sample) scores at this n.

Pairwise distances are computed in row blocks of about ``BLOCK_ENTRIES`` entries (32 MB of
float64), so 10k x 10k sets need well under 200 MB.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from diffswarm.data.datasets import ImageDataset
from diffswarm.data.partition import Partition
from diffswarm.eval.classifier import Classifier
from diffswarm.eval.fd import frechet_distance
from diffswarm.eval.quality import real_and_sample_features

BLOCK_ENTRIES = 4_000_000  # entries of one block of a distance matrix (float64: 32 MB)


def as_features(feats: np.ndarray | torch.Tensor, name: str = "features") -> np.ndarray:
    """(N, D) numpy or torch features -> (N, D) float64 numpy (copied only if needed); checks shape and finiteness."""
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().to("cpu", torch.float64).numpy()
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 1 or f.shape[1] < 1:
        raise ValueError(f"{name} must be (N, D) with N, D >= 1, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError(f"{name} contain NaN or inf")
    return f


def _blocks(n_rows: int, n_cols: int) -> Iterator[slice]:
    """Row slices so that one (rows, n_cols) block has about BLOCK_ENTRIES entries."""
    step = max(1, BLOCK_ENTRIES // max(1, n_cols))
    for s in range(0, n_rows, step):
        yield slice(s, min(s + step, n_rows))


def _sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (n_a, n_b) by ||a||^2 - 2 a.b + ||b||^2, clamped at 0 against round-off."""
    d = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + b_sq[None, :]
    return np.maximum(d, 0.0, out=d)


# ---------------------------------------------------------------------------------------------- KID


def kid(
    feats_a: np.ndarray | torch.Tensor,
    feats_b: np.ndarray | torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance between (N_a, D) and (N_b, D) features: (mean, std) over subsets.

    Estimator (Binkowski et al. 2018, Eq. 2 with the kernel of Sec. 4; clean-fid's
    ``kernel_distance`` and torchmetrics' ``KernelInceptionDistance``): with m =
    min(subset_size, N_a, N_b), draw ``subsets`` pairs of subsets X (m of a) and Y (m of b) without
    replacement, and for each pair compute the unbiased MMD^2

        sum_{i!=j} k(x_i, x_j) / (m (m-1)) + sum_{i!=j} k(y_i, y_j) / (m (m-1)) - 2 sum_{i,j} k(x_i, y_j) / m^2

    with k(x, y) = (x.y / D + 1)^3. Returns the mean of these values and their population std
    (ddof=0, as torchmetrics), in squared feature units: the std is the spread of one subset's
    estimate, not the standard error of the mean. Deterministic for a seed (numpy default_rng).
    Cost: 3 * subsets (m x m x D) matrix products. When N_a = N_b = m (both sets no larger than
    subset_size) every subset is the whole set, so one is computed and the std is 0.

    Unbiasedness needs X and Y independent. Passing one set twice breaks that (subsets share
    points, so the cross sum includes k(x, x) terms) and gives a small negative value: with
    m = N it is exactly -2 (mean_i k(x_i, x_i) - mean_{i!=j} k(x_i, x_j)) / m. Two independent
    samples of one distribution give ~0, of either sign.
    """
    a, b = as_features(feats_a, "feats_a"), as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs subsets of at least 2 points, got m = {m}")
    d = a.shape[1]
    if m == len(a) == len(b):
        subsets = 1  # every "subset" is the whole of both sets: one gives the same value, std 0
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]  # (m, D)
        y = b[rng.choice(len(b), m, replace=False)]  # (m, D)
        k_xx = (x @ x.T / d + 1.0) ** 3  # (m, m)
        k_yy = (y @ y.T / d + 1.0) ** 3  # (m, m)
        k_xy = (x @ y.T / d + 1.0) ** 3  # (m, m)
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values[s] = within - 2.0 * k_xy.sum() / (m * m)
    return float(values.mean()), float(values.std())


# ----------------------------------------------------------------------------- precision and recall


def knn_radii(feats: np.ndarray | torch.Tensor, k: int = 3) -> np.ndarray:
    """(N,) distance from each point to its k-th nearest neighbour in the same set, the point itself excluded."""
    f = as_features(feats)
    if not 1 <= k < len(f):
        raise ValueError(f"k must be in [1, N-1] = [1, {len(f) - 1}], got {k}")
    f_sq = (f * f).sum(1)
    out = np.empty(len(f))
    for sl in _blocks(len(f), len(f)):
        d = _sq_dists(f[sl], f, f_sq)  # (rows, N)
        rows = np.arange(sl.stop - sl.start)
        d[rows, rows + sl.start] = -1.0  # the point itself sorts first, before any duplicate
        out[sl] = np.partition(d, k, axis=1)[:, k]
    return np.sqrt(out)


def precision_recall(
    real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of (N_f, D) fake vs (N_r, D) real features.

    Each point's ball has radius the distance to its k-th nearest neighbour in its own set
    (:func:`knn_radii`). precision = share of fake points inside at least one real point's ball
    (fidelity: samples look real); recall = share of real points inside at least one fake point's
    ball (coverage: the real data's variety is produced). Both in [0, 1]. The balls shrink as N
    grows, so compare values only at equal (N_r, N_f) and next to the real-vs-real floor. One
    pass over the (N_f, N_r) cross distances in blocks gives both numbers.
    """
    r, f = as_features(real, "real"), as_features(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dimensions differ: {r.shape[1]} vs {f.shape[1]}")
    r2 = knn_radii(r, k) ** 2  # (N_r,)
    f2 = knn_radii(f, k) ** 2  # (N_f,)
    r_sq = (r * r).sum(1)
    fake_in_real = np.zeros(len(f), dtype=bool)
    real_in_fake = np.zeros(len(r), dtype=bool)
    for sl in _blocks(len(f), len(r)):
        d = _sq_dists(f[sl], r, r_sq)  # (rows, N_r)
        fake_in_real[sl] = (d <= r2[None, :]).any(1)
        real_in_fake |= (d <= f2[sl, None]).any(0)
    return float(fake_in_real.mean()), float(real_in_fake.mean())


def nearest_neighbor_distance(query: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N_q,) Euclidean distance from each query point to its nearest point of ref (N_r, D)."""
    q, r = as_features(query, "query"), as_features(ref, "ref")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"feature dimensions differ: {q.shape[1]} vs {r.shape[1]}")
    r_sq = (r * r).sum(1)
    out = np.empty(len(q))
    for sl in _blocks(len(q), len(r)):
        out[sl] = _sq_dists(q[sl], r, r_sq).min(1)
    return np.sqrt(out)


# -------------------------------------------------------------------------------------- diversity


def _mean_pairwise_distance(f: np.ndarray) -> float:
    """Mean Euclidean distance over the n (n-1) ordered pairs i != j of (n, D) points; n >= 2."""
    f_sq = (f * f).sum(1)
    total = 0.0
    for sl in _blocks(len(f), len(f)):
        d = _sq_dists(f[sl], f, f_sq)  # (rows, n)
        rows = np.arange(sl.stop - sl.start)
        d[rows, rows + sl.start] = 0.0  # exact zero on the diagonal, whatever the round-off
        total += np.sqrt(d).sum()
    return float(total / (len(f) * (len(f) - 1)))


def within_class_diversity(feats: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | Sequence[int]) -> dict:
    """Mean pairwise feature distance within each class of (N, D) features with (N,) int labels.

    Returns ``{"per_class": {label: distance}, "count": {label: n}, "mean": float}``: for every
    label with at least 2 members, the mean Euclidean distance over its distinct pairs (feature
    units; 0 when all members are identical); ``mean`` is the unweighted mean over those classes
    (NaN if none has 2 members). Labels are any ints (e.g. -1 for unconditional samples).
    """
    f = as_features(feats)
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    lab = lab.reshape(-1).astype(np.int64)
    if lab.shape[0] != len(f):
        raise ValueError(f"labels must be ({len(f)},), got {lab.shape}")
    per_class, count = {}, {}
    for c in np.unique(lab):
        members = f[lab == c]
        count[int(c)] = len(members)
        if len(members) >= 2:
            per_class[int(c)] = _mean_pairwise_distance(members)
    mean = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return {"per_class": per_class, "count": count, "mean": mean}


# -------------------------------------------------------------------------------- seeds and spread


def summarize(values: Sequence[float] | np.ndarray) -> dict:
    """``{"mean", "std", "n"}`` of per-seed values; std is the sample std (ddof=1), NaN for n < 2.

    NaN entries are dropped first (and not counted in n).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[~np.isnan(v)]
    n = int(v.size)
    return {
        "mean": float(v.mean()) if n else float("nan"),
        "std": float(v.std(ddof=1)) if n >= 2 else float("nan"),
        "n": n,
    }


def summarize_runs(runs: Sequence[dict]) -> dict:
    """Per-key :func:`summarize` over metric dicts of several seeds (e.g. from :func:`metric_report`).

    Only keys whose value is a real number (not bool) in every run are summarized.
    """
    if not runs:
        return {}
    keys = [
        key
        for key in runs[0]
        if all(isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) for r in runs)
    ]
    return {key: summarize([r[key] for r in runs]) for key in keys}


# ------------------------------------------------------------------------------ full metric dicts


def feature_metrics(
    sample_feats: np.ndarray | torch.Tensor,
    sample_labels: np.ndarray | torch.Tensor | None,
    ref_feats: np.ndarray | torch.Tensor,
    ref_labels: np.ndarray | torch.Tensor | None,
    floor_feats: np.ndarray | torch.Tensor,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict:
    """All feature metrics of (N, D) samples against a held-out real reference, with real floors.

    Args:
        sample_feats: (N, D) features of the samples.
        sample_labels: (N,) class of each sample for the diversity (None: one group).
        ref_feats: (M, D) features of M real held-out (test) images, the reference; M <= N.
        ref_labels: (M,) their true classes (None: one group).
        floor_feats: (M, D) features of M real train images: the floor is their score against the same reference.
        k, kid_subsets, kid_subset_size, seed: passed to :func:`precision_recall` and :func:`kid`.

    Returns a flat dict: ``fd``, ``kid``, ``kid_std``, ``precision``, ``recall`` of samples vs the
    reference; the floors ``fd_floor``, ``kid_floor``, ``kid_floor_std``, ``precision_floor``,
    ``recall_floor`` of the real train images vs the same reference; ``diversity`` (samples, mean over
    classes) / ``diversity_real`` (the reference) and their ``*_per_class`` dicts; ``n`` (samples) and
    ``n_floor`` (= ``n_ref``, the reference's and the floor's size: equal to n in ``diffswarm eval``).
    """
    fs = as_features(sample_feats, "sample_feats")
    fref = as_features(ref_feats, "ref_feats")
    ffl = as_features(floor_feats, "floor_feats")
    n, m = len(fs), len(fref)
    if len(ffl) != m:
        raise ValueError(f"floor_feats must have as many rows as the reference ({m}), got {len(ffl)}")
    if m > n:
        raise ValueError(f"the reference ({m} rows) must not outnumber the samples ({n})")
    sample_labels = np.zeros(n, dtype=np.int64) if sample_labels is None else sample_labels
    ref_labels = np.zeros(m, dtype=np.int64) if ref_labels is None else ref_labels
    out: dict = {"n": n, "n_floor": m, "n_ref": m}
    nan = float("nan")
    ok = m >= 2
    out["fd"] = frechet_distance(fs, fref) if ok else nan
    out["kid"], out["kid_std"] = kid(fs, fref, kid_subsets, kid_subset_size, seed) if ok else (nan, nan)
    ok_pr = m > k  # k-NN radii need more than k points in each set
    out["precision"], out["recall"] = precision_recall(fref, fs, k) if ok_pr else (nan, nan)
    out["fd_floor"] = frechet_distance(ffl, fref) if ok else nan
    out["kid_floor"], out["kid_floor_std"] = kid(ffl, fref, kid_subsets, kid_subset_size, seed) if ok else (nan, nan)
    out["precision_floor"], out["recall_floor"] = precision_recall(fref, ffl, k) if ok_pr else (nan, nan)
    div, div_real = within_class_diversity(fs, sample_labels), within_class_diversity(fref, ref_labels)
    out["diversity"], out["diversity_real"] = div["mean"], div_real["mean"]
    out["diversity_per_class"], out["diversity_real_per_class"] = div["per_class"], div_real["per_class"]
    return out


def metric_report(
    samples: torch.Tensor,
    requested_labels: torch.Tensor | None,
    train_ds: ImageDataset,
    test_ds: ImageDataset,
    classifier: Classifier,
    partition: Partition | None = None,
    seed: int = 0,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> dict:
    """The full metric dict of (N, C, H, W) samples in [-1, 1] against the real splits.

    Real subsets are drawn exactly as :func:`diffswarm.eval.quality.quality_report` draws them
    (numpy default_rng(seed): M = min(N, len(test)) held-out test indices, the reference, then M train
    indices, the floor's side), so ``fd`` and ``fd_floor`` equal its numbers for the same seed.
    On top of :func:`feature_metrics` (in the
    classifier's 128-d features) it adds ``pixel_diversity`` / ``pixel_diversity_real`` (the same
    within-class diversity in pixel space, samples and reference), ``class_accuracy`` (share of samples with a requested
    class >= 0 that the classifier assigns to it; None if none requested), ``mean_confidence``
    (mean classifier probability of the requested class, or of the predicted class where
    unconditional) and, with a partition, ``cluster_share`` / ``data_share`` (K lists).
    Diversity groups samples by requested class, falling back to the classifier's prediction
    where the label is -1; the real reference groups the test subset by its true labels.
    """
    n = int(samples.shape[0]) if samples.ndim == 4 else -1
    if samples.ndim != 4 or tuple(samples.shape[1:]) != train_ds.shape:
        raise ValueError(f"samples must be (N, {', '.join(map(str, train_ds.shape))}), got {tuple(samples.shape)}")
    if n < 2:
        raise ValueError(f"need N >= 2 samples, got {n}")
    if test_ds.shape != train_ds.shape:
        raise ValueError(f"train {train_ds.shape} and test {test_ds.shape} image shapes differ")
    if classifier.config.content_hash != train_ds.content_hash:
        raise ValueError(f"classifier was trained on {classifier.config.dataset_id}, not on {train_ds.dataset_id}")
    if not torch.isfinite(samples).all():
        raise ValueError("samples contain NaN or inf")
    samples = samples.detach().float()
    req = None
    if requested_labels is not None:
        req = requested_labels.detach().to("cpu", torch.int64).reshape(-1)
        if req.shape[0] != n:
            raise ValueError(f"requested_labels must be ({n},), got {tuple(requested_labels.shape)}")
        if ((req < -1) | (req >= train_ds.num_classes)).any():
            raise ValueError(f"requested_labels must lie in [-1, {train_ds.num_classes - 1}]")

    # 1-2. Real subsets (as quality_report draws them), classifier features and predictions.
    f_samples, f_ref, f_floor, ref_idx, _ = real_and_sample_features(classifier, samples, train_ds, test_ds, seed)
    probs = classifier.logits(samples).cpu().double().softmax(1)  # (N, num_classes)
    pred = probs.argmax(1)  # (N,)
    group = pred if req is None else torch.where(req >= 0, req, pred)  # (N,) class for the diversity

    out = feature_metrics(
        f_samples, group, f_ref, test_ds.labels[ref_idx], f_floor, k, kid_subsets, kid_subset_size, seed
    )

    # 2b. Diversity in pixels too (not the classifier's features alone), next to the reference's.
    out["pixel_diversity"] = within_class_diversity(samples.cpu().flatten(1).double(), group)["mean"]
    out["pixel_diversity_real"] = within_class_diversity(test_ds.images[ref_idx].flatten(1).double(),
                                                         test_ds.labels[ref_idx])["mean"]

    # 3. Conditioning and confidence.
    out["class_accuracy"] = None
    if req is not None and (req >= 0).any():
        cond = req >= 0
        out["class_accuracy"] = float((pred[cond] == req[cond]).double().mean())
    out["mean_confidence"] = float(probs.gather(1, group[:, None]).mean())

    # 4. Cluster coverage.
    if partition is not None:
        assigned = partition.assign(samples)  # (N,)
        out["cluster_share"] = (np.bincount(assigned, minlength=partition.k) / n).tolist()
        out["data_share"] = partition.shares().tolist()
    return out


def per_sample_quality(
    classifier: Classifier,
    samples: torch.Tensor,
    requested_labels: torch.Tensor | None,
    real_feats: np.ndarray | torch.Tensor,
) -> dict:
    """Per-sample quality of (N, C, H, W) samples, to relate to per-sample diagnostics.

    Returns numpy (N,) arrays: ``confidence``, the classifier's softmax probability of the
    requested class (of its predicted class where the label is -1 or labels are None);
    ``predicted`` (int64); ``nn_distance``, the Euclidean distance in classifier features to the
    nearest of the (M, 128) ``real_feats`` (e.g. features of real train images; lower = closer
    to real data, which also flags memorised copies near 0).
    """
    probs = classifier.logits(samples.detach().float()).cpu().double().softmax(1)  # (N, num_classes)
    pred = probs.argmax(1)
    group = pred
    if requested_labels is not None:
        req = requested_labels.detach().to("cpu", torch.int64).reshape(-1)
        group = torch.where(req >= 0, req, pred)
    feats = classifier.features(samples.detach().float()).cpu().double().numpy()
    return {
        "confidence": probs.gather(1, group[:, None]).squeeze(1).numpy(),
        "predicted": pred.numpy(),
        "nn_distance": nearest_neighbor_distance(feats, real_feats),
    }


__all__ = [
    "as_features",
    "feature_metrics",
    "kid",
    "knn_radii",
    "metric_report",
    "nearest_neighbor_distance",
    "per_sample_quality",
    "precision_recall",
    "summarize",
    "summarize_runs",
    "within_class_diversity",
]
