"""The user's path through the CLI on digits: partition, train (DDPM + FM), router, generate, quality."""

import json

import numpy as np
import pytest
from PIL import Image

from diffswarm.cli import main

TINY = ["--net", "mlp", "--width", "64", "--depth", "1", "--batch", "32", "--ckpt-every", "10"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    assert main(["partition", "--dataset", "digits", "--k", "2", "--out", str(d / "p.json")]) == 0
    assert main(["train", "--partition", str(d / "p.json"), "--cluster", "0", "--objective", "ddpm",
                 "--steps", "20", "--out", str(d / "c0"), *TINY]) == 0
    assert main(["train", "--partition", str(d / "p.json"), "--cluster", "1", "--objective", "fm",
                 "--steps", "20", "--out", str(d / "c1"), *TINY]) == 0
    assert main(["train-router", "--partition", str(d / "p.json"), "--steps", "30", "--width", "32",
                 "--out", str(d / "router.safetensors")]) == 0
    return d


def _generate(d, name, *extra):
    argv = ["generate", "--local", str(d / "c0" / "expert.safetensors"), str(d / "c1" / "expert.safetensors"),
            "--router", str(d / "router.safetensors"), "--n", "6", "--steps", "5", "--class", "3", "--class", "7",
            "--output", str(d / f"{name}.png"), "--save-samples", str(d / f"{name}.npz"), *extra]
    assert main(argv) == 0
    return np.load(d / f"{name}.npz")


def test_partition_manifest_names_its_source(run):
    m = json.loads((run / "p.json").read_text())
    assert m["source"]["name"] == "digits" and m["k"] == 2


def test_generate_writes_grid_and_samples_reproducibly(run):
    a = _generate(run, "a", "--seed", "3")
    b = _generate(run, "b", "--seed", "3")
    c = _generate(run, "c", "--seed", "4")
    assert a["samples"].shape == (6, 1, 8, 8) and a["samples"].dtype == np.float32
    assert a["samples"].min() >= -1 and a["samples"].max() <= 1
    assert a["labels"].tolist() == [3, 7, 3, 7, 3, 7]
    np.testing.assert_array_equal(a["samples"], b["samples"])
    assert not np.array_equal(a["samples"], c["samples"])
    assert Image.open(run / "a.png").size[0] > 8


@pytest.mark.parametrize("routing", [["--routing", "full"], ["--routing", "threshold"], ["--routing", "sample-k", "--k", "1"],
                                     ["--routing", "top-k", "--k", "1", "--sampler", "heun"]])
def test_every_routing_strategy_runs(run, routing):
    out = _generate(run, "r", *routing)
    assert np.isfinite(out["samples"]).all()


def test_quality_command(run, capsys, tmp_cache):
    _generate(run, "q")
    assert main(["quality", str(run / "q.npz"), "--partition", str(run / "p.json")]) == 0
    assert "FD" in capsys.readouterr().out


def test_resume_and_init_from(run):
    p = str(run / "p.json")
    assert main(["train", "--partition", p, "--cluster", "1", "--objective", "fm", "--steps", "30",
                 "--out", str(run / "c1"), "--resume", *TINY]) == 0
    log = [json.loads(x) for x in (run / "c1" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 30
    assert main(["train", "--partition", p, "--cluster", "1", "--objective", "fm", "--steps", "5",
                 "--init-from", str(run / "c0" / "expert.safetensors"), "--out", str(run / "c1i"), *TINY]) == 0


def test_clear_errors(run, capsys):
    assert main(["train", "--partition", str(run / "p.json"), "--cluster", "5", "--out", str(run / "x")]) == 2
    assert "--cluster" in capsys.readouterr().err
    assert main(["generate", "--local", str(run / "c0" / "expert.safetensors"), str(run / "nope.safetensors"),
                 "--router", str(run / "router.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # an FM checkpoint is not a valid --init-from source
    assert main(["train", "--partition", str(run / "p.json"), "--cluster", "1", "--objective", "fm", "--steps", "2",
                 "--init-from", str(run / "c1" / "expert.safetensors"), "--out", str(run / "y"), *TINY]) == 2
