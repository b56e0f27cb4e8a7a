"""One expert pool for many studies: every cluster with every objective, a monolith, two trained routers.

``diffswarm eval`` draws all its ensembles from one pool per training seed, so homogeneous FM,
homogeneous DDPM, 2 DDPM + 6 FM (HDDM's mix) and 4 + 4 differ only in which objective each
cluster's expert has, never in data, network or training length:

- an expert per (cluster k, objective) trained alone on cluster k's images (``train_expert``);
- a monolithic FM model of the same network on all images for K times one expert's steps at the
  same batch: the compute of one ensemble's K experts together;
- the trained router p(k | x_t, t, class) and the unconditional one (same network, no class input),
  trained on every cluster's images (the one component that needs central data);
- the statistics router (``router/stats/``), built from K per-cluster statistics blobs, each
  computed from its own cluster's images only and passed through the wire format
  (``ClusterStats.to_bytes`` / ``from_bytes``), exactly what peers would publish.

Training lengths are step counts, never wall time, so one set of settings gives one set of weights
(on one kind of device; CPU and CUDA differ in rounding). Pools are cached and reused:

    <cache>/eval-pools/<sha of the partition settings>/partition.json
    <cache>/eval-pools/<sha of the partition settings>/models/<name>-<sha of its own settings>/

with ``<cache>`` = ``$DIFFSWARM_CACHE`` or ``~/.cache/diffswarm``. The partition's sha covers the
dataset (its content hash), K and the partition seed; each model's sha covers everything that
changes its weights (its expert or router config, the partition hash, steps, batch, learning-rate
recipe, seed), so changing, say, the expert steps retrains the experts and the monolith but
reuses the partition and the routers. A model counts as done when its weights file records the
planned steps; a run killed mid-training resumes from its training state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch

from diffswarm.data import DatasetSpec, ImageDataset, Partition
from diffswarm.eval.classifier import default_cache_dir
from diffswarm.experts.checkpoint import CheckpointError, read_meta
from diffswarm.experts.config import ExpertConfig
from diffswarm.experts.expert import Expert
from diffswarm.experts.train import TrainConfig, train_expert
from diffswarm.router.model import Router, RouterConfig
from diffswarm.router.stats.basis import DEFAULT_FEATURES, DCTBasis
from diffswarm.router.stats.blob import ClusterStats
from diffswarm.router.stats.publish import cluster_stats
from diffswarm.router.stats.router import StatsRouter
from diffswarm.router.train import RouterTrainConfig, train_router
from diffswarm.training.jobs import ClusterData, expert_config, router_config, write_partition
from diffswarm.training.pool import WorkerPool

logger = logging.getLogger(__name__)

POOL_FORMAT = "diffswarm.eval-pool/1"
# the objectives of the pool's experts; the order numbers their seeds (``ExpertPool.expert_seed``), keep it
# (``ddpm-eps``: DDPM as HDDM trains it, the standard eps loss at uniform steps; ``ddpm``: this project's recipe,
# logit-normal steps with the flow weighting, which is the FM loss of the translated prediction)
POOL_OBJECTIVES = ("fm", "ddpm", "ddpm-eps")
# the pool's two trained routers: with the class as input, and without (the papers' kind)
ROUTER_CONDITIONINGS = ("cond", "uncond")


@dataclass(frozen=True)
class PoolConfig:
    """What the pool is made of. The network and training recipe come from one place (the presets of
    ``training/presets.py`` the demo runs too, via ``cli.eval_plans``), so changing the preset changes the eval."""

    data: DatasetSpec = field(default_factory=DatasetSpec)  # resolved: a name is set
    k: int = 8  # clusters = experts per ensemble
    partition_seed: int = 0
    net: str = "dit"  # network kind
    width: int = 96
    depth: int = 3
    batch: int = 96  # experts and monolith
    lr: float = 1e-3
    expert_steps: int = 1000  # optimizer steps of one expert
    monolith_factor: int | None = None  # monolith steps = factor x expert_steps (None: K, one ensemble's compute)
    schedule: str = "cosine"  # DDPM experts' noise schedule
    router_steps: int = 1000
    router_width: int = 256
    router_batch: int = 256
    stats_features: int = DEFAULT_FEATURES  # d of the statistics router's DCT feature space
    device: str = "auto"  # training device (not part of any cache key; recorded in each summary)
    threads: int = 1  # torch threads per training process

    @property
    def monolith_steps(self) -> int:
        return self.expert_steps * (self.monolith_factor or self.k)

    def to_dict(self) -> dict:
        return asdict(self)


def settings_sha(settings: dict) -> str:
    """sha256 hex of a settings dict in canonical JSON (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


@dataclass(frozen=True)
class ModelJob:
    """One model of the pool: what to train, where, and the settings its folder is keyed by."""

    name: str  # e.g. "s0-c3-fm", "s0-monolith-fm", "s0-router-cond"
    kind: str  # expert | router
    settings: dict  # everything that changes the weights (hashed into the folder name)
    dir: str

    @property
    def weights(self) -> Path:
        return Path(self.dir) / ("expert.safetensors" if self.kind == "expert" else "router.safetensors")

    @property
    def steps(self) -> int:
        return int(self.settings["train"]["steps"])

    def done(self) -> bool:
        """The weights file exists and records the planned steps and these settings."""
        try:
            meta = read_meta(self.weights)
        except CheckpointError:
            return False
        return meta.get("summary", {}).get("steps") == self.steps and meta.get("summary", {}).get(
            "eval_settings_sha") == settings_sha(self.settings)


@lru_cache(maxsize=4)
def _load_split(spec: DatasetSpec, split: str) -> ImageDataset:
    return spec.load(split)


class ExpertPool:
    """The cached pool of one :class:`PoolConfig` (see the module docstring)."""

    def __init__(self, cfg: PoolConfig, cache_dir: str | Path | None = None):
        if cfg.data.name is None:
            cfg = replace(cfg, data=cfg.data.resolved())
        self.cfg = cfg
        self.train_ds = _load_split(cfg.data, "train")
        self.test_ds = _load_split(cfg.data, "test")
        base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        psettings = {"format": POOL_FORMAT, "data": cfg.data.to_dict(), "content_hash": self.train_ds.content_hash,
                     "k": cfg.k, "partition_seed": cfg.partition_seed}
        self.root = base / "eval-pools" / settings_sha(psettings)[:16]
        self.root.mkdir(parents=True, exist_ok=True)
        part_path = self.root / "partition.json"
        if part_path.exists():
            self.partition = Partition.load(part_path)
            self.partition.check_dataset(self.train_ds)
        else:
            self.partition = write_partition(self.train_ds, cfg.data, cfg.k, cfg.partition_seed, part_path)
            (self.root / "pool.json").write_text(json.dumps(psettings, indent=2))
        self._stats_router: StatsRouter | None = None

    # ------------------------------------------------------------------ what the pool holds

    def expert_config(self, objective: str, cluster: int | None) -> ExpertConfig:
        """The config of cluster ``cluster``'s expert (None: the monolith) with pool objective ``objective``."""
        cfg = expert_config(ClusterData.of(self.partition, self.train_ds), objective.removesuffix("-eps"), cluster,
                            net=self.cfg.net, width=self.cfg.width, depth=self.cfg.depth, schedule=self.cfg.schedule)
        if objective == "ddpm-eps":  # HDDM as published: plain eps loss, tau ~ U{0..T-1}
            cfg = replace(cfg, ddpm_time="uniform", loss_weighting="none")
        return cfg

    def router_config(self, kind: str) -> RouterConfig:
        """The config of the router of conditioning ``kind`` (one of ``ROUTER_CONDITIONINGS``)."""
        return router_config(ClusterData.of(self.partition, self.train_ds), width=self.cfg.router_width,
                             unconditional=kind != "cond")

    @staticmethod
    def expert_seed(train_seed: int, cluster: int | None, objective: str) -> int:
        """Distinct seeds per model: 1000 s + 10 k + objective index (the monolith has k = 99)."""
        return 1000 * train_seed + 10 * (99 if cluster is None else cluster) + POOL_OBJECTIVES.index(objective)

    def _job(self, name: str, kind: str, settings: dict) -> ModelJob:
        sha = settings_sha(settings)[:12]
        return ModelJob(name, kind, settings, str(self.root / "models" / f"{name}-{sha}"))

    def expert_job(self, train_seed: int, objective: str, cluster: int | None) -> ModelJob:
        steps = self.cfg.expert_steps if cluster is not None else self.cfg.monolith_steps
        train = TrainConfig(steps=steps, batch=self.cfg.batch, lr=self.cfg.lr,
                            seed=self.expert_seed(train_seed, cluster, objective))
        keep = ("steps", "batch", "lr", "weight_decay", "warmup", "ema_decay", "seed")
        settings = {"expert": self.expert_config(objective, cluster).to_dict(),
                    "train": {k: getattr(train, k) for k in keep}, "content_hash": self.train_ds.content_hash}
        where = "monolith" if cluster is None else f"c{cluster}"
        return self._job(f"s{train_seed}-{where}-{objective}", "expert", settings)

    def router_job(self, train_seed: int, kind: str) -> ModelJob:
        train = RouterTrainConfig(steps=self.cfg.router_steps, batch=self.cfg.router_batch, seed=1000 * train_seed + 7)
        settings = {"router": self.router_config(kind).to_dict(),
                    "train": {"steps": train.steps, "batch": train.batch, "lr": train.lr, "seed": train.seed},
                    "content_hash": self.train_ds.content_hash}
        return self._job(f"s{train_seed}-router-{kind}", "router", settings)

    def jobs(self, train_seeds, objectives=("fm", "ddpm"), monolith_objectives=("fm",)) -> list[ModelJob]:
        """Every model the studies need, seed by seed, longest first: the monoliths (K experts' steps), the
        experts, then the routers, so parallel workers finish together (the monolith last would run alone)."""
        out = []
        for s in train_seeds:
            out += [self.expert_job(s, o, None) for o in monolith_objectives]
            out += [self.expert_job(s, o, k) for o in objectives for k in range(self.cfg.k)]
            out += [self.router_job(s, kind) for kind in ROUTER_CONDITIONINGS]
        return out

    # ------------------------------------------------------------------ training

    def ensure(self, train_seeds, jobs: int = 1, **which) -> dict:
        """Train whatever of ``self.jobs(train_seeds, **which)`` is not done yet; returns
        ``{"trained": [names], "reused": [names], "seconds": float, "models": {name: summary}}``."""
        t0 = time.perf_counter()
        all_jobs = self.jobs(train_seeds, **which)
        todo = [j for j in all_jobs if not j.done()]
        reused = [j.name for j in all_jobs if j not in todo]
        if reused:
            logger.info(f"pool {self.root}: reusing {len(reused)} trained model(s)")
        if todo:
            logger.info(f"pool {self.root}: training {len(todo)} model(s) in {min(jobs, len(todo))} process(es): "
                + ", ".join(j.name for j in todo))
        # one model left: it trains in this process on every thread the workers would have had
        cfg = self.cfg if len(todo) > 1 else replace(self.cfg, threads=self.cfg.threads * max(1, jobs))
        args = [(cfg, j, self.partition.to_dict()) for j in todo]
        with WorkerPool(min(jobs, len(todo)) if jobs > 1 and len(todo) > 1 else 0) as workers:
            for j, summ in zip(todo, workers.map(_train_job, args), strict=True):
                logger.info(f"  trained {j.name}: {summ['steps']} steps in {summ['seconds']:.0f}s")
        models = {j.name: read_meta(j.weights)["summary"] for j in all_jobs}
        return {"trained": [j.name for j in todo], "reused": reused, "seconds": time.perf_counter() - t0,
                "models": models, "root": str(self.root)}

    # ------------------------------------------------------------------ loading

    def expert(self, train_seed: int, objective: str, cluster: int | None, device="cpu") -> Expert:
        job = self.expert_job(train_seed, objective, cluster)
        if not job.done():
            raise FileNotFoundError(f"{job.name} is not trained yet ({job.dir}); call ensure() first")
        return Expert.from_checkpoint(job.weights, device)

    def experts(self, train_seed: int, objectives, device="cpu") -> list[Expert]:
        """Cluster k's expert with objective ``objectives[k]`` for every k (a list of K objective names)."""
        if len(objectives) != self.cfg.k:
            raise ValueError(f"need one objective per cluster (K={self.cfg.k}), got {len(objectives)}")
        return [self.expert(train_seed, o, k, device) for k, o in enumerate(objectives)]

    def router(self, train_seed: int, kind: str, device="cpu") -> Router:
        job = self.router_job(train_seed, kind)
        if not job.done():
            raise FileNotFoundError(f"{job.name} is not trained yet ({job.dir}); call ensure() first")
        return Router.load(job.weights, device)

    def cluster_stats_blobs(self) -> list[bytes]:
        """K statistics blobs, each computed from its own cluster's images only (what each peer publishes)."""
        basis = DCTBasis(self.train_ds.shape, self.cfg.stats_features)
        out = []
        for k in range(self.cfg.k):
            idx = torch.from_numpy(self.partition.indices(k))
            st = cluster_stats(self.train_ds.images[idx], self.train_ds.labels[idx], self.train_ds.num_classes, basis,
                               cluster=k, partition_hash=self.partition.partition_hash,
                               dataset_id=self.train_ds.dataset_id)
            out.append(st.to_bytes())
        return out

    def stats_router(self, device="cpu") -> StatsRouter:
        """The statistics router from the K blobs as a client would receive them (deterministic: no seed)."""
        if self._stats_router is None:
            blobs = self.cluster_stats_blobs()
            self._stats_router = StatsRouter([ClusterStats.from_bytes(b) for b in blobs])
            self.stats_bytes = [len(b) for b in blobs]
        return self._stats_router.to(device)


def _train_job(arg: tuple[PoolConfig, ModelJob, dict]) -> dict:
    """Train one model (in this process or a spawned worker); returns its summary."""
    cfg, job, part_dict = arg
    torch.set_num_threads(max(1, cfg.threads))
    part = Partition.from_dict(part_dict)
    ds = _load_split(cfg.data, "train")
    sha = settings_sha(job.settings)
    out = Path(job.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(job.settings, indent=2, sort_keys=True))
    if job.kind == "router":
        s = job.settings["train"]
        rcfg = RouterConfig.from_dict(job.settings["router"])
        tcfg = RouterTrainConfig(steps=s["steps"], batch=s["batch"], lr=s["lr"], seed=s["seed"], threads=cfg.threads,
                                 device=cfg.device)
        router = train_router(rcfg, tcfg, ds.images, ds.labels, torch.from_numpy(part.assignments), job.weights,
                              progress=False)
        router.save(job.weights, {**router.summary, "eval_settings_sha": sha})
        return read_meta(job.weights)["summary"]
    ecfg = ExpertConfig.from_dict(job.settings["expert"])
    tcfg = TrainConfig(**job.settings["train"], threads=cfg.threads, device=cfg.device, resume=True,
                       ckpt_every=min(500, max(100, job.steps // 4)), log_every=100)
    if ecfg.cluster is None:
        images, labels = ds.images, ds.labels
    else:
        idx = torch.from_numpy(part.indices(ecfg.cluster))
        images, labels = ds.images[idx], ds.labels[idx]
    train_expert(ecfg, tcfg, images, labels, out, progress=False)
    # stamp the summary with the settings it was trained from, then drop the resumable state (weights suffice)
    from diffswarm.experts.checkpoint import load_expert_file, save_expert

    meta, weights = load_expert_file(job.weights)
    save_expert(job.weights, weights, meta["config"], {**meta["summary"], "eval_settings_sha": sha})
    (out / "state.safetensors").unlink(missing_ok=True)
    return read_meta(job.weights)["summary"]


__all__ = ["POOL_OBJECTIVES", "ROUTER_CONDITIONINGS", "ExpertPool", "ModelJob", "PoolConfig", "settings_sha"]
