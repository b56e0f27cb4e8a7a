"""``diffswarm eval``: the two papers' claims tested on our own experts, from one expert pool.

:func:`run_study` trains (or reuses, :mod:`.pool`) the pool of every training seed, runs the studies
below, and writes ``results.json`` (every number) and ``report.md`` with its PNG plots
(:mod:`.report`). Every number comes from the stated seeds; nothing is typed in.

Samples ("cells")
    A cell is one sample set: ``n`` class-conditional samples (labels cycling through the classes)
    from one ensemble (objectives per cluster), one router, one routing strategy and one sampler,
    at one training seed and one sampling seed. The sampling seed fixes the noise (one CPU generator,
    shared by every setting, so settings are compared on the same noise), the ``sample-k`` draw and
    the real subsets the metrics compare with. Samples are clipped to the data range [-1, 1], then
    scored (``metric_report``: FD, KID, precision, recall, within-class diversity, each with its real
    train-vs-test floor at the same n; class accuracy; cluster shares through the partition). Cells
    are keyed by everything that changes them and cached under ``OUT/cells/``, so studies share
    them and an interrupted run resumes; ``--save-samples`` writes each cell's samples to
    ``OUT/samples/<cell>.npz`` (samples, labels, and the setting, seeds and studies as strings).

Studies (each a function returning JSON-able tables)
    - :func:`study_routing`: full, top-1/2/3, threshold, sample-1 and time-scheduled (full above
      ``switch_t``, top-1 below) with the conditional and the unconditional trained router, top-2
      with the statistics router, and the FM monolith of equal training compute: quality, cluster
      shares against the target share (with total variation), expert calls and FLOPs per image.
    - :func:`study_objectives`: 8 FM vs 8 DDPM vs 2 DDPM + 6 FM vs 4 + 4 (DDPM at evenly spaced
      clusters: 0, 4 and 0, 2, 4, 6 for K = 8), top-2, conditional router; the DDPM ensemble
      sampled natively with DDIM vs through the translator; the 2 + 6 mix with no translator
      (:mod:`.ablations` defines both).
    - :func:`study_stability`: local Lipschitz estimate of one sampler step and the refinement gap
      (:mod:`.diagnostics`) per strategy on the first ``stability_n`` samples of a cell, next to its
      quality.
    - :func:`study_alignment`: per step, predicted-x0 distance to selected vs other centroids and
      angular disagreement (from the stability traces), their per-sample Spearman correlation with
      quality; on real test images noised to x_t, the selected vs non-selected experts' errors.
    - :func:`study_routers`: statistics vs trained routers: routing accuracy against t, cluster
      shares and quality under top-2.
    - :func:`study_gmm`: the exact 2-D Gaussian-mixture checks (:func:`.gmm.run_gmm_study`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from diffswarm.eval.ablations import NoTranslator, router_flops, sample_native_ddim, velocity_flops
from diffswarm.eval.classifier import get_classifier
from diffswarm.eval.diagnostics import LipschitzConfig, expert_errors, split_by_selection, trace_sampling
from diffswarm.eval.metrics import metric_report, per_sample_quality, summarize
from diffswarm.eval.pool import ExpertPool, PoolConfig, settings_sha
from diffswarm.experts.schedules import flow_point
from diffswarm.experts.train import pick_device
from diffswarm.router.ensemble import RoutedEnsemble
from diffswarm.router.local import make_labels
from diffswarm.router.routing import RoutingConfig, choose_experts
from diffswarm.router.train import EVAL_TIMES, router_accuracy_by_t
from diffswarm.sampling.config import SamplingConfig
from diffswarm.sampling.loop import sample
from diffswarm.utils.images import save_grid, save_samples

STUDIES = ("routing", "objectives", "stability", "alignment", "routers", "gmm")
CELL_VERSION = 1  # bump when a cell's computation changes (invalidates OUT/cells)
ROUTERS = ("cond", "uncond", "stats", "stats-uncond")


@dataclass(frozen=True)
class GMMSettings:
    """Sizes of :func:`diffswarm.eval.gmm.run_gmm_study` (its defaults are the full run's)."""

    n_samples: int = 2000
    steps: int = 50
    router_steps: int = 1500
    stats_fit_samples: int = 20000
    kl_samples: int = 4000
    reference_samples: int = 20000


QUICK_GMM = GMMSettings(n_samples=500, steps=20, router_steps=300, stats_fit_samples=4000, kl_samples=1000,
                        reference_samples=4000)


@dataclass(frozen=True)
class StudyConfig:
    """One ``diffswarm eval`` run (built by ``diffswarm.cli.eval_plans.plan_eval`` from a preset and the options)."""

    out: str
    pool: PoolConfig
    sampling: SamplingConfig  # steps, sampler, guidance (seed: each sampling seed; batch: all n of a cell at once)
    train_seeds: tuple[int, ...] = (0, 1)
    seeds: tuple[int, ...] = (0, 1, 2)  # sampling seeds
    n: int = 400  # samples per cell
    studies: tuple[str, ...] = STUDIES
    quick: bool = False  # only a label in the report
    classifier_epochs: int = 2
    threshold: float = 0.1  # the threshold strategy's cut-off
    switch_t: float = 0.5  # time-scheduled: full ensemble while t > switch_t, top-1 below
    stability_n: int = 32  # samples traced per stability cell
    lipschitz_directions: int = 2
    lipschitz_every: int = 3  # probe every this many steps
    align_n: int = 256  # real test images for the real-data alignment
    align_times: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    router_eval_n: int = 2000  # test images for routing accuracy against t
    gmm: GMMSettings = field(default_factory=GMMSettings)
    save_samples: bool = False
    jobs: int | None = None  # training processes (None: one per core)
    threads: int | None = None  # torch threads of this process (None: every core) and of each training
    #                            process (None: the cores shared out among the jobs)
    device: str = "auto"
    cache_dir: str | None = None  # None: $DIFFSWARM_CACHE or ~/.cache/diffswarm

    def __post_init__(self) -> None:
        unknown = set(self.studies) - set(STUDIES)
        if unknown or not self.studies:
            raise ValueError(f"studies must be some of {', '.join(STUDIES)}; got {', '.join(self.studies) or 'none'}")
        if not self.seeds or (self.needs_pool and not self.train_seeds):
            raise ValueError("give at least one sampling seed and one training seed")
        if self.n < 10 or self.stability_n < 2 or self.stability_n > self.n:
            raise ValueError(f"need n >= 10 samples per cell and 2 <= stability_n <= n, got {self.n}, "
                             f"{self.stability_n}")
        if (self.jobs is not None and self.jobs < 1) or (self.threads is not None and self.threads < 1):
            raise ValueError("jobs and threads must be >= 1")

    @property
    def cores(self) -> int:
        return os.cpu_count() or 1

    @property
    def sampling_threads(self) -> int:
        """Torch threads of the process that samples and scores."""
        return self.threads or self.cores

    @property
    def training_jobs(self) -> int:
        return self.jobs or self.cores

    @property
    def training_threads(self) -> int:
        """Torch threads of each training process."""
        return self.threads or max(1, self.cores // self.training_jobs)

    @property
    def needs_pool(self) -> bool:
        return any(s != "gmm" for s in self.studies)


# ---------------------------------------------------------------------------------------------
# settings


def strategies(threshold: float = 0.1, switch_t: float = 0.5) -> dict[str, RoutingConfig]:
    """The routing strategies of the routing study, by display name."""
    return {
        "full": RoutingConfig("full"),
        "top-1": RoutingConfig("top-k", k=1),
        "top-2": RoutingConfig("top-k", k=2),
        "top-3": RoutingConfig("top-k", k=3),
        f"threshold-{threshold:g}": RoutingConfig("threshold", threshold=threshold),
        "sample-1": RoutingConfig("sample-k", k=1),
        f"full>{switch_t:g}/top-1": RoutingConfig("top-k", k=1, full_above=switch_t),
    }


def ddpm_clusters(k: int, n_ddpm: int) -> list[int]:
    """Evenly spaced clusters that get DDPM experts in a mix: K = 8, 2 -> [0, 4]; 4 -> [0, 2, 4, 6]."""
    return sorted({round(i * k / n_ddpm) for i in range(n_ddpm)}) if n_ddpm else []


def ensemble_objectives(name: str, k: int) -> list[str]:
    """Objective per cluster for an ensemble name: ``fm``, ``ddpm`` or ``mix-<n DDPM>``."""
    if name in ("fm", "ddpm"):
        return [name] * k
    if name.startswith("mix-"):
        dd = set(ddpm_clusters(k, int(name[4:])))
        return ["ddpm" if c in dd else "fm" for c in range(k)]
    raise ValueError(f"unknown ensemble {name!r}")


def mixes(k: int) -> dict[str, str]:
    """{ensemble name: display name} of the objectives study: all FM, all DDPM, ~1/4 DDPM, 1/2 DDPM."""
    q, h = max(1, k // 4), max(1, k // 2)
    out = {"fm": f"{k} FM", "ddpm": f"{k} DDPM", f"mix-{q}": f"{q} DDPM + {k - q} FM"}
    out.setdefault(f"mix-{h}", f"{h} DDPM + {k - h} FM")
    return out


@dataclass(frozen=True)
class Cell:
    """One sample set (module docstring). ``router``/``strategy`` are None for the monolith."""

    train_seed: int
    seed: int
    ensemble: str  # fm | ddpm | mix-<n> | monolith-fm
    router: str | None = None  # cond | uncond | stats | stats-uncond
    strategy: str | None = None  # a key of strategies()
    method: str = "flow"  # flow (the sampler over velocities) | ddim (native DDPM, as many steps) | ddim-nfe
    # (native DDPM, as many network evaluations as the flow sampler) | no-translator
    generation: str = "class"  # class: labels cycling through the classes, with CFG | none: unconditional, no CFG

    @property
    def setting(self) -> str:
        """Display name without the seeds."""
        gen = "uncond gen | " if self.generation == "none" else ""
        if self.router is None:
            return gen + self.ensemble
        extra = "" if self.method == "flow" else f", {self.method}"
        return f"{gen}{self.ensemble} | {self.router} router | {self.strategy}{extra}"

    @property
    def run(self) -> str:
        return f"s{self.train_seed}/r{self.seed}"


# ---------------------------------------------------------------------------------------------
# the context every study runs in


def _clean(o):
    """JSON-ready copy: numpy/torch scalars to Python, NaN/inf to None, tuples to lists."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, torch.Tensor):
        return _clean(o.tolist())
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, np.integer):
        return int(o)
    return o


def _spearman(a, b) -> float | None:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return None
    return float(spearmanr(a[ok], b[ok]).statistic)


class Context:
    """Pool, data, classifier and the cell cache shared by the studies of one run."""

    def __init__(self, cfg: StudyConfig, log=print):
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        self.device = pick_device(cfg.device)
        self.pool = ExpertPool(replace(cfg.pool, device=cfg.device, threads=cfg.training_threads), cfg.cache_dir)
        self.train_ds, self.test_ds, self.partition = self.pool.train_ds, self.pool.test_ds, self.pool.partition
        self.k = cfg.pool.k
        self.num_classes = self.train_ds.num_classes
        self.shape = self.train_ds.shape
        self.strategies = strategies(cfg.threshold, cfg.switch_t)
        t0 = time.perf_counter()
        self.classifier = get_classifier(self.train_ds, cache_dir=cfg.cache_dir, epochs=cfg.classifier_epochs,
                                         progress=False, test_ds=self.test_ds)
        self.classifier_seconds = time.perf_counter() - t0
        self._models: dict = {}
        self._flops: dict = {}
        self.cell_seconds = 0.0
        self.cells_computed = 0
        self.cells_reused = 0
        self.cell_cost: dict[str, float] = {}  # seconds each cell used took when it was computed, by any run
        self.cell_studies: dict[str, dict] = {}  # cell key -> setting, cell and the studies that used it
        pool_key = {k: v for k, v in cfg.pool.to_dict().items() if k not in ("device", "threads")}
        self.cell_base = {"version": CELL_VERSION, "pool": pool_key, "n": cfg.n, "threshold": cfg.threshold,
                          "switch_t": cfg.switch_t, "classifier_epochs": cfg.classifier_epochs,
                          "sampling": {k: v for k, v in asdict(cfg.sampling).items() if k not in ("seed", "batch")}}
        # class histogram per cluster (train split): the share a sampler should give each cluster for given labels
        hist = np.array([st["class_hist"] for st in self.partition.cluster_summary], dtype=np.float64)  # (K, C)
        self.p_cluster_given_class = hist / hist.sum(0, keepdims=True).clip(min=1)  # (K, C)
        self._real_feats = None

    # ------------------------------------------------------------------ models

    def _cached(self, key, make):
        if key not in self._models:
            self._models[key] = make()
        return self._models[key]

    def experts(self, train_seed: int, ensemble: str) -> list:
        objs = ensemble_objectives(ensemble, self.k)
        return [self._cached(("expert", train_seed, o, c), lambda o=o, c=c: self.pool.expert(train_seed, o, c,
                                                                                           self.device))
                for c, o in enumerate(objs)]

    def monolith(self, train_seed: int, objective: str = "fm"):
        return self._cached(("monolith", train_seed, objective),
                            lambda: self.pool.expert(train_seed, objective, None, self.device))

    def router(self, train_seed: int, name: str):
        if name.startswith("stats"):
            return self._cached(("stats",), lambda: self.pool.stats_router(self.device))
        return self._cached(("router", train_seed, name), lambda: self.pool.router(train_seed, name, self.device))

    def ensemble(self, cell: Cell) -> RoutedEnsemble:
        experts = self.experts(cell.train_seed, cell.ensemble)
        if cell.method == "no-translator":
            experts = [NoTranslator(e) for e in experts]
        return RoutedEnsemble(experts, self.router(cell.train_seed, cell.router), self.strategies[cell.strategy],
                              seed=cell.seed, router_sees_labels=cell.router in ("cond", "stats"))

    def flops_of(self, key, make_model, kind: str, guidance: float = 1.0) -> int:
        key = (*key, guidance)
        if key not in self._flops:
            m = make_model()
            if kind == "router":
                self._flops[key] = router_flops(m, self.shape, self.device)
            else:
                self._flops[key] = velocity_flops(m, self.shape, guidance, self.num_classes, self.device)
        return self._flops[key]

    def real_feats(self) -> np.ndarray:
        """Classifier features of up to 5000 train images (seeded), for per-sample nearest-neighbour distances."""
        if self._real_feats is None:
            rng = np.random.default_rng(12345)
            idx = torch.from_numpy(rng.choice(len(self.train_ds), min(5000, len(self.train_ds)), replace=False))
            self._real_feats = self.classifier.features(self.train_ds.images[idx]).double().numpy()
        return self._real_feats

    # ------------------------------------------------------------------ cells

    def labels(self, generation: str = "class") -> torch.Tensor:
        """(n,) requested labels: cycling through the classes, or -1 (unconditional) for ``generation="none"``."""
        classes = list(range(self.num_classes)) if generation == "class" else None
        return make_labels(self.cfg.n, classes or None, self.num_classes)

    def guidance(self, cell: Cell) -> float:
        return self.cfg.sampling.guidance if cell.generation == "class" and self.num_classes else 1.0

    def noise(self, seed: int) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn((self.cfg.n, *self.shape), generator=gen)

    def target_share(self, labels: torch.Tensor) -> np.ndarray:
        """(K,) the share of real images of the requested classes that fall in each cluster."""
        if not self.num_classes or bool((labels < 0).all()):
            return self.partition.shares()
        counts = np.bincount(labels.numpy(), minlength=self.num_classes) / len(labels)  # (C,)
        return self.p_cluster_given_class @ counts

    def _cell_key(self, kind: str, cell: Cell, extra: dict | None = None) -> str:
        return settings_sha({**self.cell_base, "kind": kind, "cell": asdict(cell), **(extra or {})})[:20]

    def _load_or(self, kind: str, cell: Cell, compute, extra: dict | None = None) -> dict:
        key = self._cell_key(kind, cell, extra)
        path = self.out / "cells" / f"{kind}-{key}.json"
        want_samples = kind == "cell" and self.cfg.save_samples
        if path.exists() and (not want_samples or (self.out / "samples" / f"{key}.npz").exists()):
            self.cells_reused += 1
            res = json.loads(path.read_text())
            self.cell_cost[path.name] = float(res.get("seconds") or 0.0)
            return res
        t0 = time.perf_counter()
        res = compute(key)
        res = _clean({**res, "key": key, "cell": asdict(cell), "setting": cell.setting, "run": cell.run,
                      "seconds": time.perf_counter() - t0})
        self.cell_seconds += res["seconds"]
        self.cells_computed += 1
        self.cell_cost[path.name] = res["seconds"]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res))
        os.replace(tmp, path)
        return res

    def cell(self, cell: Cell, studies: tuple[str, ...] = ()) -> dict:
        """Sample, score and cost one cell (cached)."""

        def compute(key: str) -> dict:
            labels = self.labels(cell.generation)
            noise = self.noise(cell.seed)
            s = replace(self.cfg.sampling, guidance=self.guidance(cell))
            dev = self.device
            # all n samples in one batch: a trajectory's sample-k draw is per row of the batch, so splitting the
            # batch would give rows i and i + batch the same draw
            x, y = noise.to(dev), labels.to(dev)
            if cell.router is None:  # the monolith
                model = self.monolith(cell.train_seed, cell.ensemble.removeprefix("monolith-"))
                x = sample(model, x, y, s.steps, s.sampler, s.guidance).cpu()
                calls = np.array([self.cfg.n * s.evaluations])
                fl = self.flops_of(("monolith", cell.train_seed, cell.ensemble), lambda: model, "expert",
                                   s.guidance)
                flops, router_fl = [fl], 0
                evaluations = s.evaluations
            else:
                ens = self.ensemble(cell)
                ddim_steps = {"ddim": s.steps, "ddim-nfe": s.evaluations}.get(cell.method)
                if ddim_steps:
                    x = sample_native_ddim(ens, x, y, ddim_steps, s.guidance).cpu()
                else:
                    x = sample(ens, x, y, s.steps, s.sampler, s.guidance).cpu()
                calls = ens.calls.numpy().astype(np.float64)
                objs = ensemble_objectives(cell.ensemble, self.k)
                flops = [self.flops_of(("expert", cell.train_seed, o, c), lambda e=e: e, "expert", s.guidance)
                         for c, (o, e) in enumerate(zip(objs, ens.experts, strict=True))]
                router_fl = self.flops_of(("router", cell.router), lambda: ens.router, "router")
                evaluations = ddim_steps or s.evaluations
            x = x.clamp(-1, 1)
            rep = metric_report(x, labels if cell.generation == "class" else None, self.train_ds, self.test_ds,
                                self.classifier, self.partition, seed=cell.seed)
            target = self.target_share(labels)
            share = np.asarray(rep["cluster_share"])
            n = self.cfg.n
            res = {"metrics": {k: v for k, v in rep.items() if not k.endswith("per_class")},
                   "target_share": target.tolist(), "share_tv": float(0.5 * np.abs(share - target).sum()),
                   "calls_per_image": float(calls.sum() / n), "expert_call_share": (calls / calls.sum()).tolist(),
                   "gflops_per_image": float((calls @ np.asarray(flops, dtype=np.float64)
                                              + evaluations * n * router_fl) / n / 1e9),
                   "expert_gflops_per_call": [f / 1e9 for f in flops], "router_gflops_per_call": router_fl / 1e9}
            nrow = max(1, self.num_classes) if self.num_classes else 10
            save_grid(x[: nrow * 4], self.out / "grids" / f"{key}.png", nrow)
            if self.cfg.save_samples:
                save_samples(self.out / "samples" / f"{key}.npz", x, labels, setting=np.array(cell.setting),
                             train_seed=np.array(cell.train_seed), seed=np.array(cell.seed),
                             ensemble=np.array(cell.ensemble), router=np.array(str(cell.router)),
                             strategy=np.array(str(cell.strategy)), method=np.array(cell.method),
                             first_study=np.array(",".join(studies)))
            self.log(f"    {cell.run} {cell.setting}: FD {rep['fd']:.2f} (floor {rep['fd_floor']:.2f}), "
                     f"TV {res['share_tv']:.3f}, {res['calls_per_image']:.0f} calls/img")
            return res

        self.cell_studies.setdefault(self._cell_key("cell", cell), {"setting": cell.setting, "cell": asdict(cell),
                                                                     "studies": set()})["studies"].update(studies)
        return self._load_or("cell", cell, compute)

    def write_sample_index(self) -> None:
        """OUT/samples/index.json: for every saved sample file, its setting, seeds and the studies that score it."""
        index = {key: {**v, "studies": sorted(v["studies"]), "file": f"{key}.npz"}
                 for key, v in self.cell_studies.items() if (self.out / "samples" / f"{key}.npz").exists()}
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        (self.out / "samples" / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True))

    def samples_of(self, cell: Cell) -> torch.Tensor | None:
        p = self.out / "samples" / f"{self._cell_key('cell', cell)}.npz"
        return torch.from_numpy(np.load(p)["samples"]) if p.exists() else None


# ---------------------------------------------------------------------------------------------
# tables


def _metric(r: dict, key: str):
    if key in r.get("metrics", {}):
        return r["metrics"][key]
    return r.get(key)


QUALITY_KEYS = ("fd", "fd_floor", "kid", "kid_floor", "precision", "precision_floor", "recall", "recall_floor",
                "class_accuracy", "diversity", "diversity_real", "share_tv", "calls_per_image", "gflops_per_image")


def summarize_cells(results: list[dict], keys=QUALITY_KEYS) -> dict:
    """{key: summarize over the cells' runs}, the mean cluster/target shares, and ``per_run``
    ({run: {key: value}}) for paired comparisons."""
    out = {k: summarize([_metric(r, k) if _metric(r, k) is not None else float("nan") for r in results])
           for k in keys}
    out["cluster_share"] = np.mean([r["metrics"]["cluster_share"] for r in results], 0).tolist()
    out["target_share"] = np.mean([r["target_share"] for r in results], 0).tolist()
    out["per_run"] = {r["run"]: {k: _metric(r, k) for k in keys} for r in results}
    return out


def _runs(cfg: StudyConfig):
    return [(ts, s) for ts in cfg.train_seeds for s in cfg.seeds]


# ---------------------------------------------------------------------------------------------
# studies


def study_routing(ctx: Context) -> dict:
    """Routing strategies x routers (FM experts), the stats router's top-2 and the FM monolith."""
    cfg = ctx.cfg
    settings: list[tuple[str, str | None, str | None]] = [("fm", r, s) for r in ("cond", "uncond")
                                                          for s in ctx.strategies]
    settings += [("fm", "stats", "top-2"), ("fm", "stats-uncond", "top-2"), ("monolith-fm", None, None)]
    # unconditional generation (no class anywhere, no CFG): where argmax routing collapsed in the CPU prototype
    uncond = [("fm", "uncond", s) for s in ctx.strategies] + [("fm", "stats-uncond", "top-2"),
                                                               ("monolith-fm", None, None)]
    out: dict = {"data_share": ctx.partition.shares().tolist(),
                 "strategies": {k: asdict(v) for k, v in ctx.strategies.items()}}
    for name, gen, group in (("rows", "class", settings), ("rows_uncond_gen", "none", uncond)):
        out[name] = []
        for ens, router, strat in group:
            cells = [ctx.cell(Cell(ts, s, ens, router, strat, generation=gen), ("routing",)) for ts, s in _runs(cfg)]
            out[name].append({"setting": cells[0]["setting"], "ensemble": ens, "router": router, "strategy": strat,
                              "generation": gen, "summary": summarize_cells(cells), "cells": [c["key"] for c in cells]})
    return out


def study_objectives(ctx: Context) -> dict:
    """Homogeneous vs heterogeneous mixes at top-2 (conditional router), and the translator ablations."""
    cfg = ctx.cfg
    mix_rows = []
    for ens, name in mixes(ctx.k).items():
        cells = [ctx.cell(Cell(ts, s, ens, "cond", "top-2"), ("objectives",)) for ts, s in _runs(cfg)]
        mix_rows.append({"setting": name, "ensemble": ens, "ddpm_clusters": ddpm_clusters(
            ctx.k, ensemble_objectives(ens, ctx.k).count("ddpm")) if ens.startswith("mix") else None,
            "summary": summarize_cells(cells), "cells": [c["key"] for c in cells]})
    q = max(1, ctx.k // 4)
    ablation = [("ddpm", "flow", f"{ctx.k} DDPM, eps -> v translator + {cfg.sampling.sampler}"),
                ("ddpm", "ddim", f"{ctx.k} DDPM, native DDIM (diffusers), {cfg.sampling.steps} steps"),
                ("fm", "flow", f"{ctx.k} FM, native {cfg.sampling.sampler}"),
                (f"mix-{q}", "flow", f"{q} DDPM + {ctx.k - q} FM, translator"),
                (f"mix-{q}", "no-translator", f"{q} DDPM + {ctx.k - q} FM, one shared schedule, no translator")]
    if cfg.sampling.evaluations != cfg.sampling.steps:  # a 2nd-order sampler: DDIM at its cost, not its steps
        ablation.insert(2, ("ddpm", "ddim-nfe", f"{ctx.k} DDPM, native DDIM (diffusers), {cfg.sampling.evaluations} "
                                                "steps (the same network evaluations)"))
    tr_rows = []
    for ens, method, name in ablation:
        cells = [ctx.cell(Cell(ts, s, ens, "cond", "top-2", method), ("objectives",)) for ts, s in _runs(cfg)]
        tr_rows.append({"setting": name, "ensemble": ens, "method": method, "summary": summarize_cells(cells),
                        "cells": [c["key"] for c in cells]})
    return {"mixes": mix_rows, "translator": tr_rows}


def study_stability(ctx: Context) -> dict:
    """Local Lipschitz and refinement gap per strategy (FM experts, conditional router) and the monolith."""
    cfg = ctx.cfg
    s = cfg.sampling
    lip = LipschitzConfig(directions=cfg.lipschitz_directions, every=cfg.lipschitz_every)
    rows = []
    settings = [("fm", "cond", st) for st in ctx.strategies] + [("fm", "uncond", st) for st in ("full", "top-1")]
    settings.append(("monolith-fm", None, None))
    for ens, router, strat in settings:
        traces = []
        for ts, seed in _runs(cfg):
            cell = Cell(ts, seed, ens, router, strat)

            def compute(key, cell=cell):
                m = cfg.stability_n
                labels = ctx.labels()[:m].to(ctx.device)
                noise = ctx.noise(cell.seed)[:m].to(ctx.device)
                model = ctx.monolith(cell.train_seed) if cell.router is None else ctx.ensemble(cell)
                tr = trace_sampling(model, noise, labels, s.steps, s.sampler, s.guidance, ctx.partition,
                                    lipschitz=replace(lip, seed=1000 * cell.seed), disagreement=True)
                fine = sample(model, noise, labels, 2 * s.steps, s.sampler, s.guidance)
                dim = tr.x0[0].numel()
                gap = ((tr.x0 - fine).flatten(1).norm(dim=1) / math.sqrt(dim)).cpu()  # (m,)
                x0 = tr.x0.clamp(-1, 1).cpu()
                q = per_sample_quality(ctx.classifier, x0, labels.cpu(), ctx.real_feats())
                ps = tr.per_sample()
                summ = tr.summary()
                out = {"lipschitz": summ["lipschitz_mean"], "lipschitz_per_step": summ["lipschitz_per_step"],
                       "t": summ["t"], "refinement_gap": float(gap.mean()), "step_change": summ["step_change_mean"],
                       "experts_per_step": summ["experts_per_step"], "confidence": float(q["confidence"].mean()),
                       "nn_distance": float(q["nn_distance"].mean()),
                       "spearman_lipschitz_confidence": _spearman(ps["lipschitz"], q["confidence"]),
                       "spearman_gap_confidence": _spearman(gap, q["confidence"])}
                if "disagreement" in ps:
                    out.update(disagreement=summ["disagreement_mean"],
                               disagreement_per_step=summ["disagreement_per_step"],
                               spearman_disagreement_confidence=_spearman(ps["disagreement"], q["confidence"]),
                               spearman_disagreement_nn=_spearman(ps["disagreement"], q["nn_distance"]))
                for key2 in ("centroid_selected", "centroid_other", "centroid_best_selected"):
                    if key2 in summ:
                        out[key2] = summ[key2]
                        out[key2 + "_per_step"] = summ[key2 + "_per_step"]
                out["centroid_nearest"] = summ.get("centroid_nearest")
                return out

            traces.append(ctx._load_or("trace", cell, compute, {"stability_n": cfg.stability_n,
                                                                 "lipschitz": asdict(lip)}))
        keys = ("lipschitz", "refinement_gap", "step_change", "disagreement", "confidence", "nn_distance",
                "centroid_selected", "centroid_other", "centroid_best_selected",
                "spearman_disagreement_confidence", "spearman_disagreement_nn", "spearman_lipschitz_confidence")
        summ = {k: summarize([t.get(k) if t.get(k) is not None else float("nan") for t in traces]) for k in keys}
        summ["per_run"] = {t["run"]: {k: t.get(k) for k in ("lipschitz", "refinement_gap")} for t in traces}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # steps that were not probed are NaN in every run
            per_step = {k: np.nanmean(np.array([[np.nan if v is None else v for v in t[k]] for t in traces],
                                               dtype=float), 0).tolist()
                        for k in ("lipschitz_per_step", "disagreement_per_step", "centroid_selected_per_step",
                                  "centroid_other_per_step") if all(t.get(k) is not None for t in traces)}
        quality = [ctx.cell(Cell(ts, sd, ens, router, strat), ("stability",)) for ts, sd in _runs(cfg)]
        rows.append({"setting": Cell(0, 0, ens, router, strat).setting, "router": router, "strategy": strat,
                     "summary": summ, "per_step": per_step, "t": traces[0]["t"],
                     "quality": summarize_cells(quality, ("fd", "kid", "precision", "recall", "class_accuracy")),
                     "traces": [t["key"] for t in traces], "_traces": traces, "_quality": quality})
    # across strategies (conditional router, per run): does stability rank opposite to quality?
    cond = [r for r in rows if r["router"] == "cond"]
    per_run = []
    for i in range(len(_runs(cfg))):
        lips = [r["_traces"][i]["lipschitz"] for r in cond]
        fds = [r["_quality"][i]["metrics"]["fd"] for r in cond]
        per_run.append(_spearman(lips, fds))
    for r in rows:
        del r["_traces"], r["_quality"]
    most_stable = min(cond, key=lambda r: r["summary"]["lipschitz"]["mean"])
    worst = max(cond, key=lambda r: r["quality"]["fd"]["mean"])
    return {"rows": rows, "lipschitz": asdict(lip), "stability_n": cfg.stability_n,
            "spearman_lipschitz_fd": summarize([v if v is not None else float("nan") for v in per_run]),
            "most_stable": most_stable["strategy"], "worst_fd": worst["strategy"]}


def study_alignment(ctx: Context, stability: dict | None = None) -> dict:
    """Centroid distances and disagreement from the stability traces; real-data errors of selected experts."""
    cfg = ctx.cfg
    rng = np.random.default_rng(777)
    m = min(cfg.align_n, len(ctx.test_ds))
    idx = torch.from_numpy(rng.choice(len(ctx.test_ds), m, replace=False))
    x0 = ctx.test_ds.images[idx].to(ctx.device)
    labels = ctx.test_ds.labels[idx].to(ctx.device)
    clusters = torch.from_numpy(ctx.partition.assign(x0.cpu()))
    routings = [("cond", "top-1"), ("cond", "top-2"), ("uncond", "top-1"), ("uncond", "top-2"), ("stats", "top-2")]
    per_run = []
    for ts, seed in _runs(cfg):
        cell = Cell(ts, seed, "fm", "cond", "top-2")

        def compute(key, ts=ts, seed=seed):
            experts = ctx.experts(ts, "fm")
            gen = torch.Generator(device="cpu").manual_seed(seed)
            rows = []
            for tv in cfg.align_times:
                eps = torch.randn(x0.shape, generator=gen).to(ctx.device)
                t = torch.full((m,), float(tv), device=ctx.device)
                err = expert_errors(experts, x0, eps, t, labels, guidance=1.0).cpu()  # (m, K)
                own = err.gather(1, clusters[:, None]).squeeze(1)
                x_t = flow_point(x0, eps, t)
                row = {"t": tv, "own_error": float(own.mean()), "mean_error": float(err.mean()),
                       "own_is_best": float((err.argmin(1) == clusters).double().mean())}
                for rname, strat in routings:
                    router = ctx.router(ts, rname)
                    y = labels if rname in ("cond", "stats") else torch.full_like(labels, -1)
                    w = choose_experts(router.probs(x_t, t, y), torch.ones(ctx.k, dtype=torch.bool),
                                       ctx.strategies[strat], float(tv)).cpu()
                    sp = split_by_selection(err, w)
                    row[f"{rname}/{strat}"] = {"selected": sp["selected"], "other": sp["other"],
                                               "best_selected": sp["best_selected"],
                                               "own_selected": float(w.gather(1, clusters[:, None]).gt(0).double()
                                                                     .mean())}
                rows.append(row)
            return {"rows": rows}

        per_run.append(ctx._load_or("align", cell, compute, {"align_n": m, "times": list(cfg.align_times)}))
    table = []
    for i, tv in enumerate(cfg.align_times):
        row = {"t": tv}
        for k in ("own_error", "mean_error", "own_is_best"):
            row[k] = summarize([r["rows"][i][k] for r in per_run])
        for rname, strat in routings:
            key = f"{rname}/{strat}"
            row[key] = {k: summarize([r["rows"][i][key][k] if r["rows"][i][key][k] is not None else float("nan")
                                      for r in per_run]) for k in ("selected", "other", "best_selected",
                                                                   "own_selected")}
        table.append(row)
    out = {"real_data": table, "routings": [f"{a}/{b}" for a, b in routings], "align_n": m}
    if stability is not None:
        out["sampling"] = [{"setting": r["setting"], "strategy": r["strategy"], "router": r["router"],
                            **{k: r["summary"][k] for k in ("centroid_selected", "centroid_other",
                                                            "centroid_best_selected", "disagreement",
                                                            "spearman_disagreement_confidence",
                                                            "spearman_disagreement_nn")},
                            "per_step": r["per_step"], "t": r["t"]}
                           for r in stability["rows"] if r["router"] is not None]
    return out


def study_routers(ctx: Context) -> dict:
    """Statistics router vs trained routers: accuracy against t on the test split, shares and quality at top-2."""
    cfg = ctx.cfg
    rng = np.random.default_rng(4242)
    m = min(cfg.router_eval_n, len(ctx.test_ds))
    idx = torch.from_numpy(rng.choice(len(ctx.test_ds), m, replace=False))
    images, labels = ctx.test_ds.images[idx], ctx.test_ds.labels[idx]
    clusters = torch.from_numpy(ctx.partition.assign(images))
    variants = [("cond", "cond", True), ("cond router, no class", "cond", False), ("uncond", "uncond", False),
                ("stats", "stats", True), ("stats, no class", "stats", False)]
    acc_runs = []
    for ts, seed in _runs(cfg):
        cell = Cell(ts, seed, "fm", "stats", "top-2")

        def compute(key, ts=ts, seed=seed):
            out = {}
            for name, rname, conditional in variants:
                router = ctx.router(ts, rname)
                # images stay on the CPU: the function draws the noise there and moves each chunk to the router
                out[name] = router_accuracy_by_t(router, images, labels, clusters, EVAL_TIMES, seed=seed,
                                                 conditional=conditional)
            return {"accuracy": out}

        acc_runs.append(ctx._load_or("routeracc", cell, compute, {"router_eval_n": m}))
    accuracy = {}
    for name, _, _ in variants:
        accuracy[name] = [{"t": tv, "top1": summarize([r["accuracy"][name][i]["top1"] for r in acc_runs]),
                           "top2": summarize([r["accuracy"][name][i]["top2"] for r in acc_runs])}
                          for i, tv in enumerate(EVAL_TIMES)]
    quality = []
    for rname in ROUTERS:
        cells = [ctx.cell(Cell(ts, s, "fm", rname, "top-2"), ("routers",)) for ts, s in _runs(cfg)]
        quality.append({"router": rname, "summary": summarize_cells(cells), "cells": [c["key"] for c in cells]})
    ctx.pool.stats_router()
    return {"accuracy": accuracy, "quality": quality, "router_eval_n": m,
            "stats_blob_bytes": getattr(ctx.pool, "stats_bytes", None)}


def study_gmm(cfg: StudyConfig, log=print) -> dict:
    """:func:`run_gmm_study` at every sampling seed, summarized."""
    from diffswarm.eval.gmm import run_gmm_study

    runs = []
    for s in cfg.seeds:
        log(f"  gmm seed {s}")
        runs.append(run_gmm_study(seed=s, **asdict(cfg.gmm)))
    first = runs[0]
    kl = [{"t": row["t"], **{k: summarize([r["router_kl"][i][k] for r in runs]) for k in row if k != "t"}}
          for i, row in enumerate(first["router_kl"])]
    top1 = [{"t": row["t"], **{k: summarize([r["router_top1"][i][k] for r in runs]) for k in row if k != "t"}}
            for i, row in enumerate(first["router_top1"])]
    rows = []
    for i, row in enumerate(first["sampling"]):
        rr = [r["sampling"][i] for r in runs]
        rows.append({"router": row["router"], "strategy": row["strategy"],
                     **{k: summarize([x[k] for x in rr]) for k in ("nll", "parzen_nll", "share_tv")},
                     "shares": np.mean([x["shares"] for x in rr], 0).tolist(), "runs": rr})
    ref = {k: summarize([r["reference"][k] for r in runs]) for k in ("nll", "parzen_nll")}
    return {"config": first["config"], "cluster_weights": first["cluster_weights"], "router_kl": kl,
            "router_top1": top1, "sampling": rows, "reference": ref, "seconds": sum(r["seconds"] for r in runs)}


# ---------------------------------------------------------------------------------------------
# the run


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "device": str(device),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_average_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def run_study(cfg: StudyConfig, log=print, command: str | None = None) -> dict:
    """Run every requested study; writes OUT/results.json and OUT/report.md (+ PNGs) and returns the results.

    The report is rewritten after each study, so a long run shows what it has so far.
    """
    from diffswarm.eval.report import write_report

    t_start = time.perf_counter()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.sampling_threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": command, "config": _clean(asdict(cfg)), "studies": {}, "timings": {}}
    try:
        results["machine"] = machine_info(pick_device(cfg.device))

        def save() -> None:
            results["timings"]["total_s"] = time.perf_counter() - t_start
            try:
                results["machine"]["load_average_now"] = list(os.getloadavg())
            except OSError:
                pass
            (out / "results.json").write_text(json.dumps(_clean(results), indent=1))
            write_report(_clean(results), out)
            if ctx is not None and cfg.save_samples:
                ctx.write_sample_index()  # after every study, so a stopped run's samples are indexed too

        ctx = None
        order = [s for s in STUDIES if s in cfg.studies]
        if cfg.needs_pool:
            t0 = time.perf_counter()
            ctx = Context(cfg, log)
            results["timings"]["classifier_s"] = ctx.classifier_seconds
            results["data"] = {"dataset": ctx.train_ds.dataset_id, "train": len(ctx.train_ds),
                               "test": len(ctx.test_ds), "k": ctx.k, "partition_hash": ctx.partition.partition_hash,
                               "data_share": ctx.partition.shares().tolist(),
                               "classifier_test_accuracy": ctx.classifier.test_accuracy,
                               "clusters": ctx.partition.describe(ctx.train_ds.class_names).splitlines()}
            results["timings"]["setup_s"] = time.perf_counter() - t0  # data, partition, classifier
        # one pass per training seed: train (or reuse) that seed's pool, then every study over the seeds so far
        # (cells of earlier seeds are reused), so a long run has a complete report for its first seed early
        passes = [cfg.train_seeds[: i + 1] for i in range(len(cfg.train_seeds))] if cfg.needs_pool else [()]
        trained: list[str] = []

        def ensure(seed: int, objectives: tuple[str, ...]) -> None:
            t0 = time.perf_counter()
            log(f"[pool] {ctx.train_ds.dataset_id}, K={ctx.k}, training seed {seed}, objectives {list(objectives)}")
            pool = ctx.pool.ensure((seed,), jobs=cfg.training_jobs, log=log, objectives=objectives)
            trained.extend(pool["trained"])
            models = {**results.get("pool", {}).get("models", {}), **pool["models"]}
            results["pool"] = {"root": pool["root"], "trained": list(trained), "models": models,
                               "reused": [m for m in models if m not in trained]}
            results["timings"]["pool_s"] = results["timings"].get("pool_s", 0.0) + time.perf_counter() - t0

        def run(name: str, seeds_so_far, first: bool) -> None:
            if name == "gmm" and not first:
                return  # the Gaussian-mixture study does not depend on the expert pool
            t0 = time.perf_counter()
            log(f"[{name}]" + (f" training seeds {list(seeds_so_far)}" if ctx is not None else ""))
            if name == "gmm":
                results["studies"]["gmm"] = study_gmm(cfg, log)
            elif name == "alignment":
                results["studies"]["alignment"] = study_alignment(ctx, results["studies"].get("stability"))
            else:
                results["studies"][name] = globals()[f"study_{name}"](ctx)
            results["timings"][f"{name}_s"] = results["timings"].get(f"{name}_s", 0.0) + time.perf_counter() - t0
            if ctx is not None:
                results["cells"] = {"computed": ctx.cells_computed, "reused": ctx.cells_reused,
                                    "sampling_s": ctx.cell_seconds, "distinct": len(ctx.cell_cost),
                                    "all_cells_s": sum(ctx.cell_cost.values())}
            save()

        for i, seeds_so_far in enumerate(passes):
            results["progress"] = {"train_seeds_done": list(seeds_so_far), "complete": i == len(passes) - 1}
            if ctx is not None:
                # FM experts, monolith and routers first: every study but the objectives one runs on them, so
                # their results come while the DDPM experts still train
                ctx.cfg = replace(cfg, train_seeds=seeds_so_far)
                ensure(seeds_so_far[-1], ("fm",))
            for name in [n for n in order if n != "objectives"]:
                run(name, seeds_so_far, i == 0)
            if "objectives" in order:
                ensure(seeds_so_far[-1], ("fm", "ddpm"))
                run("objectives", seeds_so_far, i == 0)
            if ctx is not None:
                _grids(ctx, results)
        save()
    finally:
        torch.set_num_threads(prev_threads)
    log(f"report -> {out / 'report.md'} ({time.perf_counter() - t_start:.0f}s)")
    return results


def _grids(ctx: Context, results: dict) -> None:
    """The PNG grids (first 4 samples per class, first run) of a few settings, for the report."""
    ts, s = ctx.cfg.train_seeds[0], ctx.cfg.seeds[0]
    picks = [Cell(ts, s, "fm", "cond", "top-2"), Cell(ts, s, "fm", "cond", "full"),
             Cell(ts, s, "fm", "uncond", "top-1"), Cell(ts, s, "fm", "stats", "top-2"), Cell(ts, s, "monolith-fm"),
             Cell(ts, s, "ddpm", "cond", "top-2"), Cell(ts, s, "ddpm", "cond", "top-2", "ddim")]
    results["grids"] = {c.setting: f"grids/{ctx._cell_key('cell', c)}.png" for c in picks
                        if (ctx.out / "grids" / f"{ctx._cell_key('cell', c)}.png").exists()}


__all__ = ["STUDIES", "Cell", "Context", "GMMSettings", "StudyConfig", "ddpm_clusters", "ensemble_objectives",
           "mixes", "run_study", "strategies", "study_alignment", "study_gmm", "study_objectives",
           "study_routers", "study_routing", "study_stability", "summarize_cells"]
