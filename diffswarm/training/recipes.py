"""Which expert recipe a machine should train, from its own measured speed (the demo's choice at start).

A recipe's quality depends on how many steps it trains, and how many steps fit a wall-clock budget
depends on the machine: the UNet's convolutions cost 1.8x the DiT's step on the machine the recipe
table was measured on and 2.7x on an AVX2-only EPYC (docs/performance.md). So the demo does not take
one machine's table: it times one training step and one sampling pass of each candidate here
(``measure_costs``, a few seconds), predicts the steps each would train in what the budget leaves
after generating, reads each candidate's quality at that many steps off its measured quality-per-step
curve (``Recipe.curve``, from ``bench/recipe_choice.py --steps N``), and trains the best.

``choose_recipe`` is a pure function of the measured costs and the budget (unit-tested);
``measure_costs`` is the thin wrapper that measures.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Recipe:
    """An expert network and batch, with its measured quality after N training steps.

    ``curve``: ((steps, FD, class accuracy), ...) in increasing steps: an FM expert trained on all of
    Fashion-MNIST for that many steps (warm-up + cosine LR over them), 500 class-conditional samples
    (Heun 6, CFG 2) scored by ``diffswarm.eval.quality_report``; the command is in docs/performance.md.
    ``ddpm_curve``: the same for a DDPM expert of the demo's configuration (empty: not measured).
    """

    name: str
    net: str
    width: int
    depth: int
    batch: int
    curve: tuple[tuple[int, float, float], ...]
    ddpm_curve: tuple[tuple[int, float, float], ...] = ()

    def __post_init__(self) -> None:
        for curve in (self.curve, self.ddpm_curve) if self.ddpm_curve else (self.curve,):
            steps = [p[0] for p in curve]
            if len(steps) < 2 or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
                raise ValueError(f"recipe {self.name}: a curve needs 2 or more points in increasing steps")


# FD weight of one point of class accuracy in the score a choice minimises (FD + 100 * (1 - accuracy)):
# both targets of the demo (FD <= 25, accuracy >= 90%) count, FD first.
ACCURACY_WEIGHT = 100.0


def quality_score(fd: float, accuracy: float) -> float:
    """What a choice minimises: FD + ``ACCURACY_WEIGHT`` x (1 - class accuracy)."""
    return fd + ACCURACY_WEIGHT * (1.0 - accuracy)


def predict_quality(recipe: Recipe, steps: float, objective: str = "fm") -> tuple[float, float]:
    """(FD, class accuracy) of ``recipe``'s ``objective`` expert after ``steps`` steps: linear in log(steps)
    between measured points; past the last point the last point's quality (no promise of more), before the
    first the first segment's slope continued (so fewer steps than ever measured predict worse, never better)."""
    pts = recipe.ddpm_curve if objective == "ddpm" else recipe.curve
    if not pts:
        raise ValueError(f"recipe {recipe.name}: no measured {objective} curve")
    if steps >= pts[-1][0]:
        return float(pts[-1][1]), float(pts[-1][2])
    i = next(j for j in range(len(pts) - 1) if steps <= pts[j + 1][0])  # its segment (0 before the first point)
    (s0, f0, a0), (s1, f1, a1) = pts[i], pts[i + 1]
    w = (math.log(max(steps, 1.0)) - math.log(s0)) / (math.log(s1) - math.log(s0))
    return f0 + w * (f1 - f0), min(1.0, max(0.0, a0 + w * (a1 - a0)))


@dataclass(frozen=True)
class Costs:
    """What ``measure_costs`` measured of one recipe on this machine (seconds of one thread)."""

    step_s: float  # one training step
    row_s: float  # one velocity row when sampling (CFG included)


@dataclass(frozen=True)
class Budget:
    """What the run leaves to training and generating (wall-clock), and how it shares the cores."""

    seconds: float  # wall seconds for training + generating
    rows: float  # velocity rows generating will compute (``generation_rows``)
    train_share: float  # cores each expert gets while training (cores / training processes, at most 1)
    gen_parallel: float  # experts computing at once when generating (below 1 under a CPU quota)
    # the client, routing, mixing and the sampler's own arithmetic cost about as much again as the rows at the
    # measured row cost (one thread, batch 64), fitted with SWARM_CHECK_EVALUATIONS to the demo over its swarm on
    # the emulated AVX2 machine (docs/performance.md item 9): at 2.0, 1,100 samples x 11 evaluations x top-2 at
    # 5.77 ms on 1.45 CPUs took 240 s (predicted 262), 1,000 x 5 x 2 at 5.69 ms 140 s (predicted 141); three later
    # Heun 3 runs took 1.05-1.08x their prediction (179 s for 166), natively 1.10x (126 s for 115): 2.15
    gen_factor: float = 2.15
    gen_overhead_s: float = 0.0  # fixed cost of generating (the local swarm's start)
    min_train_s: float = 60.0  # never train for less than this


