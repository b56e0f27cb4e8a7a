"""DHT records: strict parsing, forward compatibility, owner binding, and signed DHT storage."""

import asyncio
import dataclasses
import os
import tempfile

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.schema import SchemaValidator
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P, PeerID
from hivemind.utils.timed_storage import get_dht_time

from diffswarm.dht.entries import experts_key, make_validators, parse_entries, peer_id_of_public_key
from diffswarm.dht.node import NetworkConfig, SwarmDHT, load_identity
from diffswarm.dht.records import (
    RECORD_VERSION,
    ExpertRecord,
    ExpertRecordModel,
    RouterProvider,
    RouterProviderModel,
    SwarmManifest,
    SwarmManifestModel,
)
from diffswarm.dht.schema import RecordError

SHA = "ab" * 32
SWARM = "diffswarm"  # the DHT key prefix of these nodes (a full NAME@FINGERPRINT in real swarms)


def expert_record(**kw) -> ExpertRecord:
    base = dict(version=1, expert_id="c0-fm", cluster=0, num_clusters=3, partition_hash="ph", objective="fm",
                schedule="flow", image_shape=[1, 8, 8], num_classes=4, checkpoint_sha256=SHA, software="0.1.0",
                protocol=1, state="online", progress=1.0, throughput=100.0, load=0.0, max_batch=64,
                peer_id="QmPeer", addrs=["/ip4/127.0.0.1/tcp/1/p2p/QmPeer"], updated=1.0)
    base.update(kw)
    return ExpertRecord(**base)


def provider_record(**kw) -> RouterProvider:
    base = dict(version=RECORD_VERSION, router_sha256=SHA, router_bytes=1000, software="0.1.0", peer_id="QmA",
                addrs=[], updated=1.0)
    base.update(kw)
    return RouterProvider(**base)


def v1_dict(rec: ExpertRecord) -> dict:
    """``rec`` as a version-1 peer sends it: without the version-2 fields."""
    d = {**rec.to_dict(), "version": 1}
    del d["train_steps"], d["final_loss"]
    return d


def schema_accepts(value: dict) -> bool:
    """Whether a diffswarm DHT node's ``SchemaValidator`` stores ``value`` as an expert record."""
    [schema] = [v for v in make_validators("diffswarm") if isinstance(v, SchemaValidator)]
    ser = DHTProtocol.serializer
    return schema.validate(DHTRecord(key=DHTID.generate(source=experts_key("diffswarm", 0)).to_bytes(),
                                     subkey=ser.dumps(b"[owner:ssh-rsa AAAA]/c0-fm"), value=ser.dumps(value),
                                     expiration_time=get_dht_time() + 60))


def test_dataclasses_and_schemas_have_the_same_fields():
    assert [f.name for f in dataclasses.fields(ExpertRecord)] == list(ExpertRecordModel.__fields__)
    assert [f.name for f in dataclasses.fields(RouterProvider)] == list(RouterProviderModel.__fields__)
    assert [f.name for f in dataclasses.fields(SwarmManifest)] == [*SwarmManifestModel.__fields__, "extra"]


def test_round_trip_and_unknown_fields_ignored():
    rec = expert_record()
    d = rec.to_dict()
    assert ExpertRecord.from_dict(d) == rec
    d["gpu"] = "H100"  # a field a newer peer adds
    d["stats"] = {"p50_ms": 3.0}
    assert ExpertRecord.from_dict(d) == rec
    s = provider_record()
    assert RouterProvider.from_dict({**s.to_dict(), "mirror": "ipfs://..."}) == s


@pytest.mark.parametrize("change, message", [
    ({"throughput": 100}, "wrong field types"),  # int where a float is required: no coercion
    ({"cluster": "0"}, "wrong field types"),
    ({"state": "busy"}, "state"),
    ({"objective": "score"}, "objective"),
    ({"cluster": 3}, "cluster 3 outside"),
    ({"checkpoint_sha256": "xyz"}, "sha256"),
    ({"image_shape": [1, 8]}, "image_shape"),
    ({"load": -1.0}, "negative"),
    ({"version": 0}, "version"),
])
def test_invalid_records_are_rejected(change, message):
    d = {**expert_record().to_dict(), **change}
    with pytest.raises(RecordError, match=message):
        ExpertRecord.from_dict(d)


