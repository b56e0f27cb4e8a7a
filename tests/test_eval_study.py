"""`diffswarm eval`: the pieces offline (native DDIM, no-translator, FLOP counting, pool cache keys, the plan),
then the quick study end to end (about 3 minutes on a loaded 2-core CPU; marked slow)."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffswarm.eval.ablations import NoTranslator, forward_flops, sample_native_ddim
from diffswarm.eval.report_common import paired
from diffswarm.eval.settings import ddpm_clusters, ensemble_objectives, mixes, strategies
from diffswarm.experts.config import ExpertConfig
from diffswarm.experts.expert import Expert
from diffswarm.experts.networks import NetConfig
from diffswarm.experts.schedules import FM_TIME_SCALE
from diffswarm.router.ensemble import RoutedEnsemble
from diffswarm.router.routing import RoutingConfig

# ---------------------------------------------------------------------------------------------- pieces
from diffswarm.sampling.loop import sample


class PointMassEps(nn.Module):
    """Exact eps of a DDPM network when all data is the one image ``c``: (x - sqrt(abar) c) / sqrt(1 - abar)."""

    def __init__(self, schedule, c: torch.Tensor):
        super().__init__()
        self.schedule, self.c = schedule, c

    def forward(self, x, tau, labels):
        ab = self.schedule.alpha_bar_at(tau.double()).to(x.dtype).reshape(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.c) / (1 - ab).sqrt().clamp_min(1e-6)


def point_mass_expert(c: torch.Tensor, objective="ddpm") -> Expert:
    cfg = ExpertConfig(objective=objective, net=NetConfig(kind="mlp", channels=1, size=4, num_classes=0, width=8,
                                                          depth=1))
    e = Expert(cfg)
    e.net = PointMassEps(e.schedule, c)
    return e.eval()


def test_native_ddim_and_the_translator_both_land_on_a_point_mass():
    c = torch.linspace(-0.8, 0.8, 16).reshape(1, 1, 4, 4)
    experts = [point_mass_expert(c), point_mass_expert(c)]
    ens = RoutedEnsemble(experts, None, RoutingConfig("full"))
    noise = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.full((5,), -1)
    x_ddim = sample_native_ddim(ens, noise, labels, steps=12)
    assert torch.allclose(x_ddim, c.expand_as(x_ddim), atol=1e-3)
    assert ens.calls.tolist() == [5 * 12, 5 * 12]  # both experts on every row at every step
    x_flow = sample(ens, noise, labels, steps=12)  # the eps -> v translator and Euler
    assert torch.allclose(x_flow, c.expand_as(x_flow), atol=1e-3)
    with pytest.raises(ValueError, match="DDPM experts"):
        sample_native_ddim(RoutedEnsemble([Expert(ExpertConfig(objective="fm"))], None, RoutingConfig("full")),
                           torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long), 3)


@pytest.mark.parametrize("x0_clip", [None, 1.0])
def test_translator_and_euler_on_the_ddim_grid_is_native_ddim(x0_clip):
    """For one eps-model, translator + Euler on the SNR-matched flow grid of DDIM's steps equals native DDIM
    (eta 0), up to float32 rounding and the translator's interpolation of tau(t): with no clipping, and with the
    translator's clipping (x0 clipped, eps recomputed, for t >= 0.5) that the native DDIM uses too. Without
    clipping the native DDIM is diffusers' DDIMScheduler step for step."""
    from diffusers import DDIMScheduler

    from diffswarm.eval.ablations import ddim_update, trailing_timesteps
    from diffswarm.sampling.steps import euler_step, model_velocity

    torch.manual_seed(1)
    cfg = ExpertConfig(objective="ddpm", x0_clip=x0_clip,
                       net=NetConfig(kind="mlp", channels=1, size=4, num_classes=0, width=16, depth=1))
    e = Expert(cfg).eval()
    for p in e.net.parameters():
        nn.init.normal_(p, std=0.2)
    ens = RoutedEnsemble([e], None, RoutingConfig("full"))
    noise = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.full((6,), -1)
    steps = 8
    native = sample_native_ddim(ens, noise, labels, steps)
    abar = e.schedule.alpha_bar
    taus = trailing_timesteps(e.schedule.steps, steps)
    a, sg = abar[taus].sqrt(), (1 - abar[taus]).sqrt()
    grid = [float(v) for v in sg / (a + sg)] + [0.0]  # flow times of DDIM's steps, then the data
    x = noise / float(a[0] + sg[0])  # the flow point of the VP noise at tau = T - 1
    f = model_velocity(e, labels)
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        x = euler_step(f, x, torch.tensor(t), torch.tensor(t_next))
    scale = native.abs().max()  # without clipping x0_hat near t = 1 is huge (a ~ 0): compare relative to it
    assert (x - native).abs().max() <= 1e-3 * scale + 1e-4, ((x - native).abs().max(), scale)
    if x0_clip is None:  # the DDIM update is diffusers' (away from t = 1, where ours floors a as the translator does)
        betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
        sched = DDIMScheduler(num_train_timesteps=1000, trained_betas=betas.numpy(), timestep_spacing="trailing",
                              clip_sample=False, set_alpha_to_one=True, prediction_type="epsilon")
        sched.set_timesteps(steps)
        assert [int(v) for v in sched.timesteps] == taus
        for i in range(2, steps):
            tau, xv = taus[i], torch.randn(6, 1, 4, 4)
            eps = e.network_output(xv, torch.full((6,), float(tau)), labels)
            prev = float(abar[taus[i + 1]]) if i + 1 < steps else 1.0
            ours = ddim_update(xv, eps, float(abar[tau]), prev, None)
            assert torch.allclose(ours, sched.step(eps, tau, xv, eta=0.0).prev_sample, atol=1e-4, rtol=1e-4)


