"""Where records live in the DHT and how a DHT dictionary is read: keys, validators, owner binding.

The DHT keys of a swarm; ``swarm`` is the swarm's full name ``NAME@FINGERPRINT`` (``names``), so
swarms of different owners never share keys. Each key is a dictionary whose subkeys are owned by the
announcing peer (hivemind's ``RSASignatureValidator``). A DHT ``get`` returns a whole dictionary in one
message (p2pd caps a message at 4 MiB), so the records every peer announces live under one key per
cluster (version 6): at 1,000 volunteers and K = 64 a key holds ~16 peers' entries, not 1,000.

- ``{swarm}_experts_{k}``: one ``ExpertRecord`` per served expert of cluster ``k`` (``{swarm}_experts``: the
  experts trained on all data, ``cluster`` None). subkey = ``[owner:<peer RSA public key>]`` + ``"/" + expert_id``
  (a joining record is replaced by the online one).
- ``{swarm}_stats_{k}``: the ``ClusterStatsRecord`` of cluster ``k`` a peer publishes;
  subkey = ``[owner:<peer key>]`` + ``"/stats" + cluster``.
- ``{swarm}_attest_{k}``: validators' signed admission scores for cluster ``k`` (``AttestationRecord``,
  :mod:`diffswarm.dht.attestations`); subkey = ``[owner:<peer key>]`` + ``"/" + sha256[:16] + "/" + cluster + "/" +
  validator fingerprint``.
- ``{swarm}_manifest``: the owner-signed ``SwarmManifest`` (partition, router hashes, dataset, shapes),
  re-announced unchanged under the announcer's own subkey ``[owner:<peer key>]`` by the owner's peer and a few
  others (``peer.manifest_copies``: one of each of the first 8 clusters), so the swarm outlives its founder
  and the key stays small. Who announces it does not matter: its validity comes from the owner's signature inside.
- ``{swarm}_routers``: one ``RouterProvider`` per peer that serves router bytes ("I serve the file with
  this sha256 at these addresses"); subkey = ``[owner:<peer key>]``. Anyone may serve bytes; the client
  checks them against the manifest.

Only the owner of the key named in a subkey can write it (the record is signed; every DHT node
running ``make_validators`` rejects other writes), and ``SwarmValidator`` rejects values that are
not exactly of the schema's types or exceed its sizes, and per-cluster values whose ``cluster`` is not the key's.
On top of that, the subkey's key is the peer's
libp2p identity key, so its peer id must equal the record's ``peer_id`` (``parse_entries``): a peer
cannot announce an expert or a router at another peer's address.
Bad entries are skipped, each with a one-line reason the caller logs (``parse_entries``, ``parse_manifests``).
"""

from __future__ import annotations

import functools
import hashlib
import re

import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import DHTRecord

from diffswarm.dht.records import (
    AttestationRecordModel,
    ClusterStatsRecordModel,
    ExpertRecordModel,
    RouterProviderModel,
    SwarmManifest,
    SwarmManifestModel,
)
from diffswarm.dht.schema import MAX_CLUSTERS, MAX_RECORD_AGE, RecordError, check_time

_OWNER_RE = re.compile(rb"\[owner:(.+?)\]")


class SwarmSchema(pydantic.BaseModel):
    """The DHT keys of one swarm (prefixed with the swarm's full name by ``SchemaValidator``); ``experts``,
    ``stats`` and ``attest`` also name the per-cluster keys ``{swarm}_experts_{k}`` ... (``SwarmValidator``)."""

    experts: dict[BytesWithPublicKey, ExpertRecordModel]
    manifest: dict[BytesWithPublicKey, SwarmManifestModel]
    routers: dict[BytesWithPublicKey, RouterProviderModel]
    stats: dict[BytesWithPublicKey, ClusterStatsRecordModel]
    attest: dict[BytesWithPublicKey, AttestationRecordModel]


PER_CLUSTER = ("experts", "stats", "attest")  # the fields of SwarmSchema stored under one key per cluster


class SwarmValidator(SchemaValidator):
    """``SchemaValidator`` of ``SwarmSchema`` whose per-cluster fields also validate ``{swarm}_{field}_{k}`` for
    every ``k`` < ``MAX_CLUSTERS`` with the same model, and which rejects a value there whose ``cluster`` is not
    ``k`` (and one under ``{swarm}_experts`` whose ``cluster`` is not None): a record lives under its cluster's key."""

    def __init__(self, swarm: str):
        super().__init__(SwarmSchema, allow_extra_keys=True, prefix=swarm)
        fields, self._cluster_of = _cluster_key_ids(swarm)
        self._key_id_to_field_name.update(fields)

    def validate(self, record: DHTRecord) -> bool:
        if not super().validate(record):
            return False
        if record.key not in self._cluster_of:
            return True
        try:
            value = DHTProtocol.serializer.loads(record.value)
        except Exception:  # unreadable bytes from the network (super() already parsed them: not expected)
            return False
        return isinstance(value, dict) and value.get("cluster") == self._cluster_of[record.key]


