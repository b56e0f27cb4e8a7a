"""``diffswarm demo``: the whole path on the embedded default dataset, in one command, in a time budget.

1. partition the data into K clusters (k-means on whitened pixel PCA, no labels);
2. train K experts in parallel processes, one per cluster, as independent volunteers would (the router
   and the quality classifier train beside them): DDPM and flow matching alternating where the steps
   the budget trains make a DDPM expert about as good as an FM one (their measured quality curves),
   else all flow matching (``--objectives`` sets the mix);
3. start a local swarm (a bootstrap node serving the router + one peer process per expert on
   127.0.0.1) and sample class-conditional images over it, as a client, with top-2 routing and CFG; the
   first batch (every class ``per_class`` times) is saved as the per-class grid at once;
4. score those samples: Frechet distance in the classifier's features against real data
   (with the real train-vs-test floor), class accuracy, and the share of samples per cluster.

The demo keeps its time on any machine: the preset gives a wall-clock budget for the whole run
(``--minutes`` overrides it). After partitioning, the demo times one training step and one sampling
pass of each of the preset's candidate recipes here (``Preset.recipes``; a few seconds), predicts the
steps each would train in what the budget leaves after generating, and trains the one whose measured
quality-per-step curve promises the best images at that many steps (``diffswarm.training.recipes``):
the UNet's convolutions cost relatively more on some CPUs (an AVX2-only EPYC) than on the machine the
recipe table was measured on, so the choice follows this machine, not that table. The experts then
train for the time left (``TrainConfig.minutes``: the steps follow from the measured speed); a slower
machine trains fewer steps instead of running late. ``--steps`` trains the preset's own recipe a fixed
number of steps instead. Every stage's time and the choice are printed and written to ``report.json``.

Presets (``training/presets.py``): ``cpu`` fits a 2-core CPU, ``gpu`` is larger, ``tiny`` (digits) is what
the tests run.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from diffswarm.data import DatasetSpec, ImageDataset, Partition
from diffswarm.experts.train import TrainConfig
from diffswarm.router.train import RouterTrainConfig
from diffswarm.training.jobs import RouterJob, TrainJob
from diffswarm.training.pool import WorkerPool
from diffswarm.training.presets import PRESETS, Preset, device_preset
from diffswarm.training.recipes import (
    RECIPES,
    Budget,
    Choice,
    Costs,
    Recipe,
    choose_objectives,
    choose_recipe,
    generate_seconds,
    generation_rows,
    measure_costs,
    recipe_for,
)
from diffswarm.utils.cpus import available_cpus

# CPU-seconds of starting the demo's local swarm (5 processes importing torch and hivemind, the bootstrap scoring
# each expert before admitting it): 34-52 s on 1.45 CPUs (emulated AVX2 machine, docs/performance.md item 9),
# 30-34 s natively on 2 (53 CPU-s measured there: the start waits on the network a quarter of its time)
SWARM_START_CPU_S = 66.0
# seconds the budget keeps besides training and generating: the experts' last step and checkpoint past their
# deadline (8 s on the emulated AVX2 machine), scoring (1 s), the estimate's error
END_MARGIN_S = 20.0


@dataclass(frozen=True)
class DemoConfig:
    """One demo run (from `diffswarm demo`'s options)."""

    out: str = "runs/demo"
    data: DatasetSpec = field(default_factory=DatasetSpec)  # name None: the preset's, else the default dataset
    k: int = 4
    preset: str | None = None  # cpu | gpu | tiny (None: gpu with CUDA, else cpu)
    minutes: float | None = None  # budget of the whole demo (None: the preset's)
    steps: int | None = None  # train each expert a fixed number of steps instead of a budget
    workers: int | None = None  # training processes (default: one per job)
    local_generation: bool = False  # generate in this process instead of over a local swarm
    seed: int = 0
    objectives: str = "auto"  # auto | mixed | fm | ddpm (recipes.choose_objectives)


def _expert_job(job: TrainJob, deadline: float | None, position: int) -> dict:
    """One volunteer in its own process: train until ``deadline`` (time.time()), or job.train.steps."""
    torch.set_num_threads(max(1, job.train.threads))
    from diffswarm.training.jobs import run_train_job

    t0 = time.perf_counter()
    prepared = job.load_data()  # before reading the clock, so that the deadline counts the loading too
    if deadline is not None:
        left = max(deadline - time.time(), 1.0)
        job = replace(job, train=replace(job.train, minutes=left / 60))
    summary = run_train_job(job, position=position, progress=True, prepared=prepared)
    return {"expert": Path(job.out).name, "seconds": time.perf_counter() - t0, **summary}


def _router_job(job: RouterJob) -> dict:
    torch.set_num_threads(max(1, job.train.threads))
    from diffswarm.training.jobs import run_router_job

    return run_router_job(job, progress=False).summary


def _classifier_job(data: DatasetSpec, epochs: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    from diffswarm.eval import get_classifier

    ds, test = data.load("train"), data.load("test")
    t0 = time.perf_counter()
    clf = get_classifier(ds, epochs=epochs, progress=False, test_ds=test)
    return {"seconds": time.perf_counter() - t0, "test_accuracy": getattr(clf.config, "test_accuracy", None)}


def sampling_seconds_per_row(job: TrainJob, part, ds, guidance: float, device: torch.device | None = None) -> float:
    """Wall seconds of one velocity row (CFG included) of this job's network on this machine: the best of a few
    timed forward passes of an untrained expert at batch 64, on one CPU thread, or on ``device`` when it is a GPU
    (where the demo generates then)."""
    from diffswarm.experts.expert import Expert

    cfg, _, _ = job.expert(part, ds)
    dev = device if device is not None and device.type == "cuda" else torch.device("cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        e = Expert(cfg).to(dev).answering()  # the layout the served experts answer in
        x, t = torch.randn(64, *ds.shape, device=dev), torch.full((64,), 0.5, device=dev)
        labels = torch.zeros(64, dtype=torch.long, device=dev)
        e.velocity(x, t, labels, guidance)  # warm-up
        best = float("inf")
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            e.velocity(x, t, labels, guidance)
            sync()
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev)
    return best / 64


@dataclass
class _Run:
    """What every stage of one demo run reads: its config and preset, where it writes, and its clock."""

    cfg: DemoConfig
    preset: Preset
    dev: torch.device
    out: Path
    data: DatasetSpec  # resolved
    budget_s: float  # wall-clock budget of the whole run
    t_start: float  # time.perf_counter() at the start
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    cpus: float = field(default_factory=available_cpus)  # CPUs' worth of time: the cores, or a tighter CPU quota
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, in the order they ran


@dataclass
class _Training:
    """The training stage's plan: the experts' jobs, the router's, and the processes they run in."""

    objectives: list[str]
    why_objectives: str  # the reason for that mix (printed and in report.json)
    jobs: list[TrainJob]
    router: RouterJob
    processes: int
    threads: int  # torch threads per process
    deadline: float | None  # time.time() the experts stop at (None: a fixed number of steps)
    est_generate: float  # estimated seconds of generating (grid + scored samples) on this machine
    train_s: float  # seconds left to training by the budget
    network: str  # what the experts train, e.g. "unet 16x3 batch 96"
    choice: Choice | None = None  # the measured recipe choice (None: the preset's recipe)
    classifier_cached: bool = True  # False: the quality classifier trains beside the experts, on their CPU


def _start(cfg: DemoConfig) -> _Run:
    from diffswarm.experts.train import pick_device

    t_start = time.perf_counter()
    dev = pick_device("auto")
    preset = PRESETS[cfg.preset or device_preset(dev.type)]
    budget_s = 60 * (cfg.minutes if cfg.minutes is not None else preset.minutes)
    out = Path(cfg.out)
    if not cfg.local_generation:  # leftovers of a demo that was SIGKILLed: refuse now, not after training
        from diffswarm.swarm.local import refuse_beside_running

        refuse_beside_running(out / "swarm")
    out.mkdir(parents=True, exist_ok=True)
    data = DatasetSpec(cfg.data.name or preset.dataset, cfg.data.root, cfg.data.size, cfg.data.channels).resolved()
    return _Run(cfg, preset, dev, out, data, budget_s, t_start)


def _partition(run: _Run) -> tuple[ImageDataset, ImageDataset, Partition, Path]:
    """1. partition: (train split, test split, partition, its manifest's path)."""
    from diffswarm.training.jobs import write_partition

    t0 = time.perf_counter()
    ds, test = run.data.load("train"), run.data.load("test")
    part_path = run.out / "partition.json"
    part = write_partition(ds, run.data, run.cfg.k, run.cfg.seed, part_path)
    run.timings["partition_s"] = time.perf_counter() - t0
    print(f"[1/4] partitioned {ds.dataset_id} ({len(ds)} images) into K={run.cfg.k} clusters "
          f"in {run.timings['partition_s']:.1f}s")
    print(part.describe(ds.class_names))
    return ds, test, part, part_path


def _plan_training(run: _Run, ds: ImageDataset, part: Partition, part_path: Path) -> _Training:
    """2. experts, router and classifier, in parallel processes, in what the budget leaves; with a budget and a
    preset listing candidate recipes, the recipe is the one this machine trains best. The experts alternate
    DDPM and FM where the steps they will train make a DDPM expert about as good as an FM one (its measured
    curve), else they are all FM (``recipes.choose_objectives``; ``--objectives`` sets the mix)."""
    from diffswarm.eval.classifier import cached_classifier

    cfg, preset = run.cfg, run.preset
    n_jobs = cfg.k + 2
    workers = cfg.workers or n_jobs
    processes = min(workers, n_jobs)
    threads = max(1, run.cores // processes)
    grid_n = max(1, ds.num_classes) * preset.per_class  # the grid is the first of the scored samples
    s = preset.sampling_for_demo
    rows = generation_rows(max(grid_n, preset.eval_n), s.evaluations, min(preset.routing.k, cfg.k),
                           checked=not cfg.local_generation)
    budget = Budget(seconds=0.0, rows=rows,
                    train_share=min(1.0, run.cpus / processes),
                    # the peers share one GPU where there is one (rows timed on it), else each has its CPU share
                    gen_parallel=1 if run.dev.type == "cuda" else min(run.cpus, preset.routing.k),
                    gen_overhead_s=0 if cfg.local_generation else SWARM_START_CPU_S / run.cpus,
                    min_train_s=60 * preset.min_train_minutes)
    recipe, choice = _choose_recipe(run, ds, budget) if preset.recipes and not cfg.steps else (None, None)
    net, width, depth, batch = ((recipe.net, recipe.width, recipe.depth, recipe.batch) if recipe
                                else (preset.net, preset.width, preset.depth, preset.batch))
    measured = recipe or recipe_for(net, width, depth, batch)  # --steps: the curves of the preset's network
    objectives, why = choose_objectives(cfg.k, cfg.objectives, measured, cfg.steps or (choice and choice.best.steps))
    length = {"steps": cfg.steps} if cfg.steps else {"steps": None, "minutes": 1.0}  # minutes: set per job later
    jobs = [TrainJob(str(part_path), k, str(run.out / "experts" / f"c{k}-{obj}"), objective=obj, net=net,
                     width=width, depth=depth,
                     train=TrainConfig(**length, batch=batch, lr=preset.lr, seed=cfg.seed + k, threads=threads,
                                       resume=True, ckpt_every=max(100, (cfg.steps or 400) // 4)))
            for k, obj in enumerate(objectives)]
    rjob = RouterJob(str(part_path), str(run.out / "router.safetensors"),
                     train=RouterTrainConfig(steps=preset.router_steps, seed=cfg.seed, threads=threads))
    if choice is None:
        row_s = sampling_seconds_per_row(jobs[0], part, ds, s.guidance, run.dev)
        est_generate = generate_seconds(budget, row_s)
    else:
        est_generate = choice.best.generate_s
    elapsed = time.perf_counter() - run.t_start
    train_s = max(60 * preset.min_train_minutes, run.budget_s - elapsed - est_generate - END_MARGIN_S)
    deadline = None if cfg.steps else time.time() + train_s
    run.timings.update(budget_s=run.budget_s, estimated_generate_s=est_generate, training_budget_s=train_s)
    return _Training(objectives, why, jobs, rjob, processes, threads, deadline, est_generate, train_s,
                     f"{net} {width or ''}x{depth or ''} batch {batch}", choice,
                     not ds.num_classes or cached_classifier(ds, epochs=preset.classifier_epochs) is not None)


def _choose_recipe(run: _Run, ds: ImageDataset, budget: Budget) -> tuple[Recipe, Choice]:
    """Time each of the preset's candidate recipes here (a few seconds) and choose the one predicted to
    make the best images in what the budget leaves (``diffswarm.training.recipes``)."""
    t0 = time.perf_counter()
    candidates = [RECIPES[name] for name in run.preset.recipes]
    costs: dict[str, Costs] = {}
    rows: dict[tuple, float] = {}  # one row cost per network: its recipes differ only in the training batch
    for r in candidates:
        net = (r.net, r.width, r.depth)
        costs[r.name] = measure_costs(r, tuple(ds.shape), ds.num_classes, run.preset.sampling_for_demo.guidance,
                                      row_s=rows.get(net))
        rows.setdefault(net, costs[r.name].row_s)
    run.timings["measure_s"] = time.perf_counter() - t0
    left = run.budget_s - (time.perf_counter() - run.t_start) - END_MARGIN_S
    choice = choose_recipe(candidates, costs, replace(budget, seconds=left))
    print(f"[2/4] measured {len(candidates)} candidate recipes on this machine in {run.timings['measure_s']:.1f}s "
          f"(one thread; each expert gets {budget.train_share:.2f} of a core while training):\n{choice.describe()}")
    return choice.best.recipe, choice


def _train(run: _Run, plan: _Training) -> tuple[list[dict], dict, dict]:
    """Run the plan's jobs side by side; returns (expert summaries, router summary, classifier info)."""
    from diffswarm.router.train import format_router_accuracy

    cfg, preset, objectives = run.cfg, run.preset, plan.objectives
    what = f"{cfg.steps} steps each" if cfg.steps else f"{plan.train_s:.0f} s wall-clock each"
    print(f"[2/4] training {cfg.k} experts ({objectives.count('ddpm')} DDPM + {objectives.count('fm')} FM, "
          f"{plan.network}, {what}) + router + classifier in {plan.processes} "
          f"processes ({plan.threads} thread(s) each); generating is estimated at {plan.est_generate:.0f} s here")
    if not plan.classifier_cached:
        print("  the quality classifier is not prepared: it trains beside the experts, on their CPU, once (cached "
              "for later runs); `diffswarm prepare`, which scripts/setup.sh runs, trains it beforehand")
    print(f"  objectives: {plan.why_objectives}")
    t0 = time.perf_counter()
    with WorkerPool(plan.processes) as pool:
        f_router = pool.submit(_router_job, plan.router)
        f_clf = pool.submit(_classifier_job, run.data, preset.classifier_epochs, plan.threads)
        futs = [pool.submit(_expert_job, j, plan.deadline, k) for k, j in enumerate(plan.jobs)]
        expert_summaries = [f.result() for f in futs]
        router_summary = f_router.result()
        clf_info = f_clf.result()
    run.timings["train_s"] = time.perf_counter() - t0
    for e in expert_summaries:
        print(f"  {e['expert']}: {e['steps']} steps, final loss {e['final_loss']:.4f}, {e['seconds']:.0f}s")
    print(format_router_accuracy(router_summary))
    return expert_summaries, router_summary, clf_info


@dataclass
class _Generated:
    grid_path: Path
    samples: torch.Tensor  # (eval_n, C, H, W) scored samples (the grid's among them)
    labels: torch.Tensor  # (eval_n,) their classes
    calls: torch.Tensor  # (K,) rows each expert evaluated for the scored samples


def _generate(run: _Run, ds: ImageDataset, expert_paths: list[Path], router_path: Path,
              part_path: Path | None = None) -> _Generated:
    """3. generate over a local swarm (bootstrap + K peer processes on 127.0.0.1; the bootstrap admits each expert
    by its score on ``part_path``'s test split, as any swarm's owner does): class-conditional samples for scoring,
    whose first batch is saved as the per-class grid (local_generation: in this process instead)."""
    from diffswarm.router.local import ProgressCallback, generate, load_local_ensemble, seeded_noise
    from diffswarm.utils.images import save_grid, save_samples

    cfg, preset, dev, s, timings = run.cfg, run.preset, run.dev, run.preset.sampling_for_demo, run.timings
    classes = list(range(ds.num_classes)) or [-1]
    t_gen = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if cfg.local_generation:
            model = load_local_ensemble(expert_paths, router_path, preset.routing, dev, seed=cfg.seed)
            where = "in this process"
        else:
            from diffswarm.swarm.local import local_swarm

            t0 = time.perf_counter()
            print(f"[3/4] starting a local swarm: bootstrap (router) + {cfg.k} expert peers on 127.0.0.1 "
                  f"(logs in {run.out / 'swarm' / 'logs'})")
            swarm = stack.enter_context(local_swarm(expert_paths, router_path, run_dir=run.out / "swarm",
                                                    validate=part_path))
            model = stack.enter_context(swarm.client(preset.routing, seed=cfg.seed, device=dev))
            timings["swarm_up_s"] = time.perf_counter() - t0
            where = f"over the swarm ({' '.join(swarm.initial_peers)})"
        # the grid is the scored samples' first batch: their labels cycle through the classes, so the first
        # len(classes) x per_class of them hold per_class of every class (no samples made only for the picture)
        grid_n = len(classes) * preset.per_class
        n = max(preset.eval_n, grid_n)
        eval_labels = torch.tensor([classes[i % len(classes)] for i in range(n)])
        noise = seeded_noise(n, ds.shape, cfg.seed + 1)  # one draw for all n: the grid's and the rest's
        print(f"[3/4] sampling {n} class-conditional samples {where} ({s.steps} {s.sampler} steps, "
              f"{preset.routing.strategy} k={preset.routing.k}, CFG {s.guidance:g}); the first {grid_n} make "
              f"the {len(classes)}x{preset.per_class} grid")
        t0 = time.perf_counter()
        model.calls.zero_()
        head = generate(model, eval_labels[:grid_n], ds.shape, s, dev, callback=ProgressCallback("grid"),
                        noise=noise[:grid_n])
        order = torch.cat([torch.nonzero(eval_labels[:grid_n] == c).flatten() for c in classes])
        grid_path = save_grid(head[order], run.out / "grid.png", preset.per_class)
        timings["grid_s"] = time.perf_counter() - t0
        print(f"  grid -> {grid_path} ({timings['grid_s']:.0f}s)")
        t0 = time.perf_counter()
        samples = head if n == grid_n else torch.cat([head, generate(
            model, eval_labels[grid_n:], ds.shape, s, dev, callback=ProgressCallback("eval samples"),
            noise=noise[grid_n:])])
        save_samples(run.out / "samples.npz", samples, eval_labels)
        timings["eval_sampling_s"] = time.perf_counter() - t0
        model_calls = model.calls.clone()
    timings["generate_s"] = time.perf_counter() - t_gen
    return _Generated(grid_path, samples, eval_labels, model_calls)


def _score(run: _Run, ds: ImageDataset, test: ImageDataset, part: Partition, plan: _Training,
           trained: tuple[list[dict], dict, dict], gen: _Generated) -> dict:
    """4. quality: score the samples, write ``report.json`` and print the summary; returns the report."""
    from diffswarm.eval import get_classifier, quality_report

    cfg, preset, timings, out = run.cfg, run.preset, run.timings, run.out
    expert_summaries, router_summary, clf_info = trained
    t0 = time.perf_counter()
    clf = get_classifier(ds, epochs=preset.classifier_epochs, progress=False, test_ds=test)
    rep = quality_report(gen.samples, gen.labels if ds.num_classes else None, ds, test, clf, part, seed=cfg.seed)
    timings["score_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - run.t_start
    calls = (gen.calls.float() / gen.calls.sum().clamp_min(1)).tolist()
    report = {"dataset": ds.dataset_id, "k": cfg.k, "preset": asdict(preset), "objectives": plan.objectives,
              "objectives_reason": plan.why_objectives,
              "experts": expert_summaries, "router": router_summary, "classifier": clf_info,
              "quality": rep.to_dict(), "routing": asdict(preset.routing), "sampling": asdict(preset.sampling_for_demo),
              "expert_call_share": calls, "timings": timings, "cpu_count": run.cores, "available_cpus": run.cpus,
              "recipe_choice": _choice_report(plan.choice), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "generation": "local" if cfg.local_generation else "swarm", "grid": str(gen.grid_path)}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"[4/4] quality (classifier features, {preset.routing.strategy} k={preset.routing.k}):")
    print(rep.format())
    print("  expert call share (rows evaluated): " + ", ".join(f"c{k} {v:.2f}" for k, v in enumerate(calls)))
    print("  time per stage: " + ", ".join(f"{k.removesuffix('_s')} {v:.0f}s" for k, v in timings.items()
                                           if k not in ("budget_s", "estimated_generate_s", "training_budget_s")))
    print(f"grid -> {gen.grid_path}\nreport -> {out / 'report.json'}\ntotal {timings['total_s']:.0f}s "
          f"(budget {run.budget_s:.0f}s)")
    return report


def _choice_report(choice: Choice | None) -> list[dict] | None:
    """The measured recipe choice for report.json: every candidate, best first."""
    if choice is None:
        return None
    return [{"recipe": p.recipe.name, "step_ms": 1000 * p.costs.step_s, "row_ms": 1000 * p.costs.row_s,
             "train_s": p.train_s, "predicted_steps": p.steps, "predicted_fd": p.fd, "predicted_accuracy": p.accuracy,
             "chosen": p is choice.best} for p in choice.ranked]


def run_demo(cfg: DemoConfig) -> dict:
    run = _start(cfg)
    ds, test, part, part_path = _partition(run)
    plan = _plan_training(run, ds, part, part_path)
    trained = _train(run, plan)
    torch.set_num_threads(run.cores)
    gen = _generate(run, ds, [Path(j.out) / "expert.safetensors" for j in plan.jobs], Path(plan.router.out),
                    part_path)
    return _score(run, ds, test, part, plan, trained, gen)
