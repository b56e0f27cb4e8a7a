"""A small CNN trained on the real train split: the feature extractor for FD and the judge of
class-conditional samples.

Inception (used by FID) is not available offline and does not fit 28x28 grayscale, so, like the
"FID with a domain classifier" practice of small-image papers, we train our own: two conv layers
(32 then 64 channels), max pooling, adaptive average pooling to 7x7 (so any (C, H, W) with
H, W >= 4 works), a 128-d penultimate layer (the FD features) and a linear output.

Speed/accuracy choices, measured on one CPU core for 2 epochs of Fashion-MNIST at batch 256:
a stride-2 first conv instead of conv + max-pool trains in ~40 s instead of ~55 s; pooling to
7x7 rather than 4x4 lifts test accuracy from ~86% to ~90%; Adam with a one-cycle schedule
(peak lr 5e-3) beats constant lr 1e-3 (81%); BatchNorm helped less than it cost in time. It trains in
channels-last memory format: the whole 2-epoch training took 68.6 s instead of 79.5 s on one thread of the
emulated AVX2 machine (docs/performance.md item 9; test accuracy 90.0% vs 89.9%).

Weights are cached as safetensors at
``<cache_dir or $DIFFSWARM_CACHE or ~/.cache/diffswarm>/classifier-<content_hash[:16]>.safetensors``
with metadata (dataset id, content hash, sha256 of the weights, test accuracy, epochs, seed,
architecture). A cached file is used only if its weights hash, dataset hash and training
options match; otherwise the classifier is retrained and the file replaced.

The classifier needs labels: for an unlabeled dataset (``num_classes == 0``) ``get_classifier``
raises ValueError, and FD must then be measured on a labeled dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffswarm.data.datasets import ImageDataset
from diffswarm.utils.fileio import atomic_write

FEATURE_DIM = 128
POOL = 7  # adaptive pooling grid; identity for 28x28 inputs
MIN_IMAGE_SIZE = 4
CACHE_ENV = "DIFFSWARM_CACHE"


@dataclass
class ClassifierConfig:
    """Architecture and provenance of one classifier; stored in the safetensors metadata."""

    channels: int  # image channels C
    height: int  # image H
    width: int  # image W
    num_classes: int  # output classes (> 0)
    dataset_id: str  # ImageDataset.dataset_id of the train split
    content_hash: str  # ImageDataset.content_hash of the train split
    epochs: int  # passes over the train split actually made
    seed: int  # torch seed for init and shuffling
    test_accuracy: float | None = None  # on the test split given to get_classifier, if any
    train_seconds: float | None = None  # wall time of training


class SmallCNN(nn.Module):
    """(N, C, H, W) in [-1, 1] -> logits (N, num_classes); ``features`` gives the (N, 128) penultimate layer."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 32, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(POOL)
        self.fc = nn.Linear(64 * POOL * POOL, FEATURE_DIM)
        self.out = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))  # (N, 32, H/2, W/2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (N, 64, H/4, W/4)
        h = self.pool(h).flatten(1)  # (N, 64 * 7 * 7)
        return F.relu(self.fc(h))  # (N, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))  # (N, num_classes)


