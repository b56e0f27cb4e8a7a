"""Train one expert on its own cluster, alone: AdamW, EMA, AMP on CUDA, atomic checkpoints, resume.

Output folder layout::

    out/expert.safetensors   EMA weights + ExpertConfig + summary (what a peer serves)
    out/state.safetensors    raw weights, optimizer moments, EMA, RNG, step (what --resume reads)
    out/train_log.jsonl      one JSON line per log interval: step, loss, per-t loss bins, ms/step

No lost work. A checkpoint (every ``ckpt_every`` steps and at the end) writes two files, in this order:

1. ``state.safetensors`` at step N: all that resuming needs, with a ``state_sha256`` over its tensors
   and metadata, checked on resume (``checkpoint.load_state``);
2. ``expert.safetensors``: the EMA weights of the same step N, with their ``weights_sha256``.

Each write is atomic (``fileio.atomic_write``: temporary file, fsync, ``os.replace``, fsync of the
folder), so after a SIGKILL or a power cut each file is whole, an earlier version or the new one; the
fsync of the folder after the state's rename also keeps the order of the two writes through a power
cut. The invariant is **step(expert) <= step(state)**: the state is the one source of truth for
resuming, the expert file is derived from it and never runs ahead of it. A kill with the last
checkpoint at N lands:

- between checkpoints: both files at N; the resumed run starts at N (fewer than ``ckpt_every``
  steps are recomputed);
- inside the state write: both files still at N (a temporary file stays behind; the next run in
  the folder deletes it);
- between the two writes, or inside the expert write: state at the new step, expert at N (or none
  before the first checkpoint); the resumed run starts from the state and rewrites the expert at its
  next checkpoint, or at once when the state is already at the last step.

The expert file cannot be the resume point (it lacks raw weights, optimizer moments and RNG), and
writing it first would serve weights of steps that a resumed run then recomputes. Resuming is exact:
the state holds the RNG, so a run killed any number of times ends with the bit-identical weights of
an uninterrupted run with the same seed and step count on the same CPU and thread count
(``tests/test_kill_resume.py``; CUDA's convolution and attention gradients are not deterministic, so there the
resumed run continues from the same state but does not repeat the same bits). A state saved on another kind of
device resumes with a generator re-seeded from the seed and step (a CPU generator's state does not fit CUDA's).
``train_log.jsonl`` is cut back to its length at the checkpoint, so the log of a resumed run lists each step
once. A state file that fails its check is refused with a ``CheckpointError`` saying what to do (never trained
on); the folder is locked while a run trains, so two runs cannot write the same checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffswarm.experts.checkpoint import (
    CheckpointError,
    load_expert_file,
    load_state,
    read_meta,
    save_expert,
    save_state,
)
from diffswarm.experts.config import ExpertConfig
from diffswarm.experts.expert import Expert
from diffswarm.experts.objectives import expert_loss
from diffswarm.utils.fileio import FolderBusyError, folder_lock, remove_stale_temps
from diffswarm.utils.signals import raise_if_stopped

STATE_FORMAT = "diffswarm.train-state/2"  # /2: state_sha256 recorded and checked
STATE_FILE, EXPERT_FILE, LOG_FILE = "state.safetensors", "expert.safetensors", "train_log.jsonl"
LOCK_FILE = ".train.lock"  # held (flock) while a run trains in the folder
T_BINS = 10  # flow-time bins of width 0.1 for the per-t loss log


@dataclass
class TrainConfig:
    """How to train (not what): saved in the training state and in the checkpoint's summary.

    Length is either a step count (``steps``) or a wall-clock budget (``minutes``): then the steps
    follow from the ms per step measured over the first seconds, are re-estimated at every log
    interval (so a machine that slows down still ends on time), and the warm-up and cosine LR
    schedule are laid over the steps that fit. The checkpoint records the steps reached.
    """

    steps: int | None = 2000  # optimizer steps (None: as many as fit in `minutes`)
    minutes: float | None = None  # wall-clock budget instead of a step count (counts across resumes and each
    # run's set-up: building the model, loading a checkpoint)
    batch: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 100  # linear LR warm-up steps (at most a tenth of the run), then cosine decay to lr/10
    ema_decay: float = 0.999
    ckpt_every: int = 500  # steps between checkpoints
    log_every: int = 100  # steps between train_log.jsonl lines (and budget re-estimates)
    seed: int = 0
    threads: int = 0  # torch CPU threads (0: leave torch's default)
    device: str = "auto"  # auto (CUDA if present) | cpu | cuda[:i]
    resume: bool = False  # continue from OUT/state.safetensors when it exists
    init_from: str | None = None  # DDPM expert whose trunk initialises this FM expert (HDDM's conversion)

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.minutes is None):
            raise ValueError("give the training length as steps or as minutes, not both")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        if self.batch < 1 or self.ckpt_every < 1 or self.log_every < 1:
            raise ValueError("batch, ckpt_every and log_every must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def pick_device(device: str | None = None) -> torch.device:
    """``auto``/None: CUDA if present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def lr_at(step: int, cfg: TrainConfig, total: int | None = None) -> float:
    """Learning rate of 0-based ``step`` of a run of ``total`` steps (default ``cfg.steps``; None while a
    budget run is still measuring its speed: warm-up only). Warm-up lasts ``cfg.warmup`` steps but at
    most a tenth of the run, then cosine decay to lr/10."""
    total = cfg.steps if total is None else total
    warmup = cfg.warmup if total is None else max(1, min(cfg.warmup, total // 10))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if total is None:
        return cfg.lr
    frac = (step - warmup) / max(1, total - warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


@dataclass
class StepBudget:
    """Turns a wall-clock budget into a step count (pure; the caller passes elapsed seconds).

    ``plan(step, elapsed)`` returns the total steps that fit: None until ``probe_s`` seconds and
    ``probe_steps`` steps have passed (the first step, which allocates, is not timed), then
    ``step + remaining / (seconds per step)`` with the speed measured since the last plan, smoothed.
    """

    seconds: float  # the whole budget
    probe_s: float = 3.0  # measure at least this long before the first plan
    probe_steps: int = 5
    rate: float | None = None  # smoothed seconds per step
    _mark: tuple[int, float] | None = None  # (step, elapsed) where the current measurement started

    def plan(self, step: int, elapsed: float) -> int | None:
        if self._mark is None:
            self._mark = (step, elapsed)  # the first call follows step 1: measure from here
            return None
        s0, e0 = self._mark
        if self.rate is None and (step - s0 < self.probe_steps or elapsed - e0 < min(self.probe_s, self.seconds / 20)):
            return None
        if step > s0:
            r = (elapsed - e0) / (step - s0)
            self.rate = r if self.rate is None else 0.5 * self.rate + 0.5 * r
            self._mark = (step, elapsed)
        return step + max(0, int((self.seconds - elapsed) / max(self.rate, 1e-9)))


def _opt_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_opt(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        pid, k = name.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def init_from_ddpm(expert: Expert, ddpm_path: str | Path) -> None:
    """HDDM checkpoint conversion: copy a DDPM expert's trunk into an FM expert, reinitialise the
    output layer (its target changes from eps to v). FM time 999 t matches DDPM's tau range."""
    meta, weights = load_expert_file(ddpm_path)
    src = ExpertConfig.from_dict(meta["config"])
    if src.objective != "ddpm":
        raise CheckpointError(f"--init-from wants a DDPM checkpoint, {ddpm_path} is {src.objective}")
    if src.net != expert.config.net:
        raise CheckpointError(f"--init-from network {src.net} differs from this expert's {expert.config.net}")
    fresh = expert.net.state_dict()
    head = _output_layer_names(expert.config.net.kind)
    for name, value in weights.items():
        if not any(name.startswith(h) for h in head):
            fresh[name] = value
    expert.net.load_state_dict(fresh)


def _output_layer_names(kind: str) -> tuple[str, ...]:
    return {"mlp": ("out.",), "dit": ("net.proj_out_2.", "head.conv2."), "unet": ("net.conv_out.",)}[kind]


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _restart_advice(state_path: Path) -> str:
    """What a user whose state file cannot be resumed from can do (and what is not lost)."""
    expert = state_path.parent / EXPERT_FILE
    try:
        steps = load_expert_file(expert)[0].get("summary", {}).get("steps")
    except CheckpointError:
        return f"Delete {state_path} to restart training from step 0, or train into another folder"
    return (f"{expert} (step {steps}) passes its sha256 check and can still be served. Delete {state_path} to "
            f"restart training from step 0 (the restarted run replaces {expert.name} at its first checkpoint: copy "
            "it first to keep it), or train into another folder")


def load_resume_state(state_path: str | Path, config: ExpertConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a training state to resume ``config`` from, checked; a ``CheckpointError``
    otherwise that names the file, what is wrong and what to do."""
    state_path = Path(state_path)
    try:
        meta, tensors = load_state(state_path, STATE_FORMAT)
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume training: {e}. {_restart_advice(state_path)}") from None
    if meta.get("config") != config.to_dict():
        raise CheckpointError(f"{state_path} belongs to a different expert configuration; "
                              "remove it or train into another folder")
    return meta, tensors


def _truncate_log(path: Path, size) -> None:
    """Cut the training log back to its length at the checkpoint resumed from (drops the killed run's later
    lines, and a line cut by the kill)."""
    if isinstance(size, int) and path.exists() and path.stat().st_size > size:
        with open(path, "r+b") as f:
            f.truncate(size)


def train_expert(config: ExpertConfig, train: TrainConfig, images: torch.Tensor, labels: torch.Tensor,
                 out_dir: str | Path, *, progress: bool = True, position: int = 0, on_step=None) -> dict:
    """Train one expert on ``images`` (N, C, H, W) in [-1, 1] and ``labels`` (N,); returns the summary.

    ``on_step(step, loss, progress)`` is called after every step with ``progress`` in [0, 1] (an
    exception raised there stops the run like a kill would, leaving the last checkpoint in place).
    ``progress``/``position``: the tqdm bar and its line (parallel workers). Holds the folder's lock
    while it trains and first deletes the temporary files a killed run left (module docstring).
    """
    out = Path(out_dir)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(folder_lock(out, LOCK_FILE))
        except FolderBusyError as e:
            raise CheckpointError(f"{e}: another training run writes its checkpoints there; "
                                  "stop it first or train into another folder") from None
        remove_stale_temps(out)
        return _train_expert(config, train, images, labels, out, progress=progress, position=position,
                             on_step=on_step)


@dataclass
class _Run:
    """The moving parts of one training run: the model, its EMA copy, the optimizer, the data RNG and the counters
    (all of them saved in the training state)."""

    expert: Expert
    ema: Expert
    opt: torch.optim.Optimizer
    gen: torch.Generator
    total: int | None  # planned steps (budget runs: None until measured)
    step: int = 0  # steps done
    spent: float = 0.0  # wall seconds spent by earlier runs of a resumed budget
    last_loss: float = float("nan")


def _start_run(config: ExpertConfig, train: TrainConfig, dev: torch.device, out: Path) -> _Run:
    """A fresh run (seeded weights, or a DDPM trunk with ``init_from``), or the one resumed from ``out``'s state."""
    torch.manual_seed(train.seed)  # same seed, same initial weights
    expert = Expert(config).to(dev)
    ema = Expert(config).to(dev)
    opt = torch.optim.AdamW(expert.net.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    gen = torch.Generator(device=dev).manual_seed(train.seed)
    run = _Run(expert, ema, opt, gen, total=train.steps)
    state_path = out / STATE_FILE
    if train.resume and state_path.exists():
        meta, state = load_resume_state(state_path, config)
        expert.net.load_state_dict(_prefixed(state, "model."))
        ema.net.load_state_dict(_prefixed(state, "ema."))
        _load_opt(opt, _prefixed(state, "opt."))
        run.step = int(meta["step"])
        try:
            gen.set_state(state["rng.gen"])
        except RuntimeError:  # saved on another kind of device: a CPU generator's state is not a CUDA one's
            gen.manual_seed(train.seed + run.step)  # deterministic from here on, not the other device's draws
            print(f"resuming {out} from step {run.step} on {dev.type}: its random state was saved on another kind "
                  "of device, so the batches drawn from here differ from an uninterrupted run's", file=sys.stderr)
        run.spent = float(meta.get("elapsed_s", 0.0))
        run.last_loss = float(meta.get("last_loss", run.last_loss))
        _truncate_log(out / LOG_FILE, meta.get("log_bytes"))
        if train.minutes is not None:
            run.total = meta.get("planned_steps")
    else:
        if train.init_from:
            init_from_ddpm(expert, train.init_from)
        ema.net.load_state_dict(expert.net.state_dict())
    ema.requires_grad_(False)
    return run


def _optimizer_step(run: _Run, train: TrainConfig, images: torch.Tensor, labels: torch.Tensor,
                    use_amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One AdamW step on a random batch, then the EMA update; returns the batch's per-sample losses and flow
    times, both (B,)."""
    expert, ema, opt, gen = run.expert, run.ema, run.opt, run.gen
    for g in opt.param_groups:
        g["lr"] = lr_at(run.step, train, run.total)
    idx = torch.randint(0, images.shape[0], (train.batch,), generator=gen, device=images.device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
        loss_b, t_b = expert_loss(expert, images[idx], labels[idx], gen)
    loss = loss_b.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(expert.net.parameters(), 1.0)
    opt.step()
    run.step += 1
    decay = min(train.ema_decay, (1 + run.step) / (10 + run.step))
    with torch.no_grad():
        for pe, pm in zip(ema.net.parameters(), expert.net.parameters(), strict=True):
            pe.lerp_(pm, 1 - decay)
        for be, bm in zip(ema.net.buffers(), expert.net.buffers(), strict=True):
            be.copy_(bm)
    run.last_loss = loss.item()
    return loss_b.detach(), t_b.detach()


class _TrainLog:
    """``train_log.jsonl``: one line per log interval with the mean loss, the loss by flow-time bin and the speed."""

    def __init__(self, path: Path):
        self.f = open(path, "a")
        self.bins_sum = torch.zeros(T_BINS, dtype=torch.float64)
        self.bins_n = torch.zeros(T_BINS, dtype=torch.float64)
        self.loss, self.n, self.t_last = 0.0, 0, time.perf_counter()

    def add(self, loss_b: torch.Tensor, t_b: torch.Tensor, loss: float) -> None:
        """One step: its per-sample losses and flow times (B,) and its mean loss."""
        b = (t_b.float().clamp(0, 1 - 1e-6) * T_BINS).long().cpu()
        self.bins_sum.index_add_(0, b, loss_b.double().cpu())
        self.bins_n.index_add_(0, b, torch.ones_like(b, dtype=torch.float64))
        self.loss += loss
        self.n += 1

    def write(self, step: int, lr: float, total: int | None) -> float:
        """Write the interval's line and start the next interval; returns the interval's mean loss."""
        now = time.perf_counter()
        rec = {"step": step, "loss": self.loss / self.n, "lr": lr,
               "ms_per_step": 1000 * (now - self.t_last) / self.n, "planned_steps": total,
               "loss_by_t": [round(s / n, 5) if n else None
                             for s, n in zip(self.bins_sum.tolist(), self.bins_n.tolist(), strict=True)]}
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        self.loss, self.n, self.t_last = 0.0, 0, now
        self.bins_sum.zero_()
        self.bins_n.zero_()
        return rec["loss"]

    def size(self) -> int:
        """Bytes written so far (a checkpoint records it: a resumed run cuts the log back to it)."""
        self.f.flush()
        return os.fstat(self.f.fileno()).st_size

    def close(self) -> None:
        self.f.close()


def class_histogram(labels: torch.Tensor, num_classes: int) -> list[int] | None:
    """(num_classes,) images per class among ``labels`` (-1 and out-of-range ids not counted); None when unlabeled.

    Saved in the checkpoint's summary: the expert answers the classes it never saw unconditionally."""
    if num_classes <= 0:
        return None
    y = labels.detach().to("cpu", torch.int64).reshape(-1)
    y = y[(y >= 0) & (y < num_classes)]
    return torch.bincount(y, minlength=num_classes).tolist()


def _save_checkpoint(run: _Run, config: ExpertConfig, train: TrainConfig, out: Path, log: _TrainLog, n_train: int,
                     elapsed: float, class_hist: list[int] | None = None) -> None:
    summary = {"steps": run.step, "final_loss": run.last_loss, "n_train": n_train, "train": train.to_dict(),
               "seconds": elapsed, "planned_steps": run.total}
    if class_hist is not None:
        summary["class_hist"] = class_hist
    tensors = {f"model.{k}": v for k, v in run.expert.net.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in run.ema.net.state_dict().items()})
    tensors.update(_opt_tensors(run.opt))
    tensors["rng.gen"] = run.gen.get_state()
    log_bytes = log.size()
    # the state first, then the expert file derived from it: step(expert) <= step(state) (module docstring)
    save_state(out / STATE_FILE, tensors, {"format": STATE_FORMAT, "config": config.to_dict(), "step": run.step,
                                           "train": train.to_dict(), "elapsed_s": elapsed,
                                           "planned_steps": run.total, "last_loss": run.last_loss,
                                           "log_bytes": log_bytes})
    save_expert(out / EXPERT_FILE, run.ema.net.state_dict(), config.to_dict(), summary)


def _train_expert(config: ExpertConfig, train: TrainConfig, images: torch.Tensor, labels: torch.Tensor,
                  out: Path, *, progress: bool, position: int, on_step) -> dict:
    t_start = time.perf_counter()  # a wall-clock budget counts the set-up too (seconds under a loaded CPU)
    if train.threads:
        torch.set_num_threads(train.threads)
    dev = pick_device(train.device)
    if images.shape[0] == 0:
        raise ValueError("no training images for this expert (empty cluster?)")
    run = _start_run(config, train, dev, out)
    budget = StepBudget(train.minutes * 60 - run.spent) if train.minutes is not None else None
    images = images.to(dev)
    labels = labels.to(dev)
    log = _TrainLog(out / LOG_FILE)
    use_amp = dev.type == "cuda"
    bar = tqdm(total=run.total, initial=run.step, desc=f"train {config.expert_id}", disable=not progress,
               position=position, leave=True, dynamic_ncols=True)

    def checkpoint() -> None:
        _save_checkpoint(run, config, train, out, log, int(images.shape[0]), run.spent + time.perf_counter() - t_start,
                         class_histogram(labels, config.net.num_classes))

    def done() -> bool:
        if budget is not None and time.perf_counter() - t_start >= budget.seconds:
            return True  # out of time, whatever the plan said
        return run.total is not None and run.step >= run.total

    run.expert.train()
    while not done():
        raise_if_stopped()
        loss_b, t_b = _optimizer_step(run, train, images, labels, use_amp)
        log.add(loss_b, t_b, run.last_loss)
        bar.update(1)
        if budget is not None and (run.total is None or run.step % train.log_every == 0):
            planned = budget.plan(run.step, time.perf_counter() - t_start)
            if planned is not None and planned != run.total:
                run.total = planned
                bar.total = run.total
                bar.refresh()
        if run.step % train.log_every == 0 or run.step == run.total:
            mean = log.write(run.step, lr_at(run.step - 1, train, run.total), run.total)
            bar.set_postfix(loss=f"{mean:.4f}")
        if run.step % train.ckpt_every == 0 and not done():
            checkpoint()
        if on_step is not None:
            on_step(run.step, run.last_loss, min(1.0, run.step / run.total) if run.total else 0.0)
    bar.close()
    checkpoint()
    log.close()
    return read_meta(out / EXPERT_FILE)["summary"]
