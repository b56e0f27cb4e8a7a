"""The admission score of an expert: its mean flow-matching loss on its cluster's held-out images (pure, CPU).

Anyone holding the dataset recomputes it exactly (docs/security.md, "Admission"):

1. The validation set of cluster k is the dataset's **test** split assigned to cluster k by the partition's own
   projection and centroids (``Partition.assign``), in index order, at most ``MAX_IMAGES`` images.
2. A fixed set of (image, t, noise) triples is drawn from one ``torch.Generator`` seeded with the swarm's
   admission seed (``AdmissionRule.seed``, signed in the owner's manifest): ``DRAWS`` flow times per image,
   stratified over (T_LO, T_HI), and one standard normal noise per triple, drawn in a fixed order on the CPU.
3. The score is the mean over triples of the per-pixel mean of ``(v_hat - (eps - x0))^2`` with
   ``v_hat = expert.velocity(x_t, t, label)`` (no guidance), i.e. the flow-matching loss; a DDPM expert answers
   through the translator (``experts/translator.py``), so both objectives are measured on one scale.

Next to it the report carries the loss of predicting v = 0 on the same triples (``baseline``: what a network
that learnt nothing scores, the rule's ceiling is a fraction of it) and the loss split by class: on the
validation images of the classes the expert's training data contains (the partition's class histogram of
cluster k: classes with at least ``MIN_CLASS_SHARE`` of its images, ``in_classes``) and on test images (any
cluster) of the classes it does not contain (``out_classes``).
Deterministic on the CPU in float32 with one thread count; across machines and thread counts it agrees to
``TOLERANCE`` (relative), which is what a verifier allows (``agrees``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from diffswarm.data.datasets import ImageDataset
from diffswarm.data.partition import Partition

MAX_IMAGES = 256  # validation images per cluster (the first ones, in test-split order)
MAX_OUT_IMAGES = 128  # test images of classes outside the expert's data
DRAWS = 2  # (t, noise) draws per image
T_LO, T_HI = 0.02, 0.98  # flow times drawn in (T_LO, T_HI): the translator's t = 1 end is excluded
BATCH = 64  # rows per forward pass (fixed: the sum's order does not depend on the machine)
MIN_CLASS_SHARE = 0.05  # a class "is in" a cluster's data when it is at least this share of its training images
TOLERANCE = 1e-3  # relative: two honest computations of one score agree to this (CPU, any thread count)


@dataclass(frozen=True)
class ValidationSet:
    """The held-out images cluster k is scored on: (N, C, H, W) in [-1, 1] and (N,) labels, plus the test images of
    classes its training data does not contain."""

    cluster: int
    images: torch.Tensor  # (N, C, H, W) float32
    labels: torch.Tensor  # (N,) int64
    out_images: torch.Tensor  # (M, C, H, W) float32: test images of classes outside the cluster's data
    out_labels: torch.Tensor  # (M,) int64
    in_classes: tuple[int, ...]  # classes the cluster's training data contains (empty: unlabeled dataset)
    partition_hash: str
    dataset_id: str


def validation_set(part: Partition, test: ImageDataset, k: int) -> ValidationSet:
    """Cluster k's validation set from the partition and the dataset's test split (module docstring, step 1)."""
    if not 0 <= k < part.k:
        raise ValueError(f"cluster {k} is not one of the partition's 0..{part.k - 1}")
    if tuple(test.shape) != tuple(part.image_shape) or test.dataset_id != part.dataset_id:
        raise ValueError(f"test split {test.dataset_id} {test.shape} is not the partition's data "
                         f"({part.dataset_id} {tuple(part.image_shape)})")
    assigned = part.assign(test.images)  # (N_test,)
    idx = np.flatnonzero(assigned == k)[:MAX_IMAGES]
    if len(idx) == 0:
        raise ValueError(f"no test image is assigned to cluster {k}: it cannot be validated")
    hist = part.cluster_summary[k].get("class_hist") or []
    in_classes = tuple(c for c, n in enumerate(hist) if n >= MIN_CLASS_SHARE * max(1, sum(hist)))
    if test.num_classes and in_classes:
        out_mask = ~np.isin(test.labels.numpy(), np.asarray(in_classes))
        out_idx = np.flatnonzero(out_mask)[:MAX_OUT_IMAGES]
    else:
        out_idx = np.zeros(0, dtype=np.int64)
    sel, out_sel = torch.from_numpy(idx), torch.from_numpy(out_idx)
    return ValidationSet(k, test.images[sel], test.labels[sel], test.images[out_sel], test.labels[out_sel],
                         in_classes, part.partition_hash, part.dataset_id)


@dataclass(frozen=True)
class ScoreReport:
    """An expert's losses on one validation set (each a mean per-pixel squared velocity error; NaN: no images)."""

    score: float  # on the cluster's validation images (the admission score)
    baseline: float  # predicting v = 0 on the same triples
    in_classes: float  # on the validation images of classes the expert's data contains
    out_classes: float  # on test images of classes it does not contain
    triples: int  # (image, t, noise) triples of ``score``

    def describe(self) -> str:
        def f(v: float) -> str:
            return "n/a" if math.isnan(v) else f"{v:.4f}"
        return (f"score {f(self.score)} (v=0 scores {f(self.baseline)}; classes of its data {f(self.in_classes)}, "
                f"other classes {f(self.out_classes)}; {self.triples} triples)")


