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


def test_train_draws_its_loss_by_t_beside_the_checkpoint(run):
    curves = json.loads((run / "c0" / "loss_by_t.json").read_text())
    assert len(curves["t"]) == 10 and curves["curves"][-1]["steps"][1] == 20
    assert (run / "c0" / "loss_by_t.png").read_bytes()[:4] == b"\x89PNG"


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


def test_routing_options_change_the_samples(run):
    """Each routing option does what it says on these K=2 experts."""
    base = _generate(run, "r0", "--seed", "5")["samples"]
    out = {name: _generate(run, name, "--seed", "5", *opts)["samples"] for name, opts in {
        "full": ["--routing", "full"], "top1": ["--k", "1"], "sample1": ["--routing", "sample-k", "--k", "1"],
        "thr_all": ["--routing", "threshold", "--threshold", "0.0"],
        "thr_argmax": ["--routing", "threshold", "--threshold", "0.99"], "euler": ["--sampler", "euler"],
        "guided": ["--guidance", "4"]}.items()}
    for x in out.values():
        assert np.isfinite(x).all()
    np.testing.assert_allclose(out["full"], base, atol=1e-6)  # top-2 of 2 experts is the full ensemble
    np.testing.assert_allclose(out["thr_all"], base, atol=1e-6)  # a zero threshold keeps everyone
    np.testing.assert_allclose(out["thr_argmax"], out["top1"], atol=1e-6)  # a high one keeps the argmax only
    for name in ("top1", "sample1", "euler", "guided"):
        assert np.abs(out[name] - base).max() > 1e-3, name


def test_quality_command(run, capsys, tmp_cache):
    import re

    import torch

    from diffswarm.data import Partition
    from diffswarm.eval import get_classifier, quality_report
    from diffswarm.training.jobs import dataset_for_partition

    q = _generate(run, "q")
    capsys.readouterr()
    assert main(["quality", str(run / "q.npz"), "--partition", str(run / "p.json")]) == 0
    printed = capsys.readouterr().out
    part = Partition.load(run / "p.json")
    train, test = dataset_for_partition(part), dataset_for_partition(part, "test")
    want = quality_report(torch.from_numpy(q["samples"]), torch.from_numpy(q["labels"]), train, test,
                          get_classifier(train), part)
    fd, floor = map(float, re.search(r"FD ([\d.]+)\s+\(real-vs-real floor ([\d.]+)", printed).groups())
    assert fd == pytest.approx(want.fd, abs=0.01) and floor == pytest.approx(want.fd_floor, abs=0.01)
    assert f"class accuracy {100 * want.class_accuracy:.1f}%" in printed
    assert "cluster share samples/data: c0" in printed


def test_prepare_trains_the_quality_classifier_once_and_quality_then_loads_it(run, capsys, tmp_cache):
    """`diffswarm prepare` (what scripts/setup.sh runs) trains and caches the dataset's classifier; a second run
    finds it, and `quality` scores with that very file instead of training another."""
    import re

    from diffswarm.data import DatasetSpec
    from diffswarm.eval.classifier import Classifier, classifier_path

    assert main(["prepare", "--dataset", "digits"]) == 0
    first = capsys.readouterr().out
    path = classifier_path(DatasetSpec("digits").resolved().load("train"))
    assert "trained in" in first and str(path) in first and path.parent == tmp_cache
    acc = float(re.search(r"test accuracy ([\d.]+)%", first).group(1))
    assert acc == pytest.approx(100 * Classifier.load(path).test_accuracy, abs=0.05) and acc > 80
    stamp = path.stat().st_mtime_ns
    assert main(["prepare", "--dataset", "digits"]) == 0
    assert "already cached" in capsys.readouterr().out
    _generate(run, "qp")
    assert main(["quality", str(run / "qp.npz"), "--partition", str(run / "p.json")]) == 0
    assert path.stat().st_mtime_ns == stamp  # loaded, not retrained


