"""No lost work: `diffswarm train --resume` SIGKILLed at 10 random moments loses no checkpoint.

Each run is the real CLI (``diffswarm.cli.main(["train", ..., "--resume"])``) in its own process, forked
from a forkserver that has imported torch and diffswarm once (a fresh interpreter costs ~4 s of imports
per run on two cores; a fork costs milliseconds). The only thing added to the run is a step counter:
``run_train_job`` gets an ``on_step`` that writes (first step, latest step) of the process into a file,
so the test knows how far a run got when it was killed and where the next one started.

Kills land at random moments (seeded) spread over the run: a random target step, then a random delay
of up to one checkpoint interval; half of the kills first wait for the run's next checkpoint write to
begin (its temporary file appears) and then for a random delay of up to half an interval, so that
kills land inside the state write, between the two writes and inside the expert write (the printed
line counts where each landed). After every kill the test checks that the files present
pass their hashes, that the state never went back nor ahead of what the run reached, that the expert
file is never ahead of the state, and that the next run starts at the state's step and deletes the
temporary file the kill left; at the end, that the weights equal those of an uninterrupted run bit for
bit (the state holds the RNG, optimizer moments and raw weights, and every run uses one thread on the CPU).
"""

import json
import multiprocessing as mp
import os
import random
import signal
import struct
import sys
import time
from collections import Counter
from multiprocessing import forkserver

import pytest
import torch

from diffswarm.cli import main
from diffswarm.experts.checkpoint import load_expert_file
from diffswarm.experts.train import STATE_FILE, load_resume_state
from diffswarm.utils.fileio import is_temp_file, stale_temps

STEPS, EVERY, KILLS = 200, 5, 10
PRELOAD = ["diffswarm.cli", "diffswarm.commands", "diffswarm.training.jobs", "diffswarm.experts.train",
           "diffswarm.data", "diffswarm.client.client", "diffswarm.dht.node", "diffswarm.swarm.local",
           "diffswarm.router.routing"]


