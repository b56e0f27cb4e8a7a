"""From a partition manifest to what one volunteer trains: ``TrainJob``, its data and its expert config.

``diffswarm train``, ``diffswarm peer --cluster``, ``diffswarm swarm up`` (one job file per peer in
the run directory) and the demo's worker processes all describe a volunteer's run as one
``TrainJob`` and run it with ``run_train_job``, so all four build the same expert from the same
settings. The job is written to ``OUT/job.json`` beside the checkpoint it produces.

Every expert and router config the package builds from a partition (these jobs, the eval's expert
pool, the toy swarm) comes from ``expert_config`` / ``router_config`` over one ``ClusterData``, and
every new partition manifest is written by ``write_partition`` (it records the dataset it came from).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from diffswarm.data import DatasetSpec, ImageDataset, Partition, load_dataset, make_partition
from diffswarm.experts.config import OBJECTIVES, ExpertConfig
from diffswarm.experts.networks import NETWORKS, NetConfig, default_patch
from diffswarm.experts.schedules import ScheduleConfig
from diffswarm.experts.train import TrainConfig
from diffswarm.router.model import RouterConfig
from diffswarm.router.stats.publish import STATS_FILE, write_cluster_stats
from diffswarm.router.train import RouterTrainConfig
from diffswarm.utils.fileio import atomic_write

JOB_FILE = "job.json"


def write_partition(ds: ImageDataset, data: DatasetSpec, k: int, seed: int, path: str | Path) -> Partition:
    """Partition ``ds`` (loaded from ``data``) into ``k`` clusters, record ``data`` as the manifest's source
    (what ``dataset_for_partition`` reloads) and save the manifest to ``path``."""
    part = make_partition(ds, k, seed=seed)
    part.source = data.resolved().to_dict()
    part.save(path)
    return part


def dataset_for_partition(part: Partition, split: str = "train", root: str | None = None) -> ImageDataset:
    """Reload the dataset a partition was made from (its manifest records the source) and check it. ``root``: where
    this machine keeps it (None: the folder the manifest records; "": the dataset's default location here)."""
    src = part.source or {}
    if not src.get("name"):
        raise ValueError("the partition manifest does not name its dataset source; re-run `diffswarm partition`")
    where = src.get("root") if root is None else (root or None)
    ds = load_dataset(src["name"], split, root=where, size=src.get("size"), channels=src.get("channels"))
    if split == part.split:
        part.check_dataset(ds)
    return ds


@dataclass(frozen=True)
class ClusterData:
    """What an expert's or a router's config records of the partition and the dataset it trains on."""

    shape: tuple[int, int, int]  # (C, H, W) of the images
    num_classes: int
    k: int  # clusters of the partition
    partition_hash: str | None
    dataset_id: str = ""

    @classmethod
    def of(cls, part: Partition, ds: ImageDataset) -> ClusterData:
        return cls(tuple(ds.shape), ds.num_classes, part.k, part.partition_hash, ds.dataset_id)


def expert_config(data: ClusterData, objective: str, cluster: int | None, *, net: str, width: int | None = None,
                  depth: int | None = None, schedule: str = "cosine", unconditional: bool = False) -> ExpertConfig:
    """The config of cluster ``cluster``'s expert (None: a monolith on all data, with no cluster, K or partition
    hash): network ``net`` at its kind's default sizes unless ``width`` / ``depth`` are given."""
    c, h, _ = data.shape
    ncfg = NetConfig.for_kind(net, channels=c, size=h, num_classes=0 if unconditional else data.num_classes,
                              patch=default_patch(h))
    if width:
        ncfg.width = width
    if depth:
        ncfg.depth = depth
    whole = cluster is None
    return ExpertConfig(objective=objective, net=ncfg, schedule=ScheduleConfig(kind=schedule), cluster=cluster,
                        num_clusters=None if whole else data.k, partition_hash=None if whole else data.partition_hash,
                        dataset_id=data.dataset_id)


def router_config(data: ClusterData, *, width: int, unconditional: bool = False, depth: int | None = None
                  ) -> RouterConfig:
    """The config of a router over ``data``'s K clusters (``unconditional``: no class input, the papers' kind)."""
    c, h, _ = data.shape
    cfg = RouterConfig(num_clusters=data.k, num_classes=0 if unconditional else data.num_classes, channels=c,
                       size=h, width=width, partition_hash=data.partition_hash, dataset_id=data.dataset_id)
    return replace(cfg, depth=depth) if depth else cfg


@dataclass
class TrainJob:
    """One volunteer's training run: which expert (cluster, objective, network) and how (``TrainConfig``)."""

    partition: str  # partition manifest (from `diffswarm partition`)
    cluster: int  # the cluster whose images this expert trains on
    out: str  # folder of expert.safetensors, state.safetensors, train_log.jsonl, job.json
    objective: str = "fm"  # ddpm | fm
    schedule: str = "cosine"  # DDPM noise schedule: cosine | linear (FM experts have none)
    net: str = "unet"  # denoiser network kind
    width: int | None = None  # None: the network kind's default
    depth: int | None = None
    unconditional: bool = False  # ignore class labels (no CFG)
    data_root: str | None = None  # the dataset's folder here (None: the partition's recorded one; "": the default)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.net not in NETWORKS:
            raise ValueError(f"unknown network {self.net!r}; choose one of {sorted(NETWORKS)}")
        if self.cluster < 0:
            raise ValueError(f"cluster must be >= 0, got {self.cluster}")
        if self.train.init_from and self.objective != "fm":
            raise ValueError("--init-from initialises an FM expert from a DDPM one: use it with --objective fm")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainJob:
        d = dict(d)
        train = TrainConfig.from_dict(d.pop("train", {}))
        return cls(train=train, **{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def save(self, path: str | Path) -> Path:
        return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(self.to_dict(), indent=2)))

    @classmethod
    def load(cls, path: str | Path) -> TrainJob:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"training job file {path} does not exist") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"training job file {path} is not valid: {e}") from None

    def expert(self, part: Partition, ds: ImageDataset) -> tuple[ExpertConfig, torch.Tensor, torch.Tensor]:
        """(expert config, images (n, C, H, W), labels (n,)) of this job's cluster."""
        if not 0 <= self.cluster < part.k:
            raise ValueError(f"--cluster must be in 0..{part.k - 1}")
        idx = torch.from_numpy(part.indices(self.cluster))
        cfg = expert_config(ClusterData.of(part, ds), self.objective, self.cluster, net=self.net, width=self.width,
                            depth=self.depth, schedule=self.schedule, unconditional=self.unconditional)
        return cfg, ds.images[idx], ds.labels[idx]

    def load_data(self) -> tuple[ExpertConfig, torch.Tensor, torch.Tensor]:
        part = Partition.load(self.partition)
        return self.expert(part, dataset_for_partition(part, root=self.data_root))


