"""Nobody captures the swarm: owner-signed manifests, NAME@FINGERPRINT names, plausible replica figures,
records from the future, bounded sizes; and one in-process DHT where a Sybil crowd announces another
router and the client still takes the owner's."""

import asyncio
import dataclasses
import hashlib
import logging
import math
import os
import threading

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.schema import SchemaValidator
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from diffswarm.client.discovery import router_mismatch, router_sources
from diffswarm.client.selection import (
    DEFAULT_LATENCY,
    MAX_LOAD,
    MAX_THROUGHPUT,
    UNKNOWN_THROUGHPUT,
    Blacklist,
    Replica,
    pick_replica,
    plausible_load,
    plausible_throughput,
)
from diffswarm.dht.entries import (
    make_validators,
    manifest_key,
    parse_entries,
    parse_manifests,
    peer_id_of_public_key,
    routers_key,
)
from diffswarm.dht.names import (
    FINGERPRINT_HEX,
    SwarmName,
    SwarmNameError,
    choose_manifest,
    key_fingerprint,
    load_owner_key,
    parse_swarm_name,
    public_key_der,
    sign_manifest,
    swarm_name_of,
    verify_manifest,
)
from diffswarm.dht.records import RECORD_VERSION, ExpertRecord, RouterProvider, SwarmManifest
from diffswarm.dht.schema import MAX_CLOCK_SKEW, MAX_RECORD_AGE, MAX_ROUTER_BYTES, RecordError

SHA_A, SHA_B, WSHA = "aa" * 32, "bb" * 32, "cc" * 32


@pytest.fixture(scope="module")
def keys():
    """The owner's key and a few others (RSA-2048, ~50 ms each)."""
    return RSAPrivateKey(), [RSAPrivateKey() for _ in range(3)]


def fields(**kw) -> dict:
    base = dict(version=RECORD_VERSION, swarm="fashion", partition_hash="ph", num_clusters=4, dataset_id="fashion:28",
                image_shape=[1, 28, 28], num_classes=10, router_sha256=SHA_A, router_weights_sha256=WSHA,
                router_bytes=1000, protocol=1, software="0.1.0", issued=1000.0)
    base.update(kw)
    return base


# -- names ---------------------------------------------------------------------------------------


def test_swarm_names_carry_the_owner_fingerprint(keys):
    owner, _ = keys
    name = swarm_name_of("fashion", owner)
    der = public_key_der(owner)
    assert name.fingerprint == hashlib.sha256(der).hexdigest()[:FINGERPRINT_HEX] == key_fingerprint(der)
    assert len(name.fingerprint) == 32 and str(name) == f"fashion@{name.fingerprint}"
    assert parse_swarm_name(str(name)) == name
    assert parse_swarm_name(f"fashion@{name.fingerprint.upper()}") == name  # hex digits in any case
    assert parse_swarm_name("a.b_c-1@" + "0" * 32) == SwarmName("a.b_c-1", "0" * 32)


@pytest.mark.parametrize("text, message", [
    ("fashion", "no owner fingerprint"),
    ("", "no owner fingerprint"),
    ("fashion@" + "0" * 24, "32 hex digits"),  # 96 bits: too short
    ("fashion@" + "0" * 33, "32 hex digits"),
    ("fashion@" + "g" * 32, "32 hex digits"),
    ("fashion@" + "0" * 16 + "@" + "0" * 15, "32 hex digits"),
    ("@" + "0" * 32, "must be 1-64 characters"),
    ("fa shion@" + "0" * 32, "must be 1-64 characters"),
    ("-x@" + "0" * 32, "must be 1-64 characters"),
    ("x" * 65 + "@" + "0" * 32, "must be 1-64 characters"),
])
def test_bad_swarm_names_are_refused_with_how_to_get_the_full_name(text, message):
    with pytest.raises(SwarmNameError, match=message) as e:
        parse_swarm_name(text)
    if "fingerprint" in message or "hex" in message:
        assert "swarm up" in str(e.value) and "NAME@FINGERPRINT" in str(e.value)


def test_a_client_refuses_a_swarm_named_without_its_fingerprint():
    from diffswarm.client.client import SwarmClient
    from diffswarm.client.config import ClientConfig

    with pytest.raises(SwarmNameError, match="no owner fingerprint"):  # before any daemon starts
        SwarmClient(["/ip4/127.0.0.1/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"],
                    ClientConfig(swarm="fashion"))


