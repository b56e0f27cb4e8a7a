"""The statistics router: p(k | x_t, t, class) in closed form from statistics each peer publishes.

The trained router (:mod:`.model`) needs every cluster's images in one place. Here each peer
computes a few summary statistics of its own cluster (:func:`cluster_stats`), publishes them as a
small versioned blob (:meth:`ClusterStats.to_bytes`), and anyone holding the K blobs builds a
:class:`StatsRouter` that answers ``probs(x, t, labels)`` like the trained router, with no
central data and no training. The idea is the one the science sheet leaves open ("e.g. from
per-expert statistics each peer publishes"); the papers give no recipe, so this module is ours.

Feature space (fixed, data independent)
---------------------------------------
``DCTBasis``: the orthonormal 2-D DCT-II of each channel, coefficients put in frequency order
(JPEG zig-zag over (u, v), all channels of one frequency next to each other). Its first ``d``
columns are the feature basis ``B`` (D x d, D = C*H*W, ``B^T B = I``); the remaining D - d
columns span the residual (complement) space. Every node rebuilds it from the image shape and
``d`` alone; its name ``"dct2d-v1:d=<d>"`` is carried in every blob so peers and clients agree.

The per-cluster model (what a peer publishes)
---------------------------------------------
Write ``c = Q^T x`` for all D DCT coefficients in that order, ``z = c[:d]`` (features) and
``w = c[d:]`` (residual). Cluster k is modelled as one Gaussian that is full in the features and
diagonal in the residual coefficients:

    z0 ~ N(m_k, S_k),   w0_j ~ N(mu_kj, r_kj) independently,   z0 independent of w0.

The peer publishes the pixel mean (D,) (its DCT gives m_k and mu_k), S_k (d x d), r_k (D - d,),
its count and its class histogram; optionally per-class feature means and the pooled
within-class feature covariance (``per_class=True``).

Closed-form posterior (what :class:`StatsRouter` computes)
----------------------------------------------------------
With a = 1 - t, b = t (flow convention: x_t = a x0 + b eps, t = 0 data, t = 1 noise):

1. The DCT is orthonormal, so Q^T eps ~ N(0, I) and each part noises independently:
   z_t ~ N(a m_k, a^2 S_k + b^2 I),   w_tj ~ N(a mu_kj, a^2 r_kj + b^2).
2. With S_k = U diag(lam) U^T (eigendecomposition, once, float64):
   log N(z_t) = -1/2 sum_i [ (U^T (z_t - a m_k))_i^2 / (a^2 lam_i + b^2) + log(a^2 lam_i + b^2) + log 2 pi ].
   Variances lam_i and r_kj are floored (``StatsRouterOptions``): at ``var_floor`` so that t = 0
   stays finite when a cluster never varies in some direction (digit borders are always -1), and
   by default at ``var_floor_rel`` = 2 times the mean feature variance trace(S_k) / d (count-
   weighted over clusters). The second floor is a regulariser, not part of the exact model: real
   clusters are not Gaussian, and trusting hundreds of low-variance directions makes the
   posterior confidently wrong at small t. Measured on the K=4 partitions of Fashion-MNIST and
   digits (held-out test images, unconditional, cross-entropy of the true cluster at t = 0):
   no floor 4.77 / 1.37 nats, relative floor 2: 0.073 / 0.126 nats; top-1 0.88 -> 0.98 and
   0.92 -> 0.94. The price: on clusters that really are Gaussian it discards information (the
   synthetic 1x8x8 test mixture: total variation from exact Bayes 0.46 at t = 0 with it, 1e-4
   without). Set ``var_floor_rel = 0`` for the exact model (the exact tests and the 2-D study do).
3. Prior: p(k | c) = hist_k[c] / sum_j hist_j[c] for a class label c; p(k) = count_k / sum_j count_j
   for label -1 (or no classes, or a class no cluster has seen).
4. log p(k | x_t, t, c) = log p(k | c) + log N(z_t) + sum_j log N(w_tj) - logsumexp_k(...).
   At t = 1 every cluster's likelihood is N(0, I), so the posterior is the prior; t >= 1 returns
   the prior exactly. All of this runs in float64; ``probs`` returns float32.

When ``per_class`` statistics are present and a label c is given, step 2 uses the class mean
m_kc (shrunk towards m_k by ``class_shrinkage`` pseudo-counts) and the pooled within-class
covariance instead of m_k, S_k: p(k | x, c) needs p(x | k, c), and p(x | k) counts the class
evidence twice. Measured gain is small (Fashion-MNIST, conditional, t = 0: cross-entropy 0.123 ->
0.086 nats, top-1 0.965 -> 0.971; digits top-1 +-0.02 depending on t) for +5.7 KB per cluster at
1x28x28, so ``cluster_stats`` leaves it off by default.

The model is exact when each cluster is one Gaussian of this block form (tested against the exact
Bayes posterior); for real clusters it is the best single-Gaussian-per-cluster approximation in
these coordinates, i.e. quadratic discriminant analysis on the noised data.

Wire format (``ClusterStats.to_bytes``)
---------------------------------------
A msgpack map (``STATS_FORMAT``, ``version``): identifiers, ints, and arrays as
``{"dtype": "<f2" | "<f4", "data": bytes}`` whose lengths follow from the declared image shape
and basis. Written with the pixel mean, residual variances and class means in float16, the
covariances (upper triangle) in float32. ``ClusterStats.from_bytes`` refuses blobs over
``MAX_STATS_BYTES`` (64 KiB) before parsing, and any field of the wrong type, shape, or with
non-finite, negative-variance or non-PSD values, with ``StatsFormatError`` (a ``ValueError``).
Slightly negative covariance eigenvalues (float rounding, >= -1e-3 max(1, lam_max)) are accepted
and clamped to the variance floor by the router; clearly negative ones are refused.
Sizes at d = 48 (the default): 1x28x28 8.0 KB (13.7 KB with per-class statistics), 3x32x32
17.2 KB (22.9 KB); d = 64: 11.6 KB and 20.8 KB. Every blob is bounded by ``MAX_STATS_BYTES``,
and the declared shape by ``MAX_PIXELS`` = 4096 values and ``MAX_FEATURES`` = 128.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import msgpack
import numpy as np
import torch
from torch import nn

from diffswarm.router.model import RouterConfig
from diffswarm.utils.fileio import atomic_write

STATS_FORMAT = "diffswarm.cluster_stats"
STATS_VERSION = 1
BASIS_KIND = "dct2d-v1"
DEFAULT_FEATURES = 48  # d
MAX_STATS_BYTES = 64 * 1024  # hard bound on one blob, checked before parsing
MAX_PIXELS = 4096  # D = C*H*W a blob may declare (3x32x32 = 3072, 1x64x64 = 4096)
MAX_FEATURES = 128  # d
MAX_CLASSES = 1000
MAX_ID_CHARS = 256  # partition_hash, dataset_id
MAX_ABS_VALUE = 1e4  # pixel / class means
MAX_VARIANCE = 1e8
PSD_TOL = 1e-3  # eigenvalues >= -PSD_TOL * max(1, lam_max) are accepted (the router floors them)
_BASIS_RE = re.compile(r"^dct2d-v1:d=([1-9][0-9]{0,3})$")
_DTYPES = {"<f2": np.dtype("<f2"), "<f4": np.dtype("<f4")}


class StatsFormatError(ValueError):
    """A cluster-statistics blob that does not follow the format; the caller skips it and logs why."""


# ---------------------------------------------------------------------------------------------
# the fixed feature space


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix (n, n) float64: M[k, i] = sqrt((1 or 2) / n) cos(pi (2i + 1) k / (2n)).

    Same as ``scipy.fft.dct(np.eye(n), norm="ortho", axis=0)``; rows are the basis functions.
    """
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    m[0] /= np.sqrt(2.0)
    return m