def _weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 hex over the sorted tensor names and their contiguous bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Classifier:
    """A trained :class:`SmallCNN` with its :class:`ClassifierConfig`. Inputs are (N, C, H, W) in [-1, 1]."""

    def __init__(self, net: SmallCNN, config: ClassifierConfig):
        self.net = net.eval()
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def test_accuracy(self) -> float | None:
        return self.config.test_accuracy

    def to(self, device: torch.device | str) -> Classifier:
        self.net.to(device)
        return self

    def _check(self, x: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != (c.channels, c.height, c.width):
            raise ValueError(
                f"classifier for {c.dataset_id} expects (N, {c.channels}, {c.height}, {c.width}) images, "
                f"got shape {tuple(x.shape)}"
            )

    @torch.no_grad()
    def _batched(self, fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        self._check(x)
        dev = self.device
        outs = [fn(chunk.to(dev, torch.float32)) for chunk in x.split(batch_size)]
        return torch.cat(outs).to(x.device)

    def features(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """(N, 128) float32 penultimate activations, on x's device."""
        return self._batched(self.net.features, x, batch_size)

    def logits(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """(N, num_classes) float32 logits, on x's device."""
        return self._batched(self.net, x, batch_size)

    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """(N,) int64 predicted class, on x's device."""
        return self.logits(x, batch_size).argmax(1)

    def accuracy(self, ds: ImageDataset) -> float:
        """Share of ds whose label the classifier predicts."""
        if ds.num_classes == 0:
            raise ValueError(f"dataset {ds.dataset_id} is unlabeled: accuracy needs labels")
        return float((self.predict(ds.images) == ds.labels.to(ds.images.device)).float().mean())

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> None:
        """Write weights + metadata as safetensors, atomically (temp file, then os.replace)."""
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        meta = {
            "format": "diffswarm.classifier/1",
            "config": json.dumps(asdict(self.config)),
            "weights_sha256": _weights_sha256(state),
            "dataset_id": self.config.dataset_id,
            "content_hash": self.config.content_hash,
            "test_accuracy": "" if self.config.test_accuracy is None else f"{self.config.test_accuracy:.6f}",
            "epochs": str(self.config.epochs),
        }
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Classifier:
        """Read a file written by :meth:`save`; ValueError if it is unreadable or its weights hash mismatches."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for truncated/garbled files
            raise ValueError(f"{path}: unreadable classifier file ({type(e).__name__}: {e})") from e
        if meta.get("format") != "diffswarm.classifier/1":
            raise ValueError(f"{path}: not a diffswarm classifier (format {meta.get('format')!r})")
        if _weights_sha256(state) != meta.get("weights_sha256"):
            raise ValueError(f"{path}: weights do not match their stored sha256")
        try:
            d = json.loads(meta["config"])
            config = ClassifierConfig(**{k: v for k, v in d.items() if k in ClassifierConfig.__dataclass_fields__})
            net = SmallCNN(config.channels, config.num_classes)
            net.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: corrupt classifier metadata or weights ({e})") from e
        return cls(net, config)


def default_cache_dir() -> Path:
    """$DIFFSWARM_CACHE or ~/.cache/diffswarm."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "diffswarm")


def classifier_path(train_ds: ImageDataset, cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache file of the classifier for train_ds."""
    d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return d / f"classifier-{train_ds.content_hash[:16]}.safetensors"


def train_classifier(
    train_ds: ImageDataset,
    test_ds: ImageDataset | None = None,
    epochs: int = 2,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 256,
    lr: float = 5e-3,
    min_steps: int = 300,
) -> Classifier:
    """Train a :class:`SmallCNN` on train_ds with Adam under a one-cycle learning-rate schedule.

    Small datasets are passed over more often than ``epochs`` so that at least ``min_steps``
    optimizer steps are made (digits: 6 steps per epoch); the epochs actually made are recorded.
    """
    from tqdm.auto import tqdm

    if train_ds.num_classes == 0:
        raise ValueError(
            f"dataset {train_ds.dataset_id} is unlabeled (num_classes=0): the FD classifier needs labels; "
            "measure FD on a labeled dataset"
        )
    c, h, w = train_ds.shape
    if min(h, w) < MIN_IMAGE_SIZE:
        raise ValueError(f"classifier needs images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}, got {h}x{w}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SmallCNN(c, train_ds.num_classes)
    net = net.to(memory_format=torch.channels_last)  # oneDNN's convolutions run faster in NHWC (1.16x here)
    x, y = train_ds.images, train_ds.labels
    n = len(train_ds)
    steps_per_epoch = math.ceil(n / batch_size)
    epochs = max(epochs, math.ceil(min_steps / steps_per_epoch))
    total = epochs * steps_per_epoch
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    t0 = time.perf_counter()
    net.train()
    bar = tqdm(total=total, desc=f"classifier {train_ds.dataset_id}", disable=not progress, leave=False)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch_size):
            idx = perm[s : s + batch_size]
            loss = F.cross_entropy(net(x[idx].contiguous(memory_format=torch.channels_last)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    net.eval()
    config = ClassifierConfig(
        channels=c,
        height=h,
        width=w,
        num_classes=train_ds.num_classes,
        dataset_id=train_ds.dataset_id,
        content_hash=train_ds.content_hash,
        epochs=epochs,
        seed=seed,
        train_seconds=time.perf_counter() - t0,
    )
    clf = Classifier(net, config)
    if test_ds is not None:
        if test_ds.shape != train_ds.shape or test_ds.num_classes != train_ds.num_classes:
            raise ValueError(f"test split {test_ds.dataset_id} {test_ds.shape} does not match train split")
        config.test_accuracy = clf.accuracy(test_ds)
    return clf


def cached_classifier(
    train_ds: ImageDataset,
    cache_dir: str | os.PathLike | None = None,
    epochs: int = 2,
    seed: int = 0,
) -> Classifier | None:
    """The cached classifier for train_ds if the cache holds a valid one (its weights hash checks out, trained on
    this data with this seed for at least ``epochs``), else None; a file that does not qualify gets a warning
    saying it will be retrained."""
    path = classifier_path(train_ds, cache_dir)
    if not path.exists():
        return None
    try:
        clf = Classifier.load(path)
    except ValueError as e:
        warnings.warn(f"ignoring cached classifier: {e}; retraining", stacklevel=2)
        return None
    cfg = clf.config
    if (
        cfg.content_hash == train_ds.content_hash
        and cfg.seed == seed
        and cfg.epochs >= epochs
        and (cfg.channels, cfg.height, cfg.width) == train_ds.shape
        and cfg.num_classes == train_ds.num_classes
    ):
        return clf
    warnings.warn(f"cached classifier {path} was trained differently; retraining", stacklevel=2)
    return None


def get_classifier(
    train_ds: ImageDataset,
    cache_dir: str | os.PathLike | None = None,
    epochs: int = 2,
    seed: int = 0,
    progress: bool = True,
    test_ds: ImageDataset | None = None,
) -> Classifier:
    """The classifier for train_ds: loaded from the cache when valid (``cached_classifier``), else trained and cached.

    Args:
        train_ds: the real train split (must be labeled).
        cache_dir: cache folder (default ``$DIFFSWARM_CACHE`` or ``~/.cache/diffswarm``).
        epochs: passes over the train split (at least 300 optimizer steps are made on small data).
        seed: seed of init and shuffling; a cached file trained with another seed or fewer
            epochs is retrained.
        progress: show a tqdm bar while training.
        test_ds: if given, the test accuracy is measured after training and stored.
    """
    if train_ds.num_classes == 0:
        raise ValueError(
            f"dataset {train_ds.dataset_id} is unlabeled (num_classes=0): the FD classifier needs labels; "
            "measure FD on a labeled dataset"
        )
    clf = cached_classifier(train_ds, cache_dir, epochs, seed)
    if clf is not None:
        if clf.config.test_accuracy is None and test_ds is not None:
            clf.config.test_accuracy = clf.accuracy(test_ds)
        return clf
    clf = train_classifier(train_ds, test_ds, epochs=epochs, seed=seed, progress=progress)
    clf.save(classifier_path(train_ds, cache_dir))
    return clf


__all__ = [
    "Classifier",
    "ClassifierConfig",
    "cached_classifier",
    "SmallCNN",
    "classifier_path",
    "default_cache_dir",
    "get_classifier",
    "train_classifier",
]
