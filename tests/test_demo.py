"""The demo end to end on digits (tiny preset): every stage runs and the report is honest."""

import json

import numpy as np
import torch
from PIL import Image

from diffswarm.cli import main
from diffswarm.utils.images import make_grid


def test_tiny_demo_end_to_end(tmp_path, tmp_cache):
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "tiny", "--k", "2", "--out", str(out), "--steps", "150"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "digits:8" and report["objectives"] == ["ddpm", "fm"]
    assert [e["steps"] for e in report["experts"]] == [150, 150]
    q = report["quality"]
    assert q["n"] == 100 and q["fd"] > q["fd_floor"] > 0
    assert 0 <= q["class_accuracy"] <= 1
    assert abs(sum(q["cluster_share"]) - 1) < 1e-6 and len(q["data_share"]) == 2
    assert len(report["router"]["accuracy_by_t"]) == 11
    # the router is far better than chance on clean data
    assert report["router"]["accuracy_by_t"][0]["top1"] > 0.8
    img = Image.open(out / "grid.png")
    assert img.size[0] > 8 * 4 and img.size[1] > 8 * 10
    # the grid is the scored samples' first 40 (4 of each class), row by class: no samples made for it alone
    scored = np.load(out / "samples.npz")
    labels = torch.from_numpy(scored["labels"])
    assert labels[:40].tolist() == [i % 10 for i in range(40)]
    first = torch.from_numpy(scored["samples"][:40])
    rows = torch.cat([first[labels[:40] == c] for c in range(10)])
    assert np.array_equal(np.asarray(img), np.asarray(make_grid(rows, 4, scale=3)))
    for sub in ("c0-ddpm", "c1-fm"):
        assert (out / "experts" / sub / "expert.safetensors").exists()
