"""Denoiser networks: one call signature for every kind.

Every network maps ``(x, timestep, labels) -> out`` with

- ``x``: (B, C, H, W) float, the network's own input space (DDPM: the VP point; FM: x_t),
- ``timestep``: (B,) float, the network's own time scale (DDPM tau in [0, T-1]; FM 999 * t),
- ``labels``: (B,) long class ids, ``num_classes`` meaning "no condition" (the CFG null label),
- ``out``: (B, C, H, W), epsilon (DDPM) or velocity (FM).

Kinds (``NetConfig.kind``):

- ``unet`` (the default of new experts, ``KIND_DEFAULTS``): diffusers ``UNet2DModel`` with class
  embeddings, 16 base channels, 3 levels, no middle attention. The best samples per CPU-second of
  training among the candidates of ``bench/recipe_choice.py`` (FD 12.9 vs the DiT's 34.4 at 140
  CPU-s; table in docs/benchmarks.md), though 2.5x slower per forward pass than the DiT.
- ``dit``: diffusers ``DiTTransformer2DModel`` (adaLN-zero, class-conditional), width 96, depth 3,
  patch 4 at 28x28 (NetConfig's own defaults, hence what older checkpoints without a kind were);
  the fastest forward pass, with patch seams after short training.
- ``mlp``: a residual MLP over flattened pixels with AdaLN modulation from diffusers'
  ``Timesteps``/``TimestepEmbedding``: the fastest step, clearly worse per CPU-second at 28x28;
  handy for tiny tests (8x8 digits).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from diffswarm.experts.embeddings import TimestepEmbedding, Timesteps


@dataclass
class NetConfig:
    """Architecture of one denoiser; saved inside every checkpoint."""

    kind: str = "dit"  # dit | mlp | unet
    channels: int = 1  # image channels C
    size: int = 28  # image height = width
    num_classes: int = 10  # 0 = unconditional; label num_classes is the null label
    width: int = 96  # dit hidden width / mlp hidden width / unet base channels
    depth: int = 3  # dit layers / mlp residual blocks / unet levels (<= 3)
    patch: int = 4  # dit patch size
    heads: int = 4  # dit attention heads
    head: int = 0  # dit: feature channels of a conv head on the unpatchified output (0: none)
    layers: int = 1  # unet: resnet layers per block
    attn: bool = False  # unet: self-attention in the lowest-resolution down/up blocks too
    mid_attn: bool = True  # unet: self-attention in the middle block
    extra: dict = field(default_factory=dict)  # room for kind-specific options

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_kind(cls, kind: str, **kw) -> NetConfig:
        """A new network of ``kind`` with that kind's default sizes (``KIND_DEFAULTS``), overridden by ``kw``."""
        return cls(kind=kind, **{**KIND_DEFAULTS.get(kind, {}), **kw})

    @classmethod
    def from_dict(cls, d: dict) -> NetConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# Defaults of a new network per kind, where they differ from NetConfig's (which a checkpoint's missing
# field falls back to, so they describe older checkpoints). The UNet's: 16 base channels, 3 levels, no
# middle attention: at equal CPU time it beat the 96-wide DiT (Fashion-MNIST FD 12.9 vs 34.4) and the
# UNet with middle attention (bench/recipe_choice.py, docs/benchmarks.md).
KIND_DEFAULTS: dict[str, dict] = {"unet": {"width": 16, "depth": 3, "mid_attn": False}}


