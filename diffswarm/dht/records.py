"""What peers announce in the DHT: strict, versioned, forward-compatible, bounded records.

Three DHT keys per swarm; ``swarm`` is the swarm's full name ``NAME@FINGERPRINT`` (``trust``), so
swarms of different owners never share keys. Each key is a dictionary whose subkeys are owned by the
announcing peer (hivemind's ``RSASignatureValidator``):

- ``{swarm}_experts``: one ``ExpertRecord`` per served expert.
  subkey = ``[owner:<peer RSA public key>]`` + ``"/" + expert_id`` (a joining record is replaced by the online one).
- ``{swarm}_manifest``: the owner-signed ``SwarmManifest`` (partition, router hashes, dataset, shapes),
  re-announced unchanged by every peer of the swarm under its own subkey ``[owner:<peer key>]``. Who
  announces it does not matter: its validity comes from the owner's signature inside (``trust``).
- ``{swarm}_routers``: one ``RouterProvider`` per peer that serves router bytes ("I serve the file with
  this sha256 at these addresses"); subkey = ``[owner:<peer key>]``. Anyone may serve bytes; the client
  checks them against the manifest.

Only the owner of the key named in a subkey can write it (the record is signed; every DHT node
running ``make_validators`` rejects other writes), and ``SchemaValidator`` rejects values that are
not exactly of the schema's types or exceed its sizes. On top of that, the subkey's key is the peer's
libp2p identity key, so its peer id must equal the record's ``peer_id`` (``parse_entries``): a peer
cannot announce an expert or a router at another peer's address.

Bounds (every size a record carries; ``from_dict`` raises ``RecordError`` before anything is
allocated for an oversized value, and DHT nodes refuse to store oversized strings, lists and bytes):
ids and peer ids <= 64 characters, other strings <= 128, <= 16 addresses of <= 256 characters, image
shape (C, H, W) with C <= 16, H, W <= 4096 and C*H*W <= 2**24, num_classes <= 100,000, K <= 1024,
max_batch <= 65,536, router file <= 64 MiB, owner key and signature <= 1 KiB each, a manifest's signed
encoding <= 16 KiB. Times: a record ``updated`` (or a manifest ``issued``) more than
``MAX_CLOCK_SKEW`` (30 s) in the future is rejected; expert and provider records ``updated`` more than
``MAX_RECORD_AGE`` (600 s) ago are stale. Throughput, load, progress and losses must be finite.

Versioning: ``version`` is the record schema version. Versions only add fields (readers ignore
unknown fields, ``from_dict``); a change of meaning gets new DHT keys. Version 2 added the optional
``ExpertRecord`` fields ``train_steps`` and ``final_loss``; readers accept version-1 records that lack
them. Version 3 replaced the unsigned per-peer ``SwarmRecord`` (key ``{swarm}_swarm``) by the signed
``SwarmManifest`` and the ``RouterProvider`` entries, under the new keys above; ``ExpertRecord`` keeps
its layout (version 3 only adds the bounds). ``protocol`` is the RPC protocol version
(``diffswarm.protocol.wire``); clients skip peers speaking another major protocol.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from pydantic.v1 import StrictFloat, StrictInt, conbytes, conlist, constr

from diffswarm.experts.config import OBJECTIVES

logger = logging.getLogger(__name__)

RECORD_VERSION = 3  # 2: optional ExpertRecord.train_steps / final_loss; 3: signed SwarmManifest + RouterProvider
STATES = ("joining", "online", "offline")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_OWNER_RE = re.compile(rb"\[owner:(.+?)\]")

# -- bounds ----------------------------------------------------------------------------------
MAX_ID_CHARS = 64  # expert_id, peer_id, swarm NAME
MAX_TEXT_CHARS = 128  # software, schedule, dataset_id, partition_hash, objective, state
MAX_ADDRS = 16  # multiaddrs per record
MAX_ADDR_CHARS = 256
MAX_CHANNELS = 16
MAX_IMAGE_SIDE = 4096
MAX_IMAGE_ELEMENTS = 1 << 24  # C * H * W
MAX_CLASSES = 100_000
MAX_CLUSTERS = 1024  # K
MAX_BATCH_ROWS = 65_536  # an ExpertRecord's max_batch
MAX_TRAIN_STEPS = 10**12
MAX_ROUTER_BYTES = 64 << 20  # the router file a client will download
MAX_STATS_RECORD_BYTES = 64 << 10  # a cluster-statistics blob in a stats record (router.stats.MAX_STATS_BYTES)
MAX_KEY_BYTES = 1024  # owner public key (DER; RSA-4096 is 550 bytes)
MAX_SIGNATURE_BYTES = 1024  # base64 of an RSA-4096 signature is 684 bytes
MAX_MANIFEST_BYTES = 16 << 10  # canonical signed encoding of a manifest, unknown fields included
MAX_CLOCK_SKEW = 30.0  # seconds a record's time may be ahead of ours
MAX_RECORD_AGE = 600.0  # seconds after which an expert or provider record is stale (heartbeats are every ~10 s)


class RecordError(ValueError):
    """A DHT record that does not follow the schema; the caller skips it and logs why."""


# ---------------------------------------------------------------------------------------------
# pydantic v1 schemas for hivemind's SchemaValidator (strict types, no conversions allowed).
# Extra fields are allowed inside a record so that older nodes keep storing newer peers' records.
# Fields with a default are optional (added by later versions); ``= ...`` marks a nullable field
# that is still required (pydantic v1 makes ``X | None`` optional otherwise). The constrained types
# carry the size bounds; ``_check_sizes`` reads them from here, so the DHT's check and the reader's
# clear error message share one table.

IdStr = constr(strict=True, max_length=MAX_ID_CHARS)
TextStr = constr(strict=True, max_length=MAX_TEXT_CHARS)
AddrStr = constr(strict=True, max_length=MAX_ADDR_CHARS)
Addrs = conlist(AddrStr, max_items=MAX_ADDRS)
Shape = conlist(StrictInt, max_items=3)
KeyBytes = conbytes(strict=True, max_length=MAX_KEY_BYTES)
SigBytes = conbytes(strict=True, max_length=MAX_SIGNATURE_BYTES)
StatsBytes = conbytes(strict=True, max_length=MAX_STATS_RECORD_BYTES)


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
    expert_id: IdStr
    cluster: StrictInt | None = ...
    num_clusters: StrictInt
    partition_hash: TextStr
    objective: TextStr
    schedule: TextStr
    image_shape: Shape
    num_classes: StrictInt
    checkpoint_sha256: TextStr
    software: TextStr
    protocol: StrictInt
    state: TextStr
    progress: StrictFloat
    throughput: StrictFloat
    load: StrictFloat
    max_batch: StrictInt
    peer_id: IdStr
    addrs: Addrs
    updated: StrictFloat
    train_steps: StrictInt | None = None  # version 2
    final_loss: StrictFloat | None = None  # version 2

    class Config:
        extra = pydantic.Extra.allow


class RouterProviderModel(_RecordModel):
    version: StrictInt
    router_sha256: TextStr
    router_bytes: StrictInt
    software: TextStr
    peer_id: IdStr
    addrs: Addrs
    updated: StrictFloat

    class Config:
        extra = pydantic.Extra.allow


class ClusterStatsRecordModel(_RecordModel):
    version: StrictInt
    cluster: StrictInt
    num_clusters: StrictInt
    partition_hash: TextStr
    stats_sha256: TextStr
    blob: StatsBytes
    software: TextStr
    peer_id: IdStr
    updated: StrictFloat

    class Config:
        extra = pydantic.Extra.allow


class SwarmManifestModel(_RecordModel):
    version: StrictInt
    swarm: IdStr
    partition_hash: TextStr
    num_clusters: StrictInt
    dataset_id: TextStr
    image_shape: Shape
    num_classes: StrictInt
    router_sha256: TextStr
    router_weights_sha256: TextStr
    router_bytes: StrictInt
    protocol: StrictInt
    software: TextStr
    issued: StrictFloat
    owner_key: KeyBytes
    signature: SigBytes

    class Config:
        extra = pydantic.Extra.allow


class SwarmSchema(pydantic.BaseModel):
    """The DHT keys of one swarm (prefixed with the swarm's full name by ``SchemaValidator``)."""

    experts: dict[BytesWithPublicKey, ExpertRecordModel]
    manifest: dict[BytesWithPublicKey, SwarmManifestModel]
    routers: dict[BytesWithPublicKey, RouterProviderModel]
    stats: dict[BytesWithPublicKey, ClusterStatsRecordModel]


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


# ---------------------------------------------------------------------------------------------
# records as plain dataclasses (what the code passes around)


def _check_sizes(model: type[_RecordModel], d: dict, what: str) -> None:
    """``RecordError`` for a string, bytes or list field longer than the schema allows (checked on the
    raw value, before any parsing or copying)."""
    for name, f in model.__fields__.items():
        v = d.get(name)
        if isinstance(v, (str, bytes)):
            limit = getattr(f.outer_type_, "max_length", None)
            if limit is not None and len(v) > limit:
                raise RecordError(f"{what}: {name} is {len(v)} {'bytes' if isinstance(v, bytes) else 'characters'}, "
                                  f"at most {limit}")
        elif isinstance(v, (list, tuple)):
            limit = getattr(f.outer_type_, "max_items", None)
            if limit is not None and len(v) > limit:
                raise RecordError(f"{what}: {name} has {len(v)} entries, at most {limit}")
            item_limit = getattr(f.type_, "max_length", None)
            for i, item in enumerate(v):
                if item_limit is not None and isinstance(item, (str, bytes)) and len(item) > item_limit:
                    raise RecordError(f"{what}: {name}[{i}] is {len(item)} characters, at most {item_limit}")


def _strict(model: type[_RecordModel], d: Any, what: str) -> dict:
    """The schema's fields of ``d``, exactly typed and within the schema's sizes; optional fields that
    ``d`` lacks (records of an older version) read as None."""
    if not isinstance(d, dict):
        raise RecordError(f"{what} must be a dict, got {type(d).__name__}")
    known = {k: v for k, v in d.items() if k in model.__fields__}
    missing = sorted(name for name, f in model.__fields__.items() if f.required and name not in known)
    if missing:
        raise RecordError(f"{what} lacks fields {missing}")
    _check_sizes(model, known, what)
    try:
        parsed = model.parse_obj(known).dict()  # only the fields present (_RecordModel.dict)
    except pydantic.ValidationError as e:
        raise RecordError(f"{what} has wrong field types: {e.errors()}") from None
    if parsed != known:  # strict types should make this impossible; guard against silent coercion
        raise RecordError(f"{what} needed type conversions")
    return {name: parsed.get(name) for name in model.__fields__}


def _check_shape(r, what: str) -> None:
    shape = r.image_shape
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise RecordError(f"{what}: image_shape {shape} is not a positive (C, H, W)")
    c, h, w = shape
    if c > MAX_CHANNELS or h > MAX_IMAGE_SIDE or w > MAX_IMAGE_SIDE or c * h * w > MAX_IMAGE_ELEMENTS:
        raise RecordError(f"{what}: image_shape {shape} is too large (C <= {MAX_CHANNELS}, H, W <= {MAX_IMAGE_SIDE}, "
                          f"C*H*W <= {MAX_IMAGE_ELEMENTS})")


def _check_common(r, what: str) -> None:
    if r.version < 1:
        raise RecordError(f"{what}: version {r.version} < 1")
    _check_shape(r, what)
    if not 0 <= r.num_classes <= MAX_CLASSES:
        raise RecordError(f"{what}: num_classes {r.num_classes} outside 0..{MAX_CLASSES}")
    if not 1 <= r.num_clusters <= MAX_CLUSTERS:
        raise RecordError(f"{what}: num_clusters {r.num_clusters} outside 1..{MAX_CLUSTERS}")


def _check_peer(r, what: str) -> None:
    if not r.peer_id:
        raise RecordError(f"{what}: empty peer_id")


def _check_router_bytes(n: int, what: str) -> None:
    if not 1 <= n <= MAX_ROUTER_BYTES:
        raise RecordError(f"{what}: router_bytes {n} outside 1..{MAX_ROUTER_BYTES} ({MAX_ROUTER_BYTES >> 20} MiB)")


def check_time(t: float, now: float | None, what: str, max_age: float | None = MAX_RECORD_AGE) -> None:
    """``RecordError`` if time ``t`` (DHT time) is not finite, more than ``MAX_CLOCK_SKEW`` ahead of
    ``now``, or (with ``max_age``) older than ``max_age`` seconds. ``now`` None: only finiteness."""
    if not math.isfinite(t):
        raise RecordError(f"{what}: time {t} is not finite")
    if now is None:
        return
    if t > now + MAX_CLOCK_SKEW:
        raise RecordError(f"{what}: from the future ({t - now:.0f} s ahead; clocks may differ by at most "
                          f"{MAX_CLOCK_SKEW:.0f} s)")
    if max_age is not None and t < now - max_age:
        raise RecordError(f"{what}: stale (announced {now - t:.0f} s ago, more than {max_age:.0f} s)")


def canonical_bytes(fields: dict) -> bytes:
    """What a swarm owner signs: a context string and msgpack of ``fields`` with every dict's items sorted
    by key (recursively), so the same fields always give the same bytes whatever their order on the wire.
    Floats are float64, ints minimal, bytes and str distinct (msgpack's own rules)."""
    import msgpack

    def norm(v: Any) -> Any:
        if isinstance(v, dict):
            if not all(isinstance(k, str) for k in v):
                raise RecordError("manifest has a non-string key")
            return [[k, norm(v[k])] for k in sorted(v)]
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return v

    try:
        return _SIGNED_CONTEXT + msgpack.packb(norm(fields), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise RecordError(f"manifest cannot be encoded canonically: {e}") from None


_SIGNED_CONTEXT = b"diffswarm swarm manifest\x00"  # domain separation: this signature means nothing elsewhere


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
    throughput: float  # measured rows per second of one forward pass (CFG rows count twice); a claim
    load: float  # rows queued or being computed when announced; a claim
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
        _check_peer(r, what)
        if r.state not in STATES:
            raise RecordError(f"{what}: state {r.state!r} not in {STATES}")
        if r.objective not in OBJECTIVES:
            raise RecordError(f"{what}: objective {r.objective!r} not in {OBJECTIVES}")
        if r.cluster is not None and not 0 <= r.cluster < r.num_clusters:
            raise RecordError(f"{what}: cluster {r.cluster} outside 0..{r.num_clusters - 1}")
        if r.state != "joining" and not _SHA256.match(r.checkpoint_sha256):
            raise RecordError(f"{what}: checkpoint_sha256 is not a sha256 hex digest")
        if not all(math.isfinite(v) for v in (r.throughput, r.load, r.progress)):
            raise RecordError(f"{what}: throughput/load/progress must be finite")
        if not (r.throughput >= 0 and r.load >= 0 and 0 <= r.progress <= 1 and 1 <= r.max_batch <= MAX_BATCH_ROWS):
            raise RecordError(f"{what}: negative or out-of-range throughput/load/progress/max_batch "
                              f"(max_batch <= {MAX_BATCH_ROWS})")
        if r.train_steps is not None and not 0 <= r.train_steps <= MAX_TRAIN_STEPS:
            raise RecordError(f"{what}: train_steps {r.train_steps} outside 0..{MAX_TRAIN_STEPS}")
        if r.final_loss is not None and not math.isfinite(r.final_loss):
            raise RecordError(f"{what}: final_loss {r.final_loss} is not finite")
        check_time(r.updated, None, what)
        return r

    @property
    def subkey_suffix(self) -> bytes:
        return f"/{self.expert_id}".encode()


@dataclass(frozen=True)
class RouterProvider:
    """A peer saying "I serve the router file with this sha256 at these addresses" (``rpc_router``). Not a
    statement about which router the swarm uses: that is the owner's manifest."""

    version: int
    router_sha256: str  # sha256 of the file bytes it serves
    router_bytes: int  # their size
    software: str
    peer_id: str  # where to fetch it (must be the announcing key's peer id)
    addrs: list[str]
    updated: float  # DHT time of this announcement

    def to_dict(self) -> dict:
        d = asdict(self)
        d["updated"] = float(d["updated"])
        d["addrs"] = [str(a) for a in d["addrs"]]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> RouterProvider:
        r = cls(**_strict(RouterProviderModel, d, "router provider record"))
        what = f"router provider {r.peer_id[:12]}"
        _check_peer(r, what)
        if r.version < 1:
            raise RecordError(f"{what}: version {r.version} < 1")
        if not _SHA256.match(r.router_sha256):
            raise RecordError(f"{what}: router_sha256 is not a sha256 hex digest")
        _check_router_bytes(r.router_bytes, what)
        check_time(r.updated, None, what)
        return r


@dataclass(frozen=True)
class ClusterStatsRecord:
    """A peer publishing the statistics of its own cluster's images (``router.stats.ClusterStats`` bytes),
    from which clients build the statistics router (no router peer, no central data). A claim like any
    other: readers check the blob's hash, parse it with bounds and match it against the manifest."""

    version: int
    cluster: int  # the cluster the statistics describe
    num_clusters: int  # K of the partition
    partition_hash: str
    stats_sha256: str  # sha256 of blob
    blob: bytes  # ClusterStats.to_bytes() (<= MAX_STATS_RECORD_BYTES)
    software: str
    peer_id: str  # the announcing peer (must be the announcing key's peer id)
    updated: float  # DHT time of this announcement

    @property
    def subkey_suffix(self) -> bytes:
        return f"/stats{self.cluster}".encode()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["updated"] = float(d["updated"])
        d["blob"] = bytes(d["blob"])
        return d

    @classmethod
    def from_dict(cls, d: Any) -> ClusterStatsRecord:
        r = cls(**_strict(ClusterStatsRecordModel, d, "cluster stats record"))
        what = f"cluster stats of {r.peer_id[:12]}"
        _check_peer(r, what)
        if r.version < 1:
            raise RecordError(f"{what}: version {r.version} < 1")
        if not 1 <= r.num_clusters <= MAX_CLUSTERS or not 0 <= r.cluster < r.num_clusters:
            raise RecordError(f"{what}: cluster {r.cluster} of K={r.num_clusters} is out of range")
        if not _SHA256.match(r.stats_sha256) or hashlib.sha256(r.blob).hexdigest() != r.stats_sha256:
            raise RecordError(f"{what}: the blob does not hash to stats_sha256")
        check_time(r.updated, None, what)
        return r


_MANIFEST_FIELDS = ("version", "swarm", "partition_hash", "num_clusters", "dataset_id", "image_shape", "num_classes",
                    "router_sha256", "router_weights_sha256", "router_bytes", "protocol", "software", "issued",
                    "owner_key", "signature")


@dataclass(frozen=True)
class SwarmManifest:
    """What the swarm's owner decides, signed by the owner key (see ``trust`` for naming and checks).

    ``extra`` keeps the fields of a newer version this reader does not know: they are signed too, so a
    re-announcing peer stores them unchanged and the signature still verifies."""

    version: int
    swarm: str  # NAME (the part before '@' of the swarm's full name)
    partition_hash: str  # partition the router and the swarm's experts were trained on ("" if none)
    num_clusters: int  # K
    dataset_id: str  # e.g. "fashion:28" (what class ids mean)
    image_shape: list[int]  # [C, H, W]
    num_classes: int
    router_sha256: str  # sha256 of the router file bytes (served by anyone over rpc_router)
    router_weights_sha256: str  # Router.weights_sha256 (checked again after loading)
    router_bytes: int  # file size (<= MAX_ROUTER_BYTES): the most a client downloads
    protocol: int  # RPC protocol of the swarm
    software: str  # diffswarm version that signed it
    issued: float  # DHT time of signing: the newest valid manifest wins
    owner_key: bytes  # owner's RSA public key, DER (SubjectPublicKeyInfo); its fingerprint is in the name
    signature: bytes  # owner's signature (RSA-PSS, SHA-256, base64) over canonical_bytes of every other field
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict:
        d = {name: getattr(self, name) for name in _MANIFEST_FIELDS}
        d["issued"] = float(d["issued"])
        d["image_shape"] = [int(s) for s in d["image_shape"]]
        return {**self.extra, **d}

    @property
    def has_router(self) -> bool:
        """False for a swarm without a trained router (router fields empty): clients route with the
        statistics its peers publish (``ClusterStatsRecord``)."""
        return bool(self.router_sha256)

    def signed_bytes(self) -> bytes:
        """The bytes the signature covers: every field but ``signature``, unknown ones included."""
        d = self.to_dict()
        del d["signature"]
        return canonical_bytes(d)

    @classmethod
    def from_dict(cls, d: Any) -> SwarmManifest:
        """Parse and check the fields (not the signature: ``trust.verify_manifest``)."""
        known = _strict(SwarmManifestModel, d, "swarm manifest")
        extra = {k: v for k, v in d.items() if k not in SwarmManifestModel.__fields__}
        r = cls(**known, extra=extra)
        what = f"manifest of swarm {r.swarm!r}"
        _check_common(r, what)
        if r.has_router:
            if not (_SHA256.match(r.router_sha256) and _SHA256.match(r.router_weights_sha256)):
                raise RecordError(f"{what}: router hashes are not sha256 hex digests")
            _check_router_bytes(r.router_bytes, what)
        elif r.router_weights_sha256 or r.router_bytes:
            raise RecordError(f"{what}: names no router file but a router weights hash or size")
        if not r.owner_key or not r.signature:
            raise RecordError(f"{what}: no owner key or signature")
        check_time(r.issued, None, what)
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


def parse_entries(entries: dict, kind: type, now: float | None = None) -> tuple[list, list[str]]:
    """Peer records (``ExpertRecord`` or ``RouterProvider``) from one DHT dictionary value ``{subkey:
    value}`` (values already unwrapped from ``ValueWithExpiration``). Returns (records, errors): each
    invalid entry is skipped with a one-line reason, including records whose ``peer_id`` is not the
    owner key's peer id, and (given ``now``, DHT time) records from the future or stale ones."""
    out, errors = [], []
    for subkey, value in (entries or {}).items():
        try:
            pub = owner_public_key(subkey)
            if pub is None:
                raise RecordError("subkey carries no single [owner:...] public key")
            rec = kind.from_dict(value)
            check_time(rec.updated, now, f"record of {rec.peer_id[:12]}")
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


def parse_manifests(entries: dict, now: float | None = None) -> tuple[list[SwarmManifest], list[str]]:
    """Manifests from the ``{swarm}_manifest`` dictionary, any announcer (the owner's signature inside is
    checked later, by ``trust.choose_manifest``); those issued more than ``MAX_CLOCK_SKEW`` ahead of ``now``
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