@dataclass(frozen=True)
class Prediction:
    """One candidate under a budget: the time it leaves to training, its steps and predicted quality."""

    recipe: Recipe
    costs: Costs
    generate_s: float
    train_s: float
    steps: int
    fd: float
    accuracy: float

    @property
    def score(self) -> float:
        return quality_score(self.fd, self.accuracy)

    def describe(self) -> str:
        return (f"{self.recipe.name:14s} step {1000 * self.costs.step_s:5.0f} ms, row {1000 * self.costs.row_s:5.2f} ms"
                f" -> {self.steps:5d} steps in {self.train_s:4.0f} s, predicted FD {self.fd:5.1f}, "
                f"accuracy {100 * self.accuracy:4.1f}%")


@dataclass(frozen=True)
class Choice:
    """The chosen recipe and every candidate's prediction, best first."""

    best: Prediction
    ranked: tuple[Prediction, ...] = field(default=())

    def describe(self) -> str:
        return "\n".join(("* " if p is self.best else "  ") + p.describe() for p in self.ranked)


# A DDPM expert joins the demo's mix only where its measured curve predicts images about as good as an FM
# expert's at the steps the budget trains (its score at most this factor of FM's). DDPM experts need more steps:
# at 200 steps of batch 48 a DDPM expert scored FD 177 / 60% where an FM one scored 29.7 / 89.6%.
DDPM_SCORE_RATIO = 1.25
OBJECTIVE_MIXES = ("auto", "mixed", "fm", "ddpm")


def choose_objectives(k: int, mode: str = "auto", recipe: Recipe | None = None,
                      steps: int | None = None) -> tuple[list[str], str]:
    """The objectives of ``k`` experts and why. ``mixed``: DDPM and FM alternating (DDPM first); ``fm``, ``ddpm``:
    all one; ``auto``: mixed where ``recipe``'s measured curves predict a DDPM expert within
    ``DDPM_SCORE_RATIO`` of an FM one at ``steps`` (and where no curve says otherwise), else all FM."""
    if mode not in OBJECTIVE_MIXES:
        raise ValueError(f"objectives must be one of {OBJECTIVE_MIXES}, got {mode!r}")
    mixed = ["ddpm" if i % 2 == 0 else "fm" for i in range(k)]
    if mode == "mixed":
        return mixed, "DDPM and FM alternating (--objectives mixed)"
    if mode in ("fm", "ddpm"):
        return [mode] * k, f"all {mode.upper()} (--objectives {mode})"
    if recipe is None or steps is None or not recipe.ddpm_curve:
        return mixed, "DDPM and FM alternating"
    if steps > recipe.ddpm_curve[-1][0]:  # past what was measured: no evidence that DDPM experts stay behind
        return mixed, (f"DDPM and FM alternating: {steps} steps is past the measured quality curves "
                       f"({recipe.ddpm_curve[-1][0]} steps)")
    fm_fd, fm_acc = predict_quality(recipe, steps)
    dd_fd, dd_acc = predict_quality(recipe, steps, "ddpm")
    at = (f"at {steps} steps a DDPM expert is predicted FD {dd_fd:.1f} / {100 * dd_acc:.1f}%, "
          f"an FM one {fm_fd:.1f} / {100 * fm_acc:.1f}%")
    if quality_score(dd_fd, dd_acc) <= DDPM_SCORE_RATIO * quality_score(fm_fd, fm_acc):
        return mixed, f"DDPM and FM alternating: {at}"
    return ["fm"] * k, f"all FM: {at} (--objectives mixed trains the mix anyway)"


