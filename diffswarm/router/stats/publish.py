"""What a peer computes from its own cluster's images and publishes, and the stats file beside its checkpoint.

The per-cluster model (what a peer publishes)
---------------------------------------------
Write ``c = Q^T x`` for all D DCT coefficients in that order, ``z = c[:d]`` (features) and
``w = c[d:]`` (residual). Cluster k is modelled as one Gaussian that is full in the features and
diagonal in the residual coefficients:

    z0 ~ N(m_k, S_k),   w0_j ~ N(mu_kj, r_kj) independently,   z0 independent of w0.

The peer publishes the pixel mean (D,) (its DCT gives m_k and mu_k), S_k (d x d), r_k (D - d,),
its count and its class histogram; optionally per-class feature means and the pooled
within-class feature covariance (``per_class=True``).

The closed-form posterior built from K such blobs: :mod:`diffswarm.router.stats.router`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffswarm.router.stats.basis import DCTBasis
from diffswarm.router.stats.blob import MAX_STATS_BYTES, ClusterStats, StatsFormatError
from diffswarm.utils.fileio import atomic_write

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
