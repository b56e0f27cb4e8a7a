"""Image datasets as plain tensors, loaded offline.

Every loader returns an :class:`ImageDataset` whose ``images`` are float32 (N, C, H, W) in
[-1, 1] and whose ``labels`` are int64 (N,). Sources:

- ``fashion``: Fashion-MNIST (Xiao et al. 2017) from the gzip IDX files that Debian's
  ``dataset-fashion-mnist`` package installs in ``/usr/share/datasets/fashion-mnist``
  (override with ``root`` or ``$DIFFSWARM_FASHION_DIR``). The IDX format is LeCun's MNIST
  format: a big-endian header (two zero bytes, a dtype code, the number of dimensions, one
  uint32 per dimension) followed by the raw array.
- ``digits``: scikit-learn's bundled ``load_digits`` (UCI optical digits, 8x8, values 0..16),
  split 80/20 by a fixed seed-0 permutation.
- ``folder``: the user's own images under ``root``; one subdirectory per class
  (torchvision ``ImageFolder`` layout) or a flat folder of unlabeled images.

Nothing here downloads anything.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FASHION_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_ENV = "DIFFSWARM_FASHION_DIR"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DATASET_NAMES = ("fashion", "digits", "folder")
SPLITS = ("train", "test")

# IDX dtype codes (LeCun's MNIST page); Fashion-MNIST only uses 0x08.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(eq=False)
class ImageDataset:
    """One split of one image dataset, fully in memory.

    ``dataset_id`` names the data and every option that changes its pixels (``"fashion:28"``,
    ``"digits:16"``, ``"folder:pets:32:c3"``); both splits of one dataset share it. Labels of an
    unlabeled dataset are all 0 and ``num_classes`` is 0.
    """

    name: str  # loader name: fashion | digits | folder
    split: str  # train | test
    images: torch.Tensor = field(repr=False)  # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor = field(repr=False)  # (N,) int64
    num_classes: int  # 0 if unlabeled
    class_names: list[str]  # len num_classes
    dataset_id: str  # name plus pixel-changing options, e.g. "fashion:28"
    _content_hash: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if self.labels.ndim != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"labels must be (N,) with N={self.images.shape[0]}, got shape {tuple(self.labels.shape)}"
            )
        if self.images.dtype != torch.float32 or self.labels.dtype != torch.int64:
            raise ValueError(
                f"images must be float32 and labels int64, got {self.images.dtype} and {self.labels.dtype}"
            )
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for num_classes={self.num_classes}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Image shape (C, H, W)."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def content_hash(self) -> str:
        """sha256 hex of the images' float32 bytes followed by the labels' int64 bytes; computed once."""
        if self._content_hash is None:
            h = hashlib.sha256()
            h.update(self.images.detach().cpu().contiguous().numpy().tobytes())
            h.update(self.labels.detach().cpu().contiguous().numpy().tobytes())
            self._content_hash = h.hexdigest()
        return self._content_hash


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of (N, C, H, W) to (N, C, size, size), clamped to [-1, 1]."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if images.shape[-2:] == (size, size):
        return images
    chunks = [
        F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        for chunk in images.split(8192)
    ]
    return torch.cat(chunks).clamp_(-1.0, 1.0)


# ----------------------------------------------------------------------------- fashion


def _fashion_dir(root: str | None) -> Path:
    return Path(root or os.environ.get(FASHION_ENV) or FASHION_DEFAULT_DIR)


def _fashion_available(root: str | None = None) -> bool:
    d = _fashion_dir(root)
    return all((d / f).is_file() for files in FASHION_FILES.values() for f in files)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one (optionally gzip-compressed) IDX file into a numpy array in native byte order."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX header")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {data[:4].hex()})")
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but {len(data) - header} bytes follow")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def _load_fashion(split: str, root: str | None, size: int | None) -> ImageDataset:
    d = _fashion_dir(root)
    img_file, lbl_file = (d / f for f in FASHION_FILES[split])
    missing = [str(p) for p in (img_file, lbl_file) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. "
            f"Install them with `apt-get install dataset-fashion-mnist`, or set ${FASHION_ENV} "
            "to a folder holding the four *-ubyte.gz files."
        )
    raw = read_idx(img_file)  # (N, 28, 28) uint8
    lbl = read_idx(lbl_file)  # (N,) uint8
    if raw.ndim != 3 or lbl.shape != (raw.shape[0],):
        raise ValueError(f"{d}: unexpected IDX shapes images {raw.shape}, labels {lbl.shape}")
    return _grayscale("fashion", split, raw, lbl, 255.0, size, list(FASHION_CLASSES))


def _grayscale(name: str, split: str, raw: np.ndarray, labels: np.ndarray, max_value: float, size: int | None,
               class_names: list[str]) -> ImageDataset:
    """(N, H, W) pixels in [0, max_value] -> an ImageDataset in [-1, 1], optionally resized."""
    images = torch.from_numpy(raw.astype(np.float32)).unsqueeze(1)  # (N, 1, H, W)
    images = images.mul_(2.0 / max_value).sub_(1.0)
    if size is not None:
        images = _resize(images, size)
    return ImageDataset(
        name=name,
        split=split,
        images=images.contiguous(),
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=len(class_names),
        class_names=class_names,
        dataset_id=f"{name}:{int(images.shape[-1])}",
    )


# ----------------------------------------------------------------------------- digits


def _load_digits(split: str, size: int | None) -> ImageDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    y = bunch.target.astype(np.int64)  # (1797,)
    perm = np.random.default_rng(0).permutation(len(x))
    n_train = int(0.8 * len(x))
    idx = perm[:n_train] if split == "train" else perm[n_train:]
    return _grayscale("digits", split, x[idx], y[idx], 16.0, size, [str(i) for i in range(10)])


# ----------------------------------------------------------------------------- folder


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _images_under(d: Path) -> list[Path]:
    """Image files anywhere below d, skipping hidden files and folders, sorted by path."""
    found = (p for p in d.rglob("*") if _is_image(p))
    return sorted(p for p in found if not any(part.startswith(".") for part in p.relative_to(d).parts))


def _read_image(path: Path, size: int, channels: int) -> np.ndarray:
    """Read one image, center-crop it to a square, resize to size x size; returns (size, size[, 3]) uint8."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
            im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def _load_folder(split: str, root: str, size: int | None, channels: int | None) -> ImageDataset:
    """(options checked by ``check_dataset_options``)"""
    size = 32 if size is None else int(size)
    channels = 1 if channels is None else int(channels)
    d = Path(root).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"image folder {d} does not exist or is not a directory")

    # 1. Find the files: class subdirectories (ImageFolder layout) or a flat unlabeled folder.
    subdirs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    class_names: list[str] = []
    if subdirs:
        for sub in subdirs:
            found = _images_under(sub)
            if not found:
                warnings.warn(f"class folder {sub} holds no images ({', '.join(IMAGE_EXTENSIONS)}); skipped",
                              stacklevel=2)
                continue
            files.extend(found)
            labels.extend([len(class_names)] * len(found))
            class_names.append(sub.name)
        loose = [p for p in d.iterdir() if _is_image(p)]
        if loose and files:
            warnings.warn(f"{len(loose)} images directly in {d} ignored: with class subfolders only they count",
                          stacklevel=2)
    else:
        files = sorted(p for p in d.iterdir() if _is_image(p))
        labels = [0] * len(files)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {d}")

    # 2. Deterministic 90/10 split: sorted paths (already), then a seed-0 permutation.
    order = sorted(range(len(files)), key=lambda i: str(files[i]))
    perm = np.random.default_rng(0).permutation(len(files))
    n = len(files)
    n_train = n if n == 1 else min(n - 1, max(1, round(0.9 * n)))
    chosen = perm[:n_train] if split == "train" else perm[n_train:]
    if len(chosen) == 0:
        raise ValueError(f"{d} holds only {n} image(s): too few for a {split} split")
    idx = [order[i] for i in sorted(chosen)]

    # 3. Read and convert.
    arrays = [_read_image(files[i], size, channels) for i in idx]
    x = np.stack(arrays).astype(np.float32)  # (N, H, W) or (N, H, W, 3)
    images = torch.from_numpy(x[:, None] if channels == 1 else x.transpose(0, 3, 1, 2).copy())  # (N, C, H, W)
    images = images.mul_(2.0 / 255.0).sub_(1.0)
    return ImageDataset(
        name="folder",
        split=split,
        images=images.contiguous(),
        labels=torch.tensor([labels[i] for i in idx], dtype=torch.int64),
        num_classes=len(class_names),
        class_names=class_names,
        dataset_id=f"folder:{d.resolve().name}:{size}:c{channels}",
    )


