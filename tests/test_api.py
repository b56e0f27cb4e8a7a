"""The Python API as a new user meets it: docs/api.md's examples run as written (a tiny run directory and a local
swarm stand in for the user's), the diffusers pipeline exported from a swarm is the one exported from the run
directory, and a session leaves no daemon behind.

One module-wide toy: K = 2 experts (DDPM + FM, 8x8) laid out as ``diffswarm demo`` writes them
(``runs/demo/experts/c{k}-{objective}/``, ``runs/demo/router.safetensors``), served by a bootstrap (router) and two
peers on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from diffswarm.api import DiffswarmPipeline, load_run
from diffswarm.cli import main
from diffswarm.experts.checkpoint import CheckpointError, read_meta
from diffswarm.swarm.local import PeerSpec, start_local_swarm
from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm
from diffswarm.utils.signals import _children, _cmdline

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
HANG = 60.0  # seconds: a bound on a hang only


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    run = d / "runs" / "demo"
    make_toy_swarm(run / "experts", ToySwarmSpec(("ddpm", "fm"), size=8, width=32, depth=1, steps=10))
    shutil.move(run / "experts" / "router.safetensors", run / "router.safetensors")
    return d


@pytest.fixture(scope="module")
def swarm(workdir):
    run = workdir / "runs" / "demo"
    experts = sorted(run.glob("experts/*/expert.safetensors"))
    sw = start_local_swarm([PeerSpec(f"peer{i}", str(e)) for i, e in enumerate(experts)],
                           str(run / "router.safetensors"), workdir / "swarm", threads=1, timeout=150,
                           announce_period=2.0)
    try:
        yield sw
    finally:
        sw.stop(timeout=15)


def p2pd_children() -> list[int]:
    return [p for p in _children(os.getpid()) if any("p2pd" in a for a in _cmdline(p))]


def wait_no_p2pd() -> list[int]:
    deadline = time.monotonic() + HANG
    while (left := p2pd_children()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_api_page_runs_as_written(workdir, swarm, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("DIFFSWARM_CACHE", str(workdir / "cache"))
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 5
    before = set(p2pd_children())
    ns: dict = {}
    for code in blocks:
        code = re.sub(r'^SWARM = ".*"', f"SWARM = {swarm.swarm!r}", code, flags=re.M)
        code = re.sub(r"^PEERS = \[.*\]", f"PEERS = {list(swarm.initial_peers)!r}", code, flags=re.M)
        exec(compile(code, str(DOC), "exec"), ns)
    out = capsys.readouterr().out
    assert "Session(locally, experts=['c0-ddpm', 'c1-fm']" in out
    assert "step 3/3" in out and "['c0-ddpm', 'c1-fm'] [1, 1]" in out  # the callback; the swarm's coverage
    assert (workdir / "grid.png").exists() and (workdir / "pipe0.png").exists()
    first = ns["out"]  # the swarm generation: every step recorded, weights of 4 rows over K = 2 experts
    assert len(first.routing) == 4 and all(r.weights.shape == (4, 2) for r in first.routing)
    assert not set(wait_no_p2pd()) - before, "a session left its p2pd daemon running"


def test_export_from_the_swarm_is_the_run_directory_s_pipeline(workdir, swarm, tmp_path, monkeypatch, capsys):
    """`diffswarm export --swarm NAME --initial-peers MADDR` fetches each expert by its hash: the folder loads with
    from_pretrained and makes the images `diffswarm generate --local` makes."""
    monkeypatch.setenv("DIFFSWARM_CACHE", str(tmp_path / "cache"))
    run = workdir / "runs" / "demo"
    assert main(["export", str(tmp_path / "pipe"), "--swarm", swarm.swarm, "--initial-peers", *swarm.initial_peers,
                 "--loopback", "--k", "1"]) == 0
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "DiffswarmPipeline" and index["k"] == 1
    assert sorted(p.name for p in (tmp_path / "pipe").iterdir()) == ["expert_0", "expert_1", "model_index.json",
                                                                      "router"]
    experts = sorted(run.glob("experts/*/expert.safetensors"))
    for k, e in enumerate(experts):  # the checkpoints the peers serve, fetched and verified by their hash
        cfg = json.loads((tmp_path / "pipe" / f"expert_{k}" / "config.json").read_text())
        assert cfg["weights_sha256"] == read_meta(e)["weights_sha256"]
    assert main(["generate", "--local", *map(str, experts), "--router", str(run / "router.safetensors"), "--n", "6",
                 "--class", "all", "--steps", "3", "--k", "1", "--seed", "5", "--sampler", "euler",
                 "--output", str(tmp_path / "g.png"), "--save-samples", str(tmp_path / "g.npz")]) == 0
    import numpy as np

    want = torch.from_numpy(np.load(tmp_path / "g.npz")["samples"])
    pipe = DiffswarmPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    got = pipe(class_labels=[0, 1, 2, 3, 0, 1], num_inference_steps=3, sampler="euler", output_type="pt",
               generator=torch.Generator().manual_seed(5)).images
    assert torch.allclose(got * 2 - 1, want, atol=1e-5), (got * 2 - 1 - want).abs().max()


def test_connect_local_finds_the_swarm_by_its_run_directory(workdir, swarm, tmp_path):
    from diffswarm.api import connect_local

    with connect_local(workdir / "swarm", cache_dir=str(tmp_path / "cache")) as s:
        assert s.is_swarm and s.coverage() == [1, 1] and s.image_shape == (1, 8, 8)
    assert s.closed and not wait_no_p2pd()


def test_a_damaged_pipeline_folder_is_refused(workdir, tmp_path):
    from safetensors.torch import load_file, save_file

    from diffswarm.api import export_pipeline

    out = export_pipeline(tmp_path / "pipe", run=workdir / "runs" / "demo")
    with pytest.raises(ValueError, match="not an empty folder"):
        export_pipeline(out, run=workdir / "runs" / "demo")
    f = out / "expert_1" / "diffusion_pytorch_model.safetensors"
    w = load_file(f)
    name = sorted(w)[0]
    w[name] = w[name] + 1e-3
    save_file(w, f)
    with pytest.raises(CheckpointError, match="does not match"):
        DiffswarmPipeline.from_pretrained(out)


def test_a_half_precision_pipeline_is_refused_with_what_to_do(workdir, tmp_path):
    """diffusers' usual `torch_dtype=torch.float16`: float16 weights would meet float32 noise inside the experts;
    the pipeline says the experts answer in float32 instead of failing in a matmul."""
    from diffswarm.api import export_pipeline

    pipe = DiffswarmPipeline.from_pretrained(export_pipeline(tmp_path / "pipe", run=workdir / "runs" / "demo"),
                                             torch_dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="float32"):
        pipe(class_labels=[0], num_inference_steps=2, output_type="pt")
    images = pipe.to(torch.float32)(class_labels=[0], num_inference_steps=2, output_type="pt").images
    assert images.shape[0] == 1 and torch.isfinite(images).all()


def test_bad_options_are_value_errors(workdir):
    with load_run(workdir / "runs" / "demo") as s:
        for kw in ({"routing": "best"}, {"classes": 9}, {"classes": "Sneaker"}, {"steps": 0}, {"sampler": "rk4"},
                   {"n": 0}, {"k": 0}):
            with pytest.raises(ValueError):
                s.generate(**kw)
    with pytest.raises(RuntimeError, match="closed"):
        s.generate()
    from diffswarm.api import connect

    with pytest.raises(ValueError, match="fingerprint"):
        connect("diffswarm", ["/ip4/127.0.0.1/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"])


def test_a_run_exports_with_the_statistics_router(workdir, tmp_path):
    """`diffswarm export --router-kind stats`: the clusters' statistics travel as the router component, and the
    loaded pipeline makes the images of a statistics-routed session."""
    run = workdir / "runs" / "demo"
    assert main(["export", str(tmp_path / "pipe"), "--run", str(run), "--router-kind", "stats"]) == 0
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["router"] == ["diffswarm.api.components", "StatsRouterModel"]
    pipe = DiffswarmPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    got = pipe(class_labels=[0, 1, 2, 3], num_inference_steps=3, output_type="pt",
               generator=torch.Generator().manual_seed(2)).images
    with load_run(run, router_kind="stats") as s:
        want = s.generate(classes=[0, 1, 2, 3], steps=3, seed=2).samples
    with load_run(run) as s:
        trained = s.generate(classes=[0, 1, 2, 3], steps=3, seed=2).samples
    assert torch.allclose(got * 2 - 1, want, atol=1e-5), (got * 2 - 1 - want).abs().max()
    assert not torch.allclose(want, trained, atol=1e-3)
    again = DiffswarmPipeline(**pipe.components)  # diffusers' way of re-wrapping components
    assert len(again.experts) == 2 and again.config.routing == "top-k"  # it is the statistics router that routed them


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_pipeline_and_a_session_run_on_cuda(workdir, tmp_path):
    """Each expert answers in float32 on CUDA: the images are the CPU's up to float rounding."""
    from diffswarm.api import export_pipeline

    run = workdir / "runs" / "demo"
    pipe = DiffswarmPipeline.from_pretrained(export_pipeline(tmp_path / "pipe", run=run))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[0, 1, 2, 3], num_inference_steps=3, output_type="pt", routing="full")
    want = pipe(generator=torch.Generator().manual_seed(3), **kw).images
    got = pipe.to("cuda")(generator=torch.Generator().manual_seed(3), **kw).images
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert (got.cpu() - want).norm() / want.norm() < 0.1
    with load_run(run, device="cuda") as s:
        out = s.generate(classes=[0, 1], steps=3, seed=3, routing="full")
    assert out.samples.device.type == "cpu" and torch.isfinite(out.samples).all() and len(out.routing) == 3
