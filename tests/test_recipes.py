"""The demo's recipe choice is a pure function of the step and sampling costs measured on the machine:
the same costs give the same choice, a machine whose convolutions are slow gets a cheaper recipe, and
the prediction never promises more than a recipe's measured curve."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from diffswarm.training.presets import PRESETS
from diffswarm.training.recipes import (
    RECIPES,
    SWARM_CHECK_EVALUATIONS,
    Budget,
    Costs,
    Recipe,
    choose_objectives,
    choose_recipe,
    generate_seconds,
    generation_rows,
    measure_costs,
    predict,
    predict_quality,
)

# a slow, good recipe and a fast, worse one (FD, accuracy at 100 / 1000 steps)
BIG = Recipe("big", "unet", 16, 3, 96, ((100, 100.0, 0.60), (1000, 10.0, 0.95)))
FAST = Recipe("fast", "dit", 96, 3, 96, ((100, 80.0, 0.70), (1000, 30.0, 0.90)))
# DDPM experts that catch up with FM only after many steps (as measured: FD 177 vs 29.7 at 200 steps of batch 48)
SLOW_DDPM = Recipe("slow-ddpm", "unet", 16, 3, 48, BIG.curve, ddpm_curve=((100, 300.0, 0.30), (1000, 11.0, 0.95)))
BUDGET = Budget(seconds=1200.0, rows=1000, train_share=1 / 3, gen_parallel=2, min_train_s=60.0)


def test_quality_is_interpolated_in_log_steps_and_never_extrapolated_upwards():
    assert predict_quality(BIG, 100) == (100.0, 0.60)
    fd, acc = predict_quality(BIG, math.sqrt(100 * 1000))  # halfway in log(steps)
    assert fd == pytest.approx(55.0) and acc == pytest.approx(0.775)
    assert predict_quality(BIG, 10**6) == (10.0, 0.95)  # past the last point: the last point, no promise of more
    fd10, acc10 = predict_quality(BIG, 10)  # before the first point: worse than the first point, not equal
    assert fd10 > 100.0 and acc10 < 0.60 and 0.0 <= acc10


def test_a_machine_with_slow_convolutions_gets_the_cheaper_recipe():
    # where the big recipe's step is 1.8x the fast one's (the recipe table's machine), it trains enough steps
    fast_machine = {"big": Costs(0.282, 1e-3), "fast": Costs(0.157, 4e-4)}
    assert choose_recipe([BIG, FAST], fast_machine, BUDGET).best.recipe is BIG
    # an AVX2-only EPYC: 3.3x slower UNet steps, 2.2x slower DiT steps -> too few steps for the big one
    slow_machine = {"big": Costs(0.942, 3.3e-3), "fast": Costs(0.348, 9e-4)}
    choice = choose_recipe([BIG, FAST], slow_machine, BUDGET)
    assert choice.best.recipe is FAST
    assert [p.recipe.name for p in choice.ranked] == ["fast", "big"]
    assert choice.best.steps > choice.ranked[1].steps
    assert "* fast" in choice.describe()


def test_the_choice_is_deterministic_and_ties_keep_the_table_order():
    same = Recipe("same", "dit", 96, 3, 48, FAST.curve)
    costs = {"fast": Costs(0.3, 1e-3), "same": Costs(0.3, 1e-3)}
    for _ in range(3):
        assert choose_recipe([FAST, same], costs, BUDGET).best.recipe is FAST
        assert choose_recipe([same, FAST], costs, BUDGET).best.recipe is same


def test_generation_cost_comes_out_of_the_training_time():
    cheap, dear = predict(FAST, Costs(0.3, 1e-4), BUDGET), predict(FAST, Costs(0.3, 10.0), BUDGET)
    assert cheap.generate_s == pytest.approx(generate_seconds(BUDGET, 1e-4))
    assert cheap.train_s > dear.train_s and cheap.steps > dear.steps
    assert dear.train_s == BUDGET.min_train_s  # never less than the minimum
    # steps = train seconds x the expert's share of a core / CPU seconds per step
    assert cheap.steps == int(cheap.train_s * BUDGET.train_share / 0.3)


def test_generating_over_the_swarm_counts_the_rows_its_answer_checks_recompute(tmp_path, monkeypatch):
    """The checks recompute a fixed number of evaluations' rows per trajectory whatever its length: they cost a
    larger share of a short sampler's generating, and nothing when the demo generates in its own process."""
    from diffswarm import demo

    assert generation_rows(1000, 5, 2, checked=False) == 10_000
    assert generation_rows(1000, 5, 2) == 1000 * (5 + SWARM_CHECK_EVALUATIONS) * 2
    assert generation_rows(1000, 5, 2) / generation_rows(1000, 11, 2) > 5 / 11
    monkeypatch.setitem(demo.PRESETS, "choice", replace(PRESETS["tiny"], minutes=20.0, recipes=("unet16x3-b96",)))
    monkeypatch.setattr(demo, "measure_costs", lambda r, *a, **k: Costs(0.5, 1e-3))
    est = {}
    for local in (True, False):
        run = demo._start(demo.DemoConfig(out=str(tmp_path / str(local)), k=2, preset="choice",
                                          local_generation=local))
        ds, _, part, part_path = demo._partition(run)
        est[local] = demo._plan_training(run, ds, part, part_path).est_generate
    assert est[False] > est[True] + demo.SWARM_START_CPU_S / demo.available_cpus()


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="no candidate"):
        choose_recipe([BIG], {"other": Costs(1.0, 1.0)}, BUDGET)
    with pytest.raises(ValueError, match="increasing steps"):
        Recipe("x", "unet", 16, 3, 96, ((200, 1.0, 0.9), (100, 1.0, 0.9)))
    with pytest.raises(ValueError, match="2 or more"):
        Recipe("x", "unet", 16, 3, 96, ((200, 1.0, 0.9),))