def test_each_no_translator_error_alone_and_the_native_dpm_solver():
    torch.manual_seed(0)
    cfg = ExpertConfig(objective="ddpm", net=NetConfig(kind="mlp", channels=1, size=4, num_classes=0, width=8, depth=1))
    e = Expert(cfg).eval()
    for p in e.net.parameters():
        nn.init.normal_(p, std=0.3)
    x, t, y = torch.randn(3, 1, 4, 4), torch.tensor([0.2, 0.5, 0.9]), torch.full((3,), -1)
    right = e.velocity(x, t, y)
    answers = {err: NoTranslator(e, err).velocity(x, t, y) for err in ("scale", "time", "output")}
    for err, v in answers.items():
        assert not torch.allclose(v, right), err  # each error alone changes the answer
    inp, tau = e.network_input(x, t)
    assert torch.allclose(answers["output"], e.network_output(inp, tau, y))  # eps taken for v, input right
    with pytest.raises(ValueError, match="errors"):
        NoTranslator(e, "two")
    # DPM-Solver++ lands on a point mass too, with one evaluation per step
    from diffswarm.eval.ablations import sample_native_dpm

    c = torch.linspace(-0.8, 0.8, 16).reshape(1, 1, 4, 4)
    ens = RoutedEnsemble([point_mass_expert(c)], None, RoutingConfig("full"))
    out = sample_native_dpm(ens, torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0)),
                            torch.full((4,), -1), steps=7)
    assert torch.allclose(out, c.expand_as(out), atol=1e-3) and ens.calls.tolist() == [4 * 7]


def test_no_translator_queries_the_raw_network_at_fm_time():
    torch.manual_seed(0)
    cfg = ExpertConfig(objective="ddpm", net=NetConfig(kind="mlp", channels=1, size=4, num_classes=3, width=8, depth=1))
    e = Expert(cfg).eval()
    for p in e.net.parameters():  # zero-init output layers would make every answer 0
        nn.init.normal_(p, std=0.3)
    x, t, y = torch.randn(3, 1, 4, 4), torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0, 1, -1])
    raw = NoTranslator(e).velocity(x, t, y, guidance=2.0)
    assert torch.allclose(raw, e.network_output(x, t * FM_TIME_SCALE, y, 2.0))
    assert not torch.allclose(raw, e.velocity(x, t, y, 2.0))  # the translated answer differs
    fm = Expert(replace(cfg, objective="fm")).eval()
    fm.net.load_state_dict(e.net.state_dict())
    assert torch.allclose(NoTranslator(fm).velocity(x, t, y, 2.0), fm.velocity(x, t, y, 2.0))  # FM: unchanged


def test_flop_counter_counts_matmuls():
    lin = nn.Linear(10, 20)
    assert forward_flops(lambda: lin(torch.zeros(3, 10))) == 2 * 3 * 10 * 20