def seed_of(text: str) -> int:
    """A 63-bit admission seed from ``text`` (e.g. the owner key's fingerprint)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def _triples(n: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image index (n*DRAWS,), t (n*DRAWS,), noise (n*DRAWS, C, H, W)) drawn in a fixed order on the CPU."""
    gen = torch.Generator().manual_seed(int(seed))
    m = n * DRAWS
    strata = (torch.arange(m, dtype=torch.float64) + torch.rand(m, generator=gen, dtype=torch.float64)) / m
    t = T_LO + (T_HI - T_LO) * strata[torch.randperm(m, generator=gen)]  # stratified, shuffled over images
    noise = torch.randn((m, *shape), generator=gen, dtype=torch.float32)
    index = torch.arange(n).repeat(DRAWS)  # (m,)
    return index, t.to(torch.float32), noise


@torch.no_grad()
def _losses(expert, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert losses, v=0 losses), each (n*DRAWS,) float64, on ``images`` (n, C, H, W)."""
    if len(images) == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty
    index, t, noise = _triples(len(images), tuple(images.shape[1:]), seed)
    dev = next(expert.parameters()).device
    out, base = [], []
    for s in range(0, len(index), BATCH):
        i, tb, eps = index[s:s + BATCH], t[s:s + BATCH], noise[s:s + BATCH]
        x0 = images[i].float()
        tt = tb.view(-1, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * eps  # (b, C, H, W): flow point
        target = eps - x0
        v = expert.velocity(x_t.to(dev), tb.to(dev), labels[i].to(dev), 1.0).float().cpu()
        v = torch.nan_to_num(v, nan=1e6, posinf=1e6, neginf=-1e6)  # a broken expert scores huge, never NaN
        out.append((v - target).double().pow(2).flatten(1).mean(1))
        base.append(target.double().pow(2).flatten(1).mean(1))
    return torch.cat(out), torch.cat(base)


def score_expert(expert, vset: ValidationSet, seed: int) -> ScoreReport:
    """The expert's ``ScoreReport`` on ``vset`` with the triples of ``seed`` (module docstring)."""
    loss, base = _losses(expert, vset.images, vset.labels, seed)
    rows = vset.labels.repeat(DRAWS)
    inside = torch.isin(rows, torch.tensor(vset.in_classes, dtype=torch.int64)) if vset.in_classes else \
        torch.ones_like(rows, dtype=torch.bool)
    out_loss, _ = _losses(expert, vset.out_images, vset.out_labels, seed + 1)

    def mean(x: torch.Tensor) -> float:
        return float(x.mean()) if len(x) else float("nan")

    return ScoreReport(mean(loss), mean(base), mean(loss[inside]), mean(out_loss), len(loss))


def agrees(claimed: float, recomputed: float, tolerance: float = TOLERANCE) -> bool:
    """Whether a claimed score matches a recomputation (relative ``tolerance``, with a 1e-6 absolute floor)."""
    return math.isfinite(claimed) and abs(claimed - recomputed) <= max(1e-6, tolerance * abs(recomputed))