class AdaBlock(nn.Module):
    """Pre-norm residual MLP block modulated by the (time, label) embedding (AdaLN, zero-init gate)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mod = nn.Linear(width, 3 * width)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.mod(emb).chunk(3, dim=-1)  # 3 x (B, W)
        y = self.norm(h) * (1 + scale) + shift
        y = self.fc2(self.act(self.fc1(y)))
        return h + gate * y


class MLPDenoiser(nn.Module):
    """Residual MLP denoiser over flattened pixels."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.channels * cfg.size * cfg.size
        w = cfg.width
        self.time_proj = Timesteps(128, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_emb = TimestepEmbedding(128, w)
        self.label_emb = nn.Embedding(cfg.num_classes + 1, w)
        self.inp = nn.Linear(dim, w)
        self.blocks = nn.ModuleList(AdaBlock(w) for _ in range(cfg.depth))
        self.out_norm = nn.LayerNorm(w, elementwise_affine=False)
        self.out_mod = nn.Linear(w, 2 * w)
        self.out = nn.Linear(w, dim)
        for layer in (self.out_mod, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        tproj = self.time_proj(timestep).to(x.dtype)  # (B, 128)
        emb = torch.nn.functional.silu(self.time_emb(tproj) + self.label_emb(labels))  # (B, W)
        h = self.inp(x.reshape(b, -1))  # (B, W)
        for blk in self.blocks:
            h = blk(h, emb)
        shift, scale = self.out_mod(emb).chunk(2, dim=-1)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.out(h).reshape(x.shape)  # (B, C, H, W)


class ConvHead(nn.Module):
    """Pixel-space refinement after unpatchify, so neighbouring patches can agree at their seams.

    Input: the DiT's unpatchified output (B, C + F, H, W), whose first C channels are its direct
    prediction and the other F channels features, and the network input x (B, C, H, W). Output
    (B, C, H, W) = direct + conv3x3(SiLU(conv3x3([features, x]))). The last conv is zero-initialised,
    so at init the head adds nothing and the network is the plain DiT.
    """

    def __init__(self, channels: int, features: int):
        super().__init__()
        self.channels = channels
        self.conv1 = nn.Conv2d(features + channels, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        direct, feats = y[:, : self.channels], y[:, self.channels :]  # (B, C, H, W), (B, F, H, W)
        h = torch.nn.functional.silu(self.conv1(torch.cat([feats, x], dim=1)))  # (B, F, H, W)
        return direct + self.conv2(h)


class DiTDenoiser(nn.Module):
    """diffusers ``DiTTransformer2DModel`` behind the common signature, with an optional conv head."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        from diffusers import DiTTransformer2DModel

        self.cfg = cfg
        self.net = DiTTransformer2DModel(
            num_attention_heads=cfg.heads,
            attention_head_dim=cfg.width // cfg.heads,
            in_channels=cfg.channels,
            out_channels=cfg.channels + cfg.head,
            num_layers=cfg.depth,
            sample_size=cfg.size,
            patch_size=cfg.patch,
            num_embeds_ada_norm=max(cfg.num_classes, 1),
            norm_num_groups=1,
        )
        self.head = ConvHead(cfg.channels, cfg.head) if cfg.head > 0 else None
        # diffusers drops labels itself in training mode; we drop them in the objective instead.
        for mod in self.net.modules():
            if hasattr(mod, "dropout_prob") and hasattr(mod, "token_drop"):
                mod.dropout_prob = 0.0
                if mod.embedding_table.num_embeddings == mod.num_classes:  # no null row was made
                    old = mod.embedding_table
                    mod.embedding_table = nn.Embedding(old.num_embeddings + 1, old.embedding_dim)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.clamp(max=max(self.cfg.num_classes, 1))
        y = self.net(x, timestep=timestep, class_labels=labels).sample  # (B, C + head, H, W)
        return y if self.head is None else self.head(y, x)


class UNetDenoiser(nn.Module):
    """diffusers ``UNet2DModel`` with class embeddings behind the common signature."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        from diffusers import UNet2DModel

        self.cfg = cfg
        levels = max(1, min(cfg.depth, 3))
        chans = tuple(cfg.width * (2**i) for i in range(levels))
        self.net = UNet2DModel(
            sample_size=cfg.size,
            in_channels=cfg.channels,
            out_channels=cfg.channels,
            block_out_channels=chans,
            layers_per_block=cfg.layers,
            down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D" if cfg.attn else "DownBlock2D",),
            up_block_types=("AttnUpBlock2D" if cfg.attn else "UpBlock2D",) + ("UpBlock2D",) * (levels - 1),
            add_attention=cfg.mid_attn,
            norm_num_groups=min(8, cfg.width),
            num_class_embeds=cfg.num_classes + 1,
        )

        self.channels_last = False  # set by inference_layout

    def inference_layout(self, channels_last: bool = True) -> None:
        """Channels-last weights for answering on the CPU (oneDNN's NHWC convolutions; measured by
        ``bench/inference_layout.py``), or back to NCHW. Only for answering: a training step measured 6% slower
        channels-last (``bench/cpu_kinds.py``), so a training run's network keeps NCHW."""
        self.net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.channels_last:
            return self.net(x, timestep, class_labels=labels).sample
        if x.device.type == "cpu" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # NCHW out on every device (the wire codec and row slicing expect it), also where the weights were moved
        # to another device after ``inference_layout``
        return self.net(x, timestep, class_labels=labels).sample.contiguous()


NETWORKS = {"dit": DiTDenoiser, "mlp": MLPDenoiser, "unet": UNetDenoiser}


def default_patch(size: int) -> int:
    """DiT patch size for an image side: 4 from 24 px up (49 tokens at 28x28), else 2."""
    return 4 if size >= 24 and size % 4 == 0 else 2 if size % 2 == 0 else 1


def build_network(cfg: NetConfig) -> nn.Module:
    """Instantiate the denoiser named by ``cfg.kind``."""
    try:
        return NETWORKS[cfg.kind](cfg)
    except KeyError:
        raise ValueError(f"unknown network kind {cfg.kind!r}; choose one of {sorted(NETWORKS)}") from None
