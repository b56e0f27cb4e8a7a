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
    """A run stopped at step 6 and resumed to 12 ends with the same weights as one run of 12 steps, bit for bit,
    and logs each step once (the killed run's line for step 8 is cut from the log on resume)."""
    x, y = _data()
    full = tmp_path / "full"
    train_expert(_cfg(), TrainConfig(steps=12, batch=16, ckpt_every=6, warmup=2, log_every=4), x, y, full,
                 progress=False)
    part = tmp_path / "part"

    def kill_at_9(step, loss, progress):
        if step == 9:
            raise KeyboardInterrupt

    # the 'killed' run: dies at step 9, three steps after its step-6 checkpoint
    with pytest.raises(KeyboardInterrupt):
        train_expert(_cfg(), TrainConfig(steps=12, batch=16, ckpt_every=6, warmup=2, log_every=4), x, y, part,
                     progress=False, on_step=kill_at_9)
    assert read_meta(part / "state.safetensors")["step"] == 6
    resumed = TrainConfig(steps=12, batch=16, ckpt_every=6, warmup=2, log_every=4, resume=True)
    train_expert(_cfg(), resumed, x, y, part, progress=False)
    a = load_expert_file(full / "expert.safetensors")[1]
    b = load_expert_file(part / "expert.safetensors")[1]
    for k in a:
        assert torch.equal(a[k], b[k]), k  # same RNG state, same ops in the same order: exact
    log = [json.loads(line) for line in (part / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 8, 12] and len(log[-1]["loss_by_t"]) == 10


def test_a_state_saved_on_another_kind_of_device_resumes(tmp_path, capsys):
    """A CUDA generator's state (16 bytes: seed and offset) does not fit a CPU generator: a run started on a GPU
    and resumed on a CPU (or the reverse) re-seeds its generator from the seed and step, says so, and finishes."""
    from diffswarm.experts.checkpoint import load_state, save_state
    from diffswarm.experts.train import STATE_FILE, STATE_FORMAT

    x, y = _data()
    train_expert(_cfg(), TrainConfig(steps=4, batch=8, ckpt_every=4), x, y, tmp_path, progress=False)
    meta, tensors = load_state(tmp_path / STATE_FILE, STATE_FORMAT)
    tensors["rng.gen"] = torch.zeros(16, dtype=torch.uint8)  # what torch.cuda's generator.get_state() returns
    save_state(tmp_path / STATE_FILE, tensors, {k: v for k, v in meta.items() if k != "state_sha256"})
    summary = train_expert(_cfg(), TrainConfig(steps=8, batch=8, ckpt_every=4, resume=True), x, y, tmp_path,
                           progress=False)
    assert summary["steps"] == 8 and read_meta(tmp_path / "expert.safetensors")["summary"]["steps"] == 8
    assert "saved on another kind of device" in capsys.readouterr().err


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


# -- integrity: every file that fails its hash is refused, naming the file and what to do ----------------

def _corrupt(path, at=-3):
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01  # one bit (negative offsets: inside the last tensor)
    path.write_bytes(bytes(raw))


def test_corrupt_or_truncated_state_is_never_trained_on(tmp_path):
    x, y = _data()
    train_expert(_cfg(), TrainConfig(steps=4, batch=8, ckpt_every=2), x, y, tmp_path, progress=False)
    path = tmp_path / "state.safetensors"
    good = path.read_bytes()
    again = TrainConfig(steps=8, batch=8, ckpt_every=2, resume=True)
    for name, damage in [("a flipped bit", lambda: _corrupt(path)),
                         ("another step in its metadata", lambda: path.write_bytes(  # JSON inside JSON: \\"
                             good.replace(b'\\"step\\": 4,', b'\\"step\\": 6,'))),
                         ("truncated", lambda: path.write_bytes(good[: len(good) // 2]))]:
        path.write_bytes(good)
        damage()
        assert path.read_bytes() != good, name
        with pytest.raises(CheckpointError) as e:
            train_expert(_cfg(), again, x, y, tmp_path, progress=False)
        msg = str(e.value)
        assert "cannot resume training: " in msg and str(path) in msg, (name, msg)
        assert f"Delete {path} to restart" in msg and "expert.safetensors (step 4) passes its sha256 check" in msg
        assert read_meta(tmp_path / "expert.safetensors")["summary"]["steps"] == 4, "the expert file was touched"
    path.write_bytes(good)
    assert train_expert(_cfg(), again, x, y, tmp_path, progress=False)["steps"] == 8  # the intact state resumes


def test_a_state_without_its_hash_is_refused(tmp_path):
    from diffswarm.experts.checkpoint import atomic_save, load_state, save_state

    t = {"w": torch.ones(3), "opt.0.step": torch.tensor(5.0)}  # 0-dim tensors hash too
    save_state(tmp_path / "s.safetensors", t, {"format": "f/1", "step": 5})
    meta, back = load_state(tmp_path / "s.safetensors", "f/1")
    assert meta["step"] == 5 and torch.equal(back["opt.0.step"], t["opt.0.step"])
    with pytest.raises(CheckpointError, match="format"):
        load_state(tmp_path / "s.safetensors", "f/2")
    atomic_save(t, tmp_path / "old.safetensors", {"format": "f/1", "step": 5})  # an older diffswarm's state
    with pytest.raises(CheckpointError, match="no state_sha256"):
        load_state(tmp_path / "old.safetensors", "f/1")


def test_a_second_run_in_the_same_folder_is_refused(tmp_path):
    x, y = _data()

    def second_run(step, loss, progress):
        if step == 1:
            with pytest.raises(CheckpointError, match="in use by another process"):
                train_expert(_cfg(), TrainConfig(steps=2, batch=8), x, y, tmp_path, progress=False)

    train_expert(_cfg(), TrainConfig(steps=2, batch=8), x, y, tmp_path, progress=False, on_step=second_run)
    train_expert(_cfg(), TrainConfig(steps=3, batch=8, resume=True), x, y, tmp_path, progress=False)  # lock released


def test_a_killed_writer_leaves_a_temporary_file_that_the_next_run_removes(tmp_path):
    from diffswarm.utils.fileio import atomic_write, stale_temps

    x, y = _data()
    train_expert(_cfg(), TrainConfig(steps=2, batch=8), x, y, tmp_path, progress=False)

    def die(tmp):
        open(tmp, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt  # like a kill, except that atomic_write can still clean up; fake what it cannot:

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "state.safetensors", die)
    assert stale_temps(tmp_path) == []  # an exception cleans up after itself
    left = tmp_path / ".state.safetensors.abcd_123.tmp.safetensors"  # what a SIGKILL leaves (tests/test_kill_resume.py)
    left.write_bytes(b"half a checkpoint")
    other = tmp_path / ".notes.txt"
    other.write_text("not ours")
    assert stale_temps(tmp_path) == [left]
    train_expert(_cfg(), TrainConfig(steps=3, batch=8, resume=True), x, y, tmp_path, progress=False)
    assert not left.exists() and other.exists()


@pytest.fixture
def swarm_files(tmp_path):
    """Two tiny experts of one partition and their router: what `generate --local` needs."""
    from diffswarm.router.model import Router, RouterConfig

    x, y = _data()
    for c in (0, 1):
        cfg = ExpertConfig(objective="fm", net=NetConfig(kind="mlp", size=8, width=16, depth=1, num_classes=3),
                           cluster=c, num_clusters=2, partition_hash="ab" * 32, dataset_id="test:8")
        train_expert(cfg, TrainConfig(steps=2, batch=8), x, y, tmp_path / f"c{c}", progress=False)
    Router(RouterConfig(num_clusters=2, num_classes=3, size=8, width=16, partition_hash="ab" * 32)).save(
        tmp_path / "router.safetensors")
    return tmp_path


def _generate(d, capsys):
    from diffswarm.cli import main

    capsys.readouterr()
    rc = main(["generate", "--local", str(d / "c0" / "expert.safetensors"), str(d / "c1" / "expert.safetensors"),
               "--router", str(d / "router.safetensors"), "--n", "2", "--steps", "2", "--output", str(d / "g.png")])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("damaged", ["c1/expert.safetensors", "router.safetensors"])
def test_generate_refuses_a_corrupt_expert_or_router(swarm_files, capsys, damaged):
    assert _generate(swarm_files, capsys)[0] == 0
    _corrupt(swarm_files / damaged)
    rc, err = _generate(swarm_files, capsys)
    assert rc == 2, err
    assert err.startswith("diffswarm generate: error: ") and str(swarm_files / damaged) in err
    assert "sha256" in err and "corrupt" in err and "Traceback" not in err


def test_a_peer_refuses_to_serve_a_corrupt_router_or_expert(swarm_files):
    from diffswarm.peer.config import PeerConfig
    from diffswarm.peer.hosted import RouterBlob
    from diffswarm.peer.server import Peer

    path = swarm_files / "router.safetensors"
    assert RouterBlob(path).weights_sha256 == read_meta(path)["weights_sha256"]
    _corrupt(path)
    with pytest.raises(CheckpointError, match="sha256.*corrupt") as e:
        RouterBlob(path)
    assert str(path) in str(e.value)
    peer = Peer(PeerConfig())
    expert = swarm_files / "c0" / "expert.safetensors"
    _corrupt(expert)
    with pytest.raises(CheckpointError, match="sha256.*corrupt") as e:
        peer.load_expert(str(expert))
    assert str(expert) in str(e.value) and not peer.served


def test_train_resume_on_a_corrupt_state_exits_2_with_the_message(tmp_path, capsys):
    from diffswarm.cli import main

    assert main(["partition", "--dataset", "digits", "--k", "2", "--out", str(tmp_path / "p.json")]) == 0
    argv = ["train", "--partition", str(tmp_path / "p.json"), "--cluster", "0", "--net", "mlp", "--width", "16",
            "--depth", "1", "--batch", "8", "--ckpt-every", "2", "--steps", "4", "--out", str(tmp_path / "c0")]
    assert main(argv) == 0
    state = tmp_path / "c0" / "state.safetensors"
    _corrupt(state)
    capsys.readouterr()
    assert main([*argv, "--steps", "6", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"diffswarm train: error: cannot resume training: {state}: state sha256 ")
    assert "state sha256" in err and "corrupt" in err and f"Delete {state} to restart" in err


def test_an_expert_answers_classes_absent_from_its_data_unconditionally(tmp_path):
    """The checkpoint records the class histogram; a class with no training image gets the null label (no
    guidance), a class it saw does not; a checkpoint without the histogram keeps every label as given."""
    x, y = _data()
    y = y % 2  # the cluster holds classes 0 and 1 of 3
    train_expert(_cfg("fm"), TrainConfig(steps=3, batch=16, ckpt_every=100), x, y, tmp_path, progress=False)
    meta = read_meta(tmp_path / "expert.safetensors")
    assert meta["summary"]["class_hist"] == [int((y == 0).sum()), int((y == 1).sum()), 0]
    e = Expert.from_checkpoint(tmp_path / "expert.safetensors")
    torch.manual_seed(0)
    for p in e.net.parameters():  # trained 3 steps from zero-init output layers: make every label matter
        torch.nn.init.normal_(p, std=0.3)
    xt, t = torch.randn(3, 1, 8, 8), torch.full((3,), 0.6)

    def v(label, model=e):
        return model.velocity(xt, t, torch.full((3,), label), guidance=3.0)

    assert torch.equal(v(2), v(-1))  # never seen: unconditional
    assert not torch.allclose(v(0), v(-1)) and not torch.allclose(v(1), v(-1))
    old = Expert(e.config, e.net)  # no summary: a checkpoint from before the histogram was recorded
    assert old.seen_classes is None and not torch.allclose(v(2, old), v(-1, old))
    for bad in ([1, 2], [1, -1, 0], "x", [0, 0, 0], [1.5, 1, 0]):  # malformed: ignored, not trusted
        assert Expert(e.config, e.net, summary={"class_hist": bad}).seen_classes is None
