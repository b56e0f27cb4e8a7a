"""Swarm pieces without processes: selection, bans, swarm view, request checks, batching, and one
in-process peer + client for the streamed and float16 paths."""

import asyncio
import threading
import time
from collections import deque
from dataclasses import replace

import msgpack
import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from peer_harness import FakeSwarmClient

from diffswarm.client.discovery import SwarmTarget, SwarmView
from diffswarm.client.selection import Blacklist, Replica, expected_seconds, pick_replica
from diffswarm.dht.records import ExpertRecord
from diffswarm.peer.batching import Batcher, BatchPolicy, compute_batch, should_wait, take_batch
from diffswarm.protocol.wire import (
    MAX_UNARY_BYTES,
    ExpertSpec,
    RequestError,
    check_request,
    encode_request,
    payload_bytes,
    request_metadata,
)
from diffswarm.sampling.config import SamplingConfig


def rep(peer, thr=100.0, load=0.0, sha="a", cluster=0):
    return Replica(peer, "c0-fm", sha, cluster, thr, load)


# -- bans ----------------------------------------------------------------------------------------


def test_blacklist_backoff_doubles_caps_and_resets():
    b = Blacklist(base=1.0, factor=2.0, max_ban=5.0)
    assert [b.ban("p", 0.0) for _ in range(4)] == [1.0, 2.0, 4.0, 5.0]
    assert b.is_banned("p", 4.9) and not b.is_banned("p", 5.1)
    assert b.next_release(["p", "q"], 1.0) == 5.0
    b.success("p")
    assert not b.is_banned("p", 0.0) and b.ban("p", 10.0) == 1.0
    assert b.next_release(["q"], 0.0) is None


# -- replica choice ------------------------------------------------------------------------------


def test_pick_replica_prefers_fast_and_unloaded_peers():
    bans = Blacklist()
    reps = [rep("slow", thr=10.0), rep("fast", thr=1000.0), rep("busy", thr=1000.0, load=5000.0)]
    assert pick_replica(reps, {}, bans, 0.0, rows=8).peer_id == "fast"
    # measured latency outweighs announced throughput
    assert pick_replica(reps, {"fast": 2.0, "slow": 0.001}, bans, 0.0, rows=1).peer_id == "slow"
    assert expected_seconds(rep("x", thr=0.0), 1, None) > expected_seconds(rep("y", thr=1000.0), 1, None)


def test_pick_replica_skips_banned_and_excluded_and_stays_on_a_checkpoint():
    bans = Blacklist()
    reps = [rep("a", sha="s1"), rep("b", sha="s2", thr=1e6), rep("c", sha="s1")]
    bans.ban("a", 0.0)
    assert pick_replica(reps, {}, bans, 0.5, prefer_sha="s1").peer_id == "c"
    assert pick_replica(reps, {}, bans, 0.5, exclude=["c"], prefer_sha="s1").peer_id == "b"  # s1 gone: any
    assert pick_replica(reps, {}, bans, 0.5, exclude=["b", "c"]) is None
    assert pick_replica(reps, {}, bans, 2.0, exclude=["b", "c"]).peer_id == "a"  # ban over
    # the replica in use keeps its place unless another is clearly faster
    lat = {"a": 0.010, "c": 0.009}
    assert pick_replica(reps, lat, Blacklist(), 0.0, prefer_sha="s1").peer_id == "c"
    assert pick_replica(reps, lat, Blacklist(), 0.0, prefer_sha="s1", current="a").peer_id == "a"
    assert pick_replica(reps, {"a": 0.010, "c": 0.001}, Blacklist(), 0.0, prefer_sha="s1", current="a").peer_id == "c"
    # ties break on the peer id, so the choice is deterministic
    assert pick_replica([rep("z"), rep("y")], {}, Blacklist(), 0.0).peer_id == "y"


# -- swarm view ----------------------------------------------------------------------------------


def record(peer, cluster, state="online", **kw):
    base = dict(version=1, expert_id=f"c{cluster}-fm", cluster=cluster, num_clusters=2, partition_hash="ph",
                objective="fm", schedule="flow", image_shape=[1, 8, 8], num_classes=4, checkpoint_sha256="ab" * 32,
                software="0.1.0", protocol=1, state=state, progress=1.0, throughput=10.0, load=0.0, max_batch=64,
                peer_id=peer, addrs=[], updated=1.0)
    base.update(kw)
    return ExpertRecord(**base)