def run_train_job(job: TrainJob, *, progress: bool = True, position: int = 0, on_step=None,
                  prepared: tuple[ExpertConfig, torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Train ``job`` (writing ``OUT/job.json`` first); returns the checkpoint's summary.
    ``prepared``: the (config, images, labels) of ``job.load_data()`` when the caller has them already."""
    from diffswarm.experts.train import train_expert

    cfg, images, labels = prepared or job.load_data()
    job.save(Path(job.out) / JOB_FILE)
    write_cluster_stats(cfg, images, labels, Path(job.out) / STATS_FILE)
    return train_expert(cfg, job.train, images, labels, job.out, progress=progress, position=position,
                        on_step=on_step)


@dataclass
class RouterJob:
    """Training the swarm's router on a partition's cluster ids (the one place that needs every cluster's data)."""

    partition: str  # partition manifest
    out: str  # router file to write
    unconditional: bool = False  # no class input (the papers' kind)
    width: int = 256
    train: RouterTrainConfig = field(default_factory=RouterTrainConfig)


def run_router_job(job: RouterJob, *, progress: bool = True, evaluate: bool = True):
    """Train the router of ``job`` (with its accuracy against t on the test split when ``evaluate``); returns it."""
    from diffswarm.router.train import train_router

    part = Partition.load(job.partition)
    ds = dataset_for_partition(part)
    cfg = router_config(ClusterData.of(part, ds), width=job.width, unconditional=job.unconditional)
    eval_set = None
    if evaluate:
        test = dataset_for_partition(part, "test")
        eval_set = (test.images, test.labels, torch.from_numpy(part.assign(test.images)))
    return train_router(cfg, job.train, ds.images, ds.labels, torch.from_numpy(part.assignments), job.out,
                        eval_set=eval_set, progress=progress)