def test_resume_and_init_from(run):
    import torch

    from diffswarm.experts.checkpoint import load_expert_file

    p = str(run / "p.json")
    assert main(["train", "--partition", p, "--cluster", "1", "--objective", "fm", "--steps", "30",
                 "--out", str(run / "c1"), "--resume", *TINY]) == 0
    log = [json.loads(x) for x in (run / "c1" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 30
    job = json.loads((run / "c1" / "job.json").read_text())  # the whole job is written beside the checkpoint
    assert job["train"]["steps"] == 30 and job["train"]["resume"] is True and job["objective"] == "fm"
    # --init-from copies the DDPM expert's trunk: one step later the trunk is still next to it, a fresh run's is not
    ddpm = load_expert_file(run / "c0" / "expert.safetensors")[1]
    one = [*TINY, "--steps", "1", "--lr", "1e-4"]
    assert main(["train", "--partition", p, "--cluster", "1", "--objective", "fm", "--out", str(run / "c1i"),
                 "--init-from", str(run / "c0" / "expert.safetensors"), "--seed", "9", *one]) == 0
    assert main(["train", "--partition", p, "--cluster", "1", "--objective", "fm", "--out", str(run / "c1s"),
                 "--seed", "9", *one]) == 0

    def trunk_distance(path) -> float:
        w = load_expert_file(path)[1]
        return sum(float((w[k] - ddpm[k]).abs().sum()) for k in w if not k.startswith("out."))

    scratch = trunk_distance(run / "c1s" / "expert.safetensors")
    assert trunk_distance(run / "c1i" / "expert.safetensors") < 0.01 * scratch
    assert torch.isfinite(load_expert_file(run / "c1i" / "expert.safetensors")[1]["out.weight"]).all()


def test_clear_errors(run, capsys):
    assert main(["train", "--partition", str(run / "p.json"), "--cluster", "5", "--out", str(run / "x")]) == 2
    assert "--cluster" in capsys.readouterr().err
    assert main(["generate", "--local", str(run / "c0" / "expert.safetensors"), str(run / "nope.safetensors"),
                 "--router", str(run / "router.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # an FM checkpoint is not a valid --init-from source
    assert main(["train", "--partition", str(run / "p.json"), "--cluster", "1", "--objective", "fm", "--steps", "2",
                 "--init-from", str(run / "c1" / "expert.safetensors"), "--out", str(run / "y"), *TINY]) == 2


def test_generate_with_the_statistics_router_needs_no_router_file(run, capsys):
    """`train` wrote each cluster's statistics beside its expert: `generate --local` without --router routes with
    them (auto), the same as --router-kind stats, and differently from the trained router."""
    experts = [str(run / "c0" / "expert.safetensors"), str(run / "c1" / "expert.safetensors")]
    common = [*experts, "--n", "6", "--steps", "5", "--class", "3", "--class", "7", "--seed", "5", "--routing",
              "top-k", "--k", "1"]
    assert main(["generate", "--local", *common, "--output", str(run / "s.png"), "--save-samples",
                 str(run / "s.npz")]) == 0
    assert main(["generate", "--local", *common, "--router-kind", "stats", "--output", str(run / "s2.png"),
                 "--save-samples", str(run / "s2.npz")]) == 0
    auto, stats = np.load(run / "s.npz")["samples"], np.load(run / "s2.npz")["samples"]
    trained = _generate(run, "t", "--seed", "5", "--routing", "top-k", "--k", "1")["samples"]
    np.testing.assert_array_equal(auto, stats)
    assert not np.array_equal(stats, trained)
    capsys.readouterr()
    assert main(["generate", "--local", *common, "--router-kind", "stats", "--router", str(run / "router.safetensors"),
                 "--output", str(run / "x.png")]) == 2
    assert "--router has no effect with --router-kind stats" in capsys.readouterr().err