def test_swarm_view_keeps_matching_online_replicas():
    view = SwarmView(SwarmTarget(2, "ph", (1, 8, 8), 4))
    events = view.update([
        record("p0", 0), record("p1", 1), record("p2", 1, state="joining"), record("p3", 1, state="offline"),
        record("p4", 0, partition_hash="other"), record("p5", 0, image_shape=[3, 8, 8]), record("p6", 0, protocol=2),
        record("p7", 1, num_classes=10),
    ])
    assert view.coverage() == [1, 1]
    assert len(events) == 2 and all("online" in e for e in events)
    assert {k.split("/")[0][:2] for k in view.skipped} == {"p4", "p5", "p6", "p7"}
    assert [r.peer_id for r in view.joining] == ["p2"]
    # the most recent record of a peer wins: p1 goes offline
    events = view.update([record("p0", 0), record("p1", 1, state="offline", updated=2.0), record("p1", 1)])
    assert view.coverage() == [1, 0] and events == ["c1-fm at p1 left"]


def test_a_replica_missed_by_one_lookup_stays_for_the_grace_period():
    view = SwarmView(SwarmTarget(2, "ph", (1, 8, 8), 4), grace=10.0)
    view.update([record("p0", 0), record("p1", 1)], now=100.0)
    assert view.update([record("p0", 0)], now=105.0) == [] and view.coverage() == [1, 1]  # a lookup missed p1
    assert view.update([record("p0", 0)], now=111.0) == ["c1-fm at p1 left"] and view.coverage() == [1, 0]


def test_a_missed_replica_leaves_when_its_dht_record_lapses():
    # p1's record had 3 s left in the DHT when last seen: a lookup 4 s later that misses it means it lapsed
    # (its peer stopped re-announcing), so the view drops it with every other DHT reader, grace or not
    view = SwarmView(SwarmTarget(2, "ph", (1, 8, 8), 4), grace=20.0)
    view.update([record("p0", 0), record("p1", 1)], now=100.0, lifetimes={("p0", "c0-fm"): 30.0, ("p1", "c1-fm"): 3.0})
    assert view.update([record("p0", 0)], now=102.0) == [] and view.coverage() == [1, 1]  # within its lifetime
    assert view.update([record("p0", 0)], now=104.0) == ["c1-fm at p1 left"] and view.coverage() == [1, 0]
    assert view.update([record("p0", 0)], now=119.0) == [] and view.coverage() == [1, 0]  # p0 seen each time
    # a lookup that finds nothing at all failed: what was seen stays for the grace, lifetimes aside
    view.update([record("p0", 0), record("p1", 1)], now=200.0, lifetimes={("p0", "c0-fm"): 3.0, ("p1", "c1-fm"): 3.0})
    assert view.update([], now=210.0) == [] and view.coverage() == [1, 1]
    assert view.update([record("p0", 0)], now=211.0) == ["c1-fm at p1 left"]  # a real lookup: p1's record lapsed
    assert view.update([], now=232.0) == ["c0-fm at p0 left"] and view.coverage() == [0, 0]  # past the grace


