"""How ``diffswarm eval`` scores samples: the classifier and real data a cell is compared with, the
share each cluster should get, and the summaries of scored cells over the runs."""

from __future__ import annotations

import time

import numpy as np
import torch

from diffswarm.eval.classifier import get_classifier
from diffswarm.eval.metrics import metric_report, summarize

QUALITY_KEYS = ("fd", "fd_floor", "kid", "kid_floor", "precision", "precision_floor", "recall", "recall_floor",
                "class_accuracy", "diversity", "diversity_real", "pixel_diversity", "pixel_diversity_real",
                "share_tv", "calls_per_image", "gflops_per_image")


class Scoring:
    """The eval classifier (trained or cached) and the real train/test data every cell is scored against."""

    def __init__(self, train_ds, test_ds, partition, cache_dir: str | None, classifier_epochs: int):
        self.train_ds, self.test_ds, self.partition = train_ds, test_ds, partition
        self.num_classes = train_ds.num_classes
        t0 = time.perf_counter()
        self.classifier = get_classifier(train_ds, cache_dir=cache_dir, epochs=classifier_epochs, progress=False,
                                         test_ds=test_ds)
        self.classifier_seconds = time.perf_counter() - t0
        # class histogram per cluster (train split): the share a sampler should give each cluster for given labels
        hist = np.array([st["class_hist"] for st in partition.cluster_summary], dtype=np.float64)  # (K, C)
        self.p_cluster_given_class = hist / hist.sum(0, keepdims=True).clip(min=1)  # (K, C)
        self._real_feats = None

    def real_feats(self) -> np.ndarray:
        """Classifier features of up to 5000 train images (seeded), for per-sample nearest-neighbour distances."""
        if self._real_feats is None:
            rng = np.random.default_rng(12345)
            idx = torch.from_numpy(rng.choice(len(self.train_ds), min(5000, len(self.train_ds)), replace=False))
            self._real_feats = self.classifier.features(self.train_ds.images[idx]).double().numpy()
        return self._real_feats

    def target_share(self, labels: torch.Tensor) -> np.ndarray:
        """(K,) the share of real images of the requested classes that fall in each cluster."""
        if not self.num_classes or bool((labels < 0).all()):
            return self.partition.shares()
        counts = np.bincount(labels.numpy(), minlength=self.num_classes) / len(labels)  # (C,)
        return self.p_cluster_given_class @ counts

    def score(self, x: torch.Tensor, labels: torch.Tensor, conditional: bool, seed: int) -> dict:
        """Metrics of samples ``x`` (clipped to [-1, 1]) asked for ``labels`` (``metric_report``, given the
        labels when ``conditional``), the target cluster shares and the shares' total variation from them."""
        rep = metric_report(x, labels if conditional else None, self.train_ds, self.test_ds, self.classifier,
                            self.partition, seed=seed)
        target = self.target_share(labels)
        share = np.asarray(rep["cluster_share"])
        return {"metrics": {k: v for k, v in rep.items() if not k.endswith("per_class")},
                "target_share": target.tolist(), "share_tv": float(0.5 * np.abs(share - target).sum())}


def _metric(r: dict, key: str):
    if key in r.get("metrics", {}):
        return r["metrics"][key]
    return r.get(key)


def summarize_cells(results: list[dict], keys=QUALITY_KEYS) -> dict:
    """{key: summarize over the cells' runs}, the mean cluster/target shares, and ``per_run``
    ({run: {key: value}}) for paired comparisons."""
    out = {k: summarize([_metric(r, k) if _metric(r, k) is not None else float("nan") for r in results])
           for k in keys}
    out["cluster_share"] = np.mean([r["metrics"]["cluster_share"] for r in results], 0).tolist()
    out["target_share"] = np.mean([r["target_share"] for r in results], 0).tolist()
    out["per_run"] = {r["run"]: {k: _metric(r, k) for k in keys} for r in results}
    return out


__all__ = ["QUALITY_KEYS", "Scoring", "summarize_cells"]
