import json

import pytest
import torch

from diffswarm.experts.checkpoint import CheckpointError, load_expert_file, read_meta
from diffswarm.experts.config import ExpertConfig
from diffswarm.experts.expert import Expert
from diffswarm.experts.networks import NetConfig
from diffswarm.experts.train import TrainConfig, train_expert


def _data(n=96):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 3, (n,), generator=g)


def _cfg(obj="fm"):
    return ExpertConfig(objective=obj, net=NetConfig(kind="mlp", size=8, width=32, depth=1, num_classes=3),
                        cluster=1, num_clusters=2, partition_hash="ab" * 32, dataset_id="test:8")


def test_checkpoint_round_trip_is_self_describing(tmp_path):
    x, y = _data()
    train_expert(_cfg("ddpm"), TrainConfig(steps=5, batch=16, ckpt_every=100), x, y, tmp_path, progress=False)
    meta = read_meta(tmp_path / "expert.safetensors")
    assert meta["config"]["objective"] == "ddpm"
    assert meta["config"]["schedule"]["kind"] == "cosine"
    assert meta["config"]["cluster"] == 1 and meta["config"]["partition_hash"] == "ab" * 32
    assert meta["summary"]["steps"] == 5 and len(meta["weights_sha256"]) == 64
    e = Expert.from_checkpoint(tmp_path / "expert.safetensors")
    assert e.config == _cfg("ddpm") and e.expert_id == "c1-ddpm"
    v = e.velocity(torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, -1]), guidance=3.0)
    assert v.shape == (4, 1, 8, 8) and torch.isfinite(v).all()


def test_corrupt_checkpoint_is_refused(tmp_path):
    x, y = _data()
    train_expert(_cfg(), TrainConfig(steps=2, batch=8), x, y, tmp_path, progress=False)
    path = tmp_path / "expert.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # flip bits inside the last tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        load_expert_file(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        Expert.from_checkpoint(tmp_path / "junk.safetensors")


def test_resume_continues_exactly_where_a_killed_run_stopped(tmp_path):
    """A run stopped at step 6 and resumed to 12 ends with the same weights as one run of 12 steps."""
    x, y = _data()
    full = tmp_path / "full"
    train_expert(_cfg(), TrainConfig(steps=12, batch=16, ckpt_every=6, warmup=2), x, y, full, progress=False)
    part = tmp_path / "part"

    def kill_at_9(step, loss, progress):
        if step == 9:
            raise KeyboardInterrupt

    # the 'killed' run: dies at step 9, three steps after its step-6 checkpoint
    with pytest.raises(KeyboardInterrupt):
        train_expert(_cfg(), TrainConfig(steps=12, batch=16, ckpt_every=6, warmup=2), x, y, part, progress=False,
                     on_step=kill_at_9)
    assert read_meta(part / "state.safetensors")["step"] == 6
    resumed = TrainConfig(steps=12, batch=16, ckpt_every=6, warmup=2, resume=True)
    train_expert(_cfg(), resumed, x, y, part, progress=False)
    a = load_expert_file(full / "expert.safetensors")[1]
    b = load_expert_file(part / "expert.safetensors")[1]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    log = [json.loads(line) for line in (part / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 12 and len(log[-1]["loss_by_t"]) == 10


def test_resume_refuses_another_configuration(tmp_path):
    x, y = _data()
    train_expert(_cfg("fm"), TrainConfig(steps=2, batch=8), x, y, tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="different expert"):
        train_expert(_cfg("ddpm"), TrainConfig(steps=4, batch=8, resume=True), x, y, tmp_path, progress=False)


def test_step_budget_plans_the_steps_that_fit():
    from diffswarm.experts.train import StepBudget

    b = StepBudget(seconds=100.0, probe_s=3.0, probe_steps=5)
    assert b.plan(1, 0.5) is None  # the first (allocating) step is not timed
    assert b.plan(3, 1.5) is None  # still measuring
    assert b.plan(11, 5.5) == 11 + int((100 - 5.5) / 0.5)  # 0.5 s per step over steps 1..11
    # the machine slows down to 1 s per step: the plan shrinks (smoothed: 0.75 s per step)
    assert b.plan(21, 15.5) == 21 + int((100 - 15.5) / 0.75)
    assert b.plan(200, 101.0) == 200  # out of time: no more steps


def test_lr_schedule_is_laid_over_the_planned_steps():
    from diffswarm.experts.train import lr_at

    cfg = TrainConfig(steps=None, minutes=1.0, lr=1.0, warmup=100)
    assert lr_at(0, cfg, None) == pytest.approx(0.01) and lr_at(500, cfg, None) == 1.0  # measuring: warm-up only
    assert lr_at(0, cfg, 300) == pytest.approx(1 / 30)  # warm-up at most a tenth of the run
    assert lr_at(299, cfg, 300) == pytest.approx(0.1, abs=0.01)  # decayed to lr/10 at the end of the plan
    with pytest.raises(ValueError, match="steps or as minutes"):
        TrainConfig(steps=10, minutes=1.0)


def test_a_time_budget_run_records_its_steps_and_resumes_within_the_budget(tmp_path):
    x, y = _data()
    summary = train_expert(_cfg(), TrainConfig(steps=None, minutes=0.05, batch=8, log_every=5, ckpt_every=5), x, y,
                           tmp_path, progress=False)
    assert summary["steps"] > 5 and summary["planned_steps"] >= summary["steps"] - 5
    assert 2.0 <= summary["seconds"] < 30  # 3 s budget (generous upper bound: shared machines)
    state = read_meta(tmp_path / "state.safetensors")
    assert state["elapsed_s"] >= 2.0 and state["step"] == summary["steps"]
    # resuming a spent budget trains no further
    again = train_expert(_cfg(), TrainConfig(steps=None, minutes=0.05, batch=8, resume=True), x, y, tmp_path,
                         progress=False)
    assert again["steps"] == summary["steps"]