def test_settings_helpers():
    assert ddpm_clusters(8, 2) == [0, 4] and ddpm_clusters(8, 4) == [0, 2, 4, 6] and ddpm_clusters(4, 1) == [0]
    assert ensemble_objectives("mix-2", 8) == ["ddpm", "fm", "fm", "fm", "ddpm", "fm", "fm", "fm"]
    assert set(mixes(8).values()) == {"8 FM", "8 DDPM", "2 DDPM + 6 FM", "4 DDPM + 4 FM"}
    st = strategies(0.1, 0.5)
    assert st["full>0.5/top-1"].full_above == 0.5 and st["sample-1"].strategy == "sample-k"


def test_paired_differences_replicate_over_training_seeds():
    """Sampling seeds of one training seed are one unit: 3 sampling seeds of 1 training seed test nothing."""
    a = {"per_run": {f"s{t}/r{i}": {"fd": 10.0 + 0.1 * i + 0.2 * t} for t in range(3) for i in range(2)}}
    b = {"per_run": {f"s{t}/r{i}": {"fd": 12.0 + 0.1 * i + 0.2 * t + 0.01 * (t % 2)} for t in range(3)
                     for i in range(2)}}
    d = paired(a, b)
    assert d["n"] == 3 and d["runs"] == 6 and d["mean"] < -1.9 and d["clear"]
    one_seed = {"per_run": {k: v for k, v in a["per_run"].items() if k.startswith("s0/")}}
    assert paired(one_seed, b)["n"] == 1 and not paired(one_seed, b)["clear"]  # no test with 1 training seed
    noisy = {"per_run": {f"s{t}/r0": {"fd": 12.0 + (3 if t % 2 else -3)} for t in range(3)}}
    assert not paired(noisy, b)["clear"]


def test_pool_cache_keys_retrain_only_what_a_setting_changes(tmp_path):
    from diffswarm.data import DatasetSpec
    from diffswarm.eval.pool import ExpertPool, PoolConfig

    base = PoolConfig(data=DatasetSpec("digits"), k=3, net="mlp", width=16, depth=1, batch=8, expert_steps=5,
                      router_steps=5)
    p1, p2 = ExpertPool(base, tmp_path), ExpertPool(replace(base, expert_steps=7), tmp_path)
    assert p1.root == p2.root  # same partition
    j1, j2 = {j.name: j.dir for j in p1.jobs([0])}, {j.name: j.dir for j in p2.jobs([0])}
    assert j1["s0-router-cond"] == j2["s0-router-cond"]  # routers do not depend on the expert steps
    assert j1["s0-c0-fm"] != j2["s0-c0-fm"] and j1["s0-monolith-fm"] != j2["s0-monolith-fm"]
    assert {j.name: j.dir for j in p1.jobs([1])}["s1-c0-fm"] != j1["s0-c0-fm"]  # another training seed
    assert ExpertPool(replace(base, k=4), tmp_path).root != p1.root
    # the monolith trains K x one expert's steps on all data
    mono = next(j for j in p1.jobs([0]) if j.name == "s0-monolith-fm")
    assert mono.steps == 3 * 5 and mono.settings["expert"]["cluster"] is None
    # longest first, seed by seed: parallel workers never leave the monolith to run alone at the end
    order = [j.name for j in p1.jobs([0, 1])]
    assert order[0] == "s0-monolith-fm" and order.index("s0-router-cond") > order.index("s0-c2-fm")
    assert max(i for i, n in enumerate(order) if n.startswith("s0-")) < order.index("s1-monolith-fm")


def test_a_lone_remaining_model_trains_on_every_workers_threads(tmp_path, monkeypatch):
    from diffswarm.data import DatasetSpec
    from diffswarm.eval import pool as pool_mod

    cfg = pool_mod.PoolConfig(data=DatasetSpec("digits"), k=2, net="mlp", width=8, depth=1, batch=4, expert_steps=2,
                              router_steps=2, threads=1)
    p = pool_mod.ExpertPool(cfg, tmp_path)
    seen = []

    def fake_train(arg):
        seen.append((arg[1].name, arg[0].threads))
        return {"steps": 0, "seconds": 0.0}

    monkeypatch.setattr(pool_mod, "_train_job", fake_train)
    monkeypatch.setattr(pool_mod, "read_meta", lambda path: {"summary": {}})
    lone = [j for j in p.jobs([0]) if j.name == "s0-router-uncond"]
    monkeypatch.setattr(p, "jobs", lambda *a, **k: lone)
    p.ensure([0], jobs=2)
    assert seen == [("s0-router-uncond", 2)]  # not 1 thread with the other core idle
    p.ensure([0], jobs=1)
    assert seen[-1] == ("s0-router-uncond", 1)


