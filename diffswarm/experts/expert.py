"""Experts answer one contract: ``velocity(x_t, t, labels, guidance) -> v`` in flow time.

An adapter per objective does the translating, so samplers never ask what a model predicts
(k-diffusion's ``external.py`` pattern):

- ``fm``: the network predicts v directly from (x_t, 999 t).
- ``ddpm``: the network predicts eps from the VP point x_t / r at the SNR-matched step tau(t);
  ``translator.eps_to_velocity`` turns it into v (HDDM's universal translator).

Classifier-free guidance is applied per expert, in the network's native output space, before
translating and before any mixing: ``out = out_u + g (out_c - out_u)``.

Classes an expert never saw: a cluster holds a few classes, so most of an expert's label embeddings
never trained (and CFG would amplify them). An expert whose checkpoint records the class histogram of
its training data (``summary["class_hist"]``, written by ``experts.train`` since it existed) answers a
label with no training image unconditionally (the null label, no guidance), locally and when served
alike; a checkpoint without the histogram keeps the old behaviour (every label as given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from diffswarm.experts.checkpoint import load_expert_file
from diffswarm.experts.config import ExpertConfig
from diffswarm.experts.networks import build_network
from diffswarm.experts.schedules import FM_TIME_SCALE, VPSchedule, bcast
from diffswarm.experts.translator import eps_to_velocity, flow_to_vp_scale


class VelocityModel(Protocol):
    """Anything that answers in the shared flow convention (local expert, remote expert, ensemble)."""

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
        ...


def null_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Map "no condition" (-1) and out-of-range ids to the null label ``num_classes``."""
    labels = labels.long()
    return torch.where((labels < 0) | (labels >= num_classes), torch.full_like(labels, num_classes), labels)


def seen_classes(class_hist, num_classes: int) -> torch.Tensor | None:
    """(num_classes + 1,) bool: the classes with training images, and True for the null label; None (every label
    as given) when the histogram is missing or malformed (a peer's checkpoint is checked, not trusted)."""
    if num_classes <= 0 or not isinstance(class_hist, list) or len(class_hist) != num_classes:
        return None
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in class_hist) or not any(class_hist):
        return None
    return torch.tensor([c > 0 for c in class_hist] + [True])


class Expert(nn.Module):
    """One expert denoiser with its objective adapter."""

    def __init__(self, config: ExpertConfig, net: nn.Module | None = None, summary: dict | None = None):
        super().__init__()
        self.config = config
        self.net = net if net is not None else build_network(config.net)
        self.summary = summary or {}
        self.schedule = VPSchedule(config.schedule) if config.objective == "ddpm" else None
        self.weights_sha256: str | None = None
        self.seen_classes = seen_classes(self.summary.get("class_hist"), config.net.num_classes)

    @property
    def expert_id(self) -> str:
        return self.config.expert_id

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> Expert:
        meta, weights = load_expert_file(path)
        cfg = ExpertConfig.from_dict(meta["config"])
        expert = cls(cfg, summary=meta.get("summary", {}))
        expert.net.load_state_dict(weights)
        expert.weights_sha256 = meta["weights_sha256"]
        return expert.to(device).answering()  # a loaded expert answers; it does not train

    def answering(self) -> Expert:
        """This expert set up to answer, not to train: eval mode and, on the CPU, its network's faster answering
        layout where it has one (a UNet's channels-last weights, ``UNetDenoiser.inference_layout``)."""
        self.eval()
        first = next(self.net.parameters(), None)
        if first is not None and first.device.type == "cpu" and hasattr(self.net, "inference_layout"):
            self.net.inference_layout()
        return self

    def network_input(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(network input, network timestep) for flow point x_t at flow time t (B,)."""
        if self.schedule is None:
            return x_t, t.to(x_t.dtype) * FM_TIME_SCALE
        tau = self.schedule.tau_for_flow_time(t).to(x_t.dtype)  # (B,) SNR-matched DDPM step
        return x_t / bcast(flow_to_vp_scale(t), x_t), tau

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
        """v(x_t, t | labels) with CFG. x: (B, C, H, W); t: (B,) in [0, 1]; labels: (B,), -1 = none."""
        t = t.to(device=x.device, dtype=x.dtype)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        inp, ts = self.network_input(x, t)
        out = self.network_output(inp, ts, labels, guidance)
        if self.schedule is None:
            return out
        return eps_to_velocity(x, t, out, self.config.x0_clip)

    @torch.no_grad()
    def network_output(self, inp: torch.Tensor, ts: torch.Tensor, labels: torch.Tensor,
                       guidance: float = 1.0) -> torch.Tensor:
        """The network's own prediction (DDPM: eps, FM: v) with CFG, in its own input space and time scale.

        inp: (B, C, H, W) (DDPM: the VP point, FM: x_t); ts: (B,) (DDPM: tau, FM: 999 t); labels: (B,), -1 = none.
        Native samplers (e.g. DDIM over a DDPM expert) call this instead of ``velocity``.
        """
        labels = null_labels(labels.to(inp.device), self.config.net.num_classes)
        null = torch.full_like(labels, self.config.net.num_classes)
        if self.seen_classes is not None:  # classes absent from the training data: answered unconditionally
            labels = torch.where(self.seen_classes.to(labels.device)[labels], labels, null)  # labels in [0, C]
        if guidance != 1.0 and self.config.net.num_classes > 0:
            # one forward pass over [cond; uncond]: (2B, C, H, W)
            out = self._forward(torch.cat([inp, inp]), torch.cat([ts, ts]), torch.cat([labels, null]))
            out_c, out_u = out.chunk(2)
            # rows asked unconditionally get no guidance (out_c == out_u there)
            return out_u + guidance * (out_c - out_u)
        return self._forward(inp, ts, labels)

    def _forward(self, inp: torch.Tensor, ts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if inp.device.type == "cuda":
            exact_fp32_on_cuda()
        return self.net(inp, ts, labels)


def exact_fp32_on_cuda() -> None:
    """Answers in IEEE float32 on CUDA, as on CPU: no TF32 (cuDNN's default for convolutions) and no bf16 autocast.

    A served answer is cross-checked against another source's within a per-row relative difference of 2e-3
    (``client.answer_checks.row_tolerance``), and a DDPM expert's translation amplifies its network's rounding
    near t = 1 (x0 = (x_t - t eps) / (1 - t)). Measured with CPU bf16 autocast standing in for CUDA's
    (``bench/check_precision.py``, experts trained 1-2 minutes): bf16 answers differ from float32 ones by up to
    0.1-0.3 per row from t = 0.9 on for DDPM experts and by 2-5e-2 for FM experts (more at strong guidance), so an
    honest bf16 peer would be judged a liar. Training keeps its bf16 autocast. Process-wide (the legacy flags,
    which the per-operator ones defer to while unset), set at every CUDA forward pass.
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
