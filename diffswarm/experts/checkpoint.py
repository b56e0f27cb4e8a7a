"""Self-describing safetensors checkpoints, written atomically, each verified by a sha256 on load.

A served expert file (``expert.safetensors``) holds the EMA weights plus string metadata:

- ``diffswarm``: JSON with ``format`` (``diffswarm.expert/1``), the full ``ExpertConfig``
  (objective, schedule, network, cluster, partition hash), training summary (steps, final loss)
  and ``weights_sha256`` (sha256 over the tensors in sorted-name order), verified on load. The same
  layout with another format string holds a router.

A training state file (``state.safetensors``) additionally holds raw weights, optimizer moments
and RNG state so that ``diffswarm train --resume`` continues where a killed run stopped. Its
``state_sha256`` covers its tensors *and* its metadata (the step it resumes from among them);
``load_state`` checks it, so a state that bit rot, a bad disk or a careless copy damaged is refused
with a ``CheckpointError`` instead of being trained on.

Every file here is written by ``fileio.atomic_write`` (temporary file, fsync, ``os.replace``, fsync of
the folder): a kill at any moment leaves the previous file or the new one, never a part of one. How
the trainer orders its two files is stated in ``diffswarm.experts.train``.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffswarm.utils.fileio import atomic_write

EXPERT_FORMAT = "diffswarm.expert/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or not what the caller expected."""


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``tensors`` in sorted-name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():  # the raw bytes, without a copy (reshape: 0-dim tensors, e.g. AdamW's step, have no last dim)
            h.update(t.reshape(-1).view(torch.uint8).numpy())
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
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path} has unreadable diffswarm metadata: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} has diffswarm metadata that is not a JSON object")
    return meta


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


def state_sha256(tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """sha256 over a training state's metadata (canonical JSON, without ``state_sha256``) and its tensors."""
    body = {k: v for k, v in meta.items() if k != "state_sha256"}
    h = hashlib.sha256(json.dumps(body, sort_keys=True).encode())
    h.update(tensors_sha256(tensors).encode())
    return h.hexdigest()


def save_state(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """Write a training state file with its ``state_sha256`` added to ``meta``; returns the digest."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    digest = state_sha256(tensors, meta)
    atomic_save(tensors, path, {**meta, "state_sha256": digest})
    return digest


def load_state(path: str | os.PathLike, fmt: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a training state file, with format and ``state_sha256`` checked.

    Raises ``CheckpointError`` saying what is wrong; the caller adds what to do about it.
    """
    meta = read_meta(path)
    if meta.get("format") != fmt:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {fmt!r}")
    if not isinstance(meta.get("state_sha256"), str):
        raise CheckpointError(f"{path}: no state_sha256 recorded, so it cannot be verified")
    tensors = load_tensors(path)
    digest = state_sha256(tensors, meta)
    if digest != meta["state_sha256"]:
        raise CheckpointError(f"{path}: state sha256 {digest[:12]} does not match the recorded "
                              f"{meta['state_sha256'][:12]}; the file is corrupt")
    return meta, tensors