def recipe_for(net: str, width: int | None, depth: int | None, batch: int) -> Recipe | None:
    """The measured recipe of this network (``width`` / ``depth`` None: the kind's defaults), the nearest batch;
    None if none of ``RECIPES`` has it."""
    from diffswarm.experts.networks import KIND_DEFAULTS

    sizes = {**KIND_DEFAULTS.get(net, {}), **{n: v for n, v in (("width", width), ("depth", depth)) if v}}
    same = [r for r in RECIPES.values() if (r.net, r.width, r.depth) == (net, sizes.get("width"), sizes.get("depth"))]
    return min(same, key=lambda r: abs(r.batch - batch), default=None)


# The swarm client's answer checks (client/answer_checks.py) recompute, with its own copy of the weights where a
# cluster has one peer as in the demo, every peer's first answer and last-step answer of each trajectory, one audited
# answer and a share of the rest: about 4 evaluations' rows per trajectory whatever its length. Measured natively on
# the demo's experts, 1,000 samples: Heun 3 (5 evaluations) over the swarm 78.3 s, with the checks off 42.6 s (4.2
# evaluations' worth); Heun 6 (11) 122 vs 93 ms per sample (3.4)
SWARM_CHECK_EVALUATIONS = 4.0


def generation_rows(samples: int, evaluations: int, k: int, checked: bool = True) -> float:
    """Velocity rows generating ``samples`` costs: ``evaluations`` per trajectory for each of the ``k`` experts
    routed to, plus what the swarm client's answer checks recompute (``checked``; none when generating locally)."""
    return samples * (evaluations + (SWARM_CHECK_EVALUATIONS if checked else 0.0)) * k


def generate_seconds(budget: Budget, row_s: float) -> float:
    """Estimated wall seconds of generating ``budget.rows`` rows at ``row_s`` seconds of one thread per row."""
    return budget.gen_factor * budget.rows * row_s / max(0.05, budget.gen_parallel) + budget.gen_overhead_s


def predict(recipe: Recipe, costs: Costs, budget: Budget) -> Prediction:
    """The steps ``recipe`` trains and its predicted quality, with ``costs`` measured on this machine."""
    generate_s = generate_seconds(budget, costs.row_s)
    train_s = max(budget.min_train_s, budget.seconds - generate_s)
    steps = max(1, int(train_s * min(1.0, budget.train_share) / max(costs.step_s, 1e-6)))
    fd, acc = predict_quality(recipe, steps)
    return Prediction(recipe, costs, generate_s, train_s, steps, fd, acc)


def choose_recipe(recipes: tuple[Recipe, ...] | list[Recipe], costs: dict[str, Costs], budget: Budget) -> Choice:
    """The recipe with the best predicted quality (lowest ``Prediction.score``; the earlier one on a tie)
    among ``recipes`` with measured ``costs``."""
    preds = [predict(r, costs[r.name], budget) for r in recipes if r.name in costs]
    if not preds:
        raise ValueError("no candidate recipe has measured costs")
    ranked = sorted(preds, key=lambda p: p.score)  # stable: ties keep the table's order
    return Choice(ranked[0], tuple(ranked))


def measure_costs(recipe: Recipe, shape: tuple[int, int, int], num_classes: int, guidance: float = 2.0,
                  timed: int = 2, row_s: float | None = None) -> Costs:
    """Time ``recipe`` on this machine with one thread: the fastest of ``timed`` training steps (loss,
    backward, AdamW) after one untimed, and of 8 sampling passes (CFG) at batch 64, on random data.
    CPU time of this process (``time.process_time``): what the step costs, not what other work takes.
    ``row_s``: the row cost already measured for the same network (recipes that differ only in batch sample
    alike): the sampling passes are skipped, and such candidates are compared on one row cost, not on the
    noise of two measurements (5.65 vs 6.13 ms for one network in one run on the emulated AVX2 machine)."""
    from diffswarm.experts.config import ExpertConfig
    from diffswarm.experts.expert import Expert
    from diffswarm.experts.networks import NetConfig, default_patch
    from diffswarm.experts.objectives import expert_loss

    c, h, _ = shape
    net = NetConfig.for_kind(recipe.net, channels=c, size=h, num_classes=num_classes, width=recipe.width,
                             depth=recipe.depth, patch=default_patch(h))
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        e = Expert(ExpertConfig(objective="fm", net=net))
        opt = torch.optim.AdamW(e.net.parameters(), lr=1e-4)
        x, labels = torch.randn(recipe.batch, *shape, generator=g), torch.randint(0, max(1, num_classes),
                                                                                  (recipe.batch,), generator=g)
        step = float("inf")
        for i in range(timed + 1):
            t0 = time.process_time()
            loss, _ = expert_loss(e, x, labels, g)
            opt.zero_grad(set_to_none=True)
            loss.mean().backward()
            opt.step()
            step = min(step, time.process_time() - t0) if i else step
        if row_s is not None:
            return Costs(step, row_s)
        # the row is timed in the training layout (NCHW), as ``Budget.gen_factor`` was fitted; served UNet experts
        # answer channels-last (``Expert.answering``), 1.04-1.21x faster (bench/inference_layout.py). Demo runs since
        # generated in 0.89-1.03x the estimate natively and 0.80-0.82x on the emulated AVX2 machine (Intel host,
        # docs/performance.md item 9), against 1.05-1.10x on the EPYC host before: left as fitted
        e.eval()
        xs, ts, ls = torch.randn(64, *shape, generator=g), torch.full((64,), 0.5), torch.zeros(64, dtype=torch.long)
        row = float("inf")
        with torch.no_grad():
            for _ in range(8):  # the fastest of 8 (once per network): the estimate of generating scales with it
                t0 = time.process_time()
                e.velocity(xs, ts, ls, guidance)
                row = min(row, (time.process_time() - t0) / 64)
    finally:
        torch.set_num_threads(prev)
    return Costs(step, row)


