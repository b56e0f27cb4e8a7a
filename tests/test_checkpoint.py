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

    def kill_at_9(step, loss):
        if step == 9:
            raise KeyboardInterrupt

    # the 'killed' run: dies at step 9, three steps after its step-6 checkpoint
    with pytest.raises(KeyboardInterrupt):
        train_expert(_cfg(), TrainConfig(steps=12, batch=16, ckpt_every=6, warmup=2), x, y, part, progress=False,
                     on_step=kill_at_9)
    assert read_meta(part / "state.safetensors")["step"] == 6
    train_expert(_cfg(), TrainConfig(steps=12, batch=16, ckpt_every=6, warmup=2), x, y, part, resume=True, progress=False)
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
        train_expert(_cfg("ddpm"), TrainConfig(steps=4, batch=8), x, y, tmp_path, resume=True, progress=False)
