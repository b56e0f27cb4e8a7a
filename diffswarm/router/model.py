"""The router: a small classifier p(k | x_t, t, cond) over the K clusters of a partition.

Trained with cross-entropy on the partition's cluster labels at random flow times (DDM, HDDM,
Paris). With ``num_classes > 0`` it also sees the class label (dropped with probability
``label_drop`` during training so the null label gives the unconditional router): at t = 1 it
then knows p(k | class), which an unconditional router cannot, and does not collapse onto the
largest cluster under argmax routing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from diffswarm.experts.checkpoint import load_expert_file, save_expert
from diffswarm.experts.embeddings import TimestepEmbedding, Timesteps
from diffswarm.experts.expert import null_labels
from diffswarm.experts.networks import AdaBlock
from diffswarm.experts.schedules import FM_TIME_SCALE

ROUTER_FORMAT = "diffswarm.router/1"


@dataclass
class RouterConfig:
    """Architecture and provenance of a router; saved in its checkpoint."""

    num_clusters: int = 4  # K
    num_classes: int = 10  # 0: unconditional router (the papers' kind)
    channels: int = 1
    size: int = 28
    width: int = 256
    depth: int = 2
    partition_hash: str | None = None
    label_drop: float = 0.2  # conditional routers only
    dataset_id: str = ""  # data it was trained on, e.g. "fashion:28" (announced in the swarm record)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RouterConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class Router(nn.Module):
    """MLP over flattened pixels, AdaLN-modulated by (t, label), K logits out."""

    def __init__(self, cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.time_proj = Timesteps(128, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_emb = TimestepEmbedding(128, w)
        self.label_emb = nn.Embedding(cfg.num_classes + 1, w)
        self.inp = nn.Linear(cfg.channels * cfg.size * cfg.size, w)
        self.blocks = nn.ModuleList(AdaBlock(w) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, cfg.num_clusters)
        self.summary: dict = {}

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits (B, K). x: (B, C, H, W) flow point; t: (B,) flow time; labels: (B,), -1 = none."""
        labels = null_labels(labels.to(x.device), self.cfg.num_classes)
        emb = self.time_proj(t.to(x.dtype) * FM_TIME_SCALE).to(x.dtype)
        emb = torch.nn.functional.silu(self.time_emb(emb) + self.label_emb(labels))  # (B, W)
        h = self.inp(x.flatten(1))  # (B, W)
        for blk in self.blocks:
            h = blk(h, emb)
        return self.head(self.norm(h))

    @torch.no_grad()
    def probs(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """p(k | x_t, t, labels): (B, K) float32, rows sum to 1."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self(x, t.to(x.device), labels).float().softmax(-1)

    def save(self, path: str | Path, summary: dict | None = None) -> str:
        """Write the router file; returns the weights' sha256 (what the swarm record names)."""
        self.summary = summary or self.summary
        return save_expert(path, self.state_dict(), {"router": self.cfg.to_dict()}, self.summary, fmt=ROUTER_FORMAT)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Router:
        meta, weights = load_expert_file(path, fmt=ROUTER_FORMAT)
        router = cls(RouterConfig.from_dict(meta["config"]["router"]))
        router.load_state_dict(weights)
        router.summary = meta.get("summary", {})
        router.weights_sha256 = meta["weights_sha256"]
        return router.to(device).eval()
