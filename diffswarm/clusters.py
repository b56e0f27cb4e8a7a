"""From a partition manifest to what one volunteer trains: its cluster's data and its expert config.

Shared by ``diffswarm train``, the demo's worker processes and a peer that trains on start, so all
three build the same expert from the same arguments.
"""

from __future__ import annotations

import torch

from .data import ImageDataset, Partition, load_dataset
from .experts.config import ExpertConfig
from .experts.networks import NetConfig, default_patch
from .experts.schedules import ScheduleConfig


def dataset_for_partition(part: Partition, split: str = "train") -> ImageDataset:
    """Reload the dataset a partition was made from (its manifest records the source) and check it."""
    src = part.source or {}
    if not src.get("name"):
        raise ValueError("the partition manifest does not name its dataset source; re-run `diffswarm partition`")
    ds = load_dataset(src["name"], split, root=src.get("root"), size=src.get("size"), channels=src.get("channels"))
    if split == part.split:
        part.check_dataset(ds)
    return ds


def cluster_expert(part: Partition, ds: ImageDataset, cluster: int, objective: str, net: str = "dit",
                   width: int | None = None, depth: int | None = None, schedule: str = "cosine",
                   unconditional: bool = False) -> tuple[ExpertConfig, torch.Tensor, torch.Tensor]:
    """(expert config, images (n, C, H, W), labels (n,)) for the expert of ``cluster``."""
    if not 0 <= cluster < part.k:
        raise ValueError(f"--cluster must be in 0..{part.k - 1}")
    idx = torch.from_numpy(part.indices(cluster))
    c, h, _ = ds.shape
    ncfg = NetConfig(kind=net, channels=c, size=h, num_classes=0 if unconditional else ds.num_classes,
                     patch=default_patch(h))
    if width:
        ncfg.width = width
    if depth:
        ncfg.depth = depth
    cfg = ExpertConfig(objective=objective, net=ncfg, schedule=ScheduleConfig(kind=schedule), cluster=cluster,
                       num_clusters=part.k, partition_hash=part.partition_hash, dataset_id=ds.dataset_id)
    return cfg, ds.images[idx], ds.labels[idx]