def test_an_idle_client_refreshes_less_often_and_catches_up_when_used(monkeypatch):
    """Refreshes every ``period`` while the client samples, every ``idle_period`` once it has been idle for
    ``IDLE_AFTER``; the first tick after it is used again refreshes at once."""
    from diffswarm.client import refresh as refresh_mod
    from diffswarm.client.refresh import PeerDiscovery

    monkeypatch.setattr(refresh_mod, "IDLE_AFTER", 0.2)
    monkeypatch.setattr(refresh_mod, "FULL_EVERY", 0.1)
    lookups = []  # (time, newest) of each lookup

    class DHT:
        async def get_experts_expiring(self, clusters, newest=True):
            lookups.append((time.monotonic(), newest))
            return [], [], {}

    async def scenario():
        d = PeerDiscovery(DHT(), None, Blacklist(), {}, deque())
        task = asyncio.get_running_loop().create_task(d.refresh_loop(0.02, idle_period=60.0))
        try:
            for _ in range(25):  # in use: a call every 20 ms for ~0.5 s
                d.mark_used()
                await asyncio.sleep(0.02)
            busy = len(lookups)
            await asyncio.sleep(0.4)  # idle for longer than IDLE_AFTER
            n = len(lookups)
            await asyncio.sleep(1.0)  # then 1 s of 50 ticks: no lookup (the idle period is 60 s)
            idle = len(lookups) - n
            n = len(lookups)
            d.mark_used()
            for _ in range(500):  # used again: the next tick refreshes
                await asyncio.sleep(0.01)
                if len(lookups) > n:
                    break
            return busy, idle, len(lookups) - n
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    busy, idle, again = asyncio.run(scenario())
    assert busy >= 3, busy  # ~25 ticks of 20 ms; a loaded machine stretches them, never to 3
    assert idle == 0, idle
    assert again >= 1
    # every storing node's answer merged at least every FULL_EVERY, the cheaper first answer in between, and the
    # first refresh after the idle spell a full one
    full = [ts for ts, newest in lookups[:busy] if newest]
    assert full and len(full) < busy, lookups
    assert all(b - a >= 0.1 for a, b in zip(full, full[1:], strict=False))
    assert lookups[busy][1] is True


def test_peer_records_announce_the_training_summary():
    """Online: the served checkpoint's summary; joining: the current step and loss."""
    from types import SimpleNamespace

    from diffswarm.experts.config import ExpertConfig, NetConfig
    from diffswarm.experts.expert import Expert
    from diffswarm.peer.announce import ExpertStatus, make_expert_record
    from diffswarm.peer.config import PeerConfig
    from diffswarm.peer.hosted import ServedExpert
    from diffswarm.peer.server import Peer

    cfg = ExpertConfig(objective="fm", net=NetConfig(kind="mlp", size=8, width=8, depth=1, num_classes=3),
                       cluster=0, num_clusters=2, partition_hash="ph")
    peer = Peer(PeerConfig())
    peer.dht = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: "QmPeer"))  # records() only needs the id
    peer.training_cfg, peer.progress, peer.train_step, peer.train_loss = cfg, 0.3, 30, 0.5
    [joining] = peer.records()
    assert (joining.state, joining.train_steps, joining.final_loss) == ("joining", 30, 0.5)

    expert = Expert(cfg, summary={"steps": 100, "final_loss": 0.25, "n_train": 64})
    expert.weights_sha256 = "ab" * 32
    peer.served = {expert.expert_id: ServedExpert(expert, BatchPolicy(max_rows=64))}
    peer.state = "online"
    [online] = peer.records()
    assert (online.state, online.train_steps, online.final_loss) == ("online", 100, 0.25)
    assert ExpertRecord.from_dict(online.to_dict()) == online

    expert.summary = {}  # an older checkpoint without a summary
    assert peer.records()[0].train_steps is None and peer.records()[0].final_loss is None
    # no step done yet (the trainer's loss starts as NaN): announced as unknown, not as an invalid record
    rec = make_expert_record(cfg, ExpertStatus("joining", train_steps=0, final_loss=float("nan")), "QmPeer", [])
    assert rec.final_loss is None and ExpertRecord.from_dict(rec.to_dict()).train_steps == 0


def test_router_only_peer_announces_the_routers_dataset(tmp_path):
    """The bootstrap of a local swarm serves the router and no expert: the dataset id comes from the router."""
    from types import SimpleNamespace

    from diffswarm.peer.config import PeerConfig
    from diffswarm.peer.hosted import RouterBlob
    from diffswarm.peer.server import Peer
    from diffswarm.router.model import Router, RouterConfig

    path = tmp_path / "router.safetensors"
    Router(RouterConfig(num_clusters=2, num_classes=10, size=8, width=16, dataset_id="fashion:8")).save(path)
    from diffswarm.dht.names import SwarmName

    peer = Peer(PeerConfig())
    peer.dht = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: "QmPeer"))
    peer.router = RouterBlob(path)
    peer.swarm = SwarmName("fashion", "0" * 32)
    fields = peer.manifest_fields()
    assert fields["dataset_id"] == "fashion:8" and fields["num_clusters"] == 2 and not peer.served
    assert fields["swarm"] == "fashion" and fields["router_bytes"] == path.stat().st_size
    prov = peer.provider_record()
    assert (prov.router_sha256, prov.peer_id) == (peer.router.sha256, "QmPeer")