def test_every_preset_candidate_is_a_known_recipe_with_a_sane_curve():
    names = [n for p in PRESETS.values() for n in p.recipes]
    assert names and all(n in RECIPES for n in names)
    for r in RECIPES.values():
        assert all(fd > 0 and 0 < acc <= 1 for _, fd, acc in r.curve), r.name


def test_measuring_is_a_thin_wrapper_that_returns_positive_costs():
    tiny = Recipe("tiny", "mlp", 32, 1, 8, ((1, 1.0, 0.5), (2, 1.0, 0.5)))
    c = measure_costs(tiny, (1, 8, 8), 10, timed=1)
    assert c.step_s > 0 and c.row_s > 0


def test_the_demo_trains_the_recipe_its_measurements_choose(tmp_path, monkeypatch):
    """The demo's plan takes the network and batch of the recipe chosen from the measured costs (faked here:
    the measuring itself is the thin wrapper above), and the preset's own recipe with a fixed --steps."""
    from dataclasses import replace

    from diffswarm import demo

    monkeypatch.setitem(demo.PRESETS, "choice", replace(PRESETS["tiny"], minutes=20.0,
                                                        recipes=("unet16x3-b96", "dit96x3-b96")))
    run = demo._start(demo.DemoConfig(out=str(tmp_path / "demo"), k=2, preset="choice", local_generation=True))
    ds, _, part, part_path = demo._partition(run)
    for costs, net, batch in (({"unet16x3-b96": Costs(50.0, 1e-5), "dit96x3-b96": Costs(0.05, 1e-5)}, "dit", 96),
                              ({"unet16x3-b96": Costs(0.05, 1e-5), "dit96x3-b96": Costs(5.0, 1e-5)}, "unet", 96)):
        monkeypatch.setattr(demo, "measure_costs", lambda r, *a, costs=costs, **k: costs[r.name])
        plan = demo._plan_training(run, ds, part, part_path)
        assert {(j.net, j.train.batch) for j in plan.jobs} == {(net, batch)}
        assert plan.choice is not None and plan.choice.best.recipe.net == net
    fixed = demo._start(demo.DemoConfig(out=str(tmp_path / "fixed"), k=2, preset="choice", steps=5,
                                        local_generation=True))
    plan = demo._plan_training(fixed, ds, part, part_path)
    assert plan.choice is None and {(j.net, j.train.batch) for j in plan.jobs} == {("mlp", 64)}


