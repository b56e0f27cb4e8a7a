"""Datasets (:mod:`.datasets`) and the label-free K-way partition into expert clusters (:mod:`.partition`)."""

from diffswarm.data.datasets import (
    DATASET_NAMES,
    FASHION_CLASSES,
    DatasetSpec,
    ImageDataset,
    default_dataset_name,
    load_dataset,
    read_idx,
)
from diffswarm.data.partition import PARTITION_FORMAT, Partition, make_partition

__all__ = [
    "DATASET_NAMES",
    "FASHION_CLASSES",
    "PARTITION_FORMAT",
    "DatasetSpec",
    "ImageDataset",
    "Partition",
    "default_dataset_name",
    "load_dataset",
    "make_partition",
    "read_idx",
]
