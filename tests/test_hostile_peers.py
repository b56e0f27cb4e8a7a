"""Hostile peers as real processes on 127.0.0.1: generations with a liar in the swarm equal clean runs.

The swarm: bootstrap (router) + one honest peer per cluster of three toy experts + one hostile peer
(``python -m diffswarm.testing.hostile``) serving cluster 1's real checkpoint, same sha256, whose lying mode
is switched between generations through its mode file. Every generation is compared with a local run of
the same experts. The client holds no weights of its own: it fetches the checkpoint it needs to
arbitrate over ``rpc_checkpoint`` and checks its hash.
"""

from __future__ import annotations

import time

import pytest
import torch

from diffswarm.client.answer_checks import TrustConfig
from diffswarm.client.config import ClientConfig
from diffswarm.dht.node import NetworkConfig
from diffswarm.router.local import generate, load_local_ensemble
from diffswarm.router.routing import RoutingConfig
from diffswarm.sampling.config import SamplingConfig
from diffswarm.swarm.local import PeerSpec, start_local_swarm
from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm

pytestmark = pytest.mark.slow

SHAPE = (1, 8, 8)
LABELS = torch.tensor([0, 1, 2, 3, -1, 0, 1, 2])
SAMPLING = SamplingConfig(steps=6, guidance=2.0, seed=11)


@pytest.fixture(scope="module")
def hostile_swarm(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    experts, router = make_toy_swarm(d, ToySwarmSpec(["ddpm", "fm", "ddpm"], size=8, width=32, depth=1, steps=10))
    mode_file = d / "mode"
    mode_file.write_text("honest")
    specs = [PeerSpec(f"peer{k}", str(p)) for k, p in enumerate(experts)]
    specs.append(PeerSpec("liar", str(experts[1]),
                          program=["diffswarm.testing.hostile", "--mode-file", str(mode_file), "--"]))
    sw = start_local_swarm(specs, str(router), d / "run", threads=1, timeout=150, announce_period=2.0)
    try:
        yield sw, d, experts, router, mode_file
    finally:
        sw.stop(timeout=15)


def clean_run(experts, router):
    return generate(load_local_ensemble(experts, router, RoutingConfig("top-k", 2), seed=1), LABELS, SHAPE, SAMPLING)


def swarm_run(sw, d, tag: str, trust: TrustConfig | None = None):
    cfg = ClientConfig(swarm=sw.swarm, net=NetworkConfig.loopback(client_mode=True), cache_dir=str(d / f"cache-{tag}"),
                       call_timeout=3.0, connect_timeout=30.0, trust=trust or TrustConfig())
    events = []
    with sw.client(RoutingConfig("top-k", 2), seed=1, config=cfg) as model:
        x = generate(model, LABELS, SHAPE, SAMPLING, callback=lambda i: events.extend(i.events))
        liar = sw.info("liar")["peer_id"]
        honest = [sw.info(f"peer{k}")["peer_id"] for k in range(3)]
        now = time.monotonic()
        banned_honest = [p for p in honest if p in model.liars or model.client.bans.is_banned(p, now)]
        # caught lying, or (a corrupted batch that breaks the peer's own split: `shape`) failed and struck
        caught = liar in model.liars or (tag == "shape" and bool(model.client.bans.strikes.get(liar)))
        return x, events, caught, banned_honest, model


@pytest.mark.parametrize("mode", ["nan", "huge", "scale:1.5", "negate", "zero", "random", "noise:0.2", "row0",
                                  "shape", "other:OTHER"])
def test_a_lying_replica_never_spoils_the_image(hostile_swarm, mode):
    sw, d, experts, router, mode_file = hostile_swarm
    mode_file.write_text(mode.replace("OTHER", str(experts[0])))
    # Every check's partner is another replica (never the client's own copy): cluster 1's first answer is then
    # cross-checked between the two replicas whichever of them the client calls, so the liar answers at least once.
    # With the default share (a quarter of checks by the client's own copy) the client sometimes called only the
    # honest replica and checked it only against its own copy: a correct image, but nothing to catch (a CI run).
    x, events, caught, banned_honest, _ = swarm_run(sw, d, mode.split(":")[0], TrustConfig(local_check_share=0.0))
    want = clean_run(experts, router)
    assert torch.allclose(x, want, atol=1e-5), f"{mode}: max diff {float((x - want).abs().max())}\n" + "\n".join(events)
    assert caught, "\n".join(events)
    assert banned_honest == [], events


def test_an_honest_run_with_the_hostile_process_honest(hostile_swarm):
    sw, d, experts, router, mode_file = hostile_swarm
    mode_file.write_text("honest")
    x, events, caught, banned_honest, model = swarm_run(sw, d, "honest")
    assert torch.allclose(x, clean_run(experts, router), atol=1e-5)
    assert not caught and banned_honest == [] and model.unverified == 0
    assert model.checks >= 1  # first answers were cross-checked


def test_a_cluster_whose_only_peer_lies_is_computed_with_its_fetched_weights(hostile_swarm):
    """Cluster 1's honest peer dies: the liar is the only one left. The client fetches the real checkpoint
    (from the liar itself: the bytes must hash to the announced sha256), catches the lie, and computes the
    cluster with the verified weights."""
    sw, d, experts, router, mode_file = hostile_swarm
    mode_file.write_text("negate")
    sw.kill("peer1")
    x, events, caught, banned_honest, model = swarm_run(sw, d, "alone")
    assert torch.allclose(x, clean_run(experts, router), atol=1e-5), "\n".join(events)
    assert caught and model.local_rows > 0