def test_the_plan_takes_the_network_from_the_demo_preset(monkeypatch):
    from diffswarm.cli import dispatch
    from diffswarm.cli.parser import build_parser, given_options
    from diffswarm.training import presets

    def plan(argv):
        parser = build_parser()
        return dispatch.plan(parser.parse_args(["eval", *argv]), given_options(parser, "eval", ["eval", *argv]))

    p = plan(["--quick"])
    tiny = presets.PRESETS["tiny"]
    assert (p.config.pool.net, p.config.pool.width, p.config.pool.batch) == (tiny.net, tiny.width, tiny.batch)
    assert p.config.sampling == tiny.sampling and p.config.pool.k == 4
    monkeypatch.setitem(presets.PRESETS, "tiny", replace(tiny, width=tiny.width * 2))
    assert plan(["--quick"]).config.pool.width == tiny.width * 2
    full = plan([]).config
    assert full.pool.k == 8 and full.pool.net == presets.PRESETS["cpu"].net
    # the training seed is the unit of replication: at least 3 of them (sampling seeds are averaged within one);
    # the Gaussian-mixture study replicates over seeds of its own
    assert len(full.train_seeds) >= 3 and len(full.seeds) >= 1 and len(full.gmm.seeds) == len(full.train_seeds) == 5
    assert full.pool.monolith_steps == 8 * full.pool.expert_steps
    # the machine's cores by default: one training process each, and all of them for sampling
    cores = os.cpu_count() or 1
    assert (full.jobs, full.threads) == (None, None)
    assert (full.training_jobs, full.training_threads, full.sampling_threads) == (cores, 1, cores)
    two = plan(["--jobs", "2", "--threads", "3"]).config
    assert (two.training_jobs, two.training_threads, two.sampling_threads) == (2, 3, 3)
    assert plan(["--jobs", "1"]).config.training_threads == cores  # one process gets every core
    with pytest.raises(ValueError, match="--budget"):
        plan(["--studies", "gmm", "--budget", "5"])
    with pytest.raises(ValueError, match="--samples"):
        plan(["--samples", "5"])
    with pytest.raises(ValueError, match="--seeds repeats"):
        plan(["--seeds", "1", "1"])


# ---------------------------------------------------------------------------------------------- end to end