def test_missing_field_and_non_dict_rejected():
    d = expert_record().to_dict()
    del d["throughput"]
    with pytest.raises(RecordError, match="lacks fields"):
        ExpertRecord.from_dict(d)
    d = expert_record().to_dict()
    del d["cluster"]  # nullable, but required: a record must say whether it has a cluster
    with pytest.raises(RecordError, match="lacks fields"):
        ExpertRecord.from_dict(d)
    with pytest.raises(RecordError):
        ExpertRecord.from_dict([1, 2, 3])


def test_training_summary_round_trips_and_passes_the_schema():
    rec = expert_record(version=RECORD_VERSION, train_steps=500, final_loss=0.0625)
    d = rec.to_dict()
    assert d["train_steps"] == 500 and type(d["final_loss"]) is float
    assert ExpertRecord.from_dict(d) == rec
    assert schema_accepts(d)
    assert type(expert_record(final_loss=1).to_dict()["final_loss"]) is float  # to_dict emits floats
    unset = expert_record(version=RECORD_VERSION).to_dict()  # announced as None: msgpack and schema accept it
    assert unset["train_steps"] is None and unset["final_loss"] is None and schema_accepts(unset)
    assert ExpertRecord.from_dict(unset).train_steps is None


def test_version_1_records_without_the_summary_are_accepted():
    d = v1_dict(expert_record())
    rec = ExpertRecord.from_dict(d)
    assert rec.version == 1 and rec.train_steps is None and rec.final_loss is None
    assert schema_accepts(d)  # newer DHT nodes keep storing older peers' records
    assert not schema_accepts({**d, "final_loss": 1})  # strict types for the new fields too
    assert not schema_accepts({**d, "train_steps": 1.0})
    assert not schema_accepts({k: v for k, v in d.items() if k != "throughput"})


@pytest.mark.parametrize("change, message", [
    ({"train_steps": -1}, "train_steps -1 outside"),
    ({"final_loss": float("nan")}, "final_loss nan is not finite"),
    ({"final_loss": float("inf")}, "not finite"),
    ({"final_loss": 1}, "wrong field types"),
    ({"train_steps": 10.0}, "wrong field types"),
    ({"train_steps": True}, "wrong field types"),
])
def test_invalid_training_summaries_are_rejected(change, message):
    d = {**expert_record(version=RECORD_VERSION, train_steps=5, final_loss=0.5).to_dict(), **change}
    with pytest.raises(RecordError, match=message):
        ExpertRecord.from_dict(d)


def test_joining_record_may_lack_a_checkpoint_hash():
    rec = ExpertRecord.from_dict(expert_record(state="joining", checkpoint_sha256="", progress=0.3).to_dict())
    assert rec.state == "joining"


def _identity(tmp) -> tuple[str, object]:
    path = os.path.join(tmp, "id.key")
    P2P.generate_identity(path)
    return path, load_identity(path)


def test_owner_key_determines_the_peer_id(tmp_path):
    path, key = _identity(str(tmp_path))
    with open(path, "rb") as f:
        assert peer_id_of_public_key(key.get_public_key().to_bytes()) == PeerID.from_identity(f.read()).to_base58()


def test_parse_entries_skips_records_not_bound_to_their_signer(tmp_path):
    _, key = _identity(str(tmp_path))
    owner = RSASignatureValidator(key).local_public_key
    me = peer_id_of_public_key(key.get_public_key().to_bytes())
    good = expert_record(peer_id=me).to_dict()
    liar = expert_record(peer_id="QmSomeoneElse", expert_id="c1-fm", cluster=1).to_dict()
    broken = {**expert_record(peer_id=me).to_dict(), "state": 3}
    recs, errors = parse_entries({owner + b"/c0-fm": good, owner + b"/c1-fm": liar, owner + b"/x": broken,
                                  b"no-owner": good}, ExpertRecord)
    assert [r.expert_id for r in recs] == ["c0-fm"]
    assert len(errors) == 3
    assert any("signed by" in e for e in errors) and any("owner" in e for e in errors)