# -- request checks ------------------------------------------------------------------------------

SPEC = ExpertSpec("c0-fm", (1, 8, 8), 4, max_rows=64)


def request(x=None, t=None, labels=None, meta=None, uid="c0-fm"):
    x = torch.randn(3, 1, 8, 8) if x is None else x
    t = torch.rand(3) if t is None else t
    labels = torch.tensor([0, -1, 3]) if labels is None else labels
    tensors = [serialize_torch_tensor(x), serialize_torch_tensor(t), serialize_torch_tensor(labels)]
    return SPEC, uid, tensors, request_metadata(2.0) if meta is None else meta


def test_valid_request_decodes():
    req = check_request(*request())
    assert req.rows == 3 and req.guidance == 2.0 and req.labels.dtype == torch.long


@pytest.mark.parametrize("kw, message", [
    (dict(x=torch.randn(3, 1, 8, 9)), "expects"),
    (dict(x=torch.randn(3, 64)), "expects"),
    (dict(x=torch.randn(3, 1, 8, 8).double()), "dtype"),
    (dict(x=torch.full((3, 1, 8, 8), float("nan"))), "NaN"),
    (dict(t=torch.rand(2)), "shape"),
    (dict(t=torch.tensor([0.1, 2.0, 0.5])), r"\[0, 1\]"),
    (dict(labels=torch.tensor([0, 1, 9])), "labels"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0])), "dtype"),
    (dict(meta=b"\xc1garbage"), "msgpack"),
    (dict(meta=msgpack.packb({"protocol": 99, "guidance": 1.0})), "protocol"),
    (dict(meta=msgpack.packb({"protocol": 1, "guidance": float("inf")})), "guidance"),
    (dict(uid="c7-ddpm"), "serves expert"),
    (dict(x=torch.randn(65, 1, 8, 8), t=torch.rand(65), labels=torch.zeros(65, dtype=torch.long)), "rows"),
])
def test_malformed_requests_raise_clear_errors(kw, message):
    with pytest.raises(RequestError, match=message):
        check_request(*request(**kw))


def test_corrupt_buffer_and_wrong_tensor_count():
    spec, uid, tensors, meta = request()
    tensors[0].buffer = tensors[0].buffer[:-4]
    with pytest.raises(RequestError, match="deserialized"):
        check_request(spec, uid, tensors, meta)
    with pytest.raises(RequestError, match="3 tensors"):
        check_request(spec, uid, tensors[:2], meta)


# -- batching ------------------------------------------------------------------------------------


def test_take_batch_and_wait_policy():
    assert take_batch([10, 20, 30], 35) == 2
    assert take_batch([500, 1], 64) == 1  # an oversized request runs alone
    assert take_batch([], 64) == 0
    assert not should_wait(10.0, {"me": 9.9}, "me", 1.0)
    assert should_wait(10.0, {"me": 9.9, "other": 9.5}, "me", 1.0)
    assert not should_wait(10.0, {"me": 9.9, "other": 8.0}, "me", 1.0)


def _reqs():
    """Three decoded requests: (rows, guidance) = (2, 2.0), (3, 1.0), (1, 2.0)."""
    spec = ExpertSpec("e", (1, 2, 2), 4)
    out = []
    for b, g in [(2, 2.0), (3, 1.0), (1, 2.0)]:
        tensors = [serialize_torch_tensor(torch.randn(b, 1, 2, 2)), serialize_torch_tensor(torch.rand(b)),
                   serialize_torch_tensor(torch.zeros(b, dtype=torch.long))]
        out.append(check_request(spec, "e", tensors, request_metadata(g)))
    return out


def fake_velocity(calls):
    def velocity(x, t, labels, g):
        calls.append((x.shape[0], g))
        return x * g + t.reshape(-1, 1, 1, 1)
    return velocity


def test_compute_batch_groups_by_guidance_and_splits_back():
    reqs = _reqs()
    calls = []
    outs = compute_batch(fake_velocity(calls), reqs)
    assert sorted(calls) == [(3, 1.0), (3, 2.0)]
    for r, v in zip(reqs, outs, strict=True):
        assert torch.equal(v, r.x * r.guidance + r.t.reshape(-1, 1, 1, 1))