def _numbers(o):
    if isinstance(o, dict):
        for v in o.values():
            yield from _numbers(v)
    elif isinstance(o, list):
        for v in o:
            yield from _numbers(v)
    elif isinstance(o, float):
        yield o


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_quick_eval_end_to_end(tmp_path, monkeypatch):
    """`diffswarm eval --quick --save-samples` writes a sane report; a second look at the pool trains nothing."""
    from diffswarm.cli import main
    from diffswarm.cli.eval_plans import eval_config
    from diffswarm.eval.pool import ExpertPool

    monkeypatch.setenv("DIFFSWARM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ev"
    assert main(["eval", "--quick", "--save-samples", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    res = json.loads((out / "results.json").read_text())

    # 1. structure: every section, every referenced plot exists
    for head in ("## 1. Routing strategies", "## 2. Objectives and the translator", "## 3. Stability vs quality",
                 "## 4. Expert-data alignment", "## 5. A router without central data",
                 "## 6. Exact checks on a 2-D Gaussian mixture", "## 7. Against the papers"):
        assert head in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) >= 8 and all((out / p).is_file() for p in images)
    assert "run time:" in report and "machine:" in report and res["command"].startswith("diffswarm eval --quick")
    cost = re.search(r"training (\d+) s summed over (\d+) pool models.*scoring (\d+) s over (\d+) cells", report)
    assert cost and int(cost[2]) == len(res["pool"]["models"]) and int(cost[4]) == res["cells"]["distinct"] > 0

    # one training seed: the claims are listed, none is tested (the sampling seeds are not the unit)
    claims_table = report.split("## 7. Against the papers")[1].split("\n## ")[0]
    verdict_rows = [ln for ln in claims_table.splitlines() if ln.startswith("| ") and not ln.startswith("| claim")]
    image_rows = [ln for ln in verdict_rows if "DDM theorem" not in ln]  # the 2-D mixture's unit: sampling seeds
    assert len(image_rows) >= 10 and all(ln.rstrip().endswith("| not tested |") for ln in image_rows)
    assert "KID" in claims_table and "Holm" in claims_table

    # 2. numbers: all finite; shares sum to 1; floors where they must be
    assert all(math.isfinite(v) for v in _numbers(res))
    rows = res["studies"]["routing"]["rows"]
    ug = res["studies"]["routing"]["rows_uncond_gen"]
    # 8 strategies (sample-1 drawn once and per step) x 2 routers, 2 stats routers, the monolith at 1x and 2x steps
    assert len(rows) == 2 * 8 + 4 and len(ug) == 8 + 3
    assert all(r["summary"]["class_accuracy"]["n"] == 0 for r in ug)  # no class was asked for
    for r in rows + ug:
        s = r["summary"]
        assert abs(sum(s["cluster_share"]) - 1) < 1e-6 and abs(sum(s["target_share"]) - 1) < 1e-6
        assert 0 <= s["share_tv"]["mean"] <= 1
        assert s["recall"]["mean"] <= s["recall_floor"]["mean"] + 0.05  # nothing covers real data better than real data
        assert s["fd"]["mean"] > 0 and s["fd_floor"]["mean"] > 0 and s["gflops_per_image"]["mean"] > 0
    by = {(r["router"], r["strategy"]): r["summary"] for r in rows}
    k = res["data"]["k"]
    assert by[("cond", "full")]["calls_per_image"]["mean"] == pytest.approx(k * 10)  # 10 Euler steps x K experts
    assert by[("cond", "top-1")]["calls_per_image"]["mean"] == pytest.approx(10)
    assert by[("cond", "top-1")]["gflops_per_image"]["mean"] < by[("cond", "full")]["gflops_per_image"]["mean"]
    # the unconditional router sends class requests to experts that never saw the class: worse than the floor
    assert by[("uncond", "top-2")]["fd"]["mean"] > by[("uncond", "top-2")]["fd_floor"]["mean"]
    assert by[("cond", "top-2")]["fd"]["mean"] < by[("uncond", "top-2")]["fd"]["mean"]
    gmm = res["studies"]["gmm"]
    true_full = next(r for r in gmm["sampling"] if r["router"] == "true" and r["strategy"] == "full")
    true_top1 = next(r for r in gmm["sampling"] if r["router"] == "true" and r["strategy"] == "top-1")
    assert true_full["parzen_nll"]["mean"] < true_top1["parzen_nll"]["mean"]
    assert gmm["router_kl"][0]["true"]["mean"] == pytest.approx(0, abs=1e-6)  # exact posterior: KL 0 up to rounding
    acc = res["studies"]["routers"]["accuracy"]
    assert acc["stats"][0]["top1"]["mean"] > 0.8 and acc["uncond"][-1]["top1"]["mean"] < 0.5  # t=0 vs t=1

    # 3. the samples each metric was computed on
    index = json.loads((out / "samples" / "index.json").read_text())
    st = res["studies"]
    scored = {c for r in st["routing"]["rows"] + ug + st["objectives"]["mixes"] + st["objectives"]["translator"]
              + st["routers"]["quality"] for c in r["cells"]}
    assert set(index) == scored
    key, entry = next(iter(index.items()))
    npz = np.load(out / "samples" / entry["file"])
    assert npz["samples"].shape[0] == res["config"]["n"] and npz["labels"].shape == (res["config"]["n"],)
    assert str(npz["setting"]) == entry["setting"] and entry["studies"]

    # 4. a person's reading is appended on re-rendering, from results.json alone
    (out / "reading.md").write_text("Toy sizes: nothing to read here.")
    assert main(["eval", "--out", str(out), "--report-only"]) == 0
    assert "## 8. Reading\n\nToy sizes: nothing to read here." in (out / "report.md").read_text()
    assert main(["eval", "--out", str(out), "--report-only", "--budget", "3"]) == 2  # refused: no effect
    # a stopped run's report says how far it got, and that its verdicts are provisional
    part = tmp_path / "part"
    part.mkdir()
    stopped = {**res, "config": {**res["config"], "train_seeds": [0, 1], "quick": False},
               "progress": {"train_seeds_done": [0], "complete": False}}
    (part / "results.json").write_text(json.dumps(stopped))
    assert main(["eval", "--out", str(part), "--report-only"]) == 0
    text = (part / "report.md").read_text()
    assert "Partial report: training seeds [0] of [0, 1] done" in text
    assert "1 training seed(s) x 2 sampling seeds (partial: 1 of 2 training seeds done" in text

    # 5. the pool is cached: asking again trains nothing and leaves the weights untouched
    cfg = eval_config(True, str(out))
    pool = ExpertPool(cfg.pool)
    weights = sorted(Path(pool.root).glob("models/*/*.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in weights]
    again = pool.ensure(cfg.train_seeds)
    assert again["trained"] == [] and len(again["reused"]) == len(res["pool"]["trained"]) == 2 + 2 * k + 1
    assert [p.stat().st_mtime_ns for p in weights] == mtimes


@pytest.mark.parametrize("sampler, steps, ddim_rows",
                         [("heun", 6, {"ddim": 6, "ddim-nfe": 11}), ("euler", 10, {"ddim": 10})])
def test_native_ddim_is_also_compared_at_the_flow_samplers_cost(monkeypatch, sampler, steps, ddim_rows):
    """With a 2nd-order sampler the translator meets DDIM at equal steps and at equal network evaluations."""
    from types import SimpleNamespace

    from diffswarm.eval.studies import objectives as study
    from diffswarm.sampling.config import SamplingConfig

    cfg = SimpleNamespace(sampling=SamplingConfig(steps=steps, sampler=sampler), train_seeds=(0,), seeds=(0, 1))
    asked = []
    ctx = SimpleNamespace(cfg=cfg, k=4, cell=lambda c, studies=(): asked.append(c) or {"key": str(len(asked))})
    monkeypatch.setattr(study, "summarize_cells", lambda cells: {})
    out = study.study_objectives(ctx)
    methods = [r["method"] for r in out["translator"] if r["ensemble"] == "ddpm"]
    assert [m for m in methods if m.startswith("ddim")] == list(ddim_rows)
    for m, n in ddim_rows.items():
        row = next(r for r in out["translator"] if r["method"] == m)
        assert f"{n} steps" in row["setting"] and len(row["cells"]) == 2  # one cell per run


def test_the_full_runs_hddm_and_scaling_studies_are_defined(tmp_path, monkeypatch):
    """HDDM as published (eps-loss DDPM experts at two placements) and scaling K at equal total training compute:
    what they would train and sample, checked without training."""
    from types import SimpleNamespace

    from diffswarm.cli.eval_plans import eval_config
    from diffswarm.eval.pool import ExpertPool
    from diffswarm.eval.studies import QUICK_STUDIES, STUDIES
    from diffswarm.eval.studies import hddm as hstudy
    from diffswarm.eval.studies.scaling import SCALING_K, scaled_config

    assert ensemble_objectives("hmix-2", 8) == ["ddpm-eps", "fm", "fm", "fm", "ddpm-eps", "fm", "fm", "fm"]
    assert ensemble_objectives("hmix-2@1", 8) == ["fm", "ddpm-eps", "fm", "fm", "fm", "ddpm-eps", "fm", "fm"]
    cfg = SimpleNamespace(train_seeds=(0, 1, 2), seeds=(0, 1))
    asked = []
    ctx = SimpleNamespace(cfg=cfg, k=8, cell=lambda c, studies=(): asked.append(c) or {"key": str(len(asked))})
    monkeypatch.setattr(hstudy, "summarize_cells", lambda cells: {})  # no real cells: check which ones are asked
    out = hstudy.study_hddm(ctx)
    assert [r["ensemble"] for r in out["rows"]] == ["fm", "ddpm-eps", "hmix-2", "hmix-2@1"]
    assert len(asked) == 4 * 6 and {c.strategy for c in asked} == {"top-2"}
    full = eval_config(False, str(tmp_path))
    assert full.train_seeds == (0, 1, 2, 3, 4) and full.n == 300 and full.pool.expert_steps == 100
    assert set(full.studies) == set(STUDIES) and "hddm" not in QUICK_STUDIES
    pool = ExpertPool(eval_config(True, str(tmp_path), cache_dir=None).pool, str(tmp_path / "cache"))
    eps = pool.expert_config("ddpm-eps", 0)
    assert (eps.objective, eps.ddpm_time, eps.loss_weighting) == ("ddpm", "uniform", "none")
    assert pool.expert_job(0, "ddpm-eps", 0).name == "s0-c0-ddpm-eps"
    assert pool.expert_job(0, "ddpm-eps", 0).dir != pool.expert_job(0, "ddpm", 0).dir
    for k in SCALING_K:
        sc = scaled_config(full, k).pool
        assert sc.k == k and sc.expert_steps * k == full.pool.expert_steps * full.pool.k  # equal total compute
