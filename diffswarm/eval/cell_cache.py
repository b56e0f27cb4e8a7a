"""``OUT/cells``: every cell's (or trace's) JSON result, keyed by everything that changes it, so that
studies share cells and an interrupted ``diffswarm eval`` resumes; and the index of saved samples."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from diffswarm.eval.pool import settings_sha
from diffswarm.eval.settings import Cell
from diffswarm.utils.fileio import atomic_write

CELL_VERSION = 2  # bump when a cell's computation changes (invalidates OUT/cells); 2: held-out test reference,
#                  experts answer absent classes unconditionally, sample-k drawn once per trajectory


def clean(o):
    """JSON-ready copy: numpy/torch scalars to Python, NaN/inf to None, tuples to lists."""
    if isinstance(o, dict):
        return {str(k): clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean(v) for v in o]
    if isinstance(o, torch.Tensor):
        return clean(o.tolist())
    if isinstance(o, np.ndarray):
        return clean(o.tolist())
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, np.integer):
        return int(o)
    return o


class CellCache:
    """Results under ``out/cells/<kind>-<key>.json``; ``base``: what every key includes (the pool, n, sampling, ...)."""

    def __init__(self, out: Path, base: dict, save_samples: bool):
        self.out, self.base, self.save_samples = out, {"version": CELL_VERSION, **base}, save_samples
        self.seconds = 0.0
        self.computed = 0
        self.reused = 0
        self.cost: dict[str, float] = {}  # seconds each cell used took when it was computed, by any run
        self.studies: dict[str, dict] = {}  # cell key -> setting, cell and the studies that used it

    def key(self, kind: str, cell: Cell, extra: dict | None = None) -> str:
        return settings_sha({**self.base, "kind": kind, "cell": asdict(cell), **(extra or {})})[:20]

    def load_or(self, kind: str, cell: Cell, compute, extra: dict | None = None) -> dict:
        """The cached result, or ``compute(key)`` stamped with the cell, its setting, run and seconds, and cached."""
        key = self.key(kind, cell, extra)
        path = self.out / "cells" / f"{kind}-{key}.json"
        want_samples = kind == "cell" and self.save_samples
        if path.exists() and (not want_samples or (self.out / "samples" / f"{key}.npz").exists()):
            self.reused += 1
            res = json.loads(path.read_text())
            self.cost[path.name] = float(res.get("seconds") or 0.0)
            return res
        t0 = time.perf_counter()
        res = compute(key)
        res = clean({**res, "key": key, "cell": asdict(cell), "setting": cell.setting, "run": cell.run,
                     "seconds": time.perf_counter() - t0})
        self.seconds += res["seconds"]
        self.computed += 1
        self.cost[path.name] = res["seconds"]
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(res)))
        return res

    def note_studies(self, cell: Cell, studies: tuple[str, ...]) -> None:
        """Record that ``studies`` score the samples of ``cell`` (for the sample index)."""
        self.studies.setdefault(self.key("cell", cell), {"setting": cell.setting, "cell": asdict(cell),
                                                         "studies": set()})["studies"].update(studies)

    def write_sample_index(self) -> None:
        """OUT/samples/index.json: for every saved sample file, its setting, seeds and the studies that score it."""
        index = {key: {**v, "studies": sorted(v["studies"]), "file": f"{key}.npz"}
                 for key, v in self.studies.items() if (self.out / "samples" / f"{key}.npz").exists()}
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        (self.out / "samples" / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True))

    def samples_of(self, cell: Cell) -> torch.Tensor | None:
        p = self.out / "samples" / f"{self.key('cell', cell)}.npz"
        return torch.from_numpy(np.load(p)["samples"]) if p.exists() else None


__all__ = ["CELL_VERSION", "CellCache", "clean"]
