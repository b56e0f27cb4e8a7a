"""The statistics router's feature space (fixed, data independent): the per-channel 2-D DCT in frequency order.

``DCTBasis``: the orthonormal 2-D DCT-II of each channel, coefficients put in frequency order
(JPEG zig-zag over (u, v), all channels of one frequency next to each other). Its first ``d``
columns are the feature basis ``B`` (D x d, D = C*H*W, ``B^T B = I``); the remaining D - d
columns span the residual (complement) space. Every node rebuilds it from the image shape and
``d`` alone; its name ``"dct2d-v1:d=<d>"`` is carried in every blob so peers and clients agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

BASIS_KIND = "dct2d-v1"
DEFAULT_FEATURES = 48  # d
_BASIS_RE = re.compile(r"^dct2d-v1:d=([1-9][0-9]{0,3})$")


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix (n, n) float64: M[k, i] = sqrt((1 or 2) / n) cos(pi (2i + 1) k / (2n)).

    Same as ``scipy.fft.dct(np.eye(n), norm="ortho", axis=0)``; rows are the basis functions.
    """
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    m[0] /= np.sqrt(2.0)
    return m


def frequency_order(channels: int, height: int, width: int) -> np.ndarray:
    """(D,) int64 indices into the flattened (C, H, W) coefficient grid, lowest frequency first.

    JPEG zig-zag over (u, v): by diagonal u + v, alternating direction; at each frequency all
    channels in channel order.
    """
    uv = [(u, v) for u in range(height) for v in range(width)]
    uv.sort(key=lambda p: (p[0] + p[1], p[0] if (p[0] + p[1]) % 2 else p[1]))
    hw = height * width
    return np.array([c * hw + u * width + v for (u, v) in uv for c in range(channels)], dtype=np.int64)


@dataclass(frozen=True)
class DCTBasis:
    """The orthonormal per-channel 2-D DCT-II in frequency order; its first ``d`` columns are B."""

    image_shape: tuple[int, int, int]  # (C, H, W)
    d: int = DEFAULT_FEATURES  # feature dimension

    def __post_init__(self) -> None:
        c, h, w = self.image_shape
        if min(c, h, w) < 1:
            raise ValueError(f"image_shape must be positive (C, H, W), got {self.image_shape}")
        if not 1 <= self.d <= c * h * w:
            raise ValueError(f"d must be in 1..{c * h * w} for images {self.image_shape}, got {self.d}")

    @property
    def name(self) -> str:
        return f"{BASIS_KIND}:d={self.d}"

    @property
    def dim(self) -> int:
        """D = C*H*W."""
        c, h, w = self.image_shape
        return c * h * w

    @classmethod
    def from_name(cls, name: str, image_shape: Sequence[int]) -> DCTBasis:
        m = _BASIS_RE.match(name) if isinstance(name, str) else None
        if m is None:
            raise ValueError(f"unknown basis {name!r}; expected '{BASIS_KIND}:d=<int>'")
        return cls(tuple(int(s) for s in image_shape), int(m.group(1)))

    def _tables(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c, h, w = self.image_shape
        mh = torch.as_tensor(dct_matrix(h), device=device, dtype=dtype)  # (H, H)
        mw = torch.as_tensor(dct_matrix(w), device=device, dtype=dtype)  # (W, W)
        order = torch.as_tensor(frequency_order(c, h, w), device=device)  # (D,)
        return mh, mw, order

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """All D coefficients Q^T x in frequency order. x: (N, C, H, W) -> (N, D), dtype/device of x."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images (N, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        mh, mw, order = self._tables(x.device, x.dtype)
        coef = torch.einsum("uh,nchw,vw->ncuv", mh, x, mw)  # (N, C, H, W) per-channel DCT
        return coef.reshape(x.shape[0], -1)[:, order]  # (N, D)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """z = B^T x. x: (N, C, H, W) -> (N, d)."""
        return self.coefficients(x)[:, : self.d]

    def from_coefficients(self, coef: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`coefficients`: (N, D) in frequency order -> (N, C, H, W)."""
        c, h, w = self.image_shape
        mh, mw, order = self._tables(coef.device, coef.dtype)
        grid = torch.zeros_like(coef)
        grid[:, order] = coef
        return torch.einsum("uh,ncuv,vw->nchw", mh, grid.reshape(-1, c, h, w), mw)

    def matrix(self, dtype=torch.float64) -> torch.Tensor:
        """B as an explicit (D, d) matrix with orthonormal columns (for tests and small D)."""
        eye = torch.eye(self.dim, dtype=dtype)[: self.d]  # (d, D) unit coefficient vectors
        return self.from_coefficients(eye).reshape(self.d, -1).T  # (D, d)