def test_owner_keys_must_be_rsa_2048_to_4096_with_exponent_65537():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    def der(k):
        return k.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    with pytest.raises(RecordError, match="1024 bits"):
        load_owner_key(der(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    with pytest.raises(RecordError, match="exponent 3"):  # a grindable exponent is refused
        load_owner_key(der(rsa.generate_private_key(public_exponent=3, key_size=2048)))
    with pytest.raises(RecordError, match="not RSA"):
        load_owner_key(der(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(RecordError, match="not a DER public key"):
        load_owner_key(b"\x30\x03garbage")


# -- signing -------------------------------------------------------------------------------------


def test_manifest_signature_binds_every_field(keys):
    owner, others = keys
    name = swarm_name_of("fashion", owner)
    m = sign_manifest(owner, fields())
    verify_manifest(m, name)
    # the DHT's msgpack round trip (what a re-announcing peer stores) keeps it valid
    wire = MSGPackSerializer.loads(MSGPackSerializer.dumps(m.to_dict()))
    verify_manifest(SwarmManifest.from_dict(wire), name)
    verify_manifest(SwarmManifest.from_dict(dict(reversed(list(wire.items())))), name)  # field order is irrelevant
    for change in ({"router_sha256": SHA_B}, {"partition_hash": "other"}, {"issued": 1001.0}, {"num_clusters": 5},
                   {"image_shape": [1, 28, 29]}, {"dataset_id": "digits:8"}, {"added_by_a_forger": 1}):
        tampered = SwarmManifest.from_dict({**m.to_dict(), **change})
        with pytest.raises(RecordError, match="bad signature"):
            verify_manifest(tampered, name)
    with pytest.raises(RecordError, match="not signed by the owner"):  # right fields, another key
        verify_manifest(sign_manifest(others[0], fields()), name)
    with pytest.raises(RecordError, match="names swarm 'digits'"):  # the owner's signature on another swarm
        verify_manifest(sign_manifest(owner, fields(swarm="digits")), name)
    with pytest.raises(RecordError, match="bad signature"):  # the owner's key, a forger's signature
        forged = sign_manifest(others[0], fields())
        verify_manifest(dataclasses.replace(forged, owner_key=public_key_der(owner)), name)


def test_a_newer_versions_fields_are_signed_and_kept(keys):
    owner, _ = keys
    name = swarm_name_of("fashion", owner)
    m = sign_manifest(owner, fields(version=RECORD_VERSION + 1, mirrors=["ipfs://x"], limits={"b": 2, "a": 1}))
    back = SwarmManifest.from_dict(MSGPackSerializer.loads(MSGPackSerializer.dumps(m.to_dict())))
    assert back.extra == {"mirrors": ["ipfs://x"], "limits": {"b": 2, "a": 1}}
    verify_manifest(back, name)  # an older reader verifies what it does not understand, then ignores it
    assert back.version == RECORD_VERSION + 1 and back.router_sha256 == SHA_A


def test_choose_manifest_takes_the_owners_newest_whatever_the_crowd_says(keys):
    owner, others = keys
    name = swarm_name_of("fashion", owner)
    newest = sign_manifest(owner, fields(issued=2000.0))
    replayed = sign_manifest(owner, fields(issued=1000.0, router_sha256=SHA_B))  # an older, genuine one
    sybils = [sign_manifest(k, fields(issued=3000.0 + i, router_sha256=SHA_B, partition_hash="evil"))
              for i, k in enumerate(others * 10)]  # 30 announcements of another router, newer, other keys
    forged = dataclasses.replace(sign_manifest(others[0], fields(issued=9000.0, router_sha256=SHA_B)),
                                 owner_key=public_key_der(owner))  # the owner's key, a bad signature
    crowd = [*sybils, forged, replayed, newest, newest, replayed]
    best, notes = choose_manifest(crowd, name)
    assert best == newest
    assert len(notes) == len(sybils) + 1 and all("not signed by the owner" in n or "bad signature" in n for n in notes)
    assert choose_manifest([*sybils, forged], name)[0] is None
    # the user may pin an owner-signed router: the older one
    assert choose_manifest(crowd, name, pin=SHA_B[:12])[0] == replayed
    assert choose_manifest(crowd, name, pin="0000")[0] is None
    # a client that accepted `newest` before refuses a rollback to `replayed`
    best, notes = choose_manifest([replayed, *sybils], name, floor=newest.issued)
    assert best is None and "rollback" in notes[-1]
    assert choose_manifest([replayed, newest], name, floor=newest.issued)[0] == newest



def test_a_forgery_reusing_the_owners_signature_does_not_hide_the_genuine_manifest(keys):
    owner, _ = keys
    name = swarm_name_of("fashion", owner)
    genuine = sign_manifest(owner, fields(issued=2000.0))
    # the genuine signature copied onto other fields (read first, as a fast Sybil's copy would be)
    forged = SwarmManifest.from_dict({**genuine.to_dict(), "router_sha256": SHA_B})
    best, notes = choose_manifest([forged, genuine], name)
    assert best == genuine and len(notes) == 1 and "bad signature" in notes[0]

# -- replica choice from what the client measured -------------------------------------------------


def rep(peer, thr=100.0, load=0.0):
    return Replica(peer, "c0-fm", "s", 0, thr, load)


def test_announced_figures_are_made_plausible():
    for bad in (math.inf, math.nan, 1e300, MAX_THROUGHPUT * 1.01, 0.0, -5.0):
        assert plausible_throughput(bad) == UNKNOWN_THROUGHPUT
    assert plausible_throughput(5e4) == 5e4 and plausible_throughput(MAX_THROUGHPUT) == MAX_THROUGHPUT
    assert plausible_load(math.inf) == plausible_load(math.nan) == plausible_load(1e300) == MAX_LOAD
    assert plausible_load(-3.0) == 0.0 and plausible_load(12.0) == 12.0


def test_inf_nan_and_1e300_never_win_a_replica_choice():
    bans = Blacklist()
    honest = rep("honest", thr=900.0, load=2.0)
    for liar in (rep("a-inf", thr=math.inf), rep("a-nan", thr=math.nan), rep("a-huge", thr=1e300),
                 rep("a-neg-load", thr=1e300, load=-1e300)):
        assert pick_replica([liar, honest], {}, bans, 0.0, rows=16).peer_id == "honest", liar


def test_measured_peers_are_ranked_by_measurement_and_new_peers_never_above_them():
    bans = Blacklist()
    # a measured peer is ranked by its round trips: its own announcement of 1e5 rows/s and no load is ignored
    a, b = rep("a", thr=MAX_THROUGHPUT, load=0.0), rep("b", thr=10.0, load=500.0)
    assert pick_replica([a, b], {"a": 0.050, "b": 0.005}, bans, 0.0, rows=64).peer_id == "b"
    # a new peer claiming the best plausible figures is never ranked above a measured peer, however slow that one is
    new = rep("new", thr=MAX_THROUGHPUT, load=0.0)
    fast, slow = rep("fast", thr=10.0), rep("slow", thr=10.0)
    assert pick_replica([new, fast], {"fast": DEFAULT_LATENCY / 2}, bans, 0.0, rows=8).peer_id == "fast"
    assert pick_replica([new, slow], {"slow": 0.5}, bans, 0.0, rows=8).peer_id == "slow"
    assert pick_replica([new, slow], {"slow": DEFAULT_LATENCY}, bans, 0.0, rows=0).peer_id == "slow"  # a tie
    # it is called when the measured replicas cannot be (failed in this step, banned) ...
    assert pick_replica([new, slow], {"slow": 0.5}, bans, 0.0, rows=8, exclude=["slow"]).peer_id == "new"
    # ... and from then on its own measurement decides, whatever it announces
    assert pick_replica([new, slow], {"slow": 0.5, "new": 0.05}, bans, 0.0, rows=8).peer_id == "new"
    assert pick_replica([new, slow], {"slow": 0.5, "new": 2.0}, bans, 0.0, rows=8).peer_id == "slow"
    # a crowd of new ids claiming top speed takes nothing from a measured replica that works
    crowd = [rep(f"sybil{i}", thr=MAX_THROUGHPUT) for i in range(50)]
    assert pick_replica([*crowd, slow], {"slow": 0.5}, bans, 0.0, rows=8).peer_id == "slow"
    # among peers not measured yet, plausible claims order them (a new client's first call)
    assert pick_replica([rep("b", thr=900.0), rep("a", thr=1e300)], {}, bans, 0.0, rows=8).peer_id == "b"


# -- records from the future, stale records -------------------------------------------------------


def _signed_subkey(key) -> tuple[bytes, str]:
    return RSASignatureValidator(key).local_public_key, peer_id_of_public_key(key.get_public_key().to_bytes())


def expert(peer_id="QmPeer", **kw) -> dict:
    base = dict(version=RECORD_VERSION, expert_id="c0-fm", cluster=0, num_clusters=3, partition_hash="ph",
                objective="fm", schedule="flow", image_shape=[1, 8, 8], num_classes=4, checkpoint_sha256=SHA_A,
                software="0.1.0", protocol=1, state="online", progress=1.0, throughput=100.0, load=0.0, max_batch=64,
                peer_id=peer_id, addrs=["/ip4/127.0.0.1/tcp/1"], updated=1.0, train_steps=None, final_loss=None)
    base.update(kw)
    return base


def test_records_from_the_future_are_rejected_and_old_ones_are_stale(keys):
    owner, others = keys
    now = 10_000.0
    subkeys = [_signed_subkey(k) for k in (owner, *others)]

    def parse(updated):
        (sk, pid) = subkeys[0]
        return parse_entries({sk + b"/c0-fm": expert(pid, updated=updated)}, ExpertRecord, now)

    assert parse(now + MAX_CLOCK_SKEW - 1)[0] and parse(now - MAX_RECORD_AGE + 1)[0]
    recs, errors = parse(now + MAX_CLOCK_SKEW + 1)
    assert not recs and "from the future" in errors[0]
    recs, errors = parse(now - MAX_RECORD_AGE - 1)
    assert not recs and "stale" in errors[0]
    recs, errors = parse(math.inf)
    assert not recs and "not finite" in errors[0]
    (sk, pid) = subkeys[1]
    prov = RouterProvider(RECORD_VERSION, SHA_A, 1000, "0.1.0", pid, [], now + 3600).to_dict()
    assert "from the future" in parse_entries({sk: prov}, RouterProvider, now)[1][0]
    # manifests: a future issue time is rejected (it would win every choice); old ones stay valid (the
    # swarm outlives its founder: its peers re-announce the owner's last manifest)
    future = sign_manifest(owner, fields(issued=now + 3600))
    old = sign_manifest(owner, fields(issued=now - 30 * 24 * 3600))
    ms, errors = parse_manifests({subkeys[2][0]: future.to_dict(), subkeys[3][0]: old.to_dict()}, now)
    assert ms == [old] and "from the future" in errors[0]


def test_announced_inf_throughput_is_an_invalid_record():
    with pytest.raises(RecordError, match="finite"):
        ExpertRecord.from_dict(expert(throughput=math.inf))
    with pytest.raises(RecordError, match="finite"):
        ExpertRecord.from_dict(expert(load=math.inf))


# -- every size bounded --------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"expert_id": "x" * 65}, "expert_id is 65 characters, at most 64"),
    ({"peer_id": "Q" * 65}, "peer_id is 65 characters"),
    ({"software": "s" * 129}, "software is 129 characters, at most 128"),
    ({"partition_hash": "p" * 129}, "partition_hash is 129"),
    ({"schedule": "f" * 10_000}, "schedule is 10000"),
    ({"addrs": ["/ip4/1.2.3.4/tcp/1"] * 17}, "addrs has 17 entries, at most 16"),
    ({"addrs": ["/ip4/" + "1" * 300]}, r"addrs\[0\] is 305 characters, at most 256"),
    ({"image_shape": [1, 8, 8, 8]}, "image_shape has 4 entries, at most 3"),
    ({"image_shape": [17, 8, 8]}, "too large"),
    ({"image_shape": [1, 5000, 8]}, "too large"),
    ({"image_shape": [16, 4096, 4096]}, "too large"),
    ({"num_classes": 100_001}, "num_classes 100001 outside"),
    ({"num_clusters": 1025, "cluster": 0}, "num_clusters 1025 outside"),
    ({"max_batch": 65_537}, "max_batch"),
    ({"train_steps": 10**13}, "train_steps"),
])
def test_oversized_expert_records_are_rejected(change, message):
    with pytest.raises(RecordError, match=message):
        ExpertRecord.from_dict(expert(**change))


@pytest.mark.parametrize("change, message", [
    ({"router_bytes": MAX_ROUTER_BYTES + 1}, "router_bytes 67108865 outside 1..67108864"),
    ({"router_bytes": 0}, "router_bytes 0 outside"),
    ({"dataset_id": "d" * 129}, "dataset_id is 129 characters"),
    ({"swarm": "n" * 65}, "swarm is 65 characters"),
    ({"owner_key": b"k" * 1025}, "owner_key is 1025 bytes, at most 1024"),
    ({"signature": b"s" * 1025}, "signature is 1025 bytes"),
    ({"num_clusters": 2000}, "num_clusters"),
])
def test_oversized_manifests_are_rejected(keys, change, message):
    m = sign_manifest(keys[0], fields())
    with pytest.raises(RecordError, match=message):
        SwarmManifest.from_dict({**m.to_dict(), **change})


def test_oversized_providers_and_signed_extras_are_rejected(keys):
    with pytest.raises(RecordError, match="router_bytes"):  # refused before a byte is downloaded
        RouterProvider.from_dict(RouterProvider(RECORD_VERSION, SHA_A, 1 << 40, "0.1.0", "QmP", [], 1.0).to_dict())
    owner = keys[0]
    big = sign_manifest(owner, fields(notes="x" * (20 << 10)))  # a 20 KiB unknown field, signed
    with pytest.raises(RecordError, match="at most 16384"):
        verify_manifest(big, swarm_name_of("fashion", owner))


def test_dht_nodes_refuse_to_store_oversized_records(keys):
    """The same bounds in the DHT schema: a validating node does not even store them."""
    [schema] = [v for v in make_validators("s@" + "0" * 32) if isinstance(v, SchemaValidator)]
    ser = DHTProtocol.serializer

    def stores(key: str, value: dict) -> bool:
        return schema.validate(DHTRecord(key=DHTID.generate(source=key).to_bytes(),
                                         subkey=ser.dumps(b"[owner:ssh-rsa AAAA]"), value=ser.dumps(value),
                                         expiration_time=get_dht_time() + 60))

    prefix = "s@" + "0" * 32
    m = sign_manifest(keys[0], fields()).to_dict()
    assert stores(manifest_key(prefix), m)
    assert not stores(manifest_key(prefix), {**m, "dataset_id": "d" * 129})
    assert not stores(manifest_key(prefix), {**m, "owner_key": b"k" * 2000})
    p = RouterProvider(RECORD_VERSION, SHA_A, 1000, "0.1.0", "QmP", ["/ip4/1.2.3.4/tcp/1"], 1.0).to_dict()
    assert stores(routers_key(prefix), p)
    assert not stores(routers_key(prefix), {**p, "addrs": ["/ip4/1.2.3.4/tcp/1"] * 17})
    assert not stores(f"{prefix}_experts", expert(peer_id="Q" * 65))


# -- router sources and the manifest --------------------------------------------------------------


def test_router_sources_and_mismatch(keys):
    from diffswarm.router.model import RouterConfig

    m = sign_manifest(keys[0], fields(router_bytes=1000))
    provs = [RouterProvider(RECORD_VERSION, SHA_A, 1000, "v", "p1", [], 1.0),
             RouterProvider(RECORD_VERSION, SHA_A, 1000, "v", "p1", [], 2.0),  # p1's newer entry
             RouterProvider(RECORD_VERSION, SHA_A, 999, "v", "p2", [], 1.0),  # another size: not these bytes
             RouterProvider(RECORD_VERSION, SHA_B, 1000, "v", "p3", [], 1.0)]  # another router
    assert [(p.peer_id, p.updated) for p in router_sources(provs, m)] == [("p1", 2.0)]
    rc = RouterConfig(num_clusters=4, num_classes=10, channels=1, size=28, partition_hash="ph", dataset_id="fashion:28")
    assert router_mismatch(m, rc, WSHA) is None
    assert "weights" in router_mismatch(m, rc, SHA_B)
    assert "partition" in router_mismatch(m, dataclasses.replace(rc, partition_hash="other"), WSHA)
    assert "K" in router_mismatch(m, dataclasses.replace(rc, num_clusters=3), WSHA)
    assert router_mismatch(m, dataclasses.replace(rc, dataset_id=""), WSHA) is None  # older routers: no dataset id


# ---------------------------------------------------------------------------------------------
# a Sybil crowd in a real DHT on 127.0.0.1


class ManyKeys(RSASignatureValidator):
    """The attacker's DHT signer: signs each entry with whichever of its many keys the subkey names (each key
    is a fresh peer id; creating them is free)."""

    def __init__(self, keys):
        super().__init__(keys[0])
        self.signers = [RSASignatureValidator(k) for k in keys]

    def sign_value(self, record):
        for v in self.signers:
            if v.local_public_key in record.subkey:
                return v.sign_value(record)
        return record.value


class LoopThread:
    """One asyncio loop in a thread, for peers running next to a (blocking) SwarmClient."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _router(path, partition):
    from diffswarm.router.model import Router, RouterConfig

    Router(RouterConfig(num_clusters=2, num_classes=4, size=8, width=16, partition_hash=partition,
                        dataset_id="toy:8")).save(path)
    return path


def test_a_sybil_crowd_cannot_change_the_router_of_a_named_swarm(tmp_path, monkeypatch, caplog):
    from diffswarm.client import bootstrap as bootstrap_mod
    from diffswarm.client.client import SwarmClient
    from diffswarm.client.config import ClientConfig
    from diffswarm.dht.node import NetworkConfig, load_or_create_key
    from diffswarm.peer.config import PeerConfig
    from diffswarm.peer.server import Peer

    caplog.set_level(logging.INFO, logger="diffswarm.client.bootstrap")
    router_a, router_b = _router(tmp_path / "a.safetensors", "ph-a"), _router(tmp_path / "b.safetensors", "ph-b")
    owner_path = str(tmp_path / "owner.key")
    owner_key, _ = load_or_create_key(owner_path)
    name = swarm_name_of("toy", owner_key)
    lt = LoopThread()
    peers, sybil, out = [], None, {}
    try:
        # 1. the owner founds swarm "toy": its peer serves router A and signs the manifest naming it
        owner = Peer(PeerConfig(net=NetworkConfig.loopback(), swarm="toy", router=str(router_a), owner_key=owner_path,
                                announce_period=60))
        peers.append(owner)
        lt.run(owner.start())
        lt.run(owner.serve())
        assert owner.swarm == name and owner.manifest == owner.own_manifest
        maddrs = owner.maddrs

        # 2. a Sybil crowd: 12 fresh peer ids announce router B (providers + manifests signed with their own keys,
        #    newer than the owner's), a forged manifest with the owner's key and a bad signature, a replayed
        #    older manifest the owner really signed (naming B), and an owner-signed one from the far future
        crowd = [RSAPrivateKey() for _ in range(12)]
        sybil = lt.run(DHTNode.create(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_relay=False,
                                      auto_nat=False, nat_port_map=False,
                                      record_validator=CompositeValidator([ManyKeys(crowd)])))
        b_bytes = router_b.read_bytes()
        now = get_dht_time()
        b_fields = dict(owner.manifest_fields(), partition_hash="ph-b",
                        router_sha256=hashlib.sha256(b_bytes).hexdigest(), router_bytes=len(b_bytes))
        entries = []
        for i, k in enumerate(crowd):
            sk, pid = _signed_subkey(k)
            entries.append((routers_key(str(name)), sk, RouterProvider(RECORD_VERSION, b_fields["router_sha256"],
                                                                       len(b_bytes), "evil", pid, [], now).to_dict()))
            m = sign_manifest(k, {**b_fields, "issued": now + 1 + i})
            entries.append((manifest_key(str(name)), sk, m.to_dict()))
        forged = dataclasses.replace(sign_manifest(crowd[0], {**b_fields, "issued": now + 20}),
                                     owner_key=public_key_der(owner_key))
        replayed = sign_manifest(owner_key, {**b_fields, "issued": owner.own_manifest.issued - 100})
        future = sign_manifest(owner_key, {**b_fields, "issued": now + 3600})
        for m, k in ((forged, crowd[1]), (replayed, crowd[2]), (future, crowd[3])):
            entries.append((manifest_key(str(name)), _signed_subkey(k)[0] + b"/extra", m.to_dict()))

        async def store_all():
            return await asyncio.gather(*(sybil.store(key, value, get_dht_time() + 120, subkey=sk)
                                          for key, sk, value in entries))

        out["stored"] = lt.run(store_all())

        # 3. a lying mirror: a real peer serving zeros under router A's sha256 (same size)
        liar = Peer(PeerConfig(net=NetworkConfig.loopback(maddrs), swarm=str(name), router=str(router_a),
                               announce_period=60))
        peers.append(liar)
        lt.run(liar.start())
        liar.router.data = bytes(len(liar.router.data))
        lt.run(liar.serve())
        assert liar.owner_key is None  # not the owner: it follows the owner's manifest and serves bytes only
        assert liar.manifest == owner.own_manifest

        # 4. a client naming the swarm NAME@FINGERPRINT takes the owner's router; the liar's bytes are tried first
        monkeypatch.setattr(bootstrap_mod.random, "shuffle",
                            lambda xs: xs.sort(key=lambda p: p.peer_id != liar.peer_id))
        cfg = ClientConfig(swarm=str(name), net=NetworkConfig.loopback(client_mode=True),
                           cache_dir=str(tmp_path / "cache"), connect_timeout=20.0)
        with SwarmClient(maddrs, cfg) as client:
            manifests, errors = client.swarm_manifests()
            router, manifest = client.fetch_router(wait=10)
            out["events"] = list(client.events)
    finally:
        for p in reversed(peers):
            if p.dht is not None:
                lt.run(p.shutdown())
        if sybil is not None:
            lt.run(sybil.shutdown())
        lt.close()

    assert all(out["stored"])  # the crowd's entries are in the DHT: properly signed, each by its own key
    assert manifest == owner.own_manifest and manifest.router_sha256 == owner.router.sha256
    assert router.weights_sha256 == owner.router.weights_sha256 and router.cfg.partition_hash == "ph-a"
    # every copy reached the client: 12 Sybil manifests, the forgery, the replay and the owner's own; the future one
    # was refused at parsing. The liar serves no cluster's expert, so it keeps no copy (version 6: about one peer per
    # cluster does, ``peer.manifest_copies``; tests/test_dht_keys.py)
    assert len(manifests) == 12 + 1 + 1 + 1 and any("from the future" in e for e in errors)
    assert sum(m == owner.own_manifest for m in manifests) == 1
    assert any("ignored 13 manifest(s) not validly signed" in e for e in out["events"])
    assert any("do not match the manifest" in r.getMessage() for r in caplog.records)  # the liar was tried, refused
    assert os.path.exists(tmp_path / "cache" / "manifests" / f"{name}.json")  # the rollback floor


def test_the_owner_key_decides_who_signs(tmp_path):
    """`resolve_swarm`: a founding peer signs, a joining peer with another key only mirrors, and an explicit
    owner key of another fingerprint is an error."""
    from diffswarm.dht.node import load_or_create_key, open_identity
    from diffswarm.peer.announce import resolve_swarm

    owner_path = str(tmp_path / "owner.key")
    owner, created = load_or_create_key(owner_path)
    assert created and oct(os.stat(owner_path).st_mode & 0o777) == "0o400"
    ident = open_identity(None)
    try:
        name = swarm_name_of("toy", owner)
        got, key, what = resolve_swarm("toy", owner_path, ident, True)  # founds "toy", signs with the owner key
        assert got == name and public_key_der(key) == public_key_der(owner) and owner_path in what
        assert resolve_swarm(str(name), owner_path, ident, True)[0] == name  # restarting under its full name
        # no name, a router: founds "diffswarm" with the identity key, and says it is throw-away
        got, key, what = resolve_swarm(None, None, ident, True)
        assert got == swarm_name_of("diffswarm", ident.key) and key is ident.key and "throw-away" in what
        # joining someone else's swarm with a router: a mirror, no signing key
        assert resolve_swarm(str(name), None, ident, True) == (name, None, "")
        with pytest.raises(ValueError, match="fingerprint"):
            resolve_swarm(str(swarm_name_of("toy", ident.key)), owner_path, ident, True)
        assert resolve_swarm(None, None, ident, False) == (None, None, "")  # a plain DHT node
        with pytest.raises(SwarmNameError, match="no owner fingerprint"):
            resolve_swarm("toy", None, ident, False)
    finally:
        os.unlink(ident.path)
