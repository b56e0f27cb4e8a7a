"""Forged statistics in a live swarm routed by the statistics router: Sybil peers serving cluster 0's real
checkpoint publish a blob that would pull every row to cluster 0 (and outnumber the honest peer); the owner
signed each cluster's statistics sha256 in the manifest, so the client refuses the forgery and its images equal
a clean run."""

import dataclasses
import hashlib

import numpy as np
import pytest
import torch

from diffswarm.client.config import ClientConfig
from diffswarm.client.discovery import choose_stats
from diffswarm.dht.node import NetworkConfig
from diffswarm.router.local import generate, load_local_ensemble
from diffswarm.router.routing import RoutingConfig
from diffswarm.router.stats.blob import ClusterStats
from diffswarm.router.stats.publish import read_cluster_stats, stats_path
from diffswarm.router.stats.router import StatsRouter
from diffswarm.sampling.config import SamplingConfig
from diffswarm.swarm.local import PeerSpec, start_local_swarm
from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm

SHAPE = (1, 8, 8)
LABELS = torch.tensor([0, 1, 2, 3, -1, 0, 1, 2])
SYBILS = 2


def forged_stats(real: ClusterStats, count: int = 10**9) -> ClusterStats:
    """Cluster ``real`` claiming ``count`` images (same moments, histogram scaled): within every bound of a real
    cluster, and a prior of ~1 for it."""
    hist = real.class_hist * (count // real.count)
    hist[int(np.argmax(hist))] += count - int(hist.sum())
    return dataclasses.replace(real, count=count, class_hist=hist)


def top1_shares(router: StatsRouter, k: int) -> np.ndarray:
    """Share of rows each cluster is the top choice for, over noised rows at t in 0.1..0.9 and every label."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, *SHAPE, generator=g) * 2 - 1
    t = torch.rand(400, generator=g) * 0.8 + 0.1
    xt = (1 - t)[:, None, None, None] * x + t[:, None, None, None] * torch.randn(x.shape, generator=g)
    labels = torch.randint(-1, 4, (400,), generator=g)
    top = router.probs(xt, t, labels).argmax(-1)
    return np.bincount(top.numpy(), minlength=k) / len(top)


@pytest.mark.slow
def test_forged_statistics_from_sybils_serving_a_real_checkpoint_are_refused(tmp_path):
    experts, _ = make_toy_swarm(tmp_path / "toy", ToySwarmSpec(["ddpm", "fm", "fm"], size=8, width=32, depth=1,
                                                               steps=5))
    real = [read_cluster_stats(stats_path(p)) for p in experts]
    forged = forged_stats(real[0][1]).to_bytes()
    ClusterStats.from_bytes(forged)  # the forgery passes every bound: only the owner's signature refuses it
    forged_file = tmp_path / "forged_stats.bin"
    forged_file.write_bytes(forged)
    clean, attacked = StatsRouter([st for _, st in real]), StatsRouter([ClusterStats.from_bytes(forged)]
                                                                      + [st for _, st in real[1:]])
    clean_shares, forged_shares = top1_shares(clean, 3), top1_shares(attacked, 3)
    assert forged_shares[0] > 0.95 and clean_shares[0] < 0.8, (clean_shares, forged_shares)  # the attack is real

    specs = [PeerSpec(f"peer{i}", checkpoint=str(p)) for i, p in enumerate(experts)]
    sw = start_local_swarm(specs, None, tmp_path / "run", threads=1, timeout=150, announce_period=2.0)
    try:
        for i in range(SYBILS):  # Sybils: cluster 0's real checkpoint (same sha256), forged statistics
            sw.add_peer(PeerSpec(f"sybil{i}", checkpoint=str(experts[0]),
                                 program=["diffswarm.testing.hostile", "--stats-file", str(forged_file), "--"]))
        routing, sampling = RoutingConfig("top-k", 2), SamplingConfig(steps=6, guidance=2.0, seed=3)
        for allow in (False, True):  # the owner signed every cluster: allowing unsigned statistics changes nothing
            cfg = ClientConfig(swarm=sw.swarm, net=NetworkConfig.loopback(client_mode=True), connect_timeout=30.0,
                               cache_dir=str(tmp_path / "cache"), router_kind="stats", allow_unsigned_stats=allow)
            with sw.client(routing, seed=3, config=cfg) as model:
                manifest = model.client.bootstrap.find_manifest(0)
                recs, _ = model.client.stats_records()
                x = generate(model, LABELS, SHAPE, sampling)
                xt, t = torch.randn(8, *SHAPE), torch.rand(8)
                assert torch.allclose(model.router.probs(xt, t, LABELS), clean.probs(xt, t, LABELS), atol=1e-6)
            assert manifest.signed_stats == [hashlib.sha256(b).hexdigest() for b, _ in real]
            forgers = {r.peer_id for r in recs if r.blob == forged}
            assert len(forgers) == SYBILS  # the forgery is announced, by more peers than the honest blob
            # without the owner's signature the majority of cluster 0's serving peers would have won
            unsigned = dataclasses.replace(manifest, extra={})
            assert choose_stats(recs, unsigned, allow_unsigned=True)[0][0][0].blob == forged
            assert choose_stats(recs, manifest, allow_unsigned=True)[0][0][0].blob == real[0][0]
            local = load_local_ensemble(experts, None, routing, seed=3, router_kind="stats")
            assert torch.allclose(x, generate(local, LABELS, SHAPE, sampling), atol=1e-5)
    finally:
        sw.stop(timeout=15)
