"""Train one expert on its own cluster, alone: AdamW, EMA, AMP on CUDA, atomic checkpoints, resume.

Output folder layout::

    out/expert.safetensors   EMA weights + ExpertConfig + summary (what a peer serves)
    out/state.safetensors    raw weights, optimizer moments, EMA, RNG, step (what --resume reads)
    out/train_log.jsonl      one JSON line per log interval: step, loss, per-t loss bins, ms/step
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, atomic_save, load_expert_file, load_tensors, read_meta, save_expert
from .config import ExpertConfig
from .expert import Expert
from .objectives import expert_loss

STATE_FORMAT = "diffswarm.train-state/1"
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
    minutes: float | None = None  # wall-clock budget instead of a step count (counts across resumes)
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
    return {"mlp": ("out.",), "dit": ("net.proj_out_2.",), "unet": ("net.conv_out.",)}[kind]


def train_expert(config: ExpertConfig, train: TrainConfig, images: torch.Tensor, labels: torch.Tensor,
                 out_dir: str | Path, *, progress: bool = True, position: int = 0, on_step=None) -> dict:
    """Train one expert on ``images`` (N, C, H, W) in [-1, 1] and ``labels`` (N,); returns the summary.

    ``on_step(step, loss, progress)`` is called after every step with ``progress`` in [0, 1] (an
    exception raised there stops the run like a kill would, leaving the last checkpoint in place).
    ``progress``/``position``: the tqdm bar and its line (parallel workers).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if train.threads:
        torch.set_num_threads(train.threads)
    dev = pick_device(train.device)
    if images.shape[0] == 0:
        raise ValueError("no training images for this expert (empty cluster?)")
    torch.manual_seed(train.seed)  # same seed, same initial weights
    expert = Expert(config).to(dev)
    ema = Expert(config).to(dev)
    opt = torch.optim.AdamW(expert.net.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    gen = torch.Generator(device=dev).manual_seed(train.seed)
    step, spent = 0, 0.0  # steps done, wall seconds spent by earlier runs of a resumed budget
    total: int | None = train.steps  # planned steps (budget runs: None until measured)
    state_path = out / "state.safetensors"
    if train.resume and state_path.exists():
        meta = read_meta(state_path)
        if meta.get("format") != STATE_FORMAT or meta.get("config") != config.to_dict():
            raise CheckpointError(f"{state_path} belongs to a different expert configuration; "
                                  "remove it or train into another folder")
        expert.net.load_state_dict(load_tensors(state_path, "model."))
        ema.net.load_state_dict(load_tensors(state_path, "ema."))
        _load_opt(opt, load_tensors(state_path, "opt."))
        gen.set_state(load_tensors(state_path, "rng.")["gen"])
        step = int(meta["step"])
        spent = float(meta.get("elapsed_s", 0.0))
        if train.minutes is not None:
            total = meta.get("planned_steps")
    else:
        if train.init_from:
            init_from_ddpm(expert, train.init_from)
        ema.net.load_state_dict(expert.net.state_dict())
    budget = StepBudget(train.minutes * 60 - spent) if train.minutes is not None else None
    ema.requires_grad_(False)
    images = images.to(dev)
    labels = labels.to(dev)
    log_f = open(out / "train_log.jsonl", "a")
    bins_sum = torch.zeros(T_BINS, dtype=torch.float64)
    bins_n = torch.zeros(T_BINS, dtype=torch.float64)
    t_start = time.perf_counter()
    run_loss, run_n, t_last = 0.0, 0, t_start
    use_amp = dev.type == "cuda"
    bar = tqdm(total=total, initial=step, desc=f"train {config.expert_id}", disable=not progress,
               position=position, leave=True, dynamic_ncols=True)
    last_loss = float("nan")

    def checkpoint() -> None:
        elapsed = spent + time.perf_counter() - t_start
        summary = {"steps": step, "final_loss": last_loss, "n_train": int(images.shape[0]), "train": train.to_dict(),
                   "seconds": elapsed, "planned_steps": total}
        tensors = {f"model.{k}": v for k, v in expert.net.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in ema.net.state_dict().items()})
        tensors.update(_opt_tensors(opt))
        tensors["rng.gen"] = gen.get_state()
        atomic_save(tensors, state_path, {"format": STATE_FORMAT, "config": config.to_dict(), "step": step,
                                          "train": train.to_dict(), "elapsed_s": elapsed, "planned_steps": total})
        save_expert(out / "expert.safetensors", ema.net.state_dict(), config.to_dict(), summary)

    def done() -> bool:
        if budget is not None and time.perf_counter() - t_start >= budget.seconds:
            return True  # out of time, whatever the plan said
        return total is not None and step >= total

    expert.train()
    while not done():
        for g in opt.param_groups:
            g["lr"] = lr_at(step, train, total)
        idx = torch.randint(0, images.shape[0], (train.batch,), generator=gen, device=dev)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss_b, t_b = expert_loss(expert, images[idx], labels[idx], gen)
        loss = loss_b.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(expert.net.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(train.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.net.parameters(), expert.net.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
            for be, bm in zip(ema.net.buffers(), expert.net.buffers(), strict=True):
                be.copy_(bm)
            b = (t_b.detach().float().clamp(0, 1 - 1e-6) * T_BINS).long().cpu()
            bins_sum.index_add_(0, b, loss_b.detach().double().cpu())
            bins_n.index_add_(0, b, torch.ones_like(b, dtype=torch.float64))
        last_loss = loss.item()
        run_loss += last_loss
        run_n += 1
        bar.update(1)
        if budget is not None and (total is None or step % train.log_every == 0):
            planned = budget.plan(step, time.perf_counter() - t_start)
            if planned is not None and planned != total:
                total = planned
                bar.total = total
                bar.refresh()
        if step % train.log_every == 0 or step == total:
            now = time.perf_counter()
            rec = {"step": step, "loss": run_loss / run_n, "lr": lr_at(step - 1, train, total),
                   "ms_per_step": 1000 * (now - t_last) / run_n, "planned_steps": total,
                   "loss_by_t": [round(s / n, 5) if n else None
                                 for s, n in zip(bins_sum.tolist(), bins_n.tolist(), strict=True)]}
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            run_loss, run_n, t_last = 0.0, 0, now
            bins_sum.zero_()
            bins_n.zero_()
        if step % train.ckpt_every == 0 and not done():
            checkpoint()
        if on_step is not None:
            on_step(step, last_loss, min(1.0, step / total) if total else 0.0)
    bar.close()
    checkpoint()
    log_f.close()
    return read_meta(out / "expert.safetensors")["summary"]
