"""Where records live in the DHT and how a DHT dictionary is read: keys, validators, owner binding.

Five DHT keys per swarm; ``swarm`` is the swarm's full name ``NAME@FINGERPRINT`` (``names``), so
swarms of different owners never share keys. Each key is a dictionary whose subkeys are owned by the
announcing peer (hivemind's ``RSASignatureValidator``):

- ``{swarm}_experts``: one ``ExpertRecord`` per served expert.
  subkey = ``[owner:<peer RSA public key>]`` + ``"/" + expert_id`` (a joining record is replaced by the online one).
- ``{swarm}_manifest``: the owner-signed ``SwarmManifest`` (partition, router hashes, dataset, shapes),
  re-announced unchanged by every peer of the swarm under its own subkey ``[owner:<peer key>]``. Who
  announces it does not matter: its validity comes from the owner's signature inside (``names``).
- ``{swarm}_routers``: one ``RouterProvider`` per peer that serves router bytes ("I serve the file with
  this sha256 at these addresses"); subkey = ``[owner:<peer key>]``. Anyone may serve bytes; the client
  checks them against the manifest.
- ``{swarm}_stats``: one ``ClusterStatsRecord`` per cluster whose statistics a peer publishes;
  subkey = ``[owner:<peer key>]`` + ``"/stats" + cluster``.
- ``{swarm}_attest``: validators' signed admission scores (``AttestationRecord``, :mod:`diffswarm.dht.attestations`);
  subkey = ``[owner:<peer key>]`` + ``"/" + sha256[:16] + "/" + cluster + "/" + validator fingerprint``.

Only the owner of the key named in a subkey can write it (the record is signed; every DHT node
running ``make_validators`` rejects other writes), and ``SchemaValidator`` rejects values that are
not exactly of the schema's types or exceed its sizes. On top of that, the subkey's key is the peer's
libp2p identity key, so its peer id must equal the record's ``peer_id`` (``parse_entries``): a peer
cannot announce an expert or a router at another peer's address.
Bad entries are skipped, each with a one-line reason the caller logs (``parse_entries``, ``parse_manifests``).
"""

from __future__ import annotations

import hashlib
import re

import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator

from diffswarm.dht.records import (
    AttestationRecordModel,
    ClusterStatsRecordModel,
    ExpertRecordModel,
    RouterProviderModel,
    SwarmManifest,
    SwarmManifestModel,
)
from diffswarm.dht.schema import MAX_RECORD_AGE, RecordError, check_time

_OWNER_RE = re.compile(rb"\[owner:(.+?)\]")


class SwarmSchema(pydantic.BaseModel):
    """The DHT keys of one swarm (prefixed with the swarm's full name by ``SchemaValidator``)."""

    experts: dict[BytesWithPublicKey, ExpertRecordModel]
    manifest: dict[BytesWithPublicKey, SwarmManifestModel]
    routers: dict[BytesWithPublicKey, RouterProviderModel]
    stats: dict[BytesWithPublicKey, ClusterStatsRecordModel]
    attest: dict[BytesWithPublicKey, AttestationRecordModel]


def make_validators(swarm: str | None, private_key=None) -> list:
    """Record validators every diffswarm DHT node runs: schema for ``swarm``'s keys (none for a plain DHT
    node, ``swarm`` None), signatures for all owner-protected keys. ``private_key``: the node's
    ``hivemind.utils.crypto.RSAPrivateKey``."""
    out = [RSASignatureValidator(private_key)]
    if swarm:
        out.insert(0, SchemaValidator(SwarmSchema, allow_extra_keys=True, prefix=swarm))
    return out


def experts_key(swarm: str) -> str:
    return f"{swarm}_experts"


def manifest_key(swarm: str) -> str:
    return f"{swarm}_manifest"


def routers_key(swarm: str) -> str:
    return f"{swarm}_routers"


def stats_key(swarm: str) -> str:
    return f"{swarm}_stats"


def attest_key(swarm: str) -> str:
    return f"{swarm}_attest"


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