def test_batcher_merges_concurrent_clients_into_one_pass():
    reqs = _reqs()

    async def scenario():
        calls = []
        b = Batcher(fake_velocity(calls), BatchPolicy(max_rows=64, max_wait=0.05))
        b.last_seen = {"a": time.monotonic(), "b": time.monotonic()}  # two active clients
        b.start()
        outs = await asyncio.gather(b.submit(reqs[0], "a"), b.submit(reqs[2], "b"))
        await b.close()
        return calls, outs, b.pending_rows

    calls, outs, pending = asyncio.run(scenario())
    assert calls == [(3, 2.0)]  # 2 + 1 rows, same guidance: one forward pass
    assert [o[1].batch_rows for o in outs] == [3, 3] and pending == 0
    assert torch.equal(outs[1][0], reqs[2].x * 2.0 + reqs[2].t.reshape(-1, 1, 1, 1))


def test_batcher_stops_waiting_once_every_active_client_is_in():
    """With a 60 s batching wait, the two active clients' requests still run at once, in one pass: the wait ends
    when each client that called within the window has a request queued. A third client that called recently but
    sends nothing now is waited for: its absence keeps the pass open until the wait ends."""
    reqs = _reqs()

    async def scenario(clients: list[str]):
        calls = []
        b = Batcher(fake_velocity(calls), BatchPolicy(max_rows=64, max_wait=60.0))
        b.last_seen = {c: time.monotonic() for c in clients}
        b.start()
        try:
            both = asyncio.gather(b.submit(reqs[0], "a"), b.submit(reqs[2], "b"))
            done, _ = await asyncio.wait([both], timeout=3.0)
            return calls, bool(done)
        finally:
            await b.close()
            both.cancel()
            await asyncio.gather(both, return_exceptions=True)

    calls, answered = asyncio.run(scenario(["a", "b"]))
    assert answered and calls == [(3, 2.0)]
    calls, answered = asyncio.run(scenario(["a", "b", "c"]))
    assert not answered and calls == []  # still waiting for "c" after 3 s of the 60 s wait


def test_batcher_failure_fails_requests_not_the_worker():
    reqs = _reqs()

    async def scenario():
        state = {"n": 0}

        def flaky(x, t, labels, g):
            state["n"] += 1
            if state["n"] == 1:
                raise RuntimeError("boom")
            return x

        b = Batcher(flaky, BatchPolicy(max_wait=0))
        b.start()
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(reqs[0], "a")
        v, _ = await b.submit(reqs[1], "a")
        await b.close()
        return v, b.pending_rows

    v, pending = asyncio.run(scenario())
    assert torch.equal(v, reqs[1].x) and pending == 0


# -- one peer and one client in this process: streamed payloads, float16, info ---------------------


@pytest.fixture(scope="module")
def inproc_peer(tmp_path_factory):
    from diffswarm.dht.node import NetworkConfig
    from diffswarm.peer.config import PeerConfig
    from diffswarm.peer.server import Peer
    from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm

    d = tmp_path_factory.mktemp("inproc")
    experts, router = make_toy_swarm(d, ToySwarmSpec(["ddpm"], size=32, channels=3, width=16, steps=2))
    cfg = PeerConfig(net=NetworkConfig.loopback(), checkpoint=str(experts[0]), router=str(router), threads=1,
                     announce_period=60, batch_wait_ms=200)
    started = threading.Event()
    holder = {}

    def run():
        async def main():
            peer = Peer(cfg)
            holder["peer"], holder["loop"] = peer, asyncio.get_running_loop()
            await peer.start()
            await peer.serve()
            started.set()
            await peer.stop_event.wait()
            await peer.shutdown()

        asyncio.run(main())

    th = threading.Thread(target=run, daemon=True)
    th.start()
    assert started.wait(60), "in-process peer did not start"
    try:
        yield holder["peer"], experts[0]
    finally:
        holder["loop"].call_soon_threadsafe(holder["peer"].stop)
        th.join(30)


