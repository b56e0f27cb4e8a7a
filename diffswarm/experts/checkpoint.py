"""Self-describing safetensors checkpoints, written atomically.

A served expert file (``expert.safetensors``) holds the EMA weights plus string metadata:

- ``diffswarm``: JSON with ``format`` (``diffswarm.expert/1``), the full ``ExpertConfig``
  (objective, schedule, network, cluster, partition hash), training summary (steps, final loss)
  and ``weights_sha256`` (sha256 over the tensors in sorted-name order), verified on load.

A training state file (``state.safetensors``) additionally holds raw weights, optimizer moments
and RNG state so that ``diffswarm train --resume`` continues where a killed run stopped.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..fileio import atomic_write

EXPERT_FORMAT = "diffswarm.expert/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or not what the caller expected."""


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``tensors`` in sorted-name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, meta: dict) -> None:
    """Write a safetensors file via a temporary file in the same folder and ``os.replace``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"diffswarm": json.dumps(meta, sort_keys=True)}))


def read_meta(path: str | os.PathLike) -> dict:
    """The ``diffswarm`` metadata of a checkpoint, without loading tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("diffswarm")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {e}") from e
    if raw is None:
        raise CheckpointError(f"checkpoint {path} has no diffswarm metadata")
    return json.loads(raw)


def load_tensors(path: str | os.PathLike, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors whose names start with ``prefix`` (prefix stripped)."""
    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name.startswith(prefix):
                    out[name[len(prefix):]] = f.get_tensor(name)
    except Exception as e:
        raise CheckpointError(f"cannot read tensors from {path}: {e}") from e
    return out


def save_expert(path: str | os.PathLike, weights: dict[str, torch.Tensor], config: dict, summary: dict,
                fmt: str = EXPERT_FORMAT) -> str:
    """Write a weights file (an expert, or with ``fmt`` a router); returns the weights' sha256."""
    digest = tensors_sha256(weights)
    meta = {"format": fmt, "config": config, "summary": summary, "weights_sha256": digest}
    atomic_save(weights, path, meta)
    return digest


def load_expert_file(path: str | os.PathLike, fmt: str = EXPERT_FORMAT) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, weights) of a weights file, with format and sha256 checked."""
    meta = read_meta(path)
    if meta.get("format") != fmt:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {fmt!r}")
    weights = load_tensors(path)
    digest = tensors_sha256(weights)
    if digest != meta.get("weights_sha256"):
        raise CheckpointError(f"{path}: weights sha256 {digest[:12]} does not match the recorded "
                              f"{str(meta.get('weights_sha256'))[:12]}; the file is corrupt")
    return meta, weights
