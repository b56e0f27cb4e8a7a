"""The version-6 DHT key layout: expert, statistics and attestation records under one key per cluster (a DHT get
returns a whole dictionary in one message, capped at 4 MiB by p2pd), and the manifest kept by a few peers."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from types import SimpleNamespace

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.timed_storage import get_dht_time
from test_records import expert_record

from diffswarm.dht.entries import SwarmValidator, attest_key, experts_key, make_validators, stats_key
from diffswarm.dht.node import NetworkConfig, SwarmDHT
from diffswarm.dht.records import RECORD_VERSION, ClusterStatsRecord
from diffswarm.peer.manifest_copies import (
    MANIFEST_CLUSTERS,
    ManifestCopies,
    announces_manifest,
    keeps_manifest_copy,
    per_cluster,
)

SWARM = "keys@" + "0" * 32


def stores(key: str, value: dict, subkey: bytes = b"[owner:ssh-rsa AAAA]/x") -> bool:
    """Whether a node of ``SWARM`` accepts ``value`` under ``key`` (its schema and cluster checks)."""
    [v] = [v for v in make_validators(SWARM) if isinstance(v, SwarmValidator)]
    ser = DHTProtocol.serializer
    return v.validate(DHTRecord(key=DHTID.generate(source=key).to_bytes(), subkey=ser.dumps(subkey),
                                value=ser.dumps(value), expiration_time=get_dht_time() + 60))


def stats_record(cluster: int, peer: str = "QmPeer") -> ClusterStatsRecord:
    blob = b"stats-blob"
    return ClusterStatsRecord(version=RECORD_VERSION, cluster=cluster, num_clusters=64, partition_hash="ph",
                              stats_sha256=hashlib.sha256(blob).hexdigest(), blob=blob, software="t", peer_id=peer,
                              updated=1.0)


def test_keys_are_per_cluster():
    assert experts_key(SWARM, 5) == f"{SWARM}_experts_5" and experts_key(SWARM, None) == f"{SWARM}_experts"
    assert stats_key(SWARM, 0) == f"{SWARM}_stats_0" and attest_key(SWARM, 63) == f"{SWARM}_attest_63"
    assert RECORD_VERSION == 6


def test_a_record_lives_under_its_clusters_key_only():
    rec = expert_record(cluster=7, num_clusters=64).to_dict()
    assert stores(experts_key(SWARM, 7), rec)
    assert not stores(experts_key(SWARM, 6), rec)  # another cluster's key
    assert not stores(experts_key(SWARM, None), rec)  # the key of experts trained on all data
    assert stores(experts_key(SWARM, None), expert_record(cluster=None, expert_id="all-fm").to_dict())
    assert not stores(experts_key(SWARM, 7), {**rec, "throughput": 5})  # the schema is as strict as before
    assert stores(experts_key(SWARM, 1023), expert_record(cluster=1023, num_clusters=1024).to_dict())
    st = stats_record(3).to_dict()
    assert stores(stats_key(SWARM, 3), st) and not stores(stats_key(SWARM, 4), st)
    assert not stores(stats_key(SWARM, 3), {**st, "blob": "not bytes"})
    assert not stores(experts_key(SWARM, 3), st)  # a statistics record is not an expert record


def test_manifest_copies_at_scale():
    """1,000 volunteers, K = 64: the owner plus one peer of each of the first 8 clusters keep a copy, not 1,000."""
    m = SimpleNamespace(swarm=SWARM, num_clusters=64)
    peers = {k: {f"peer-{k}-{i}" for i in range(16)} for k in range(64)}
    keeping = [p for k, ids in peers.items() for p in ids if announces_manifest(p, [k], m, peers, owner=False)]
    assert len(keeping) == MANIFEST_CLUSTERS == 8 and per_cluster(64) == 1
    assert sorted(int(p.split("-")[1]) for p in keeping) == list(range(8))
    assert announces_manifest("peer-0-0", [0], m, peers, owner=True)  # the owner's peer always
    # the copy-holder of cluster 5 leaves: the next of its cluster (by rank) takes over, nobody else
    holder = next(p for p in keeping if p.startswith("peer-5-"))
    rest = {**peers, 5: peers[5] - {holder}}
    assert sum(announces_manifest(p, [5], m, rest, owner=False) for p in rest[5]) == 1
    assert not announces_manifest("peer-new", [5], m, rest, owner=False) or "peer-new" not in rest[5]


def test_manifest_copies_small_and_large_k():
    small = SimpleNamespace(swarm=SWARM, num_clusters=2)
    peers = {k: {f"p{k}{i}" for i in range(5)} for k in range(2)}
    assert per_cluster(2) == 2
    assert sum(announces_manifest(p, [k], small, peers, owner=False) for k in peers for p in peers[k]) == 4
    assert announces_manifest("alone", [0], small, {}, owner=False)  # a lone peer of its cluster keeps a copy
    large = SimpleNamespace(swarm=SWARM, num_clusters=1024)
    assert not announces_manifest("alone", [MANIFEST_CLUSTERS], large, {}, owner=False)  # beyond the first 8
    assert not announces_manifest("alone", [None], large, {}, owner=False)


def test_keeps_manifest_copy_reads_only_its_clusters():
    m = SimpleNamespace(swarm=SWARM, num_clusters=8)
    asked = []
    others = [dataclasses.replace(expert_record(cluster=2, num_clusters=8), peer_id=f"Qm{i}") for i in range(40)]

    async def get_experts(clusters):
        asked.append(list(clusters))
        return others, []

    dht = SimpleNamespace(get_experts=get_experts, peer_id=SimpleNamespace(to_base58=lambda: "QmMe"))
    expected = announces_manifest("QmMe", [2], m, {2: {r.peer_id for r in others}}, owner=False)
    assert asyncio.run(keeps_manifest_copy(dht, m, {2, None}, owner=False)) is expected
    assert asked == [[2]]
    assert asyncio.run(keeps_manifest_copy(dht, m, {2}, owner=True)) and asked == [[2]]  # the owner: no lookup


def test_a_peer_rechecks_its_copy_and_reads_the_manifest_once_a_minute():
    now = [0.0]
    copies = ManifestCopies(check_s=60, clock=lambda: now[0])
    m = SimpleNamespace(swarm=SWARM, num_clusters=8, issued=1.0, signature=b"s")
    asked = []

    async def get_experts(clusters):
        asked.append(list(clusters))
        return [], []

    dht = SimpleNamespace(get_experts=get_experts, peer_id=SimpleNamespace(to_base58=lambda: "QmMe"))
    keep = lambda manifest, clusters=(3,): asyncio.run(copies.keep(dht, manifest, clusters, owner=False))  # noqa: E731
    assert keep(m) and keep(m) and len(asked) == 1  # alone in its cluster: keeps a copy; decided once
    now[0] = 61.0
    assert keep(m) and len(asked) == 2  # a minute later: checked again
    assert keep(SimpleNamespace(**{**vars(m), "issued": 2.0})) and len(asked) == 3  # a new manifest: at once
    assert not keep(m, clusters=(9,)) and len(asked) == 3  # not a copy-keeping cluster: no lookup
    assert copies.read_due() and not copies.read_due()
    now[0] = 200.0
    assert copies.read_due()


def test_records_are_announced_and_read_per_cluster():
    """Two DHT nodes: records land under their clusters' keys; a reader asks for clusters in one batched lookup."""

    async def scenario():
        a = await SwarmDHT.create(NetworkConfig.loopback(), SWARM)
        b = await SwarmDHT.create(NetworkConfig.loopback(await a.visible_maddrs(), client_mode=True), SWARM)
        try:
            me = a.peer_id.to_base58()
            for k in (0, 1, 2):
                rec = expert_record(version=RECORD_VERSION, cluster=k, num_clusters=64, expert_id=f"c{k}-fm",
                                    peer_id=me, updated=get_dht_time())
                assert await a.announce_expert(rec, 60)
            assert await a.announce_stats(dataclasses.replace(stats_record(1, me), updated=get_dht_time()), 60)
            calls = []
            get_many = b.node.get_many
            b.node.get_many = lambda keys, **kw: calls.append(list(keys)) or get_many(keys, **kw)
            recs, errors = await b.get_experts([0, 2])
            stats, _ = await b.get_stats([0, 1])
            looked_up = list(calls)
            raw = await b.node.get(experts_key(SWARM, 1), latest=True)
            return recs, errors, stats, looked_up, raw
        finally:
            await b.shutdown()
            await a.shutdown()

    recs, errors, stats, calls, raw = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert sorted(r.cluster for r in recs) == [0, 2] and errors == []
    assert [s.cluster for s in stats] == [1]
    assert calls == [[experts_key(SWARM, 0), experts_key(SWARM, 2)], [stats_key(SWARM, 0), stats_key(SWARM, 1)]]
    assert len(raw.value) == 1  # cluster 1's key holds cluster 1's record only


