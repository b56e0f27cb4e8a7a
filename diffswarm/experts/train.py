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

from .checkpoint import CheckpointError, atomic_save, load_tensors, read_meta, save_expert, load_expert_file
from .config import ExpertConfig
from .expert import Expert
from .objectives import expert_loss

STATE_FORMAT = "diffswarm.train-state/1"
T_BINS = 10  # flow-time bins of width 0.1 for the per-t loss log


@dataclass
class TrainConfig:
    """How to train (not what): saved in the training state for resume."""

    steps: int = 2000
    batch: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 100  # linear LR warm-up steps, then cosine decay to lr/10
    ema_decay: float = 0.999
    ckpt_every: int = 500
    log_every: int = 100
    seed: int = 0
    threads: int = 0  # torch CPU threads (0: leave torch's default)

    def to_dict(self) -> dict:
        return asdict(self)


def pick_device(device: str | None = None) -> torch.device:
    """``auto``/None: CUDA if present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


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


def train_expert(
    config: ExpertConfig,
    train: TrainConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    out_dir: str | Path,
    device: str | None = None,
    resume: bool = False,
    init_from: str | Path | None = None,
    progress: bool = True,
    position: int = 0,
    on_step=None,
) -> dict:
    """Train one expert on ``images`` (N, C, H, W) in [-1, 1] and ``labels`` (N,); returns the summary.

    ``on_step(step, loss)`` is called after every step (progress reporting; an exception raised
    there stops the run like a kill would, leaving the last checkpoint in place).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if train.threads:
        torch.set_num_threads(train.threads)
    dev = pick_device(device)
    if images.shape[0] == 0:
        raise ValueError("no training images for this expert (empty cluster?)")
    torch.manual_seed(train.seed)  # same seed, same initial weights
    expert = Expert(config).to(dev)
    ema = Expert(config).to(dev)
    opt = torch.optim.AdamW(expert.net.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    gen = torch.Generator(device=dev).manual_seed(train.seed)
    step = 0
    state_path = out / "state.safetensors"
    if resume and state_path.exists():
        meta = read_meta(state_path)
        if meta.get("format") != STATE_FORMAT or meta.get("config") != config.to_dict():
            raise CheckpointError(f"{state_path} belongs to a different expert configuration; "
                                  "remove it or train into another folder")
        expert.net.load_state_dict(load_tensors(state_path, "model."))
        ema.net.load_state_dict(load_tensors(state_path, "ema."))
        _load_opt(opt, load_tensors(state_path, "opt."))
        gen.set_state(load_tensors(state_path, "rng.")["gen"])
        step = int(meta["step"])
    else:
        if init_from:
            init_from_ddpm(expert, init_from)
        ema.net.load_state_dict(expert.net.state_dict())
    ema.requires_grad_(False)
    images = images.to(dev)
    labels = labels.to(dev)
    log_f = open(out / "train_log.jsonl", "a")
    bins_sum = torch.zeros(T_BINS, dtype=torch.float64)
    bins_n = torch.zeros(T_BINS, dtype=torch.float64)
    run_loss, run_n, t_last = 0.0, 0, time.perf_counter()
    use_amp = dev.type == "cuda"
    bar = tqdm(total=train.steps, initial=step, desc=f"train {config.expert_id}", disable=not progress,
               position=position, leave=True, dynamic_ncols=True)
    last_loss = float("nan")

    def checkpoint() -> None:
        summary = {"steps": step, "final_loss": last_loss, "n_train": int(images.shape[0]), "train": train.to_dict()}
        tensors = {f"model.{k}": v for k, v in expert.net.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in ema.net.state_dict().items()})
        tensors.update(_opt_tensors(opt))
        tensors["rng.gen"] = gen.get_state()
        atomic_save(tensors, state_path, {"format": STATE_FORMAT, "config": config.to_dict(), "step": step,
                                          "train": train.to_dict()})
        save_expert(out / "expert.safetensors", ema.net.state_dict(), config.to_dict(), summary)

    expert.train()
    while step < train.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, train)
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
            for pe, pm in zip(ema.net.parameters(), expert.net.parameters()):
                pe.lerp_(pm, 1 - decay)
            for be, bm in zip(ema.net.buffers(), expert.net.buffers()):
                be.copy_(bm)
            b = (t_b.detach().float().clamp(0, 1 - 1e-6) * T_BINS).long().cpu()
            bins_sum.index_add_(0, b, loss_b.detach().double().cpu())
            bins_n.index_add_(0, b, torch.ones_like(b, dtype=torch.float64))
        last_loss = loss.item()
        run_loss += last_loss
        run_n += 1
        bar.update(1)
        if step % train.log_every == 0 or step == train.steps:
            now = time.perf_counter()
            rec = {"step": step, "loss": run_loss / run_n, "lr": lr_at(step - 1, train),
                   "ms_per_step": 1000 * (now - t_last) / run_n,
                   "loss_by_t": [round(s / n, 5) if n else None for s, n in zip(bins_sum.tolist(), bins_n.tolist())]}
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            run_loss, run_n, t_last = 0.0, 0, now
            bins_sum.zero_()
            bins_n.zero_()
        if step % train.ckpt_every == 0 and step < train.steps:
            checkpoint()
        if on_step is not None:
            on_step(step, last_loss)
    bar.close()
    checkpoint()
    log_f.close()
    return read_meta(out / "expert.safetensors")["summary"]