def test_streamed_and_float16_calls_match_the_local_expert(inproc_peer):
    from diffswarm.client.client import SwarmClient
    from diffswarm.client.config import ClientConfig
    from diffswarm.dht.node import NetworkConfig
    from diffswarm.experts.expert import Expert

    peer, path = inproc_peer
    expert = Expert.from_checkpoint(path)
    rows = 256  # 256 x 3 x 32 x 32 float32 = 3 MiB: above the unary limit, so it streams
    x = torch.randn(rows, 3, 32, 32)
    t = torch.rand(rows)
    labels = torch.randint(-1, 4, (rows,))
    assert payload_bytes(encode_request("c0-ddpm", x, t, labels, 2.0)) > MAX_UNARY_BYTES
    want = expert.velocity(x, t, labels, 2.0)
    r = Replica(peer.peer_id, "c0-ddpm", expert.weights_sha256, 0, 1.0, 0.0, tuple(peer.maddrs))
    cfg = ClientConfig(swarm=str(peer.swarm), net=NetworkConfig.loopback(client_mode=True),
                       cache_dir=str(path.parent.parent / "cache"))
    with SwarmClient(peer.maddrs, cfg) as client:
        v, meta = client.run(client.call_velocity(r, x, t, labels, 2.0, timeout=60))
        assert meta["rows"] == rows
        assert torch.allclose(v, want, atol=1e-5)
        client.cfg.compression = "float16"
        v16, _ = client.run(client.call_velocity(r, x[:8], t[:8], labels[:8], 2.0, timeout=30))
        assert torch.allclose(v16, want[:8], atol=0.05) and not torch.equal(v16, want[:8])
        info = client.run(client.info(peer.peer_id, peer.maddrs))
        assert info["experts"][0]["expert_id"] == "c0-ddpm" and info["manifest"]["num_clusters"] == 1
        assert info["router"]["router_sha256"] == info["manifest"]["router_sha256"] and info["swarm"] == str(peer.swarm)
        assert info["experts"][0]["train_steps"] == expert.summary["steps"] == 2  # the checkpoint's summary
        assert info["experts"][0]["final_loss"] == expert.summary["final_loss"]
        router, manifest = client.fetch_router()  # the founding peer's own swarm: it signed the manifest
        assert router.weights_sha256 == manifest.router_weights_sha256


# -- SwarmEnsemble failover logic over a fake network ---------------------------------------------


@pytest.fixture(scope="module")
def three_experts(tmp_path_factory):
    from diffswarm.experts.expert import Expert
    from diffswarm.router.model import Router
    from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm

    paths, router = make_toy_swarm(tmp_path_factory.mktemp("three"), ToySwarmSpec(["ddpm", "fm", "ddpm"], steps=2))
    return [Expert.from_checkpoint(p) for p in paths], Router.load(router), paths, router


def fake_swarm(three_experts, routing, replicas=(1, 2, 1)):
    from diffswarm.client.ensemble import SwarmEnsemble

    experts, router, _, _ = three_experts
    peers = {f"p{k}{r}": experts[k] for k in range(3) for r in range(replicas[k])}
    client = FakeSwarmClient(peers)
    ens = SwarmEnsemble(client, router, routing, seed=1)
    ph = router.cfg.partition_hash
    client.view.update([record(p, int(p[1]), num_clusters=3, partition_hash=ph, expert_id=e.expert_id,
                               checkpoint_sha256=e.weights_sha256) for p, e in peers.items()])
    return ens, client


def test_swarm_ensemble_fails_over_to_replicas_then_reroutes(three_experts):
    from diffswarm.router.local import generate, load_local_ensemble
    from diffswarm.router.routing import NoExpertsError, RoutingConfig

    _, _, paths, router_path = three_experts
    labels = torch.tensor([0, 1, 2, 3, -1, 0])
    routing = RoutingConfig("top-k", 2)
    s4 = SamplingConfig(steps=4, guidance=2.0, seed=1)
    local = generate(load_local_ensemble(paths, router_path, routing, seed=1), labels, (1, 8, 8), s4)

    ens, client = fake_swarm(three_experts, routing)
    assert torch.allclose(generate(ens, labels, (1, 8, 8), s4), local, atol=1e-6)

    # one replica of cluster 1 dies: same rows retried on the other one, same images
    ens, client = fake_swarm(three_experts, routing)
    events = []
    client.dead.add("p10")
    client.latency["p10"] = 0.0  # make the dead one the first choice
    x = generate(ens, labels, (1, 8, 8), s4, callback=lambda i: events.extend(i.events))
    assert torch.allclose(x, local, atol=1e-6)
    # the rows come from p11: retried there, or taken from its cross-check answer to the same rows
    assert any(("retrying" in e or "using the answer of" in e) and "p11" in e for e in events)
    assert client.bans.strikes.get("p10") and "connection refused" in client.last_error["p10"]  # banned (1 s backoff)

    # cluster 2's only peer dies: rows re-routed to their next-ranked experts, weights renormalised
    ens, client = fake_swarm(three_experts, routing)
    client.dead.add("p20")
    events = []
    generate(ens, labels, (1, 8, 8), SamplingConfig(steps=2, guidance=2.0, seed=1),
             callback=lambda i: events.extend(i.events))
    assert any("no replica left for cluster 2" in e for e in events)
    assert ens.last.weights[:, 2].eq(0).all() and torch.allclose(ens.last.weights.sum(1), torch.ones(6))

    # everyone dead: a clear error naming the clusters
    client.dead.update(client.peers)
    with pytest.raises(NoExpertsError, match="clusters 0, 1, 2 are uncovered"):
        generate(ens, labels, (1, 8, 8), SamplingConfig(steps=2, guidance=2.0, seed=1))