def test_recipes_of_one_network_are_compared_on_one_measured_row_cost(tmp_path, monkeypatch):
    """Candidates that differ only in the training batch sample alike: the demo times the network's sampling once
    and gives every such candidate that row cost, so noise in two measurements of one thing cannot pick the
    recipe; another network gets its own."""
    from diffswarm import demo

    monkeypatch.setitem(demo.PRESETS, "choice", replace(PRESETS["tiny"], minutes=20.0, recipes=(
        "unet16x3-b96", "unet16x3-b32", "dit96x3-b96", "unet16x3-b48")))
    calls = []

    def fake(r, *a, row_s=None, **k):
        calls.append((r.name, row_s))
        return Costs(0.5, row_s if row_s is not None else {"unet": 3e-3, "dit": 1e-3}[r.net] + 1e-4 * len(calls))

    monkeypatch.setattr(demo, "measure_costs", fake)
    run = demo._start(demo.DemoConfig(out=str(tmp_path / "demo"), k=2, preset="choice", local_generation=True))
    ds, _, part, part_path = demo._partition(run)
    plan = demo._plan_training(run, ds, part, part_path)
    unet_row = 3e-3 + 1e-4
    assert calls == [("unet16x3-b96", None), ("unet16x3-b32", unet_row), ("dit96x3-b96", None),
                     ("unet16x3-b48", unet_row)]
    rows = {p.recipe.name: p.costs.row_s for p in plan.choice.ranked}
    assert rows == {"unet16x3-b96": unet_row, "unet16x3-b32": unet_row, "unet16x3-b48": unet_row,
                    "dit96x3-b96": 1e-3 + 3e-4}


def test_measuring_with_a_known_row_cost_times_only_the_training_step():
    tiny = Recipe("tiny", "mlp", 32, 1, 8, ((1, 1.0, 0.5), (2, 1.0, 0.5)))
    c = measure_costs(tiny, (1, 8, 8), 10, timed=1, row_s=0.25)
    assert c.row_s == 0.25 and 0 < c.step_s < 5


def test_a_cpu_quota_shrinks_the_plan(tmp_path, monkeypatch):
    """Under a CPU quota (a container's --cpus; process_time does not see the throttling) the demo plans with
    the CPUs the quota allows: each expert's share of a core, so its predicted steps, shrink with it."""
    from dataclasses import replace

    from diffswarm import demo

    monkeypatch.setitem(demo.PRESETS, "choice", replace(PRESETS["tiny"], minutes=20.0, recipes=("unet16x3-b96",)))
    monkeypatch.setattr(demo, "measure_costs", lambda r, *a, **k: Costs(0.5, 1e-5))
    run = demo._start(demo.DemoConfig(out=str(tmp_path / "demo"), k=2, preset="choice", local_generation=True))
    ds, _, part, part_path = demo._partition(run)
    steps = {}
    for cpus in (2.0, 0.5):
        run.cores, run.cpus = 2, cpus
        steps[cpus] = demo._plan_training(run, ds, part, part_path).choice.best.steps
    assert steps[0.5] * 3 < steps[2.0]  # 4 processes: half a core each, then an eighth


def test_the_objectives_follow_the_steps_the_budget_trains():
    """auto: DDPM experts join where their measured curve is about as good as FM's at the steps trained, else all
    FM; a recipe without a DDPM curve (nothing measured) keeps the mix; the other modes are what they say."""
    few, why = choose_objectives(4, "auto", SLOW_DDPM, 150)
    assert few == ["fm"] * 4 and "all FM" in why and "150 steps" in why
    many, why = choose_objectives(4, "auto", SLOW_DDPM, 1000)
    assert many == ["ddpm", "fm", "ddpm", "fm"] and "alternating" in why
    assert choose_objectives(3, "auto", BIG, 150)[0] == ["ddpm", "fm", "ddpm"]
    assert choose_objectives(3, "auto")[0] == ["ddpm", "fm", "ddpm"]  # --steps with no recipe of its network
    assert choose_objectives(4, "mixed", SLOW_DDPM, 150)[0] == ["ddpm", "fm", "ddpm", "fm"]
    assert choose_objectives(2, "fm")[0] == ["fm", "fm"] and choose_objectives(2, "ddpm")[0] == ["ddpm", "ddpm"]
    with pytest.raises(ValueError, match="objectives must be one of"):
        choose_objectives(2, "eps")
    with pytest.raises(ValueError, match="no measured ddpm curve"):
        predict_quality(BIG, 100, "ddpm")
    with pytest.raises(ValueError, match="2 or more points"):
        Recipe("bad", "unet", 16, 3, 48, BIG.curve, ddpm_curve=((100, 1.0, 0.5),))


