"""What peers announce in the DHT: strict, versioned, forward-compatible records.

Two DHT keys per swarm (``swarm`` is a name, default ``diffswarm``), each a dictionary whose
subkeys are owned by the announcing peer (hivemind's ``RSASignatureValidator``):

- ``{swarm}_experts``: one ``ExpertRecord`` per served expert.
  subkey = ``[owner:<peer RSA public key>]`` + ``"/" + expert_id`` (a joining record is replaced by the online one).
- ``{swarm}_swarm``: one ``SwarmRecord`` per peer that serves the router (partition, router hash).
  subkey = ``[owner:<peer's RSA public key>]``.

Only the owner of the key named in a subkey can write it (the record is signed; every DHT node
running ``make_validators`` rejects other writes), and ``SchemaValidator`` rejects values that are
not exactly of the schema's types. On top of that, the owner key is the peer's libp2p identity
key, so ``owner_peer_id(subkey)`` must equal the record's ``peer_id``: a peer cannot announce an
expert at another peer's address.

Versioning: ``version`` is the record schema version. Versions only add fields (readers ignore
unknown fields, ``from_dict``); a change of meaning gets new DHT keys (``..._experts_v2``).
Version 2 added the optional ``ExpertRecord`` fields ``train_steps`` and ``final_loss`` (the
expert's training summary): readers accept version-1 records that lack them (they read as None),
and older readers and validators ignore them as unknown fields. ``SwarmRecord`` is unchanged
since version 1 but carries the same version number.
``protocol`` is the RPC protocol version (``diffswarm.wire``); clients skip peers
speaking another major protocol.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from pydantic.v1 import StrictFloat, StrictInt, StrictStr

from ..wire import OBJECTIVES

logger = logging.getLogger(__name__)

RECORD_VERSION = 2  # 2: optional ExpertRecord.train_steps / final_loss
STATES = ("joining", "online", "offline")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_OWNER_RE = re.compile(rb"\[owner:(.+?)\]")


class RecordError(ValueError):
    """A DHT record that does not follow the schema; the caller skips it and logs why."""


# ---------------------------------------------------------------------------------------------
# pydantic v1 schemas for hivemind's SchemaValidator (strict types, no conversions allowed).
# Extra fields are allowed inside a record so that older nodes keep storing newer peers' records.
# Fields with a default are optional (added by later versions); ``= ...`` marks a nullable field
# that is still required (pydantic v1 makes ``X | None`` optional otherwise).


class _RecordModel(pydantic.BaseModel):
    def dict(self, **kwargs) -> dict:
        """Leave out optional fields the record did not carry: ``SchemaValidator`` compares this with
        the stored value, so a version-1 record (without version-2 fields) must come back unchanged."""
        d = super().dict(**kwargs)
        for name, f in self.__fields__.items():
            if not f.required and name not in self.__fields_set__:
                d.pop(f.alias if kwargs.get("by_alias") else name, None)
        return d


class ExpertRecordModel(_RecordModel):
    version: StrictInt
    expert_id: StrictStr
    cluster: StrictInt | None = ...
    num_clusters: StrictInt
    partition_hash: StrictStr
    objective: StrictStr
    schedule: StrictStr
    image_shape: list[StrictInt]
    num_classes: StrictInt
    checkpoint_sha256: StrictStr
    software: StrictStr
    protocol: StrictInt
    state: StrictStr
    progress: StrictFloat
    throughput: StrictFloat
    load: StrictFloat
    max_batch: StrictInt
    peer_id: StrictStr
    addrs: list[StrictStr]
    updated: StrictFloat
    train_steps: StrictInt | None = None  # version 2
    final_loss: StrictFloat | None = None  # version 2

    class Config:
        extra = pydantic.Extra.allow


class SwarmRecordModel(_RecordModel):
    version: StrictInt
    partition_hash: StrictStr
    num_clusters: StrictInt
    dataset_id: StrictStr
    image_shape: list[StrictInt]
    num_classes: StrictInt
    router_sha256: StrictStr
    router_weights_sha256: StrictStr
    router_bytes: StrictInt
    software: StrictStr
    protocol: StrictInt
    peer_id: StrictStr
    addrs: list[StrictStr]
    updated: StrictFloat

    class Config:
        extra = pydantic.Extra.allow


class SwarmSchema(pydantic.BaseModel):
    """The DHT keys of one swarm (prefixed with the swarm name by ``SchemaValidator``)."""

    experts: dict[BytesWithPublicKey, ExpertRecordModel]
    swarm: dict[BytesWithPublicKey, SwarmRecordModel]


def make_validators(swarm: str, private_key=None) -> list:
    """Record validators every diffswarm DHT node runs: schema for ``swarm``'s keys, signatures for all
    owner-protected keys. ``private_key``: the node's ``hivemind.utils.crypto.RSAPrivateKey``."""
    return [SchemaValidator(SwarmSchema, allow_extra_keys=True, prefix=swarm), RSASignatureValidator(private_key)]


