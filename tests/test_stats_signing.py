"""Statistics only from who may say them: the owner signs each cluster's statistics sha256 in the manifest
(``cluster_stats_sha256``), the founding peer reads them from its files, and clients refuse unsigned statistics
unless told otherwise (then the serving peers' majority, with a warning)."""

import dataclasses
import hashlib
from collections import deque

import pytest
import torch

from diffswarm.client.bootstrap import Bootstrap
from diffswarm.client.config import ClientConfig, SwarmClientError
from diffswarm.client.discovery import choose_stats
from diffswarm.dht.names import sign_manifest, swarm_name_of, verify_manifest
from diffswarm.dht.records import RECORD_VERSION, STATS_HASHES_FIELD, ClusterStatsRecord, SwarmManifest
from diffswarm.dht.schema import RecordError
from diffswarm.peer.announce import owner_stats_hashes
from diffswarm.router.stats.basis import DCTBasis
from diffswarm.router.stats.publish import STATS_FILE, cluster_stats

K, PH = 3, "ph"


def blob_of(cluster: int, ph: str = PH, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(30, 1, 8, 8, generator=g) * 2 - 1
    return cluster_stats(x, torch.zeros(30, dtype=torch.long), 4, DCTBasis((1, 8, 8), 16), cluster=cluster,
                         partition_hash=ph).to_bytes()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def fields(**kw) -> dict:
    return dict(version=RECORD_VERSION, swarm="s", partition_hash=PH, num_clusters=K, dataset_id="toy:8",
                image_shape=[1, 8, 8], num_classes=4, router_sha256="", router_weights_sha256="", router_bytes=0,
                protocol=1, software="t", issued=1.0, **kw)


def record(peer: str, cluster: int, blob: bytes) -> ClusterStatsRecord:
    return ClusterStatsRecord(version=RECORD_VERSION, cluster=cluster, num_clusters=K, partition_hash=PH,
                              stats_sha256=sha(blob), blob=blob, software="t", peer_id=peer, updated=1.0)


@pytest.fixture(scope="module")
def owner():
    from hivemind.utils.crypto import RSAPrivateKey

    return RSAPrivateKey()


def test_the_signature_covers_the_statistics_hashes_and_old_manifests_parse(owner):
    hashes = [sha(blob_of(k)) for k in range(K)]
    m = sign_manifest(owner, fields(**{STATS_HASHES_FIELD: hashes}))
    name = swarm_name_of("s", owner)
    verify_manifest(SwarmManifest.from_dict(m.to_dict()), name)
    assert SwarmManifest.from_dict(m.to_dict()).signed_stats == hashes
    forged = {**m.to_dict(), STATS_HASHES_FIELD: [sha(b"forged")] + hashes[1:]}
    with pytest.raises(RecordError, match="bad signature"):
        verify_manifest(SwarmManifest.from_dict(forged), name)
    old = sign_manifest(owner, {**fields(), "version": 3})  # a version-3 owner signed no statistics
    assert SwarmManifest.from_dict(old.to_dict()).signed_stats == [""] * K
    for bad in (hashes[:2], ["xyz", "", ""], [1, "", ""], "ab" * 32):
        with pytest.raises(RecordError, match=STATS_HASHES_FIELD):
            SwarmManifest.from_dict({**m.to_dict(), STATS_HASHES_FIELD: bad})


def test_the_owner_signs_the_statistics_files_it_can_read(tmp_path):
    files = []
    for k, blob in enumerate([blob_of(0), blob_of(1), blob_of(0, ph="other"), blob_of(0, seed=1)]):
        d = tmp_path / f"c{k}"
        d.mkdir()
        (d / STATS_FILE).write_bytes(blob)
        files.append(d / STATS_FILE)
    (tmp_path / "bad.bin").write_bytes(b"\x00garbage")
    paths = [str(files[0]), str(files[1].parent / "expert.safetensors"), str(files[2]), str(files[3]),
             str(tmp_path / "bad.bin"), str(tmp_path / "missing" / STATS_FILE)]
    hashes, notes = owner_stats_hashes(paths, [], K, PH)
    assert hashes == [sha(blob_of(0)), sha(blob_of(1)), ""]  # a checkpoint path means the file beside it
    assert len(notes) == 3  # other partition, a second blob for cluster 0, garbage; the missing file is no note
    assert any("partition" in n for n in notes) and any("signed already" in n for n in notes)
    assert any("msgpack" in n for n in notes)
    assert owner_stats_hashes(paths, [], 500, PH)[1][0].startswith("K=500: too many clusters")


def test_unsigned_statistics_are_refused_unless_allowed_and_signed_ones_come_from_anyone():
    a0, f0, a1, a2 = blob_of(0), blob_of(0, seed=3), blob_of(1), blob_of(2)
    recs = [record("honest", 0, a0), record("sybil1", 0, f0), record("sybil2", 0, f0), record("p1", 1, a1),
            record("p2", 2, a2)]
    serving = {("honest", 0), ("sybil1", 0), ("sybil2", 0), ("p1", 1), ("p2", 2)}
    unsigned = SwarmManifest.from_dict({**fields(), "owner_key": b"k", "signature": b"s"})
    cands, notes = choose_stats(recs, unsigned, serving, allow_unsigned=False)
    assert cands == [[], [], []] and all("unsigned ones not allowed" in n for n in notes)
    cands, _ = choose_stats(recs, unsigned, serving, allow_unsigned=True)
    assert cands[0][0].blob == f0  # the majority: two Sybils beat the honest peer
    signed = dataclasses.replace(unsigned, extra={STATS_HASHES_FIELD: [sha(a0), sha(a1), ""]})
    cands, notes = choose_stats(recs, signed, {("sybil1", 0)}, allow_unsigned=False)
    assert [r.blob for r in cands[0]] == [a0] and [r.blob for r in cands[1]] == [a1] and cands[2] == []
    assert sum("not the statistics the owner signed" in n for n in notes) == 2


def test_the_client_refuses_unsigned_statistics_with_the_remedy_and_warns_when_allowed(owner):
    name = str(swarm_name_of("s", owner))
    m = SwarmManifest.from_dict({**fields(**{STATS_HASHES_FIELD: [sha(b"a"), "", ""]}), "owner_key": b"k",
                                 "signature": b"s"})
    boot = Bootstrap(ClientConfig(swarm=name), None, None, None, deque())
    with pytest.raises(SwarmClientError, match=r"cluster\(s\) 1, 2 .*swarm up --router-kind stats.*"
                                               r"--sign-stats.*--allow-unsigned-stats"):
        boot.fetch_stats_router(m)
    events: deque[str] = deque()
    boot = Bootstrap(ClientConfig(swarm=name, allow_unsigned_stats=True), None, None, None, events)
    boot._check_unsigned(m)
    assert len(events) == 1 and "UNSIGNED statistics for cluster(s) 1, 2" in events[0] and "Sybil" in events[0]
    signed = dataclasses.replace(m, extra={STATS_HASHES_FIELD: [sha(b"a")] * K})
    Bootstrap(ClientConfig(swarm=name), None, None, None, events)._check_unsigned(signed)  # all signed: silent
    assert len(events) == 1


def plan(argv: list[str]):
    from diffswarm.cli import dispatch
    from diffswarm.cli.parser import build_parser, command_path, given_options

    parser = build_parser()
    args = parser.parse_args(argv)
    return dispatch.plan(args, given_options(parser, command_path(args), argv))


def test_the_cli_flags(owner, tmp_path):
    name = str(swarm_name_of("s", owner))
    maddr = "/ip4/127.0.0.1/tcp/1/p2p/QmaCpDMGvV2BGHeYERUEnRQAwe3N8SzbUtfsmvsqQLuvuJ"
    where = ["--swarm", name, "--initial-peers", maddr]
    p = plan(["generate", *where, "--router-kind", "stats", "--allow-unsigned-stats"])
    assert p.swarm.config.allow_unsigned_stats is True
    assert plan(["generate", *where, "--router-kind", "stats"]).swarm.config.allow_unsigned_stats is False
    assert plan(["dashboard", *where, "--allow-unsigned-stats"]).swarm.config.allow_unsigned_stats is True
    with pytest.raises(ValueError, match="--allow-unsigned-stats has no effect with a trained router"):
        plan(["generate", *where, "--router-kind", "trained", "--allow-unsigned-stats"])
    with pytest.raises(ValueError, match="--allow-unsigned-stats has no effect with --local"):
        plan(["generate", "--local", "a.safetensors", "b.safetensors", "--allow-unsigned-stats"])
    ckpt = tmp_path / "expert.safetensors"
    ckpt.write_bytes(b"x")
    p = plan(["peer", "--checkpoint", str(ckpt), "--owner-key", str(tmp_path / "owner.key"), "--sign-stats", "a.bin",
              "b/expert.safetensors"])
    assert p.config.sign_stats == ("a.bin", "b/expert.safetensors")
    with pytest.raises(ValueError, match="--sign-stats has no effect without --owner-key"):
        plan(["peer", "--checkpoint", str(ckpt), "--swarm", name, "--sign-stats", "a.bin"])


def test_the_owner_signs_again_when_a_statistics_file_appears(tmp_path, owner):
    """A cluster still training writes its statistics later: the owner's next heartbeat signs a newer manifest
    naming them (and signs nothing new while nothing changes)."""
    import asyncio
    from types import SimpleNamespace

    from diffswarm.dht.names import SwarmName
    from diffswarm.peer.config import PeerConfig
    from diffswarm.peer.hosted import RouterBlob
    from diffswarm.peer.server import Peer
    from diffswarm.router.model import Router, RouterConfig

    path = tmp_path / "router.safetensors"
    Router(RouterConfig(num_clusters=2, num_classes=4, size=8, width=16)).save(path)
    later = tmp_path / "c1" / STATS_FILE

    async def unreachable():
        raise ConnectionError("no DHT in this test")

    peer = Peer(PeerConfig(sign_stats=(str(later),)))
    peer.dht = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: "QmPeer"), get_manifests=unreachable)
    peer.router, peer.owner_key = RouterBlob(path), owner
    peer.swarm = SwarmName("s", swarm_name_of("s", owner).fingerprint)
    first = asyncio.run(peer.current_manifest())
    assert first.signed_stats == ["", ""]
    later.parent.mkdir()
    later.write_bytes(blob_of(1, ph=""))
    second = asyncio.run(peer.current_manifest())
    assert second.signed_stats == ["", sha(blob_of(1, ph=""))] and second.issued >= first.issued
    verify_manifest(second, peer.swarm)
    assert asyncio.run(peer.current_manifest()) is second
