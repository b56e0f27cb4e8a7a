"""Sinusoidal timestep embeddings, numerically and parameter-for-parameter those of diffusers.

``Timesteps`` and ``TimestepEmbedding`` are diffusers' (``diffusers.models.embeddings``) with the options the
MLP denoiser and the router use, so checkpoints keep their tensor names (``linear_1``, ``linear_2``) and
outputs (``tests/test_networks.py`` compares them with diffusers'). They live here so that importing the
router or an MLP expert does not import diffusers, which pulls torch._dynamo and took 5.5 s of a cold
``diffswarm generate`` (bench/first_image.py); the UNet and the DiT still come from diffusers, imported
where they are built.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1, scale: float = 1, max_period: int = 10000) -> torch.Tensor:
    """(N, dim) sinusoidal embeddings of (N,) timesteps (diffusers' ``get_timestep_embedding``)."""
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps must be a 1-D tensor, got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    emb = scale * (timesteps[:, None].float() * freqs[None, :])
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1, 0, 0))
    return emb


class Timesteps(nn.Module):
    """diffusers' ``Timesteps``: no parameters."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: int = 1):
        super().__init__()
        self.num_channels, self.flip_sin_to_cos = num_channels, flip_sin_to_cos
        self.downscale_freq_shift, self.scale = downscale_freq_shift, scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift,
                                  self.scale)


class TimestepEmbedding(nn.Module):
    """diffusers' ``TimestepEmbedding`` with SiLU: linear_1 -> SiLU -> linear_2 (same names, same init order)."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(sample)))