def test_the_demo_trains_the_objectives_its_budget_chooses(tmp_path, monkeypatch):
    """The plan's experts: all FM when the measured costs leave few steps, the mix with --objectives mixed."""
    from diffswarm import demo

    monkeypatch.setitem(demo.PRESETS, "choice", replace(PRESETS["tiny"], minutes=20.0, recipes=("slow-ddpm",)))
    monkeypatch.setitem(demo.RECIPES, "slow-ddpm", SLOW_DDPM)
    monkeypatch.setattr(demo, "measure_costs", lambda r, *a, **k: Costs(5.0, 1e-5))  # a slow step: few steps
    for mode, objectives in (("auto", ["fm", "fm"]), ("mixed", ["ddpm", "fm"])):
        run = demo._start(demo.DemoConfig(out=str(tmp_path / mode), k=2, preset="choice", local_generation=True,
                                          objectives=mode))
        ds, _, part, part_path = demo._partition(run)
        plan = demo._plan_training(run, ds, part, part_path)
        assert [j.objective for j in plan.jobs] == plan.objectives == objectives, plan.why_objectives


def test_swarm_up_chooses_its_objectives_from_the_steps_its_minutes_train(monkeypatch):
    """`swarm up`'s default (auto): its wall-clock minutes at the step cost measured here (faked: the measuring is
    the wrapper above) give the steps; few steps of the default UNet train FM experts, a fixed --train-steps of
    many steps or a network without measured curves keeps the mix."""
    from types import SimpleNamespace

    from diffswarm.experts.train import TrainConfig
    from diffswarm.swarm.up import SwarmUpConfig, plan_objectives
    from diffswarm.training import recipes

    part = SimpleNamespace(image_shape=(1, 28, 28), num_classes=10)
    measured = []
    monkeypatch.setattr(recipes, "measure_costs", lambda r, *a, **k: measured.append(r.batch) or Costs(1.0, 1e-3))
    base = SwarmUpConfig(run_dir="x", swarm="s", owner_key=None, replicas=1, threads=1, port=0, timeout=1.0)
    objectives, why = plan_objectives(base, part)  # 4 minutes, 4 peers, a 1 s step: at most 240 steps
    assert objectives == ["fm"] * 4 and "all FM" in why and measured == [base.train.batch]
    many = replace(base, train=TrainConfig(steps=10**5))
    assert plan_objectives(many, part)[0] == ["ddpm", "fm", "ddpm", "fm"]
    assert plan_objectives(replace(base, net="mlp"), part)[0] == ["ddpm", "fm", "ddpm", "fm"]
    assert plan_objectives(replace(base, objectives="mixed"), part)[0] == ["ddpm", "fm", "ddpm", "fm"]
    assert measured == [base.train.batch]  # a fixed step count, another network, a given mix: nothing measured


def test_the_plan_knows_whether_the_classifier_must_train_beside_the_experts(tmp_path, monkeypatch):
    """Without a prepared classifier the demo trains one beside its experts (and says so); once `diffswarm prepare`
    (or an earlier run) cached a valid one, the plan knows it will only be loaded."""
    from diffswarm import demo
    from diffswarm.eval import get_classifier

    monkeypatch.setenv("DIFFSWARM_CACHE", str(tmp_path / "cache"))
    run = demo._start(demo.DemoConfig(out=str(tmp_path / "demo"), k=2, preset="tiny", local_generation=True))
    ds, _, part, part_path = demo._partition(run)
    assert not demo._plan_training(run, ds, part, part_path).classifier_cached
    get_classifier(ds, epochs=run.preset.classifier_epochs, progress=False)
    assert demo._plan_training(run, ds, part, part_path).classifier_cached
