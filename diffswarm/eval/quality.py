"""Quality check of generated samples against the real data.

Three numbers, all from :mod:`diffswarm.eval.classifier` features and predictions:

- ``fd``: Frechet distance (:mod:`diffswarm.eval.fd`) between the samples' classifier features
  and those of an equal-size random subset of the held-out **test** split (the reference; no model
  trained on it, so a sampler that reproduces its training images gains nothing).
- ``fd_floor``: the same distance between an equal-size random subset of real **train** images and
  the same reference. FD is biased upward at small n (the covariance estimate is noisy), so FD values
  are only meaningful next to this floor at the same n: samples as good as real data score near it.
- ``class_accuracy``: for class-conditional samples, the share the classifier assigns to the
  requested class (a CAS-style check of conditioning).

With a :class:`~diffswarm.data.partition.Partition`, the samples are also assigned to clusters
and their cluster shares reported next to the data's, which shows whether the routed ensemble
covers every expert's region in proportion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from diffswarm.data.datasets import ImageDataset
from diffswarm.data.partition import Partition
from diffswarm.eval.classifier import Classifier
from diffswarm.eval.fd import frechet_distance


@dataclass
class QualityReport:
    """Result of :func:`quality_report`."""

    fd: float  # FD(samples, real test subset of size min(n, len(test)))
    fd_floor: float  # FD(real train subset, the same real test subset), same size
    class_accuracy: float | None  # share of conditional samples classified as requested; None if none requested
    n: int  # number of samples
    cluster_share: list[float] | None = None  # (K,) share of samples per partition cluster
    data_share: list[float] | None = None  # (K,) share of real train examples per cluster

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """A few readable lines."""
        lines = [
            f"FD {self.fd:.2f}  (real-vs-real floor {self.fd_floor:.2f}, n={self.n})",
            "class accuracy "
            + ("n/a (unconditional)" if self.class_accuracy is None else f"{100 * self.class_accuracy:.1f}%"),
        ]
        if self.cluster_share is not None and self.data_share is not None:
            pairs = "  ".join(
                f"c{i} {s:.2f}/{d:.2f}"
                for i, (s, d) in enumerate(zip(self.cluster_share, self.data_share, strict=True))
            )
            lines.append(f"cluster share samples/data: {pairs}")
        return "\n".join(lines)


def real_and_sample_features(classifier: Classifier, samples: torch.Tensor, train_ds: ImageDataset,
                             test_ds: ImageDataset, seed: int):
    """The classifier features every quality score compares: the N samples; the **reference**, m = min(N,
    len(test)) seeded images of the held-out test split (which no expert, router or classifier trained on);
    and the **floor** side, m seeded real train images, scored against the same reference at the same m (what
    an independent real sample scores). Returns (f_samples (N, F), f_ref (m, F), f_floor (m, F), ref_idx (m,),
    floor_idx (m,)), features as float64 numpy arrays and the chosen rows of test and train."""
    n = samples.shape[0]
    # 1. Real subsets: m of the test split (the reference), m of the train split (the floor's side).
    rng = np.random.default_rng(seed)
    m = min(n, len(test_ds), len(train_ds))
    ref_idx = torch.from_numpy(rng.choice(len(test_ds), m, replace=False))
    floor_idx = torch.from_numpy(rng.choice(len(train_ds), m, replace=False))
    # 2. Classifier features.
    f_samples = classifier.features(samples).cpu().double().numpy()  # (N, 128)
    f_ref = classifier.features(test_ds.images[ref_idx]).cpu().double().numpy()  # (m, 128)
    f_floor = classifier.features(train_ds.images[floor_idx]).cpu().double().numpy()  # (m, 128)
    return f_samples, f_ref, f_floor, ref_idx, floor_idx


def quality_report(
    samples: torch.Tensor,
    requested_labels: torch.Tensor | None,
    train_ds: ImageDataset,
    test_ds: ImageDataset,
    classifier: Classifier,
    partition: Partition | None = None,
    seed: int = 0,
) -> QualityReport:
    """Score (N, C, H, W) samples in [-1, 1] against the real data.

    Args:
        samples: (N, C, H, W) generated images, N >= 2.
        requested_labels: (N,) int64 class each sample was asked for, -1 = unconditional; or None.
        train_ds, test_ds: the real splits (train_ds is what the classifier was trained on).
        classifier: from :func:`~diffswarm.eval.classifier.get_classifier` for train_ds.
        partition: if given, cluster shares of the samples vs. the data are reported.
        seed: seed of the real subsets.
    """
    n = int(samples.shape[0]) if samples.ndim == 4 else -1
    if samples.ndim != 4 or tuple(samples.shape[1:]) != train_ds.shape:
        raise ValueError(f"samples must be (N, {', '.join(map(str, train_ds.shape))}), got {tuple(samples.shape)}")
    if n < 2:
        raise ValueError(f"FD needs at least 2 samples, got {n}")
    if test_ds.shape != train_ds.shape:
        raise ValueError(f"train {train_ds.shape} and test {test_ds.shape} image shapes differ")
    if classifier.config.content_hash != train_ds.content_hash:
        raise ValueError(
            f"classifier was trained on {classifier.config.dataset_id} "
            f"(content {classifier.config.content_hash[:16]}), not on {train_ds.dataset_id} "
            f"(content {train_ds.content_hash[:16]})"
        )
    if not torch.isfinite(samples).all():
        raise ValueError("samples contain NaN or inf")
    samples = samples.detach().float()

    # 1-2. Real subsets and features; distances to the held-out reference.
    f_samples, f_ref, f_floor, _, _ = real_and_sample_features(classifier, samples, train_ds, test_ds, seed)
    fd = frechet_distance(f_samples, f_ref)
    fd_floor = frechet_distance(f_floor, f_ref) if len(f_ref) >= 2 else float("nan")

    # 3. Conditioning accuracy over the samples that asked for a class.
    class_accuracy = None
    if requested_labels is not None:
        req = requested_labels.detach().to("cpu", torch.int64).reshape(-1)
        if req.shape[0] != n:
            raise ValueError(f"requested_labels must be ({n},), got {tuple(requested_labels.shape)}")
        if ((req < -1) | (req >= train_ds.num_classes)).any():
            raise ValueError(f"requested_labels must lie in [-1, {train_ds.num_classes - 1}]")
        cond = req >= 0
        if cond.any():
            pred = classifier.predict(samples[cond.to(samples.device)]).cpu()
            class_accuracy = float((pred == req[cond]).float().mean())

    # 4. Cluster coverage.
    cluster_share = data_share = None
    if partition is not None:
        assigned = partition.assign(samples)  # (N,)
        cluster_share = (np.bincount(assigned, minlength=partition.k) / n).tolist()
        data_share = partition.shares().tolist()

    return QualityReport(
        fd=fd,
        fd_floor=fd_floor,
        class_accuracy=class_accuracy,
        n=n,
        cluster_share=cluster_share,
        data_share=data_share,
    )