# ---------------------------------------------------------------------------------------------
# signed records in a real DHT on 127.0.0.1


async def _dht_scenario(tmp: str) -> dict:
    out = {}
    nodes = []
    attacker = None
    try:
        boot = await SwarmDHT.create(NetworkConfig.loopback(), SWARM)
        nodes.append(boot)
        maddrs = await boot.visible_maddrs()
        peer = await SwarmDHT.create(NetworkConfig.loopback(maddrs, identity_path=os.path.join(tmp, "peer.key")), SWARM)
        nodes.append(peer)
        evil = await SwarmDHT.create(NetworkConfig.loopback(maddrs), SWARM)
        nodes.append(evil)
        reader = await SwarmDHT.create(NetworkConfig.loopback(maddrs, client_mode=True), SWARM)
        nodes.append(reader)

        genuine = expert_record(version=RECORD_VERSION, peer_id=peer.peer_id.to_base58(), updated=get_dht_time(),
                                train_steps=500, final_loss=0.0625)
        out["genuine_stored"] = await peer.announce_expert(genuine, 60)

        # 1. another key writes the peer's subkey through a validating node: unsigned for that owner
        forged = dataclasses.replace(genuine, throughput=1e9, updated=get_dht_time() + 1)
        key, sub = experts_key(SWARM, 0), peer.owner + genuine.subkey_suffix
        out["forged_via_validator"] = await evil.node.store(key, forged.to_dict(), get_dht_time() + 120, subkey=sub)

        # 2. a schema-invalid record under the evil node's own subkey (every node here validates)
        bad = {**forged.to_dict(), "throughput": 5, "peer_id": evil.peer_id.to_base58()}
        out["bad_schema"] = await evil.node.store(key, bad, get_dht_time() + 120, subkey=evil.owner + b"/c0-fm")

        # 2b. a valid record under another cluster's key (version 6: a record lives under its cluster's key)
        other = {**expert_record(peer_id=evil.peer_id.to_base58(), expert_id="c2-x", cluster=2,
                                 updated=get_dht_time()).to_dict()}
        out["wrong_cluster"] = await evil.node.store(key, other, get_dht_time() + 120, subkey=evil.owner + b"/c2-x")

        # 3. an attacker node without validators (stores anything itself), signing with the wrong key
        attacker = await DHTNode.create(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                        use_relay=False, auto_nat=False, nat_port_map=False)
        signature = evil.private_key.sign(forged_bytes := repr(forged).encode())  # valid, but by the wrong key
        out["attacker_stored"] = await attacker.store(key, forged_bytes + b"[signature:" + signature + b"]",
                                                      get_dht_time() + 120, subkey=sub)

        # 4. a newer peer's record with an extra field, under its own subkey: stored and parsed
        newer = {**expert_record(peer_id=evil.peer_id.to_base58(), expert_id="c2-fm", cluster=2,
                                 updated=get_dht_time()).to_dict(), "hardware": {"gpu": "none"}}
        out["newer_stored"] = await evil.node.store(experts_key(SWARM, 2), newer, get_dht_time() + 120,
                                                    subkey=evil.owner + b"/c2-fm")

        # 5. an older (version 1) peer's record, without the training summary: stored and parsed
        older = v1_dict(expert_record(peer_id=evil.peer_id.to_base58(), expert_id="c1-fm", cluster=1,
                                      updated=get_dht_time()))
        out["older_stored"] = await evil.node.store(experts_key(SWARM, 1), older, get_dht_time() + 120,
                                                    subkey=evil.owner + b"/c1-fm")

        recs, errors = await reader.get_experts([0, 1, 2])
        out["seen"] = {(r.peer_id, r.expert_id): r for r in recs}
        out["errors"] = errors
        out["peer_id"], out["evil_id"] = peer.peer_id.to_base58(), evil.peer_id.to_base58()
        out["genuine"] = genuine
    finally:
        if attacker is not None:
            await attacker.shutdown()
        for n in reversed(nodes):
            await n.shutdown()
    return out


