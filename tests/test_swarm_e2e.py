"""End to end on 127.0.0.1: a bootstrap node and peers as separate processes, and a client.

The module's swarm: bootstrap (serves the router) + peer0 (c0, DDPM) + peer1 and peer1b (two
replicas of c1, FM, same checkpoint) + peer2 (c2, DDPM). All nodes listen on 127.0.0.1 with NAT
traversal and relays off (``--loopback`` / ``NetworkConfig.loopback``). The test that kills peers
runs last. Every process is stopped and its p2pd sockets removed at the end.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hivemind.p2p import P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.timed_storage import get_dht_time

from diffswarm.client.answer_checks import TrustConfig
from diffswarm.client.client import SwarmClient
from diffswarm.client.config import ClientConfig
from diffswarm.dht.entries import experts_key
from diffswarm.dht.node import NetworkConfig, SwarmDHT
from diffswarm.peer.servicer import ExpertServicer
from diffswarm.protocol.wire import NAMESPACE, encode_request, request_metadata
from diffswarm.router.local import generate, load_local_ensemble
from diffswarm.router.routing import NoExpertsError, RoutingConfig
from diffswarm.sampling.config import SamplingConfig
from diffswarm.swarm.local import LocalSwarm, PeerSpec, _alive, _spawn, start_local_swarm
from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm

pytestmark = pytest.mark.slow


def euler(steps: int, seed: int) -> SamplingConfig:
    """Euler: one evaluation per step, so "after step 2" means the same evaluation to the swarm run and to its
    local replay (the failover tests count evaluations)."""
    return SamplingConfig(steps=steps, sampler="euler", guidance=2.0, seed=seed)


OBJECTIVES = ["ddpm", "fm", "ddpm"]
SHAPE = (1, 8, 8)
LABELS = torch.tensor([0, 1, 2, 3, -1, 0, 1, 2])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    experts, router = make_toy_swarm(d, ToySwarmSpec(OBJECTIVES, size=8, width=32, depth=1, steps=10))
    return d, experts, router


@pytest.fixture(scope="module")
def swarm(toy):
    d, experts, router = toy
    specs = [PeerSpec("peer0", str(experts[0])), PeerSpec("peer1", str(experts[1])),
             PeerSpec("peer1b", str(experts[1])), PeerSpec("peer2", str(experts[2]))]
    sw = start_local_swarm(specs, str(router), d / "run", threads=1, timeout=150, announce_period=2.0)
    try:
        yield sw
    finally:
        sw.stop(timeout=15)
        for p in sw.procs:
            assert not _alive(p.pid), f"{p.name} still running"
            info = json.loads(Path(p.info).read_text()) if os.path.exists(p.info) else {}
            for sock in info.get("sockets", []):
                assert not os.path.exists(sock)


def client_config(toy, sw: LocalSwarm, **kw) -> ClientConfig:
    return ClientConfig(swarm=sw.swarm, net=NetworkConfig.loopback(client_mode=True), cache_dir=str(toy[0] / "cache"),
                        call_timeout=5.0, connect_timeout=30.0, **kw)


def local_samples(toy, routing, seed, steps=8, unavailable_after=None, drop=()):
    """Local generation with the same experts; optionally make clusters ``drop`` unavailable from
    step ``unavailable_after + 1`` on (what the swarm client sees after a peer dies)."""
    _, experts, router = toy
    model = load_local_ensemble(experts, router, routing, seed=seed)
    if unavailable_after is not None:
        calls = {"n": 0}
        base = model.available

        def available():
            step = calls["n"]
            calls["n"] += 1
            avail = base().clone()
            if step > unavailable_after:
                avail[list(drop)] = False
            return avail

        model.available = available
    return generate(model, LABELS, SHAPE, euler(steps, seed))


def name_of(sw: LocalSwarm, peer_id: str) -> str:
    for p in sw.procs:
        info = sw.info(p.name)
        if info and info["peer_id"] == peer_id:
            return p.name
    raise KeyError(peer_id)


# ---------------------------------------------------------------------------------------------


def test_swarm_generation_matches_local(swarm, toy):
    routing = RoutingConfig("top-k", 2)
    events = []
    with swarm.client(routing, seed=3, config=client_config(toy, swarm)) as model:
        assert model.client.view.coverage() == [1, 2, 1]
        assert model.expert_ids == ["c0-ddpm", "c1-fm", "c2-ddpm"]
        x = generate(model, LABELS, SHAPE, euler(8, 3), callback=lambda i: events.extend(i.events))
        assert model.calls.sum() == 8 * 8 * 2  # every row evaluated by its top-2 experts, every (Euler) step
    want = local_samples(toy, routing, 3)
    assert torch.allclose(x, want, atol=1e-5), (x - want).abs().max()
    assert not any("failed" in e for e in events)


def test_a_trained_peer_announces_joining_then_online_then_offline(swarm, toy, tmp_path):
    from diffswarm.data import load_dataset, make_partition

    part = make_partition(load_dataset("digits", "train"), 2, seed=0)
    part.source = {"name": "digits", "root": None, "size": None, "channels": None}
    part.save(tmp_path / "partition.json")
    args = ["--initial-peers", *swarm.initial_peers, "--swarm", swarm.swarm, "--threads", "1",
            "--announce-period", "0.5", "--partition", str(tmp_path / "partition.json"), "--cluster", "1",
            "--objective", "fm",  # a time budget, not a step count: long enough to be seen joining on any machine
            "--minutes", "0.25", "--width", "32", "--depth", "1", "--batch", "32", "--out", str(tmp_path / "c1")]
    proc, pop = _spawn("trainer", args, toy[0] / "run", dict(os.environ, PYTHONUNBUFFERED="1"))
    swarm.procs.append(proc)
    swarm._popens[proc.pid] = pop
    seen = []

    async def watch():
        node = await SwarmDHT.create(NetworkConfig.loopback(swarm.initial_peers, client_mode=True), swarm.swarm)
        try:
            deadline = time.monotonic() + 180  # a bound on a hang only: 15 s of training plus start and shutdown
            while time.monotonic() < deadline:
                info = swarm.info("trainer")
                recs, _ = await node.get_experts()
                mine = [r for r in recs if info and r.peer_id == info["peer_id"]]
                for r in mine:
                    if not seen or seen[-1] != r.state:
                        seen.append(r.state)
                if seen and seen[-1] == "online" and pop.poll() is None:
                    os.kill(pop.pid, signal.SIGTERM)  # clean shutdown: must announce offline
                if seen and seen[-1] == "offline":
                    return
                await asyncio.sleep(0.2)
        finally:
            await node.shutdown()

    asyncio.run(watch())
    assert pop.wait(60) == 0
    assert seen[0] == "joining" and "online" in seen and seen[-1] == "offline", seen


def test_malformed_requests_get_errors_and_the_peer_keeps_serving(swarm, toy):
    info = swarm.info("peer0")
    with SwarmClient(swarm.initial_peers, client_config(toy, swarm)) as client:
        stub = ExpertServicer.get_stub(client.dht.p2p, PeerID.from_base58(info["peer_id"]), namespace=NAMESPACE)
        x, t, labels = torch.randn(2, *SHAPE), torch.rand(2), torch.tensor([0, 1])

        def call(uid="c0-ddpm", tensors=None, meta=None):
            req = runtime_pb2.ExpertRequest(uid=uid, tensors=tensors or encode_request(uid, x, t, labels, 2.0),
                                            metadata=request_metadata(2.0) if meta is None else meta)
            return client.run(stub.rpc_velocity(req, timeout=10))

        with pytest.raises(P2PHandlerError, match=r"expects \(B, 1, 8, 8\)"):
            call(tensors=encode_request("c0-ddpm", torch.randn(2, 1, 8, 9), t, labels, 2.0))
        with pytest.raises(P2PHandlerError, match="msgpack"):
            call(meta=b"\xc1\xc1")
        with pytest.raises(P2PHandlerError, match="NaN"):
            call(tensors=encode_request("c0-ddpm", torch.full((2, *SHAPE), float("nan")), t, labels, 2.0))
        with pytest.raises(P2PHandlerError, match="does not serve expert"):
            call(uid="c9-fm")
        with pytest.raises(P2PHandlerError, match=r"\[diffswarm:refused\] .*not a valid ExpertRequest protobuf"):
            client.run(client.dht.p2p._client.call_unary_handler(
                PeerID.from_base58(info["peer_id"]), f"{NAMESPACE}::ExpertServicer.rpc_velocity", b"\xff" * 64))
        resp = call()  # still serving
        assert tuple(resp.tensors[0].size) == (2, *SHAPE)
    assert _alive(info["pid"])


def test_forged_record_for_a_running_peer_is_rejected(swarm):
    target = swarm.info("peer0")["peer_id"]

    async def forge():
        node = await SwarmDHT.create(NetworkConfig.loopback(swarm.initial_peers), swarm.swarm)
        try:
            recs, _ = await node.get_experts()
            genuine = next(r for r in recs if r.peer_id == target)
            key = experts_key(swarm.swarm, genuine.cluster)
            found = await node.node.get(key, latest=True)
            subkey = next(sk for sk, v in found.value.items() if v.value["peer_id"] == target)
            fake = {**genuine.to_dict(), "throughput": 1e12, "updated": get_dht_time() + 5}
            stored = await node.node.store(key, fake, get_dht_time() + 300, subkey=subkey)
            after, _ = await node.get_experts()
            return stored, genuine, next(r for r in after if r.peer_id == target)
        finally:
            await node.shutdown()

    stored, genuine, after = asyncio.run(forge())
    assert stored is False
    # the forged figure never appears (the peer's own heartbeat may have refreshed its real throughput meanwhile)
    assert after.throughput != 1e12 and after.checkpoint_sha256 == genuine.checkpoint_sha256


def test_swarm_survives_killed_peers_and_fails_clearly_when_none_is_left(swarm, toy):
    # 1. full routing: every step calls every cluster; kill the c1 replica in use after step 2:
    #    the client retries the same rows on the other replica (same weights: same images)
    events = []
    # no random cross-checks (first answers and the last step's are still checked, before and after the kill): a
    # check of the dead replica's call would answer from its partner instead of "retrying", and this test is
    # about failover
    no_random = TrustConfig(verify_share=0.0, new_peer_rate=0.0)
    with swarm.client(RoutingConfig("full"), seed=5, config=client_config(toy, swarm, trust=no_random)) as model:

        def kill_c1(info):
            events.extend(info.events)
            if info.step == 2:
                dead = model.in_use[1]
                swarm.kill(name_of(swarm, dead))
                model.client.latency[dead] = 0.0  # the client still thinks it is the fastest replica

        x = generate(model, LABELS, SHAPE, euler(8, 5), callback=kill_c1)
    assert any("retrying" in e for e in events), "\n".join(events)
    assert torch.allclose(x, local_samples(toy, RoutingConfig("full"), 5), atol=1e-5)

    # 2. top-2: kill c2's only peer after step 2: its rows go to their next-ranked experts
    #    (without the client's own copy of c2's weights: local_fallback off)
    events = []
    no_fallback = client_config(toy, swarm, trust=TrustConfig(local_fallback=False))
    with swarm.client(RoutingConfig("top-k", 2), seed=7, config=no_fallback) as model:
        def kill_c2(info):
            events.extend(info.events)
            if info.step == 2:
                swarm.kill("peer2")

        x = generate(model, LABELS, SHAPE, euler(8, 7), callback=kill_c2)
        # noticed by the failed call ("no replica left") or, if its DHT record lapsed first, by the view
        assert any("no replica left for cluster 2" in e or "clusters [2] have no usable peer" in e
                   for e in events), "\n".join(events)
        want = local_samples(toy, RoutingConfig("top-k", 2), 7, unavailable_after=2, drop=[2])
        assert torch.allclose(x, want, atol=1e-5), (x - want).abs().max()

        # 3. nobody left: a clear error naming the uncovered clusters
        for name in ("peer0", "peer1", "peer1b"):
            swarm.kill(name)
        with pytest.raises(NoExpertsError, match=r"clusters 0, 1, 2 are uncovered"):
            generate(model, LABELS, SHAPE, euler(4, 7))


def test_swarm_up_generate_down_cli(toy, tmp_path):
    """`diffswarm swarm up --checkpoints ...`, `diffswarm generate` over it, `diffswarm swarm down`."""
    _, experts, router = toy
    run = tmp_path / "run"
    env = dict(os.environ, DIFFSWARM_CACHE=str(tmp_path / "cache"))
    cli = [sys.executable, "-m", "diffswarm"]
    up = subprocess.run([*cli, "swarm", "up", "--run-dir", str(run), "--checkpoints", *map(str, experts),
                         "--router", str(router), "--timeout", "120"], check=False, env=env, capture_output=True,
                        text=True, timeout=180)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "/ip4/127.0.0.1/tcp/" in up.stdout
        name = LocalSwarm.load(run).swarm  # NAME@FINGERPRINT of the owner key swarm up made in its run dir
        assert name.startswith("diffswarm@") and f"swarm {name} is up" in up.stdout and (run / "owner.key").exists()
        gen = subprocess.run([*cli, "generate", "--run-dir", str(run), "--n", "8", "--steps", "8", "--seed", "3",
                              "--class", "0", "--class", "1", "--class", "2", "--class", "3", "--class", "-1",
                              "--output", str(tmp_path / "grid.png"), "--save-samples", str(tmp_path / "s.npz")],
                             check=False, env=env, capture_output=True, text=True, timeout=120)
        assert gen.returncode == 0, gen.stdout + gen.stderr
        assert "over the swarm" in gen.stdout
    finally:
        state = LocalSwarm.load(run) if (run / "swarm.json").exists() else None
        down = subprocess.run([*cli, "swarm", "down", "--run-dir", str(run)], check=False, env=env,
                              capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
    assert state is not None and not any(_alive(p.pid) for p in state.procs)
    import numpy as np

    samples = torch.from_numpy(np.load(tmp_path / "s.npz")["samples"])
    labels = torch.tensor([0, 1, 2, 3, -1, 0, 1, 2])
    want = generate(load_local_ensemble(experts, router, RoutingConfig("top-k", 2), seed=3), labels, SHAPE,
                    SamplingConfig(steps=8, guidance=2.0, seed=3))  # the CLI default sampler
    assert torch.allclose(samples, want.clamp(-1, 1), atol=1e-5)
