"""Hidden liars (issue 19) as real processes on 127.0.0.1: colluding Sybils and a liar picking its noise levels.

Cluster 1 is served only by hostile processes (``python -m diffswarm.testing.hostile``) with its real checkpoint;
the client fetches that checkpoint (from the liars themselves: the hash decides) to check them. Each generation
uses a fresh client (no verified history) and must equal a clean local run. Catch rates over many generations:
``bench/hidden_liars.py`` (docs/security.md).
"""

from __future__ import annotations

import pytest
import torch

from diffswarm.client.answer_checks import TrustConfig, escape_probability
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
SAMPLING = SamplingConfig(steps=6, guidance=2.0, seed=11)  # 11 evaluations at t = 1, .833, .833, ..., .167
ROUTING = RoutingConfig("top-k", 2)
HOSTILE = "diffswarm.testing.hostile"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("hidden")
    experts, router = make_toy_swarm(d, ToySwarmSpec(["ddpm", "fm", "ddpm"], size=8, width=32, depth=1, steps=10))
    want = generate(load_local_ensemble(experts, router, ROUTING, seed=1), LABELS, SHAPE, SAMPLING)
    return d, experts, router, want


def swarm_with(d, experts, router, cluster1: list[PeerSpec], tag: str):
    specs = [PeerSpec("peer0", str(experts[0])), *cluster1, PeerSpec("peer2", str(experts[2]))]
    return start_local_swarm(specs, str(router), d / f"run-{tag}", threads=1, timeout=150, announce_period=2.0)


def generation(sw, d, tag: str, trust: TrustConfig):
    cfg = ClientConfig(swarm=sw.swarm, net=NetworkConfig.loopback(client_mode=True), cache_dir=str(d / f"cache-{tag}"),
                       call_timeout=3.0, connect_timeout=30.0, trust=trust)
    events: list[str] = []
    with sw.client(ROUTING, seed=1, config=cfg) as model:
        x = generate(model, LABELS, SHAPE, SAMPLING, callback=lambda i: events.extend(i.events))
        return x, set(model.liars), events


def test_colluding_sybils_are_both_caught_and_their_steps_recomputed(toy):
    """Two Sybils serve cluster 1's real checkpoint and return the same lie; with every check going to the client's
    own copy (local_check_share = 1) both are caught in one generation, and the image equals a clean run."""
    d, experts, router, want = toy
    sw = swarm_with(d, experts, router, [PeerSpec(f"sybil{s}", str(experts[1]), program=[
        HOSTILE, "--mode", "scale:1.5", "--"]) for s in "ab"], "sybils")
    try:
        x, liars, events = generation(sw, d, "sybils", TrustConfig(local_check_share=1.0))
        ids = {sw.info(f"sybil{s}")["peer_id"] for s in "ab"}
        honest = {sw.info(f"peer{k}")["peer_id"] for k in (0, 2)}
    finally:
        sw.stop(timeout=15)
    assert torch.allclose(x, want, atol=1e-5), "\n".join(events)
    assert ids <= liars and not honest & liars, "\n".join(events)


def test_a_liar_picking_its_noise_levels_is_caught_within_the_stated_bound(toy):
    """Cluster 1's only server lies (x1.5) on 4 of the 11 evaluations (t in (0.45, 0.7)), never the first nor the
    last. Each generation (fresh client) catches it with probability >= 1 - escape_probability (>= 77%); it
    escapes 6 generations with probability < 2e-4. The generation that catches it equals a clean run (its lies
    are recomputed)."""
    d, experts, router, want = toy
    bound = escape_probability(TrustConfig(), 4, 10, verified=3)
    assert bound ** 6 < 2e-4
    sw = swarm_with(d, experts, router, [PeerSpec("picky", str(experts[1]), program=[
        HOSTILE, "--mode", "scale:1.5", "--lie-t", "0.45:0.7", "--"])], "picky")
    try:
        picky = sw.info("picky")["peer_id"]
        for g in range(6):
            x, liars, events = generation(sw, d, f"picky-{g}", TrustConfig())
            if picky in liars:
                assert torch.allclose(x, want, atol=1e-5), "\n".join(events)
                return
    finally:
        sw.stop(timeout=15)
    pytest.fail("the picky liar escaped 6 generations")
