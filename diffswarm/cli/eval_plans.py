"""Plans of the evaluating subcommands: `quality` (of saved samples), `prepare` (its classifier, once), `demo` (the
whole path at once), `eval` (the papers' claims on a cached expert pool, sized from the demo's presets)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from diffswarm.cli.planning import DATASET_DESTS, dataset, refuse
from diffswarm.data import DatasetSpec

if TYPE_CHECKING:
    from diffswarm.demo import DemoConfig
    from diffswarm.eval.config import StudyConfig


@dataclass(frozen=True)
class QualityPlan:
    samples: str
    partition: str | None
    data: DatasetSpec | None  # None: the partition's own dataset


def plan_quality(args, given) -> QualityPlan:
    if args.partition:
        refuse(given, DATASET_DESTS, "with --partition (the samples are compared with the manifest's dataset)")
        return QualityPlan(args.samples, args.partition, None)
    return QualityPlan(args.samples, None, dataset(args))


@dataclass(frozen=True)
class PreparePlan:
    data: DatasetSpec


def plan_prepare(args, given) -> PreparePlan:
    return PreparePlan(dataset(args))


@dataclass(frozen=True)
class DemoPlan:
    config: DemoConfig


def plan_demo(args, given) -> DemoPlan:
    from diffswarm.demo import DemoConfig

    return DemoPlan(DemoConfig(out=args.out, data=dataset(args), k=args.k, preset=args.preset, minutes=args.minutes,
                               steps=args.steps, workers=args.workers, local_generation=args.local_generation,
                               seed=args.seed, objectives=args.objectives))


@dataclass(frozen=True)
class EvalPlan:
    config: StudyConfig
    command: str  # the command line, recorded in the report


@dataclass(frozen=True)
class EvalReportPlan:
    out: str  # re-render OUT/report.md from OUT/results.json


# optimizer steps per expert of the full run (batch 96; the monolith trains K times as many). Measured on the
# project's 2-core CPU (AMD EPYC, AVX-512), docs/results.md: the default run (5 training seeds, N = 300) trained
# 135 pool models in 11,689 s of one core each (2 run at a time) and sampled and scored 290 cells in 7,172 s, the
# Gaussian-mixture study ~270 s: ~3.7 h of the machine from an empty cache, ~45 min per training seed. Sampling,
# not training, is most of it. Seeds came before steps: with 3 seeds the Holm-adjusted paired t tests (2 df) could
# not pass; 200 steps would add ~1.6 h (~5.3 h in all: estimated, never run, so not the default).
FULL_BUDGET = 100
EVAL_POOL_DESTS = ("budget", "train_seeds", "jobs", "device", "samples", "save_samples")


def eval_config(quick: bool, out: str, **over):
    """The ``diffswarm eval`` configuration: the network, batch, router steps and sampling of the
    ``tiny`` (quick) or ``cpu`` (full) preset the demo runs too, so that changing the preset changes the eval;
    ``over`` replaces StudyConfig fields (``budget``: expert steps; ``samples``: n)."""
    from diffswarm.eval.config import QUICK_GMM, GMMSettings, StudyConfig
    from diffswarm.eval.pool import PoolConfig
    from diffswarm.training.presets import PRESETS

    pr = PRESETS["tiny" if quick else "cpu"]
    budget = over.pop("budget", None)
    pool = PoolConfig(data=DatasetSpec(pr.dataset or "fashion").resolved(), k=4 if quick else 8, net=pr.net,
                      width=pr.width, depth=pr.depth, batch=pr.batch, lr=pr.lr,
                      expert_steps=budget or (500 if quick else FULL_BUDGET), router_steps=pr.router_steps)
    if quick:
        sizes = dict(train_seeds=(0,), seeds=(0, 1), n=300, stability_n=32, align_n=128, router_eval_n=360,
                     gmm=QUICK_GMM)
    else:
        # the training seed is the unit of replication: 5 of them (a paired t test with 4 df; 3 seeds left t(2)
        # tests that no Holm-adjusted claim could pass), one sampling seed each (a second one only narrows a
        # training seed's mean, at the cost of every sampled cell), N = 300 samples per cell against as many
        # held-out test images; the measured cost is at FULL_BUDGET
        sizes = dict(train_seeds=(0, 1, 2, 3, 4), seeds=(0,), n=300, stability_n=32, gmm=GMMSettings())
    if over.get("n") is None:
        over.pop("n", None)
    for k in [k for k, v in over.items() if v is None]:
        del over[k]
    cfg = {**sizes, **over}
    cfg["stability_n"] = min(cfg.get("stability_n", 48), cfg.get("n", 500))
    return StudyConfig(out=out, pool=pool, sampling=pr.sampling, quick=quick, classifier_epochs=pr.classifier_epochs,
                       **cfg)


def plan_eval(args, given) -> EvalPlan | EvalReportPlan:
    from diffswarm.eval.studies import QUICK_STUDIES, STUDIES

    if args.report_only:
        refuse(given, [a for a in ("quick", "studies", "seeds", "threads", *EVAL_POOL_DESTS) if a in given],
                "with --report-only (it re-renders OUT/report.md from OUT/results.json)")
        return EvalReportPlan(args.out)

    studies = tuple(s for s in STUDIES if s in (args.studies or (QUICK_STUDIES if args.quick else STUDIES)))
    if set(studies) == {"gmm"}:
        refuse(given, EVAL_POOL_DESTS, "with --studies gmm only (the Gaussian-mixture study trains no expert pool, "
                                        "draws no image samples and runs on the CPU)")
    if args.samples is not None and args.samples < 10:
        raise ValueError(f"--samples must be >= 10, got {args.samples}")
    if args.budget is not None and args.budget < 1:
        raise ValueError(f"--budget must be >= 1 expert training step, got {args.budget}")
    for name, vals in (("--seeds", args.seeds), ("--train-seeds", args.train_seeds)):
        if vals is not None and len(set(vals)) != len(vals):
            raise ValueError(f"{name} repeats a seed: {vals}")
    cfg = eval_config(args.quick, args.out, budget=args.budget, n=args.samples, studies=studies,
                      seeds=tuple(args.seeds) if args.seeds else None,
                      train_seeds=tuple(args.train_seeds) if args.train_seeds else None,
                      save_samples=args.save_samples, jobs=args.jobs, threads=args.threads, device=args.device)
    return EvalPlan(cfg, " ".join(["diffswarm", "eval", *getattr(args, "argv", [])]))