def test_forged_records_are_rejected_and_genuine_ones_kept():
    with tempfile.TemporaryDirectory() as tmp:
        out = asyncio.run(asyncio.wait_for(_dht_scenario(tmp), 90))
    assert out["genuine_stored"] is True
    assert out["forged_via_validator"] is False
    assert out["bad_schema"] is False
    assert out["newer_stored"] is True
    assert out["wrong_cluster"] is False
    assert out["older_stored"] is True
    # the attacker's forged value is refused by every validating node (its own copy does not count as stored)
    assert out["attacker_stored"] is False
    # nothing invalid reached the reader: the DHT's validators dropped the forgeries before parse_entries saw them
    assert out["errors"] == []
    seen = out["seen"]
    assert seen[(out["peer_id"], "c0-fm")] == out["genuine"]  # never overwritten, summary included
    assert (out["evil_id"], "c2-fm") in seen  # forward-compatible record accepted
    assert seen[(out["evil_id"], "c1-fm")].train_steps is None  # backward-compatible record accepted
    assert (out["evil_id"], "c0-fm") not in seen
    assert (out["evil_id"], "c2-x") not in seen


def test_identity_file_keeps_the_peer_id_across_restarts(tmp_path):
    from diffswarm.dht.node import identity_peer_id

    path = str(tmp_path / "peer.key")

    async def start_twice():
        ids = []
        for _ in range(2):
            node = await SwarmDHT.create(NetworkConfig.loopback(identity_path=path))
            ids.append(node.peer_id.to_base58())
            await node.shutdown()
        return ids

    first, second = asyncio.run(asyncio.wait_for(start_twice(), 60))
    assert first == second == identity_peer_id(path)


def test_shutdown_removes_the_sockets_of_a_daemon_that_died_first():
    """A closed terminal's SIGHUP reaches p2pd with its process group: the node's shutdown still removes the daemon's
    socket (hivemind removes it only while the daemon runs)."""
    import signal

    async def run():
        node = await SwarmDHT.create(NetworkConfig.loopback())
        paths = node.socket_paths()
        assert os.path.exists(paths[0])  # the daemon's (its client's appears once a handler is registered)
        child = node.p2p._child
        child.send_signal(signal.SIGKILL)  # dead first (SIGHUP may be ignored: dispositions are inherited)
        await asyncio.wait_for(child.wait(), 10)
        await node.shutdown()
        return paths

    paths = asyncio.run(asyncio.wait_for(run(), 60))
    assert [p for p in paths if os.path.exists(p)] == []


def test_the_sockets_of_a_dead_daemon_whose_node_never_shut_down_are_removed_at_exit():
    """The owner never reached its shutdown (the daemon died under a worker that was still joining): what
    ``stop_children`` and the process's exit run removes the dead daemon's socket and keeps a live one's."""
    import signal

    from diffswarm.utils.signals import remove_dead_sockets

    async def run():
        dead, live = [await SwarmDHT.create(NetworkConfig.loopback()) for _ in range(2)]
        dead.p2p._child.send_signal(signal.SIGKILL)
        await asyncio.wait_for(dead.p2p._child.wait(), 10)
        removed = remove_dead_sockets()
        left = [p for p in dead.socket_paths() if os.path.exists(p)]
        kept = os.path.exists(live.socket_paths()[0])
        await live.shutdown()
        dead.p2p._terminate()  # as hivemind's __del__ would: the client's socket, and nothing else to do
        return removed, dead.socket_paths()[0], left, kept

    removed, dead_socket, left, kept = asyncio.run(asyncio.wait_for(run(), 60))
    assert dead_socket in removed and left == [] and kept


