"""``diffswarm eval``: the two papers' claims tested on our own experts, from one expert pool.

:func:`run_study` trains (or reuses, :mod:`diffswarm.eval.pool`) the pool of every training seed, runs
the studies of :data:`diffswarm.eval.studies.TABLE` (one module each under ``eval/studies/``), and
writes ``results.json`` (every number) and ``report.md`` with its PNG plots
(:mod:`diffswarm.eval.report`). Every number comes from the stated seeds; nothing is typed in.

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
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from diffswarm.eval.cell_cache import clean
from diffswarm.eval.config import StudyConfig
from diffswarm.eval.context import Context
from diffswarm.eval.report import write_report
from diffswarm.eval.settings import Cell
from diffswarm.eval.studies import TABLE, Study, StudyRun
from diffswarm.experts.train import pick_device

logger = logging.getLogger(__name__)


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


class _Run:
    """The results of one run as they grow, saved (results.json, report.md) after every study."""

    def __init__(self, cfg: StudyConfig, command: str | None):
        self.cfg, self.t_start = cfg, time.perf_counter()
        self.out = Path(cfg.out)
        self.results: dict = {"command": command, "config": clean(asdict(cfg)), "studies": {}, "timings": {}}
        self.ctx: Context | None = None
        self.trained: list[str] = []

    def setup(self) -> None:
        """Data, partition and classifier (the Context), when a study needs the pool."""
        res, t0 = self.results, time.perf_counter()
        ctx = self.ctx = Context(self.cfg)
        res["timings"]["classifier_s"] = ctx.scoring.classifier_seconds
        res["data"] = {"dataset": ctx.train_ds.dataset_id, "train": len(ctx.train_ds), "test": len(ctx.test_ds),
                       "k": ctx.k, "partition_hash": ctx.partition.partition_hash,
                       "data_share": ctx.partition.shares().tolist(),
                       "classifier_test_accuracy": ctx.scoring.classifier.test_accuracy,
                       "clusters": ctx.partition.describe(ctx.train_ds.class_names).splitlines()}
        res["timings"]["setup_s"] = time.perf_counter() - t0  # data, partition, classifier

    def save(self) -> None:
        res = self.results
        res["timings"]["total_s"] = time.perf_counter() - self.t_start
        try:
            res["machine"]["load_average_now"] = list(os.getloadavg())
        except OSError:
            pass
        (self.out / "results.json").write_text(json.dumps(clean(res), indent=1))
        write_report(clean(res), self.out)
        if self.ctx is not None and self.cfg.save_samples:
            self.ctx.cells.write_sample_index()  # after every study, so a stopped run's samples are indexed too

    def ensure(self, seed: int, objectives: tuple[str, ...]) -> None:
        """Train (or reuse) the pool models of ``objectives`` at training seed ``seed``."""
        ctx, res, t0 = self.ctx, self.results, time.perf_counter()
        logger.info(f"[pool] {ctx.train_ds.dataset_id}, K={ctx.k}, training seed {seed}, objectives {list(objectives)}")
        pool = ctx.pool.ensure((seed,), jobs=self.cfg.training_jobs, objectives=objectives)
        self.trained.extend(pool["trained"])
        models = {**res.get("pool", {}).get("models", {}), **pool["models"]}
        res["pool"] = {"root": pool["root"], "trained": list(self.trained), "models": models,
                       "reused": [m for m in models if m not in self.trained]}
        res["timings"]["pool_s"] = res["timings"].get("pool_s", 0.0) + time.perf_counter() - t0

    def run(self, study: Study, seeds_so_far, first: bool) -> None:
        if not study.pool and not first:
            return  # a study without the expert pool does not depend on the training seeds
        ctx, res, name, t0 = self.ctx, self.results, study.name, time.perf_counter()
        logger.info(f"[{name}]" + (f" training seeds {list(seeds_so_far)}" if ctx is not None else ""))
        res["studies"][name] = study.compute(StudyRun(self.cfg, ctx, res["studies"]))
        res["timings"][f"{name}_s"] = res["timings"].get(f"{name}_s", 0.0) + time.perf_counter() - t0
        if ctx is not None:
            c = ctx.cells
            res["cells"] = {"computed": c.computed, "reused": c.reused, "sampling_s": c.seconds,
                            "distinct": len(c.cost), "all_cells_s": sum(c.cost.values())}
        self.save()


def run_study(cfg: StudyConfig, command: str | None = None) -> dict:
    """Run every requested study; writes OUT/results.json and OUT/report.md (+ PNGs) and returns the results.

    The report is rewritten after each study, so a long run shows what it has so far.
    """
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.sampling_threads)
    run = _Run(cfg, command)
    run.out.mkdir(parents=True, exist_ok=True)
    try:
        run.results["machine"] = machine_info(pick_device(cfg.device))
        if cfg.needs_pool:
            run.setup()
        chosen = [s for s in TABLE if s.name in cfg.studies]
        # FM experts, monolith and routers first: every study but the objectives one runs on them, so their
        # results come while the DDPM experts still train
        later = [s for s in chosen if set(s.pool) - {"fm"}]
        # one pass per training seed: train (or reuse) that seed's pool, then every study over the seeds so far
        # (cells of earlier seeds are reused), so a long run has a complete report for its first seed early
        passes = [cfg.train_seeds[: i + 1] for i in range(len(cfg.train_seeds))] if cfg.needs_pool else [()]
        for i, seeds_so_far in enumerate(passes):
            run.results["progress"] = {"train_seeds_done": list(seeds_so_far), "complete": i == len(passes) - 1}
            if run.ctx is not None:
                run.ctx.cfg = replace(cfg, train_seeds=seeds_so_far)
                run.ensure(seeds_so_far[-1], ("fm",))
            for study in [s for s in chosen if s not in later]:
                run.run(study, seeds_so_far, i == 0)
            if later:
                run.ensure(seeds_so_far[-1], tuple(dict.fromkeys(o for s in later for o in s.pool)))
                for study in later:
                    run.run(study, seeds_so_far, i == 0)
            if run.ctx is not None:
                _grids(run.ctx, run.results)
        run.save()
    finally:
        torch.set_num_threads(prev_threads)
    logger.info(f"report -> {run.out / 'report.md'} ({time.perf_counter() - run.t_start:.0f}s)")
    return run.results


def _grids(ctx: Context, results: dict) -> None:
    """The PNG grids (first 4 samples per class, first run) of a few settings, for the report."""
    ts, s = ctx.cfg.train_seeds[0], ctx.cfg.seeds[0]
    picks = [Cell(ts, s, "fm", "cond", "top-2"), Cell(ts, s, "fm", "cond", "full"),
             Cell(ts, s, "fm", "uncond", "top-1"), Cell(ts, s, "fm", "stats", "top-2"), Cell(ts, s, "monolith-fm"),
             Cell(ts, s, "ddpm", "cond", "top-2"), Cell(ts, s, "ddpm", "cond", "top-2", "ddim")]
    results["grids"] = {c.setting: f"grids/{ctx.cells.key('cell', c)}.png" for c in picks
                        if (ctx.out / "grids" / f"{ctx.cells.key('cell', c)}.png").exists()}


__all__ = ["machine_info", "run_study"]