def frequency_order(channels: int, height: int, width: int) -> np.ndarray:
    """(D,) int64 indices into the flattened (C, H, W) coefficient grid, lowest frequency first.

    JPEG zig-zag over (u, v): by diagonal u + v, alternating direction; at each frequency all
    channels in channel order.
    """
    uv = [(u, v) for u in range(height) for v in range(width)]
    uv.sort(key=lambda p: (p[0] + p[1], p[0] if (p[0] + p[1]) % 2 else p[1]))
    hw = height * width
    return np.array([c * hw + u * width + v for (u, v) in uv for c in range(channels)], dtype=np.int64)


@dataclass(frozen=True)
class DCTBasis:
    """The orthonormal per-channel 2-D DCT-II in frequency order; its first ``d`` columns are B."""

    image_shape: tuple[int, int, int]  # (C, H, W)
    d: int = DEFAULT_FEATURES  # feature dimension

    def __post_init__(self) -> None:
        c, h, w = self.image_shape
        if min(c, h, w) < 1:
            raise ValueError(f"image_shape must be positive (C, H, W), got {self.image_shape}")
        if not 1 <= self.d <= c * h * w:
            raise ValueError(f"d must be in 1..{c * h * w} for images {self.image_shape}, got {self.d}")

    @property
    def name(self) -> str:
        return f"{BASIS_KIND}:d={self.d}"

    @property
    def dim(self) -> int:
        """D = C*H*W."""
        c, h, w = self.image_shape
        return c * h * w

    @classmethod
    def from_name(cls, name: str, image_shape: Sequence[int]) -> DCTBasis:
        m = _BASIS_RE.match(name) if isinstance(name, str) else None
        if m is None:
            raise ValueError(f"unknown basis {name!r}; expected '{BASIS_KIND}:d=<int>'")
        return cls(tuple(int(s) for s in image_shape), int(m.group(1)))

    def _tables(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c, h, w = self.image_shape
        mh = torch.as_tensor(dct_matrix(h), device=device, dtype=dtype)  # (H, H)
        mw = torch.as_tensor(dct_matrix(w), device=device, dtype=dtype)  # (W, W)
        order = torch.as_tensor(frequency_order(c, h, w), device=device)  # (D,)
        return mh, mw, order

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """All D coefficients Q^T x in frequency order. x: (N, C, H, W) -> (N, D), dtype/device of x."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images (N, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        mh, mw, order = self._tables(x.device, x.dtype)
        coef = torch.einsum("uh,nchw,vw->ncuv", mh, x, mw)  # (N, C, H, W) per-channel DCT
        return coef.reshape(x.shape[0], -1)[:, order]  # (N, D)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """z = B^T x. x: (N, C, H, W) -> (N, d)."""
        return self.coefficients(x)[:, : self.d]

    def from_coefficients(self, coef: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`coefficients`: (N, D) in frequency order -> (N, C, H, W)."""
        c, h, w = self.image_shape
        mh, mw, order = self._tables(coef.device, coef.dtype)
        grid = torch.zeros_like(coef)
        grid[:, order] = coef
        return torch.einsum("uh,ncuv,vw->nchw", mh, grid.reshape(-1, c, h, w), mw)

    def matrix(self, dtype=torch.float64) -> torch.Tensor:
        """B as an explicit (D, d) matrix with orthonormal columns (for tests and small D)."""
        eye = torch.eye(self.dim, dtype=dtype)[: self.d]  # (d, D) unit coefficient vectors
        return self.from_coefficients(eye).reshape(self.d, -1).T  # (D, d)


# ---------------------------------------------------------------------------------------------
# what a peer publishes


@dataclass(eq=False)
class ClusterStats:
    """Summary statistics of one cluster's images, enough for the closed-form router.

    Computed by :func:`cluster_stats`; serialised by :meth:`to_bytes` / :meth:`from_bytes`.
    Arrays are float64 numpy in memory (rounded to their wire dtype by a round trip).
    """

    image_shape: tuple[int, int, int]  # (C, H, W)
    basis: str  # DCTBasis name, e.g. "dct2d-v1:d=48"
    num_classes: int  # 0: unlabeled
    count: int  # images in the cluster
    class_hist: np.ndarray  # (num_classes,) int64, sums to count when num_classes > 0
    mean: np.ndarray  # (D,) pixel-space mean of x0
    feat_cov: np.ndarray  # (d, d) covariance of z0 = B^T x0
    resid_var: np.ndarray  # (D - d,) variance of each residual DCT coefficient
    class_means: np.ndarray | None = None  # (num_classes, d) feature mean per class (0 where absent)
    within_cov: np.ndarray | None = None  # (d, d) pooled within-class feature covariance
    cluster: int | None = None  # cluster index in the partition, if known
    partition_hash: str = ""  # partition the cluster belongs to
    dataset_id: str = ""  # e.g. "fashion:28"
    extra: dict = field(default_factory=dict)  # unknown fields found when parsing (ignored, not re-sent)

    @property
    def d(self) -> int:
        return self.feat_cov.shape[0]

    def basis_obj(self) -> DCTBasis:
        return DCTBasis.from_name(self.basis, self.image_shape)

    # -------------------------------------------------------------- wire format

    def to_bytes(self) -> bytes:
        """msgpack blob (see the module docstring); at most ``MAX_STATS_BYTES`` or ValueError."""
        d = {
            "format": STATS_FORMAT,
            "version": STATS_VERSION,
            "basis": self.basis,
            "image_shape": [int(s) for s in self.image_shape],
            "num_classes": int(self.num_classes),
            "count": int(self.count),
            "class_hist": [int(v) for v in self.class_hist],
            "mean": _pack(self.mean, "<f2"),
            "feat_cov": _pack(_triu(self.feat_cov), "<f4"),
            "resid_var": _pack(self.resid_var, "<f2"),
            "partition_hash": self.partition_hash,
            "dataset_id": self.dataset_id,
        }
        if self.cluster is not None:
            d["cluster"] = int(self.cluster)
        if self.class_means is not None and self.within_cov is not None:
            d["class_means"] = _pack(self.class_means.reshape(-1), "<f2")
            d["within_cov"] = _pack(_triu(self.within_cov), "<f4")
        blob = msgpack.packb(d, use_bin_type=True)
        if len(blob) > MAX_STATS_BYTES:
            raise ValueError(
                f"cluster stats take {len(blob)} bytes, over the {MAX_STATS_BYTES}-byte bound; use a smaller d"
            )
        return blob

    @classmethod
    def from_bytes(cls, blob: bytes) -> ClusterStats:
        """Parse and check a blob from the network. Anything wrong raises ``StatsFormatError``."""
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise StatsFormatError(f"cluster stats must be bytes, got {type(blob).__name__}")
        if len(blob) > MAX_STATS_BYTES:
            raise StatsFormatError(f"cluster stats blob of {len(blob)} bytes exceeds {MAX_STATS_BYTES}")
        try:
            d = msgpack.unpackb(bytes(blob), raw=False, strict_map_key=True, use_list=True)
        except Exception as e:  # msgpack raises several unrelated types on garbage
            raise StatsFormatError(f"cluster stats are not valid msgpack ({type(e).__name__}: {e})") from None
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d) -> ClusterStats:
        """Validate an unpacked map (see :meth:`from_bytes`); unknown fields go to ``extra``."""
        if not isinstance(d, dict):
            raise StatsFormatError(f"cluster stats must be a map, got {type(d).__name__}")
        if d.get("format") != STATS_FORMAT:
            raise StatsFormatError(f"not cluster stats (format {d.get('format')!r}, expected {STATS_FORMAT!r})")
        _int(d, "version", 1, 2**31)  # checked; every version so far reads the same
        shape = d.get("image_shape")
        if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(s) and s >= 1 for s in shape)):
            raise StatsFormatError(f"image_shape must be three positive ints, got {shape!r}")
        c, h, w = shape
        if c * h * w > MAX_PIXELS:
            raise StatsFormatError(f"image_shape {shape} has {c * h * w} values, over the bound {MAX_PIXELS}")
        basis_name = d.get("basis")
        try:
            basis = DCTBasis.from_name(basis_name, shape)
        except ValueError as e:
            raise StatsFormatError(f"basis: {e}") from None
        if basis.d > MAX_FEATURES:
            raise StatsFormatError(f"basis has d={basis.d} features, over the bound {MAX_FEATURES}")
        big_d, small_d = basis.dim, basis.d
        num_classes = _int(d, "num_classes", 0, MAX_CLASSES)
        count = _int(d, "count", 0, 2**53)
        hist = d.get("class_hist")
        hist_ok = isinstance(hist, list) and len(hist) == num_classes
        if not (hist_ok and all(_is_int(v) and 0 <= v <= count for v in hist)):
            raise StatsFormatError(f"class_hist must be {num_classes} ints in 0..count")
        if num_classes and sum(hist) != count:
            raise StatsFormatError(f"class_hist sums to {sum(hist)}, not count {count}")
        mean = _unpack(d, "mean", big_d, MAX_ABS_VALUE)
        feat_cov = _untriu(_unpack(d, "feat_cov", small_d * (small_d + 1) // 2, MAX_VARIANCE), small_d)
        _check_psd(feat_cov, "feat_cov")
        resid_var = _unpack(d, "resid_var", big_d - small_d, MAX_VARIANCE)
        if (resid_var < 0).any():
            raise StatsFormatError("resid_var has negative variances")
        class_means = within_cov = None
        if "class_means" in d or "within_cov" in d:
            if num_classes == 0:
                raise StatsFormatError("class_means given for an unlabeled cluster")
            class_means = _unpack(d, "class_means", num_classes * small_d, MAX_ABS_VALUE).reshape(num_classes, small_d)
            within_cov = _untriu(_unpack(d, "within_cov", small_d * (small_d + 1) // 2, MAX_VARIANCE), small_d)
            _check_psd(within_cov, "within_cov")
        cluster = d.get("cluster")
        if cluster is not None and not (_is_int(cluster) and 0 <= cluster < 2**31):
            raise StatsFormatError(f"cluster must be a non-negative int, got {cluster!r}")
        ids = {}
        for key in ("partition_hash", "dataset_id"):
            v = d.get(key, "")
            if not (isinstance(v, str) and len(v) <= MAX_ID_CHARS):
                raise StatsFormatError(f"{key} must be a string of at most {MAX_ID_CHARS} characters")
            ids[key] = v
        known = {"format", "version", "image_shape", "basis", "num_classes", "count", "class_hist", "mean",
                 "feat_cov", "resid_var", "class_means", "within_cov", "cluster", "partition_hash", "dataset_id"}
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(
            image_shape=(c, h, w), basis=basis.name, num_classes=num_classes, count=count,
            class_hist=np.asarray(hist, dtype=np.int64), mean=mean, feat_cov=feat_cov, resid_var=resid_var,
            class_means=class_means, within_cov=within_cov, cluster=cluster, extra=extra, **ids,
        )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(d: dict, key: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if not (_is_int(v) and lo <= v <= hi):
        raise StatsFormatError(f"{key} must be an int in {lo}..{hi}, got {v!r}")
    return v


def _pack(a: np.ndarray, dtype: str) -> dict:
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    if dtype == "<f2":
        a = np.clip(a, -65504.0, 65504.0)
    return {"dtype": dtype, "data": a.astype(_DTYPES[dtype]).tobytes()}


def _unpack(d: dict, key: str, n: int, bound: float) -> np.ndarray:
    """(n,) float64 from ``{"dtype", "data"}``; checks length, finiteness and |value| <= bound."""
    a = d.get(key)
    if not (isinstance(a, dict) and a.get("dtype") in _DTYPES and isinstance(a.get("data"), bytes)):
        raise StatsFormatError(f"{key} must be an array {{dtype: '<f2'|'<f4', data: bytes}}")
    dt = _DTYPES[a["dtype"]]
    if len(a["data"]) != n * dt.itemsize:
        raise StatsFormatError(f"{key} has {len(a['data'])} bytes, expected {n} x {dt.itemsize}")
    out = np.frombuffer(a["data"], dtype=dt).astype(np.float64)
    if not np.isfinite(out).all():
        raise StatsFormatError(f"{key} has non-finite values")
    if (np.abs(out) > bound).any():
        raise StatsFormatError(f"{key} has values beyond +-{bound:g}")
    return out


def _triu(m: np.ndarray) -> np.ndarray:
    """Upper triangle (row-major, diagonal included) of a symmetric (d, d) matrix."""
    m = np.asarray(m, dtype=np.float64)
    return m[np.triu_indices(m.shape[0])]


def _untriu(v: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((n, n))
    m[np.triu_indices(n)] = v
    return m + np.triu(m, 1).T


def _check_psd(m: np.ndarray, key: str) -> None:
    lam = np.linalg.eigvalsh(m)
    if lam.size and lam[0] < -PSD_TOL * max(1.0, lam[-1]):
        raise StatsFormatError(f"{key} is not positive semi-definite (eigenvalue {lam[0]:.3g})")


STATS_FILE = "cluster_stats.bin"  # a cluster's statistics, written beside its expert's checkpoint


def stats_path(checkpoint) -> Path:
    """Where the cluster statistics of the expert ``checkpoint`` (OUT/expert.safetensors) live."""
    return Path(checkpoint).parent / STATS_FILE


def write_cluster_stats(cfg, images: torch.Tensor, labels: torch.Tensor, path) -> Path:
    """Statistics of this cluster's own images (an expert's ``ExpertConfig`` says the shape, classes, cluster and
    partition) in the default DCT feature space, written atomically to ``path``: what its peer publishes."""
    shape = (cfg.net.channels, cfg.net.size, cfg.net.size)
    st = cluster_stats(images, labels, cfg.net.num_classes, DCTBasis(shape), cluster=cfg.cluster,
                       partition_hash=cfg.partition_hash or "", dataset_id=cfg.dataset_id)
    blob = st.to_bytes()
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(blob))


def read_cluster_stats(path) -> tuple[bytes, ClusterStats]:
    """(blob, parsed statistics) of a stats file; ``StatsFormatError`` if it is not one."""
    p = Path(path)
    if p.stat().st_size > MAX_STATS_BYTES:
        raise StatsFormatError(f"{p} is {p.stat().st_size} bytes, over the {MAX_STATS_BYTES}-byte bound")
    blob = p.read_bytes()
    return blob, ClusterStats.from_bytes(blob)


def cluster_stats(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    num_classes: int,
    basis: DCTBasis,
    per_class: bool = False,
    cluster: int | None = None,
    partition_hash: str = "",
    dataset_id: str = "",
) -> ClusterStats:
    """Statistics of one cluster from its own images alone (what a peer computes and publishes).

    images: (N, C, H, W) in [-1, 1]; labels: (N,) in 0..num_classes-1 (ignored when num_classes
    is 0). Covariances and variances are unbiased (divide by N - 1; zeros when N < 2); computed in
    float64 on the images' device, in chunks of 4096 so memory stays O(D + d^2).
    """
    if images.ndim != 4 or tuple(images.shape[1:]) != basis.image_shape:
        raise ValueError(f"images must be (N, {', '.join(map(str, basis.image_shape))}), got {tuple(images.shape)}")
    n = int(images.shape[0])
    dev = images.device
    if num_classes:
        if labels is None or labels.shape != (n,):
            raise ValueError(f"labels must be (N,) = ({n},) when num_classes > 0")
        labels = labels.to(dev).long()
        if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"labels must lie in 0..{num_classes - 1}")
        hist = torch.bincount(labels, minlength=num_classes).cpu().numpy()
    else:
        hist = np.zeros(0, dtype=np.int64)
        per_class = False
    big_d, d = basis.dim, basis.d
    # 1. sums over chunks: pixel sum, coefficient sum, coefficient sum of squares, feature outer products
    s_px = torch.zeros(big_d, dtype=torch.float64, device=dev)
    s_c = torch.zeros(big_d, dtype=torch.float64, device=dev)
    s_cc = torch.zeros(big_d, dtype=torch.float64, device=dev)
    s_zz = torch.zeros(d, d, dtype=torch.float64, device=dev)
    s_zc = torch.zeros(max(num_classes, 1), d, dtype=torch.float64, device=dev)  # per-class feature sums
    for s in range(0, n, 4096):
        x = images[s : s + 4096].to(torch.float64)  # (n, C, H, W)
        coef = basis.coefficients(x)  # (n, D)
        z = coef[:, :d]  # (n, d)
        s_px += x.reshape(x.shape[0], -1).sum(0)
        s_c += coef.sum(0)
        s_cc += (coef * coef).sum(0)
        s_zz += z.T @ z
        if per_class:
            s_zc.index_add_(0, labels[s : s + 4096], z)
    # 2. moments
    mean = s_px / max(n, 1)
    m_c = s_c / max(n, 1)  # (D,)
    denom = max(n - 1, 1)
    var_c = ((s_cc - n * m_c * m_c) / denom).clamp_min(0) if n > 1 else torch.zeros_like(m_c)
    m_z = m_c[:d]
    feat_cov = (s_zz - n * torch.outer(m_z, m_z)) / denom if n > 1 else torch.zeros_like(s_zz)
    feat_cov = 0.5 * (feat_cov + feat_cov.T)
    class_means = within_cov = None
    if per_class:
        cnt = torch.as_tensor(hist, dtype=torch.float64, device=dev)  # (num_classes,)
        class_means = s_zc / cnt.clamp_min(1)[:, None]  # (num_classes, d)
        # pooled within-class scatter: sum_i z_i z_i^T - sum_c n_c m_c m_c^T, over n - (#classes present) dof
        scatter = s_zz - (class_means * cnt[:, None]).T @ class_means
        dof = n - int((cnt > 0).sum())
        within_cov = scatter / dof if dof > 0 else torch.zeros_like(scatter)
        within_cov = 0.5 * (within_cov + within_cov.T)
        class_means, within_cov = class_means.cpu().numpy(), within_cov.cpu().numpy()
    return ClusterStats(
        image_shape=basis.image_shape, basis=basis.name, num_classes=int(num_classes), count=n,
        class_hist=np.asarray(hist, dtype=np.int64), mean=mean.cpu().numpy(), feat_cov=feat_cov.cpu().numpy(),
        resid_var=var_c[d:].cpu().numpy(), class_means=class_means, within_cov=within_cov,
        cluster=cluster, partition_hash=partition_hash, dataset_id=dataset_id,
    )


def partition_cluster_stats(images: torch.Tensor, labels: torch.Tensor, clusters: torch.Tensor, num_clusters: int,
                            num_classes: int, basis: DCTBasis, **kwargs) -> list[ClusterStats]:
    """K :func:`cluster_stats`, each from its own cluster's rows only (a simulation of K peers).

    images: (N, C, H, W); labels, clusters: (N,). kwargs go to :func:`cluster_stats`.
    """
    out = []
    for k in range(num_clusters):
        rows = (clusters == k).nonzero(as_tuple=True)[0]
        out.append(cluster_stats(images[rows], labels[rows], num_classes, basis, cluster=k, **kwargs))
    return out


# ---------------------------------------------------------------------------------------------
# the router


@dataclass
class StatsRouterOptions:
    """How a :class:`StatsRouter` turns published statistics into a posterior."""

    var_floor: float = 1e-4  # minimum variance per direction (about one 8-bit grey level squared)
    use_class_stats: bool = True  # use per-class means / within-class covariance when all clusters publish them
    class_shrinkage: float = 5.0  # pseudo-counts pulling a class mean towards its cluster mean
    var_floor_rel: float = 2.0  # extra floor: this multiple of the count-weighted mean of trace(S_k) / d


class StatsRouter(nn.Module):
    """p(k | x_t, t, class) in closed form from K :class:`ClusterStats` (see the module docstring).

    Drop-in for :class:`~diffswarm.router.model.Router` in ``RoutedEnsemble``: ``cfg`` is a
    ``RouterConfig`` (num_clusters, num_classes, channels, size, partition_hash, dataset_id) and
    ``probs(x, t, labels)`` returns (B, K) float32. ``forward`` returns the log-posterior (B, K),
    which serves as logits, so ``router_accuracy_by_t`` (router/train.py) also takes it. Statistics
    are float64 buffers; the one parameter is empty and only tells code that looks for a router's
    device with ``next(router.parameters())`` where the buffers are.
    """

    def __init__(self, stats: Sequence[ClusterStats], options: StatsRouterOptions | None = None,
                 partition_hash: str | None = None, dataset_id: str | None = None):
        super().__init__()
        self.device_anchor = nn.Parameter(torch.zeros(0, dtype=torch.float64), requires_grad=False)
        opt = options or StatsRouterOptions()
        self.options = opt
        stats = list(stats)
        if not stats:
            raise ValueError("a stats router needs at least one cluster's statistics")
        first = stats[0]
        for k, s in enumerate(stats):
            mine, ref = (s.image_shape, s.basis, s.num_classes), (first.image_shape, first.basis, first.num_classes)
            if mine != ref:
                raise ValueError(f"cluster {k} stats disagree with cluster 0 on image shape, basis or classes: "
                                 f"{mine} vs {ref}")
            if s.cluster is not None and s.cluster != k:
                raise ValueError(f"stats at position {k} are for cluster {s.cluster}; order them by cluster")
        hashes = {s.partition_hash for s in stats if s.partition_hash}
        if len(hashes) > 1:
            raise ValueError(f"cluster stats come from {len(hashes)} different partitions")
        counts = np.array([s.count for s in stats], dtype=np.float64)
        if counts.sum() <= 0:
            raise ValueError("all clusters are empty")
        self.basis = first.basis_obj()
        c, h, w = first.image_shape
        self.cfg = RouterConfig(
            num_clusters=len(stats), num_classes=first.num_classes, channels=c, size=h,
            partition_hash=partition_hash if partition_hash is not None else (hashes.pop() if hashes else None),
            dataset_id=dataset_id if dataset_id is not None else first.dataset_id,
        )
        self.image_shape = first.image_shape
        d = self.basis.d
        w_k = counts / counts.sum()
        mean_eig = float(sum(wk * np.trace(s.feat_cov) / d for wk, s in zip(w_k, stats, strict=True)))
        floor = max(opt.var_floor, opt.var_floor_rel * mean_eig)
        self.floor = floor

        # 1. priors: log p(k) and log p(k | c) (classes no cluster has seen fall back to p(k))
        with np.errstate(divide="ignore"):
            log_pk = np.log(counts / counts.sum())  # (K,), -inf for empty clusters
        nc = first.num_classes
        if nc:
            hist = np.stack([s.class_hist for s in stats]).astype(np.float64)  # (K, nc)
            tot = hist.sum(0, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                log_pkc = np.where(tot > 0, np.log(hist / np.where(tot > 0, tot, 1)), log_pk[:, None])  # (K, nc)
        else:
            hist, log_pkc = np.zeros((len(stats), 0)), np.zeros((len(stats), 0))
        self.register_buffer("log_prior", torch.as_tensor(log_pk), persistent=False)  # (K,)
        self.register_buffer("log_prior_class", torch.as_tensor(log_pkc.T.copy()), persistent=False)  # (nc, K)

        # 2. coefficient means, feature eigendecompositions, residual variances
        mean_px = torch.as_tensor(np.stack([s.mean for s in stats])).reshape(-1, *self.image_shape)  # (K, C, H, W)
        coef_mean = self.basis.coefficients(mean_px)  # (K, D)
        evals, evecs = zip(*(self._eig(s.feat_cov) for s in stats), strict=True)
        self.register_buffer("feat_mean", coef_mean[:, :d].contiguous(), persistent=False)  # (K, d)
        self.register_buffer("feat_evals", torch.stack(list(evals)), persistent=False)  # (K, d)
        self.register_buffer("feat_evecs", torch.stack(evecs), persistent=False)  # (K, d, d)
        self.register_buffer("resid_mean", coef_mean[:, d:].contiguous(), persistent=False)  # (K, D - d)
        resid = torch.as_tensor(np.stack([s.resid_var for s in stats])).clamp_min(floor)
        self.register_buffer("resid_var", resid, persistent=False)  # (K, D - d)

        # 3. optional per-class feature means (shrunk) with the pooled within-class covariance
        self.per_class = bool(opt.use_class_stats and nc and all(s.class_means is not None for s in stats))
        if self.per_class:
            kappa = opt.class_shrinkage
            cm = torch.as_tensor(np.stack([s.class_means for s in stats]))  # (K, nc, d)
            n_kc = torch.as_tensor(hist)[:, :, None]  # (K, nc, 1)
            cm = (n_kc * cm + kappa * self.feat_mean[:, None, :]) / (n_kc + kappa).clamp_min(1e-12)
            wevals, wevecs = zip(*(self._eig(s.within_cov) for s in stats), strict=True)
            self.register_buffer("class_mean", cm, persistent=False)  # (K, nc, d)
            self.register_buffer("within_evals", torch.stack(wevals), persistent=False)  # (K, d)
            self.register_buffer("within_evecs", torch.stack(wevecs), persistent=False)  # (K, d, d)

    def _eig(self, cov: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(evals (d,), evecs (d, d)) of a (d, d) covariance, eigenvalues clamped at the floor."""
        cov = np.asarray(cov, dtype=np.float64)
        lam, u = np.linalg.eigh(0.5 * (cov + cov.T))
        return torch.as_tensor(np.maximum(lam, self.floor)), torch.as_tensor(u)

    @staticmethod
    def _gauss_eig(z: torch.Tensor, mean: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor,
                   a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """log N(z; a mean, a^2 S + b^2 I) with S = evecs diag(evals) evecs^T.

        z: (B, d); mean: (B, K, d) or (K, d); evals: (K, d); evecs: (K, d, d); a, b: (B,). -> (B, K).
        """
        diff = z[:, None, :] - a[:, None, None] * mean  # (B, K, d)
        proj = torch.einsum("bkd,kde->bke", diff, evecs)  # (B, K, d) in each cluster's eigenbasis
        var = a[:, None, None] ** 2 * evals[None] + b[:, None, None] ** 2  # (B, K, d)
        return -0.5 * (proj * proj / var + var.log() + math.log(2 * math.pi)).sum(-1)

    def log_likelihood(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x_t | k, class) (B, K) float64 under each cluster's Gaussian noised to time t.

        x: (B, C, H, W); t: (B,) or scalar in [0, 1]; labels: (B,) (-1 = none) or None.
        """
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected x of shape (B, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        dev, bsz = x.device, x.shape[0]
        t = torch.as_tensor(t, device=dev, dtype=torch.float64).expand(bsz).clamp(0.0, 1.0)  # (B,)
        a, b = 1.0 - t, t
        buf = {name: tensor.to(dev) for name, tensor in self.named_buffers()}
        coef = self.basis.coefficients(x.to(torch.float64))  # (B, D)
        z, w = coef[:, : self.basis.d], coef[:, self.basis.d :]
        # residual part: independent coefficients, log N(w_j; a mu_j, a^2 r_j + b^2)
        rvar = a[:, None, None] ** 2 * buf["resid_var"][None] + b[:, None, None] ** 2  # (B, K, D - d)
        rdiff = w[:, None, :] - a[:, None, None] * buf["resid_mean"][None]  # (B, K, D - d)
        ll_resid = -0.5 * (rdiff * rdiff / rvar + rvar.log() + math.log(2 * math.pi)).sum(-1)  # (B, K)
        ll_feat = self._gauss_eig(z, buf["feat_mean"], buf["feat_evals"], buf["feat_evecs"], a, b)  # (B, K)
        if self.per_class and labels is not None:
            lab = labels.to(dev).long()
            has = (lab >= 0) & (lab < self.cfg.num_classes)  # (B,)
            cm = buf["class_mean"][:, lab.clamp(0, self.cfg.num_classes - 1)].transpose(0, 1)  # (B, K, d)
            ll_cls = self._gauss_eig(z, cm, buf["within_evals"], buf["within_evecs"], a, b)
            ll_feat = torch.where(has[:, None], ll_cls, ll_feat)
        return ll_feat + ll_resid

    def log_prior_for(self, labels: torch.Tensor, device) -> torch.Tensor:
        """log p(k | class) (B, K) float64; label -1 (or out of range, or no classes) gives log p(k)."""
        lab = labels.to(device).long()
        base = self.log_prior.to(device).expand(lab.shape[0], -1)
        nc = self.cfg.num_classes
        if not nc:
            return base
        has = (lab >= 0) & (lab < nc)
        return torch.where(has[:, None], self.log_prior_class.to(device)[lab.clamp(0, nc - 1)], base)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(k | x_t, t, labels) (B, K) float64. x: (B, C, H, W); t: (B,) or scalar; labels: (B,)."""
        bsz = x.shape[0]
        t = torch.as_tensor(t, device=x.device).expand(bsz)
        logp = self.log_prior_for(labels, x.device)  # (B, K)
        noisy = t < 1.0  # rows at t >= 1: the prior, exactly
        if bool(noisy.any()):
            ll = self.log_likelihood(x[noisy], t[noisy], labels.to(x.device)[noisy])  # (b, K)
            logp = logp.clone()
            logp[noisy] = logp[noisy] + ll
        return torch.log_softmax(logp, dim=-1)

    @torch.no_grad()
    def probs(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """p(k | x_t, t, labels): (B, K) float32 on x's device, rows sum to 1."""
        return self(x, t, labels).exp().float()


__all__ = [
    "BASIS_KIND",
    "ClusterStats",
    "DCTBasis",
    "MAX_STATS_BYTES",
    "STATS_FORMAT",
    "StatsFormatError",
    "StatsRouter",
    "StatsRouterOptions",
    "cluster_stats",
    "dct_matrix",
    "frequency_order",
    "partition_cluster_stats",
]