@functools.lru_cache(maxsize=8)
def _cluster_key_ids(swarm: str) -> tuple[dict[bytes, str], dict[bytes, int | None]]:
    """The DHT ids of ``swarm``'s per-cluster keys: {id: field name} and {id: cluster} (~0.1 s to hash them all:
    computed once per swarm and process)."""
    fields, cluster_of = {}, {DHTID.generate(source=experts_key(swarm, None)).to_bytes(): None}
    for name in PER_CLUSTER:
        for k in range(MAX_CLUSTERS):
            key_id = DHTID.generate(source=f"{swarm}_{name}_{k}").to_bytes()
            fields[key_id], cluster_of[key_id] = name, k
    return fields, cluster_of


def make_validators(swarm: str | None, private_key=None) -> list:
    """Record validators every diffswarm DHT node runs: schema for ``swarm``'s keys (none for a plain DHT
    node, ``swarm`` None), signatures for all owner-protected keys. ``private_key``: the node's
    ``hivemind.utils.crypto.RSAPrivateKey``."""
    out = [RSASignatureValidator(private_key)]
    if swarm:
        out.insert(0, SwarmValidator(swarm))
    return out


def experts_key(swarm: str, cluster: int | None) -> str:
    """The key of cluster ``cluster``'s expert records (None: the experts trained on all data)."""
    return f"{swarm}_experts" if cluster is None else f"{swarm}_experts_{cluster}"


def manifest_key(swarm: str) -> str:
    return f"{swarm}_manifest"


def routers_key(swarm: str) -> str:
    return f"{swarm}_routers"


def stats_key(swarm: str, cluster: int) -> str:
    """The key of cluster ``cluster``'s statistics records."""
    return f"{swarm}_stats_{cluster}"


def attest_key(swarm: str, cluster: int) -> str:
    """The key of the attestations for cluster ``cluster``."""
    return f"{swarm}_attest_{cluster}"


# ---------------------------------------------------------------------------------------------
# owner key <-> peer id binding


def owner_public_key(subkey: bytes) -> bytes | None:
    """The ssh-format RSA public key inside ``[owner:...]`` of a subkey, or None."""
    if not isinstance(subkey, bytes):
        return None
    found = _OWNER_RE.findall(subkey)
    return found[0] if len(found) == 1 else None


def peer_id_of_public_key(ssh_public_key: bytes) -> str:
    """Base58 libp2p peer id of an RSA public key (sha2-256 multihash of the protobuf-encoded key,
    libp2p peer-id spec); equals ``PeerID.from_identity`` of the matching private key."""
    import multihash
    from cryptography.hazmat.primitives import serialization
    from hivemind.p2p import PeerID
    from hivemind.proto import crypto_pb2

    key = serialization.load_ssh_public_key(ssh_public_key)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()


def parse_entries(entries: dict, kind: type, now: float | None = None, *, what: str = "record",
                  time_of=lambda r: r.updated, max_age: float | None = MAX_RECORD_AGE) -> tuple[list, list[str]]:
    """Peer records (``ExpertRecord``, ``RouterProvider``, ``ClusterStatsRecord`` or ``AttestationRecord``) from one
    DHT dictionary value ``{subkey: value}`` (values already unwrapped from ``ValueWithExpiration``). Returns
    (records, errors): each invalid entry is skipped with a one-line reason, including records whose ``peer_id`` is
    not the owner key's peer id, and (given ``now``, DHT time) records whose ``time_of`` is from the future or,
    with ``max_age``, stale."""
    out, errors = [], []
    for subkey, value in (entries or {}).items():
        try:
            pub = owner_public_key(subkey)
            if pub is None:
                raise RecordError("subkey carries no single [owner:...] public key")
            rec = kind.from_dict(value)
            check_time(time_of(rec), now, f"{what} of {rec.peer_id[:12]}", max_age=max_age)
            try:
                owner = peer_id_of_public_key(pub)
            except Exception as e:  # malformed key material from the network
                raise RecordError(f"owner key is not an RSA public key: {e}") from None
            if owner != rec.peer_id:
                raise RecordError(f"{what} names peer {rec.peer_id[:16]} but is signed by {owner[:16]}")
            out.append(rec)
        except RecordError as e:
            errors.append(str(e))
    return out, errors


def parse_manifests(entries: dict, now: float | None = None) -> tuple[list[SwarmManifest], list[str]]:
    """Manifests from the ``{swarm}_manifest`` dictionary, any announcer (the owner's signature inside is
    checked later, by ``names.choose_manifest``); those issued more than ``MAX_CLOCK_SKEW`` ahead of ``now``
    are rejected. Returns (manifests, errors)."""
    out, errors = [], []
    for subkey, value in (entries or {}).items():
        try:
            if owner_public_key(subkey) is None:
                raise RecordError("subkey carries no single [owner:...] public key")
            m = SwarmManifest.from_dict(value)
            check_time(m.issued, now, f"manifest of swarm {m.swarm!r}", max_age=None)
            out.append(m)
        except RecordError as e:
            errors.append(str(e))
    return out, errors
