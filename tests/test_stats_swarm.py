"""The statistics router in a live swarm: peers publish their clusters' statistics in the DHT, a swarm
can run with no router peer at all, and clients build the router from what the peers publish."""

import hashlib

import pytest
import torch

from diffswarm.client.config import ClientConfig, SwarmClientError
from diffswarm.client.discovery import choose_stats
from diffswarm.dht.node import NetworkConfig
from diffswarm.dht.records import ClusterStatsRecord, SwarmManifest
from diffswarm.dht.schema import RecordError
from diffswarm.router.local import generate, load_local_ensemble
from diffswarm.router.routing import RoutingConfig
from diffswarm.router.stats.publish import read_cluster_stats, stats_path
from diffswarm.router.stats.router import StatsRouter
from diffswarm.sampling.config import SamplingConfig
from diffswarm.swarm.local import PeerSpec, start_local_swarm
from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm

SHAPE = (1, 8, 8)
LABELS = torch.tensor([0, 1, 2, 3, -1, 0, 1, 2])


def stats_record(peer, cluster, blob=b"x" * 100, k=3, ph="ph", **kw):
    base = dict(version=1, cluster=cluster, num_clusters=k, partition_hash=ph,
                stats_sha256=hashlib.sha256(blob).hexdigest(), blob=blob, software="t", peer_id=peer, updated=1.0)
    base.update(kw)
    return ClusterStatsRecord(**base)


def manifest(**extra) -> SwarmManifest:
    return SwarmManifest(version=2, swarm="s", partition_hash="ph", num_clusters=3, dataset_id="toy:8",
                         image_shape=[1, 8, 8], num_classes=4, router_sha256="", router_weights_sha256="",
                         router_bytes=0, protocol=1, software="t", issued=1.0, owner_key=b"k", signature=b"s",
                         extra=extra)


def test_stats_records_are_checked_and_bounded():
    rec = stats_record("p0", 1)
    assert ClusterStatsRecord.from_dict(rec.to_dict()) == rec
    with pytest.raises(RecordError, match="does not hash"):
        ClusterStatsRecord.from_dict({**rec.to_dict(), "blob": b"y" * 100})
    with pytest.raises(RecordError, match="out of range"):
        ClusterStatsRecord.from_dict(stats_record("p0", 3).to_dict())
    with pytest.raises(RecordError, match="at most"):
        ClusterStatsRecord.from_dict(stats_record("p0", 0, blob=b"z" * (65 << 10)).to_dict())
    # a manifest may name no router (all router fields empty), but not half of one
    m = manifest()
    assert not m.has_router and SwarmManifest.from_dict(m.to_dict()) == m
    with pytest.raises(RecordError, match="names no router"):
        SwarmManifest.from_dict({**m.to_dict(), "router_bytes": 10})


def test_choose_stats_prefers_the_owners_word_then_the_most_peers():
    a, b = b"a" * 50, b"b" * 50
    recs = [stats_record("p0", 0, a), stats_record("p1", 0, b), stats_record("p2", 0, b), stats_record("p3", 1, a),
            stats_record("p4", 2, a, ph="other"), stats_record("p5", 2, a, k=4)]
    cands, notes = choose_stats(recs, manifest(), allow_unsigned=True)
    assert [r.blob for r in cands[0]] == [b, a]  # two peers announce b, one a
    assert [r.peer_id for r in cands[1]] == ["p3"] and cands[2] == []
    assert len(notes) == 2 and any("partition" in n for n in notes) and any("K=4" in n for n in notes)
    # a crowd of peers that serve no expert of the cluster counts for nothing
    cands, _ = choose_stats(recs, manifest(), serving={("p0", 0), ("p3", 1)}, allow_unsigned=True)
    assert [r.blob for r in cands[0]] == [a]
    # hashes signed by the owner override any majority
    signed = manifest(cluster_stats_sha256=[hashlib.sha256(a).hexdigest(), "", ""])
    cands, notes = choose_stats(recs, signed, allow_unsigned=True)
    assert [r.blob for r in cands[0]] == [a] and any("not the statistics the owner signed" in n for n in notes)


@pytest.mark.slow
def test_a_swarm_without_a_router_peer_routes_by_the_statistics_its_peers_publish(tmp_path):
    experts, _ = make_toy_swarm(tmp_path / "toy", ToySwarmSpec(["ddpm", "fm", "fm"], size=8, width=32, depth=1,
                                                               steps=5))
    assert all(stats_path(p).exists() for p in experts)
    specs = [PeerSpec(f"peer{i}", checkpoint=str(p)) for i, p in enumerate(experts)]
    sw = start_local_swarm(specs, None, tmp_path / "run", threads=1, timeout=150, announce_period=2.0)
    try:
        def config(**kw):
            return ClientConfig(swarm=sw.swarm, net=NetworkConfig.loopback(client_mode=True), connect_timeout=30.0,
                                cache_dir=str(tmp_path / "cache"), **kw)

        routing, sampling = RoutingConfig("top-k", 2), SamplingConfig(steps=6, guidance=2.0, seed=3)
        with sw.client(routing, seed=3, config=config()) as model:  # router_kind auto: the manifest names none
            assert isinstance(model.router, StatsRouter)
            assert model.client.router_providers()[0] == []  # nobody serves a router file
            x = generate(model, LABELS, SHAPE, sampling)
            used = {k for k, n in enumerate(model.calls) if n}
        local = load_local_ensemble(experts, None, routing, seed=3, router_kind="stats")
        assert torch.allclose(x, generate(local, LABELS, SHAPE, sampling), atol=1e-5)
        assert len(used) >= 2  # the published statistics route rows to more than one cluster
        # the client's router is exactly the one built from the files beside the checkpoints
        xt, t = torch.randn(8, *SHAPE), torch.rand(8)
        want = StatsRouter([read_cluster_stats(stats_path(p))[1] for p in experts])
        with sw.client(routing, config=config(router_kind="stats")) as model:
            assert torch.allclose(model.router.probs(xt, t, LABELS), want.probs(xt, t, LABELS), atol=1e-6)
        with pytest.raises(SwarmClientError, match="no trained router"):
            sw.client(routing, config=config(router_kind="trained"))
    finally:
        sw.stop(timeout=15)
