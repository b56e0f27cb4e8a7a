"""``ClusterStats``: one cluster's Gaussian statistics (what a peer publishes) and their wire format.

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

Bounds of a real cluster (``_check_cluster_scale``): images lie in [-1, 1] (``DATA_RANGE``), so
a blob must describe something a set of such images can produce, else it is refused:

- ``count`` in 1..``MAX_COUNT``; the class histogram sums to it (the priors p(k), p(k | c) the
  router derives from counts and histograms then lie in [0, 1] and sum to 1 by construction);
- every pixel mean in [-1, 1]; every class mean (a DCT feature vector) of norm <= sqrt(D);
- total variance: the DCT is orthonormal, so trace(feat_cov) + sum(resid_var) is the sum of the
  pixel variances, and a value in [-1, 1] with mean mu has variance <= (1 - mu)(1 + mu)
  (Bhatia-Davis): the total is at most sum_j (1 - mu_j^2), times n / (n - 1) (unbiased), so every
  covariance eigenvalue and variance is too; the pooled within-class covariance has the same bound;
  a cluster of one image has zero variances.
Tolerances cover the float16 / float32 wire rounding (``SCALE_TOL``). These bounds stop absurd
forgeries (a cluster claiming a billion images or a variance covering everything); a forgery within
them still moves routing, which is why clients use only statistics whose sha256 the swarm's owner
signed (``client.discovery.choose_stats``).
Sizes at d = 48 (the default): 1x28x28 8.0 KB (13.7 KB with per-class statistics), 3x32x32
17.2 KB (22.9 KB); d = 64: 11.6 KB and 20.8 KB. Every blob is bounded by ``MAX_STATS_BYTES``,
and the declared shape by ``MAX_PIXELS`` = 4096 values and ``MAX_FEATURES`` = 128.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import numpy as np

from diffswarm.router.stats.basis import DCTBasis

STATS_FORMAT = "diffswarm.cluster_stats"
STATS_VERSION = 1
MAX_STATS_BYTES = 64 * 1024  # hard bound on one blob, checked before parsing
MAX_PIXELS = 4096  # D = C*H*W a blob may declare (3x32x32 = 3072, 1x64x64 = 4096)
MAX_FEATURES = 128  # d
MAX_CLASSES = 1000
MAX_ID_CHARS = 256  # partition_hash, dataset_id
MAX_ABS_VALUE = 1e4  # pixel / class means
MAX_VARIANCE = 1e8
MAX_COUNT = 10**9  # images one cluster may claim (ImageNet-21k is 1.4e7; LAION-sized sets would need more)
DATA_RANGE = 1.0  # images lie in [-DATA_RANGE, DATA_RANGE] (datasets.ImageDataset)
SCALE_TOL = 2e-3  # absolute slack per value for the wire's float16 rounding of means and variances
PSD_TOL = 1e-3  # eigenvalues >= -PSD_TOL * max(1, lam_max) are accepted (the router floors them)
_DTYPES = {"<f2": np.dtype("<f2"), "<f4": np.dtype("<f4")}


class StatsFormatError(ValueError):
    """A cluster-statistics blob that does not follow the format; the caller skips it and logs why."""


@dataclass(eq=False)
class ClusterStats:
    """Summary statistics of one cluster's images, enough for the closed-form router.

    Computed by :func:`~diffswarm.router.stats.publish.cluster_stats`; serialised by :meth:`to_bytes` /
    :meth:`from_bytes`.
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
        count = _int(d, "count", 1, MAX_COUNT)
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
        _check_cluster_scale(count, hist, mean, feat_cov, resid_var, class_means, within_cov)
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


def _check_cluster_scale(count: int, hist: list, mean: np.ndarray, feat_cov: np.ndarray, resid_var: np.ndarray,
                         class_means: np.ndarray | None, within_cov: np.ndarray | None) -> None:
    """``StatsFormatError`` unless the moments are ones that ``count`` images in [-1, 1] (``hist`` per class) can
    have (module docstring: means within the data range, total variance within the Bhatia-Davis bound)."""
    big_d = mean.shape[0]
    rng = f"[-{DATA_RANGE:g}, {DATA_RANGE:g}]"
    if (np.abs(mean) > DATA_RANGE + SCALE_TOL).any():
        j = int(np.abs(mean).argmax())
        raise StatsFormatError(f"mean has pixel {j} at {mean[j]:.4g}, outside the data range {rng}")
    # 1. the scatter about the mean: sum_i ||x_i - mu||^2 <= n sum_j (R - mu_j)(R + mu_j) (Bhatia-Davis per pixel)
    scatter = count * (float(np.clip(DATA_RANGE**2 - mean**2, 0, None).sum()) + SCALE_TOL * big_d)
    # 2. the covariances divide it by their degrees of freedom (n - 1; n - #classes present for within_cov)
    present = sum(1 for v in hist if v > 0)
    for key, cov, resid, dof in (("feat_cov", feat_cov, resid_var, count - 1), ("within_cov", within_cov, None,
                                                                                 count - present)):
        if cov is None:
            continue
        total = float(np.trace(cov)) + (float(resid.sum()) if resid is not None else 0.0)
        bound = scatter / dof * (1 + SCALE_TOL) if dof > 0 else SCALE_TOL * big_d  # no dof: zeros
        if total > bound:
            what = "trace(feat_cov) + sum(resid_var)" if resid is not None else "trace(within_cov)"
            raise StatsFormatError(f"{key}: total variance {what} = {total:.4g} exceeds {bound:.4g}, the most "
                                   f"{count} image(s) in {rng} with this mean can have")
    if class_means is not None:
        norms = np.linalg.norm(class_means, axis=1)  # (num_classes,)
        lim = DATA_RANGE * big_d**0.5 * (1 + SCALE_TOL)
        if (norms > lim).any():
            c = int(norms.argmax())
            raise StatsFormatError(f"class_means: class {c} has a feature mean of norm {norms[c]:.4g}, more than "
                                   f"sqrt(D) = {lim:.4g} (images in {rng})")


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