def experts_key(swarm: str) -> str:
    return f"{swarm}_experts"


def swarm_key(swarm: str) -> str:
    return f"{swarm}_swarm"


# ---------------------------------------------------------------------------------------------
# records as plain dataclasses (what the code passes around)


def _strict(model: type[_RecordModel], d: Any, what: str) -> dict:
    """The schema's fields of ``d``, exactly typed; optional fields that ``d`` lacks (records of an
    older version) read as None."""
    if not isinstance(d, dict):
        raise RecordError(f"{what} must be a dict, got {type(d).__name__}")
    known = {k: v for k, v in d.items() if k in model.__fields__}
    missing = sorted(name for name, f in model.__fields__.items() if f.required and name not in known)
    if missing:
        raise RecordError(f"{what} lacks fields {missing}")
    try:
        parsed = model.parse_obj(known).dict()  # only the fields present (_RecordModel.dict)
    except pydantic.ValidationError as e:
        raise RecordError(f"{what} has wrong field types: {e.errors()}") from None
    if parsed != known:  # strict types should make this impossible; guard against silent coercion
        raise RecordError(f"{what} needed type conversions")
    return {name: parsed.get(name) for name in model.__fields__}


def _check_common(r, what: str) -> None:
    if r.version < 1:
        raise RecordError(f"{what}: version {r.version} < 1")
    if len(r.image_shape) != 3 or any(s <= 0 for s in r.image_shape):
        raise RecordError(f"{what}: image_shape {r.image_shape} is not a positive (C, H, W)")
    if r.num_classes < 0 or r.num_clusters < 1:
        raise RecordError(f"{what}: num_classes {r.num_classes} / num_clusters {r.num_clusters} out of range")
    if not r.peer_id:
        raise RecordError(f"{what}: empty peer_id")