def test_a_clients_cheap_lookup_sees_a_record_announced_after_its_last_lookup():
    """``newest=False`` stops at the first answer holding a live entry: a client's own cache must not be that answer
    (client-mode nodes keep no cache), or a peer that joined after its previous lookup would stay unseen."""

    async def scenario():
        a = await SwarmDHT.create(NetworkConfig.loopback(), SWARM)
        c = await SwarmDHT.create(NetworkConfig.loopback(await a.visible_maddrs()), SWARM)
        b = await SwarmDHT.create(NetworkConfig.loopback(await a.visible_maddrs(), client_mode=True), SWARM)
        async def announce(node: SwarmDHT, name: str) -> None:
            rec = expert_record(version=RECORD_VERSION, cluster=0, num_clusters=64, expert_id=name,
                                peer_id=node.peer_id.to_base58(), updated=get_dht_time())
            assert await node.announce_expert(rec, 60)

        try:
            await announce(a, "c0-fm")
            first, _, _ = await b.get_experts_expiring([0], newest=False)
            await announce(c, "c0-ddpm")  # a peer that joins after the client's lookup
            second, errors, left = await b.get_experts_expiring([0], newest=False)
            return first, second, errors, left
        finally:
            for node in (b, c, a):
                await node.shutdown()

    first, second, errors, left = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert [r.expert_id for r in first] == ["c0-fm"]
    assert sorted(r.expert_id for r in second) == ["c0-ddpm", "c0-fm"] and errors == []
    assert all(0 < s <= 60 for s in left.values())