def _child(argv: list[str], counter: str, log: str) -> None:
    """One training run (in a forked process): the CLI, its output to ``log``, its steps into ``counter``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import threading

    from tqdm import tqdm

    import diffswarm.training.jobs as clusters

    tqdm.set_lock(threading.RLock())  # tqdm's default lock is a semaphore that a SIGKILLed process leaks

    cnt = os.open(counter, os.O_RDWR | os.O_CREAT)
    inner = clusters.run_train_job

    def counted(job, **kw):
        first = []

        def on_step(step, loss, progress):
            if not first:
                first.append(step)
            os.pwrite(cnt, struct.pack("<qq", first[0], step), 0)

        return inner(job, on_step=on_step, **kw)

    clusters.run_train_job = counted  # commands.run_train imports it from there at call time
    sys.exit(main(argv))


def _progress(counter) -> tuple[int, int]:
    """(first step, latest step) the run reported; (0, 0) before its first step."""
    try:
        raw = open(counter, "rb").read(16)
    except FileNotFoundError:
        return 0, 0
    return struct.unpack("<qq", raw) if len(raw) == 16 else (0, 0)


@pytest.fixture(scope="module")
def ctx():
    c = mp.get_context("forkserver")
    c.set_forkserver_preload([*PRELOAD, __name__])  # __name__: the module of _child, pytest with it
    yield c
    stop = getattr(forkserver._forkserver, "_stop", None)  # no public way to end the forkserver process
    if stop is not None:
        stop()


def _writing(out, old) -> bool:
    """Whether a checkpoint write is under way in ``out`` (a temporary file that is not in ``old``)."""
    return any(n.startswith((".state.", ".expert.")) and is_temp_file(n) and out / n not in old
               for n in os.listdir(out))


def _wait(p, log, until, timeout=60.0) -> None:
    """Poll ``until()`` while the run ``p`` lives."""
    deadline = time.perf_counter() + timeout
    while not until() and p.is_alive():
        assert time.perf_counter() < deadline, log.read_text()[-3000:]
        time.sleep(0.0005)


def _state(out):
    """(meta, tensors) of the state file if it exists, verified (raises CheckpointError otherwise)."""
    return load_resume_state(out / STATE_FILE, _config(out)) if (out / STATE_FILE).exists() else (None, None)


def _config(out):
    from diffswarm.training.jobs import TrainJob

    return TrainJob.load(out / "job.json").load_data()[0]


def _expert_steps(out) -> int | None:
    path = out / "expert.safetensors"
    return load_expert_file(path)[0]["summary"]["steps"] if path.exists() else None


def test_sigkill_at_random_moments_loses_no_checkpoint(ctx, tmp_path, capsys):
    t_test = time.perf_counter()
    assert main(["partition", "--dataset", "digits", "--k", "2", "--out", str(tmp_path / "p.json")]) == 0

    def argv(out):
        return ["train", "--partition", str(tmp_path / "p.json"), "--cluster", "0", "--net", "mlp", "--width", "32",
                "--depth", "1", "--batch", "16", "--steps", str(STEPS), "--ckpt-every", str(EVERY), "--seed", "0",
                "--threads", "1", "--device", "cpu", "--out", str(out), "--resume"]

    runs = 0

    def start(out):
        nonlocal runs
        runs += 1
        counter, log = tmp_path / f"steps{runs}.bin", tmp_path / f"run{runs}.log"
        p = ctx.Process(target=_child, args=(argv(out), str(counter), str(log)), daemon=True)
        p.start()
        return p, counter, log

    def finish(p, log, deadline=120):
        p.join(deadline)
        if p.is_alive():
            p.kill()
            p.join()
        assert p.exitcode == 0, log.read_text()[-3000:]

    # the uninterrupted run, and how long one checkpoint interval takes
    ref = tmp_path / "ref"
    p, counter, log = start(ref)
    t0 = time.perf_counter()
    finish(p, log)
    interval = (time.perf_counter() - t0) / (STEPS / EVERY)

    out = tmp_path / "killed"
    rng = random.Random(9)
    targets = sorted(rng.sample(range(1, int(0.8 * STEPS)), KILLS))
    aimed = set(rng.sample(range(KILLS), KILLS // 2))  # these wait for a checkpoint write to begin
    state_step, expert_step, prev_temps = 0, 0, set()
    where, lost = Counter(), []
    for i, target in enumerate(targets):
        p, counter, log = start(out)
        # a random moment: once the run passed `target` (at once if it resumes beyond it), then a random delay of up
        # to one checkpoint interval, or of up to half of one after the run began its next checkpoint write
        _wait(p, log, lambda: _progress(counter)[1] >= target or state_step >= target)  # noqa: B023 (called at once)
        if i in aimed:
            _wait(p, log, lambda: _writing(out, prev_temps))  # noqa: B023
        time.sleep(rng.uniform(0, interval / 2 if i in aimed else interval))
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert p.exitcode == -signal.SIGKILL, f"the run ended before its kill: {log.read_text()[-3000:]}"
        first, reached = _progress(counter)

        # what the kill left: whole files that pass their hashes, at most one new temporary file
        temps = set(stale_temps(out))
        assert len(temps - prev_temps) <= 1, temps
        if first:  # the run got as far as training, so it deleted what earlier kills left
            assert not temps & prev_temps, "a temporary file of an earlier kill was not removed"
        meta, _ = _state(out)  # raises CheckpointError on a corrupt state
        expert = _expert_steps(out)  # raises CheckpointError on a corrupt expert file
        if first:  # the run trained: it started right after the checkpoint it resumed from
            assert first == state_step + 1, (first, state_step)
        new = meta["step"] if meta else 0
        assert new >= state_step, "the state went back"
        assert new % EVERY == 0 and new <= max(reached + 1, state_step), "a state of a step the run never reached"
        # the expert file never runs ahead of the state nor goes back (it lags when kills land between the writes)
        assert (expert or 0) <= new and (expert or 0) >= expert_step, f"expert file at {expert}, state at {new}"
        assert reached - new <= EVERY, "lost more than one checkpoint interval"
        lost.append(max(0, reached - new))
        left = {t.name.split(".")[1] for t in temps - prev_temps}
        where[("before its first step" if not first else "inside the state write" if "state" in left
               else "inside the expert write" if "expert" in left
               else "between the state and expert writes" if new > state_step and (expert or 0) < new
               else "between checkpoints")] += 1
        state_step, expert_step, prev_temps = new, expert or 0, temps

    # the last run completes, from the last state, and ends with the uninterrupted run's weights, bit for bit
    p, counter, log = start(out)
    finish(p, log)
    assert _progress(counter)[0] == state_step + 1
    assert stale_temps(out) == [] and stale_temps(ref) == []
    (ref_meta, ref_state), (meta, state) = _state(ref), _state(out)
    assert meta["step"] == ref_meta["step"] == STEPS and _expert_steps(out) == STEPS
    assert state.keys() == ref_state.keys()
    for k in state:
        assert torch.equal(state[k], ref_state[k]), k
    ref_w, w = load_expert_file(ref / "expert.safetensors")[1], load_expert_file(out / "expert.safetensors")[1]
    assert all(torch.equal(w[k], ref_w[k]) for k in ref_w)
    steps_logged = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(100, STEPS + 1, 100))  # each logged step once: cut back on resume

    during = sum(where[w] for w in ("inside the state write", "between the state and expert writes",
                                    "inside the expert write"))
    assert during > 0, where  # the aimed kills make this all but certain
    with capsys.disabled():
        print(f"\n{sum(where.values())} SIGKILLs at steps >= {targets} ({len(aimed)} aimed at a write), "
              f"{during} during a checkpoint: "
              + ", ".join(f"{n} {w}" for w, n in where.most_common())
              + f"; steps recomputed per kill {lost} (checkpoint every {EVERY}); {runs - 1} runs after the "
              f"uninterrupted one; final weights equal its weights bit for bit; {time.perf_counter() - t_test:.1f}s")



def _die_inside_a_write(path: str) -> None:
    """Write a new state at step 2 over ``path`` and SIGKILL this process when half of its bytes are written."""
    from diffswarm.experts import checkpoint

    real = checkpoint.save_file

    def half_then_kill(tensors, filename, metadata):
        real(tensors, filename, metadata=metadata)
        os.truncate(filename, os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save_file = half_then_kill
    checkpoint.save_state(path, {"w": torch.arange(1000.0)}, {"format": "f/1", "step": 2})


def test_a_sigkill_inside_a_write_leaves_the_previous_file_whole(ctx, tmp_path):
    """The deterministic case of the random kills above: a process dies with half a state file written."""
    from diffswarm.experts.checkpoint import load_state, save_state

    path = tmp_path / STATE_FILE
    save_state(path, {"w": torch.zeros(1000)}, {"format": "f/1", "step": 1})
    p = ctx.Process(target=_die_inside_a_write, args=(str(path),))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    meta, tensors = load_state(path, "f/1")  # the previous state, whole
    assert meta["step"] == 1 and not tensors["w"].any()
    (left,) = stale_temps(tmp_path)  # and the half-written new one, under a temporary name
    assert 0 < left.stat().st_size < path.stat().st_size * 3 // 4