def test_requests_of_two_clients_share_one_forward_pass(inproc_peer):
    from diffswarm.client.client import SwarmClient
    from diffswarm.client.config import ClientConfig
    from diffswarm.dht.node import NetworkConfig

    peer, path = inproc_peer
    sha = peer.served["c0-ddpm"].expert.weights_sha256
    r = Replica(peer.peer_id, "c0-ddpm", sha, 0, 1.0, 0.0, tuple(peer.maddrs))
    cfg = ClientConfig(net=NetworkConfig.loopback(client_mode=True))
    x, t, labels = torch.randn(3, 3, 32, 32), torch.rand(3), torch.tensor([0, 1, -1])
    batcher = peer.served["c0-ddpm"].batcher
    policy = batcher.policy
    # the peer waits for the other client's rows if that client called within `window` and they come within
    # `max_wait`: both wide enough for a slow machine (the defaults are 1 s and the fixture's 0.2 s)
    batcher.policy = replace(policy, window=30.0, max_wait=1.0)
    try:
        with SwarmClient(peer.maddrs, cfg) as a, SwarmClient(peer.maddrs, cfg) as b:
            for c in (a, b):  # both clients become "active" at the peer
                c.run(c.call_velocity(r, x, t, labels, 2.0, timeout=30))
            fa = asyncio.run_coroutine_threadsafe(a.call_velocity(r, x, t, labels, 2.0, 30), a.loop)
            fb = asyncio.run_coroutine_threadsafe(b.call_velocity(r, x[:2], t[:2], labels[:2], 2.0, 30), b.loop)
            (va, ma), (vb, mb) = fa.result(60), fb.result(60)
    finally:
        batcher.policy = policy
    assert ma["batch_rows"] == mb["batch_rows"] == 5  # 3 + 2 rows in one pass
    assert torch.allclose(va[:2], vb, atol=1e-5)


def test_a_refused_request_does_not_end_the_session(inproc_peer):
    from diffswarm.client.client import SwarmClient
    from diffswarm.client.config import ClientConfig
    from diffswarm.client.transport import PeerSession
    from diffswarm.dht.node import NetworkConfig
    from diffswarm.protocol.wire import decode_response

    peer, _ = inproc_peer
    x, t, labels = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([0, 1])
    with SwarmClient(peer.maddrs, ClientConfig(net=NetworkConfig.loopback(client_mode=True))) as client:
        async def scenario():
            await client.transport.connect(peer.peer_id, peer.maddrs)
            s = PeerSession(client.dht.p2p, peer.peer_id)
            await s.open()
            bad = await s.call("c0-ddpm", encode_request("c0-ddpm", torch.randn(2, 3, 32, 31), t, labels, 2.0), 2.0, 30)
            good = await s.call("c0-ddpm", encode_request("c0-ddpm", x, t, labels, 2.0), 2.0, 30)
            s.close()
            return bad, good

        (bad_t, bad_meta), (good_t, good_meta) = client.run(scenario())
    with pytest.raises(RequestError, match="expects"):
        decode_response(bad_t, bad_meta, 2, (3, 32, 32))
    v, _ = decode_response(good_t, good_meta, 2, (3, 32, 32))
    assert v.shape == (2, 3, 32, 32)