@dataclass(frozen=True)
class ExpertRecord:
    """What a peer announces about one expert it serves (or trains, while ``state == "joining"``)."""

    version: int  # record schema version (RECORD_VERSION)
    expert_id: str  # e.g. "c3-ddpm"
    cluster: int | None  # partition cluster (None: trained on all data)
    num_clusters: int  # K of the partition
    partition_hash: str  # partition manifest the expert was trained on ("" if none)
    objective: str  # ddpm | fm
    schedule: str  # "vp-cosine-1000" (ddpm) | "flow" (fm)
    image_shape: list[int]  # [C, H, W] of x
    num_classes: int  # class conditioning: labels in -1..num_classes-1 (-1 = none); 0 = unconditional
    checkpoint_sha256: str  # expert weights sha256 ("" while joining)
    software: str  # diffswarm version of the peer
    protocol: int  # RPC protocol version
    state: str  # joining | online | offline
    progress: float  # training progress in [0, 1] (1 when online)
    throughput: float  # measured rows per second of one forward pass (CFG rows count twice)
    load: float  # rows queued or being computed when announced
    max_batch: int  # most rows the peer runs in one forward pass
    peer_id: str  # base58 libp2p peer id serving the RPCs
    addrs: list[str]  # multiaddrs to reach the peer
    updated: float  # DHT time of this announcement
    train_steps: int | None = None  # training steps done (checkpoint's when online, current while joining); v2
    final_loss: float | None = None  # last training loss (checkpoint's when online, latest step's while joining); v2

    def to_dict(self) -> dict:
        d = asdict(self)
        for f in ("progress", "throughput", "load", "updated"):
            d[f] = float(d[f])
        if d["train_steps"] is not None:
            d["train_steps"] = int(d["train_steps"])
        if d["final_loss"] is not None:
            d["final_loss"] = float(d["final_loss"])
        d["image_shape"] = [int(s) for s in d["image_shape"]]
        d["addrs"] = [str(a) for a in d["addrs"]]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> ExpertRecord:
        """Parse and check a record from the network; unknown fields are ignored, anything else wrong
        raises ``RecordError``."""
        r = cls(**_strict(ExpertRecordModel, d, "expert record"))
        what = f"expert record {r.expert_id!r}"
        _check_common(r, what)
        if r.state not in STATES:
            raise RecordError(f"{what}: state {r.state!r} not in {STATES}")
        if r.objective not in OBJECTIVES:
            raise RecordError(f"{what}: objective {r.objective!r} not in {OBJECTIVES}")
        if r.cluster is not None and not 0 <= r.cluster < r.num_clusters:
            raise RecordError(f"{what}: cluster {r.cluster} outside 0..{r.num_clusters - 1}")
        if r.state != "joining" and not _SHA256.match(r.checkpoint_sha256):
            raise RecordError(f"{what}: checkpoint_sha256 is not a sha256 hex digest")
        if not (r.throughput >= 0 and r.load >= 0 and 0 <= r.progress <= 1 and r.max_batch >= 1):
            raise RecordError(f"{what}: negative or out-of-range throughput/load/progress/max_batch")
        if r.train_steps is not None and r.train_steps < 0:
            raise RecordError(f"{what}: negative train_steps {r.train_steps}")
        if r.final_loss is not None and not math.isfinite(r.final_loss):
            raise RecordError(f"{what}: final_loss {r.final_loss} is not finite")
        return r

    @property
    def subkey_suffix(self) -> bytes:
        return f"/{self.expert_id}".encode()


@dataclass(frozen=True)
class SwarmRecord:
    """Swarm-level facts announced by a peer that holds the router: the partition and the router."""

    version: int
    partition_hash: str  # partition the router (and the swarm's experts) were trained on
    num_clusters: int  # K
    dataset_id: str  # e.g. "fashion:28"
    image_shape: list[int]  # [C, H, W]
    num_classes: int
    router_sha256: str  # sha256 of the router file bytes served by rpc_router
    router_weights_sha256: str  # Router.weights_sha256 (checked again after loading)
    router_bytes: int  # file size
    software: str
    protocol: int
    peer_id: str  # where to fetch the router (rpc_router)
    addrs: list[str]
    updated: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["updated"] = float(d["updated"])
        d["image_shape"] = [int(s) for s in d["image_shape"]]
        d["addrs"] = [str(a) for a in d["addrs"]]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> SwarmRecord:
        r = cls(**_strict(SwarmRecordModel, d, "swarm record"))
        what = f"swarm record from {r.peer_id[:12]}"
        _check_common(r, what)
        if not (_SHA256.match(r.router_sha256) and _SHA256.match(r.router_weights_sha256)):
            raise RecordError(f"{what}: router hashes are not sha256 hex digests")
        if r.router_bytes <= 0:
            raise RecordError(f"{what}: router_bytes must be positive")
        return r


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


def parse_entries(entries: dict, kind: type) -> tuple[list, list[str]]:
    """Records from one DHT dictionary value ``{subkey: value}`` (values already unwrapped from
    ``ValueWithExpiration``). Returns (records, errors): each invalid entry is skipped with a
    one-line reason, including records whose ``peer_id`` is not the owner key's peer id."""
    out, errors = [], []
    for subkey, value in (entries or {}).items():
        try:
            pub = owner_public_key(subkey)
            if pub is None:
                raise RecordError("subkey carries no single [owner:...] public key")
            rec = kind.from_dict(value)
            try:
                owner = peer_id_of_public_key(pub)
            except Exception as e:  # malformed key material from the network
                raise RecordError(f"owner key is not an RSA public key: {e}") from None
            if owner != rec.peer_id:
                raise RecordError(f"record names peer {rec.peer_id[:16]} but is signed by {owner[:16]}")
            out.append(rec)
        except RecordError as e:
            errors.append(str(e))
    return out, errors