# ----------------------------------------------------------------------------- entry points


def check_dataset_options(name: str, root: str | None = None, size: int | None = None,
                          channels: int | None = None) -> None:
    """Refuse options a dataset would not honour (ValueError naming the option), before loading anything."""
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if size is not None and size < 1:
        raise ValueError(f"--size must be >= 1, got {size}")
    if name in ("fashion", "digits") and channels not in (None, 1):
        raise ValueError(f"dataset {name} (--dataset) is grayscale: --channels must be 1 or omitted")
    if name == "digits" and root is not None:
        raise ValueError("dataset digits (--dataset) takes no --data-root: scikit-learn bundles it")
    if name == "folder":
        if root is None:
            raise ValueError("--dataset folder needs --data-root <directory of images>")
        if channels not in (None, 1, 3):
            raise ValueError(f"--channels must be 1 (grayscale) or 3 (RGB), got {channels}")


def load_dataset(
    name: str,
    split: str = "train",
    root: str | None = None,
    size: int | None = None,
    channels: int | None = None,
) -> ImageDataset:
    """Load one split of a dataset (see the module docstring for the sources).

    Args:
        name: ``fashion``, ``digits`` or ``folder``.
        split: ``train`` or ``test``.
        root: fashion: folder of the IDX files; folder: the image directory (required).
        size: resize to size x size (fashion/digits: bilinear antialiased; folder: default 32).
        channels: folder only: 1 (grayscale, default) or 3 (RGB).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    check_dataset_options(name, root, size, channels)
    if name == "fashion":
        return _load_fashion(split, root, size)
    if name == "digits":
        return _load_digits(split, size)
    return _load_folder(split, root, size, channels)


@dataclass(frozen=True)
class DatasetSpec:
    """Which dataset and which pixel-changing options; what a partition manifest records as its ``source``."""

    name: str | None = None  # fashion | digits | folder (None: fashion if installed, else digits)
    root: str | None = None  # fashion: IDX folder; folder: the image directory
    size: int | None = None  # resize to size x size
    channels: int | None = None  # folder: 1 or 3

    def resolved(self) -> DatasetSpec:
        """This spec with the default dataset filled in and its options checked."""
        spec = self if self.name else DatasetSpec(default_dataset_name(), self.root, self.size, self.channels)
        check_dataset_options(spec.name, spec.root, spec.size, spec.channels)
        return spec

    def load(self, split: str = "train") -> ImageDataset:
        s = self.resolved()
        return load_dataset(s.name, split, root=s.root, size=s.size, channels=s.channels)

    def to_dict(self) -> dict:
        return {"name": self.name, "root": self.root, "size": self.size, "channels": self.channels}


def default_dataset_name() -> str:
    """``"fashion"`` when the Fashion-MNIST files are installed (or found via $DIFFSWARM_FASHION_DIR), else
    ``"digits"``."""
    return "fashion" if _fashion_available() else "digits"