_ENDS_WHILE_JOINING = """
import asyncio, glob, os, signal, sys, threading, time
import hivemind.dht.node
from diffswarm.dht.node import SOCKETS, NetworkConfig, SwarmDHT
from diffswarm.utils.signals import _children

async def never(*a, **k):  # the node's DHT join never ends: its owner never learns the daemon's sockets
    await asyncio.sleep(3600)

hivemind.dht.node.DHTNode.create = never
before = set(glob.glob(SOCKETS))
loop = asyncio.new_event_loop()
threading.Thread(target=loop.run_forever, daemon=True).start()
asyncio.run_coroutine_threadsafe(SwarmDHT.create(NetworkConfig.loopback()), loop)
deadline = time.monotonic() + 60
while not (new := set(glob.glob(SOCKETS)) - before) and time.monotonic() < deadline:
    time.sleep(0.05)
for pid in _children(os.getpid()):
    os.kill(pid, signal.SIGKILL)  # the daemon dies first (a closed terminal's SIGHUP reaches the whole group)
time.sleep(0.5)
print(" ".join(sorted(new)), flush=True)
sys.exit(0)  # and the command ends while its loop thread is still starting the node
"""


def test_the_sockets_of_a_daemon_that_died_while_its_node_was_starting_are_removed_at_exit(tmp_path):
    """The dashboard's case (a closed terminal, caught once in 12 runs of test_no_orphans): SIGHUP kills the
    daemon and the command while the command's loop thread is still inside ``SwarmDHT.create``, so the node
    never registered its sockets. They are the process's from their creation on, and its exit removes them."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _ENDS_WHILE_JOINING], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    new = out.stdout.split()
    assert new, f"the daemon made no socket:\n{out.stderr[-3000:]}"
    assert [p for p in new if os.path.exists(p)] == []


def test_a_failed_start_whose_daemon_is_still_dying_leaves_its_sockets_to_the_exit(monkeypatch):
    """``P2P.create`` failed after its daemon started (hivemind leaves that daemon to the P2P object's ``__del__``): the
    sockets still listen when ``SwarmDHT.create`` cleans up, so they are registered and removed once the daemon is
    dead (the dashboard's case again: the daemon died 0.2 s after the start's cleanup)."""
    import gc
    import glob
    import signal
    import time

    from diffswarm.dht.node import SOCKETS, SwarmNetworkError
    from diffswarm.utils.signals import _children, _cmdline, listening, remove_dead_sockets

    half_made: list[P2P] = []  # held here: freed, its __del__ would stop the daemon and remove the sockets itself

    async def fail(self):
        half_made.append(self)
        raise RuntimeError("the daemon did not answer")

    monkeypatch.setattr(P2P, "_ping_daemon", fail)

    async def run():
        before = set(glob.glob(SOCKETS))
        try:
            with pytest.raises(SwarmNetworkError, match="did not answer"):
                await SwarmDHT.create(NetworkConfig.loopback())
            new = set(glob.glob(SOCKETS)) - before
            daemons = [pid for pid in _children(os.getpid()) if any("p2pd" in a for a in _cmdline(pid)[:1])]
            kept = remove_dead_sockets()  # still listening: kept
            for pid in daemons:
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10  # a dying Go process holds its sockets until its last thread ends
            while any(listening(p) for p in new) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            removed = remove_dead_sockets()
        finally:
            half_made.clear()
        gc.collect()  # the half-made P2P object and its subprocess transport, while their loop still runs
        await asyncio.sleep(0.2)
        return new, daemons, kept, removed

    new, daemons, kept, removed = asyncio.run(asyncio.wait_for(run(), 60))
    assert new and daemons, "the failed start left no live daemon: nothing to test"
    assert kept == [] and sorted(new) == sorted(removed) and not [p for p in new if os.path.exists(p)]
