"""Writing samples: PNG grids and the raw ``.npz`` arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffswarm.utils.fileio import atomic_write


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(x: torch.Tensor, nrow: int, pad: int = 1, scale: int = 1) -> Image.Image:
    """Tile (N, C, H, W) images in [-1, 1] into one PIL image with ``nrow`` images per row."""
    imgs = to_uint8(x)  # (N, H, W, C)
    n, h, w, c = imgs.shape
    ncol = nrow
    rows = (n + ncol - 1) // ncol
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = imgs[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_grid(x: torch.Tensor, path: str | Path, nrow: int, scale: int = 3) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(x, nrow, scale=scale).save(path)
    return path


def save_samples(path: str | Path, samples: torch.Tensor, labels: torch.Tensor, **extra) -> Path:
    """``samples`` (N, C, H, W) float32 in [-1, 1] and ``labels`` (N,) (-1 = unconditional), atomically."""
    arrays = {"samples": samples.detach().float().cpu().clamp(-1, 1).numpy(),
              "labels": labels.detach().cpu().numpy().astype(np.int64), **extra}
    return atomic_write(path, lambda tmp: np.savez(tmp, **arrays))