# The candidates, with their measured quality-per-step curves: (steps, FD, class accuracy) of an expert on all of
# Fashion-MNIST 28x28, 500 class-conditional samples, Heun 6, CFG 2, scored by one classifier (FD floor, real train
# vs test at n = 500: 12.1): `python bench/recipe_choice.py --objective fm --n 500 --sampler heun --sample-steps 6
# --guidance 2 --steps N --only I` (I: 28 = unet16x3 b32, 7 = b48, 6 = b96, 0 = dit96x3 b96; docs/performance.md).
# Batch 32 makes the best images per CPU-second at every step count a 2-core CPU trains in the demo: its step costs
# 0.64x batch 48's (237-240 vs 372-376 ms on the curves' machine), and at equal CPU time b32 vs b48 scored FD 66 vs
# 82.9 (156 vs 100 steps, b32 interpolated), 44 vs 48.4 (234 / 150), 30.0 vs 34.2 (300 / 200), 22.1 vs 27.8
# (450 / 300), 19.7 vs 21.0 (600 / 400); batch 24 (recipe_choice 29) did not beat it. Batch 96 wins only with
# far more time. Points from 2026-12-03 (issue 21); the DiT's are from 2026-12-02, scored by a classifier of floor
# 7.9 (it scored b96 at 100 / 300 steps 68.3 / 17.9 where the one above scores 75.9 / 18.2).
# The DDPM curves: the same command with --objective ddpm (the demo's DDPM expert: logit-normal steps, the flow
# weighting): b32 300 / 600 / 900 steps FD 150.4 / 43.2 / 34.6, accuracy 64.2% / 87.4% / 86.4%; b96 100 / 300 / 600
# FD 263.4 / 73.2 / 26.3, 44.8% / 80.0% / 89.8%; b48 200 / 400 177.0 / 75.5, 60.0% / 79.8%. Far behind FM up to a few
# hundred steps: a 2-core CPU trains all-FM experts (``choose_objectives``), past the measured curves the mix.
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("unet16x3-b32", "unet", 16, 3, 32,
           ((100, 102.3, 0.640), (150, 68.6, 0.742), (300, 30.0, 0.922), (450, 22.1, 0.934), (600, 19.7, 0.924),
            (900, 18.2, 0.924)),
           ddpm_curve=((300, 150.4, 0.642), (600, 43.2, 0.874), (900, 34.6, 0.864))),
    Recipe("unet16x3-b48", "unet", 16, 3, 48,
           ((100, 82.9, 0.718), (150, 48.4, 0.846), (200, 34.2, 0.896), (300, 27.8, 0.898), (400, 21.0, 0.926)),
           ddpm_curve=((200, 177.0, 0.600), (400, 75.5, 0.798))),
    Recipe("unet16x3-b96", "unet", 16, 3, 96, ((100, 75.9, 0.780), (300, 18.2, 0.918)),
           ddpm_curve=((100, 263.4, 0.448), (300, 73.2, 0.800), (600, 26.3, 0.898))),
    Recipe("dit96x3-b96", "dit", 96, 3, 96, ((100, 287.8, 0.352), (300, 111.0, 0.730))),
)}
