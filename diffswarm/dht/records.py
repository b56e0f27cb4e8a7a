"""What peers announce in the DHT: the record types, each declared once (strict, versioned, bounded).

Each record is one frozen dataclass whose fields carry their wire types (:mod:`diffswarm.dht.schema`);
its pydantic model (``ExpertRecordModel``, ...), which DHT nodes validate stored values with, is derived
from it by ``wire_model``. ``from_dict`` parses a record from the network: exact types, the schema's
sizes, then each record's own checks (``RecordError`` on anything wrong); ``to_dict`` is what is
announced. Where records live in the DHT and how a DHT dictionary is read: :mod:`diffswarm.dht.entries`.

- ``ExpertRecord``: one per served expert.
- ``RouterProvider``: a peer that serves router bytes.
- ``ClusterStatsRecord``: a peer's published cluster statistics (the statistics router's input).
- ``AttestationRecord``: a validator's signed admission score of one checkpoint (version 5).
- ``SwarmManifest``: what the swarm's owner decides, signed by the owner (``canonical_bytes`` is what
  is signed; signing, verifying and choosing among manifests: :mod:`diffswarm.dht.names`).

Versioning: ``version`` is the record schema version (``RECORD_VERSION``; the history of each version is in
docs/protocol.md, "Versions"). Versions only add fields: readers ignore unknown fields (``from_dict``), new optional
fields are left out of ``to_dict`` when unset so an older reader sees its own layout, a newer manifest's fields
stay in ``extra`` (signed, verified, ignored), and a change of meaning gets new DHT keys. ``protocol`` is the RPC
protocol version (``diffswarm.protocol.wire``); clients skip peers speaking another major protocol.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from diffswarm.admission.rule import ADMISSION_FIELD, AdmissionRule
from diffswarm.dht.schema import (
    MAX_BATCH_ROWS,
    MAX_CHANNELS,
    MAX_CLASSES,
    MAX_CLUSTERS,
    MAX_IMAGE_ELEMENTS,
    MAX_IMAGE_SIDE,
    MAX_PARTITION_BYTES,
    MAX_ROUTER_BYTES,
    MAX_SERVED_COUNT,
    MAX_TRAIN_STEPS,
    MAX_UPTIME,
    Addrs,
    Float,
    Id,
    Int,
    OptBool,
    OptFloat,
    OptInt,
    OwnerKey,
    RecordError,
    Shape,
    Signature,
    StatsBlob,
    Text,
    check_time,
    strict_fields,
    wire_model,
)
from diffswarm.experts.config import OBJECTIVES

RECORD_VERSION = 6  # 2: optional ExpertRecord.train_steps / final_loss; 3: signed SwarmManifest + RouterProvider;
#                    4: SwarmManifest.cluster_stats_sha256 (owner-signed statistics, in ``extra``);
#                    5: optional ExpertRecord.relayed and contribution claims served_rows / served_images /
#                       served_clients / uptime; ExpertRecord.eta_s; SwarmManifest.partition_sha256 /
#                       partition_bytes and SwarmManifest.admission (in ``extra``); AttestationRecord
CONTRIBUTION_FIELDS = ("served_rows", "served_images", "served_clients")  # ExpertRecord counters (v5), all claims
STATS_HASHES_FIELD = "cluster_stats_sha256"  # manifest field: the owner-signed sha256 of each cluster's statistics
PARTITION_SHA_FIELD = "partition_sha256"  # manifest field: sha256 of the partition manifest file (rpc_partition)
PARTITION_BYTES_FIELD = "partition_bytes"  # manifest field: its size in bytes (<= MAX_PARTITION_BYTES)
STATES = ("joining", "online", "offline")
ATTESTATION_SUBJECTS = ("checkpoint", "stats")  # what an AttestationRecord vouches for
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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


def canonical_bytes(fields: dict, context: bytes | None = None) -> bytes:
    """What a swarm owner (or, with ``context``, a validator) signs: a context string and msgpack of ``fields`` with
    every dict's items sorted by key (recursively), so the same fields always give the same bytes whatever their
    order on the wire. Floats are float64, ints minimal, bytes and str distinct (msgpack's own rules)."""
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
        return (context or _SIGNED_CONTEXT) + msgpack.packb(norm(fields), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise RecordError(f"manifest cannot be encoded canonically: {e}") from None


_SIGNED_CONTEXT = b"diffswarm swarm manifest\x00"  # domain separation: this signature means nothing elsewhere
_ATTESTATION_CONTEXT = b"diffswarm attestation\x00"  # what a validator's signature means


@dataclass(frozen=True)
class ExpertRecord:
    """What a peer announces about one expert it serves (or trains, while ``state == "joining"``)."""

    version: Int  # record schema version (RECORD_VERSION)
    expert_id: Id  # e.g. "c3-ddpm"
    cluster: OptInt  # partition cluster (None: trained on all data)
    num_clusters: Int  # K of the partition
    partition_hash: Text  # partition manifest the expert was trained on ("" if none)
    objective: Text  # ddpm | fm
    schedule: Text  # "vp-cosine-1000" (ddpm) | "flow" (fm)
    image_shape: Shape  # [C, H, W] of x
    num_classes: Int  # class conditioning: labels in -1..num_classes-1 (-1 = none); 0 = unconditional
    checkpoint_sha256: Text  # expert weights sha256 ("" while joining)
    software: Text  # diffswarm version of the peer
    protocol: Int  # RPC protocol version
    state: Text  # joining | online | offline
    progress: Float  # training progress in [0, 1] (1 when online)
    throughput: Float  # measured rows per second of one forward pass (CFG rows count twice); a claim
    load: Float  # rows queued or being computed when announced; a claim
    max_batch: Int  # most rows the peer runs in one forward pass
    peer_id: Id  # base58 libp2p peer id serving the RPCs
    addrs: Addrs  # multiaddrs to reach the peer
    updated: Float  # DHT time of this announcement
    train_steps: OptInt = None  # training steps done (checkpoint's when online, current while joining); v2
    final_loss: OptFloat = None  # last training loss (checkpoint's when online, latest step's while joining); v2
    # v5: reachable only through a libp2p circuit relay (its addrs are /p2p-circuit ones; clients prefer direct
    # peers); None: not said (older peers)
    relayed: OptBool = None
    # v5: what the peer says it served with this expert since it started, claims (peer.contribution): request rows,
    # images (rows at the sampler's first step, t = 1), distinct callers; and seconds since it went online
    served_rows: OptInt = None
    served_images: OptInt = None
    served_clients: OptInt = None
    uptime: OptFloat = None
    eta_s: OptFloat = None  # v5: seconds of training left while joining (None: unknown or online); a claim

    def to_dict(self) -> dict:
        d = asdict(self)
        for f in ("progress", "throughput", "load", "updated"):
            d[f] = float(d[f])
        if d["train_steps"] is not None:
            d["train_steps"] = int(d["train_steps"])
        for f in ("final_loss", "eta_s"):
            if d[f] is not None:
                d[f] = float(d[f])
        for f in CONTRIBUTION_FIELDS:
            if d[f] is not None:
                d[f] = int(d[f])
        if d["uptime"] is not None:
            d["uptime"] = float(d["uptime"])
        if d["relayed"] is not None:
            d["relayed"] = bool(d["relayed"])
        # not said: left out, so older readers see a v4 layout
        for f in ("relayed", *CONTRIBUTION_FIELDS, "uptime", "eta_s"):
            if d[f] is None:
                del d[f]
        d["image_shape"] = [int(s) for s in d["image_shape"]]
        d["addrs"] = [str(a) for a in d["addrs"]]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> ExpertRecord:
        """Parse and check a record from the network; unknown fields are ignored, anything else wrong
        raises ``RecordError``."""
        r = cls(**strict_fields(ExpertRecordModel, d, "expert record"))
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
        for f in CONTRIBUTION_FIELDS:
            v = getattr(r, f)
            if v is not None and not 0 <= v <= MAX_SERVED_COUNT:
                raise RecordError(f"{what}: {f} {v} outside 0..{MAX_SERVED_COUNT}")
        if r.uptime is not None and not (math.isfinite(r.uptime) and 0 <= r.uptime <= MAX_UPTIME):
            raise RecordError(f"{what}: uptime {r.uptime} outside 0..{MAX_UPTIME:.0f} s")
        if r.eta_s is not None and not (math.isfinite(r.eta_s) and r.eta_s >= 0):
            raise RecordError(f"{what}: eta_s {r.eta_s} is not a finite number of seconds >= 0")
        check_time(r.updated, None, what)
        return r

    @property
    def subkey_suffix(self) -> bytes:
        return f"/{self.expert_id}".encode()


@dataclass(frozen=True)
class RouterProvider:
    """A peer saying "I serve the router file with this sha256 at these addresses" (``rpc_router``). Not a
    statement about which router the swarm uses: that is the owner's manifest."""

    version: Int
    router_sha256: Text  # sha256 of the file bytes it serves
    router_bytes: Int  # their size
    software: Text
    peer_id: Id  # where to fetch it (must be the announcing key's peer id)
    addrs: Addrs
    updated: Float  # DHT time of this announcement

    def to_dict(self) -> dict:
        d = asdict(self)
        d["updated"] = float(d["updated"])
        d["addrs"] = [str(a) for a in d["addrs"]]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> RouterProvider:
        r = cls(**strict_fields(RouterProviderModel, d, "router provider record"))
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
    """A peer publishing the statistics of its own cluster's images (``router.stats.blob.ClusterStats`` bytes),
    from which clients build the statistics router (no router peer, no central data). A claim like any
    other: readers check the blob's hash, parse it with bounds and match it against the manifest."""

    version: Int
    cluster: Int  # the cluster the statistics describe
    num_clusters: Int  # K of the partition
    partition_hash: Text
    stats_sha256: Text  # sha256 of blob
    blob: StatsBlob  # ClusterStats.to_bytes() (<= MAX_STATS_RECORD_BYTES)
    software: Text
    peer_id: Id  # the announcing peer (must be the announcing key's peer id)
    updated: Float  # DHT time of this announcement

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
        r = cls(**strict_fields(ClusterStatsRecordModel, d, "cluster stats record"))
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


@dataclass(frozen=True)
class SwarmManifest:
    """What the swarm's owner decides, signed by the owner key (see ``names`` for naming and checks).

    ``extra`` keeps the fields of a newer version this reader does not know: they are signed too, so a
    re-announcing peer stores them unchanged and the signature still verifies."""

    version: Int
    swarm: Id  # NAME (the part before '@' of the swarm's full name)
    partition_hash: Text  # partition the router and the swarm's experts were trained on ("" if none)
    num_clusters: Int  # K
    dataset_id: Text  # e.g. "fashion:28" (what class ids mean)
    image_shape: Shape  # [C, H, W]
    num_classes: Int
    router_sha256: Text  # sha256 of the router file bytes (served by anyone over rpc_router)
    router_weights_sha256: Text  # Router.weights_sha256 (checked again after loading)
    router_bytes: Int  # file size (<= MAX_ROUTER_BYTES): the most a client downloads
    protocol: Int  # RPC protocol of the swarm
    software: Text  # diffswarm version that signed it
    issued: Float  # DHT time of signing: the newest valid manifest wins
    owner_key: OwnerKey  # owner's RSA public key, DER (SubjectPublicKeyInfo); its fingerprint is in the name
    signature: Signature  # owner's signature (RSA-PSS, SHA-256, base64) over canonical_bytes of every other field
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict:
        d = {name: getattr(self, name) for name in SwarmManifestModel.__fields__}
        d["issued"] = float(d["issued"])
        d["image_shape"] = [int(s) for s in d["image_shape"]]
        return {**self.extra, **d}

    @property
    def signed_stats(self) -> list[str]:
        """Per cluster, the sha256 of the statistics blob the owner signed ("" for a cluster it signed none for;
        all "" when the manifest names none). Checked by ``from_dict``."""
        return list(self.extra.get(STATS_HASHES_FIELD) or [""] * self.num_clusters)

    @property
    def admission(self) -> AdmissionRule | None:
        """The owner's admission rule (None: the swarm admits every checkpoint, as before version 5). Checked by
        ``from_dict``."""
        d = self.extra.get(ADMISSION_FIELD)
        return None if d is None else AdmissionRule.from_field(d)

    @property
    def signed_partition(self) -> tuple[str, int] | None:
        """(sha256, size in bytes) of the partition manifest file the owner signed, None if it signed none.
        Checked by ``from_dict``."""
        sha = self.extra.get(PARTITION_SHA_FIELD)
        return (sha, int(self.extra[PARTITION_BYTES_FIELD])) if sha else None

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
        """Parse and check the fields (not the signature: ``names.verify_manifest``)."""
        known = strict_fields(SwarmManifestModel, d, "swarm manifest")
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
        hashes = extra.get(STATS_HASHES_FIELD)
        if hashes is not None and not (isinstance(hashes, list) and len(hashes) == r.num_clusters and all(
                isinstance(h, str) and (h == "" or _SHA256.match(h)) for h in hashes)):
            raise RecordError(f"{what}: {STATS_HASHES_FIELD} must be {r.num_clusters} sha256 hex digests (or \"\")")
        try:
            r.admission  # noqa: B018 (parsed to check it)
        except ValueError as e:
            raise RecordError(f"{what}: {e}") from None
        _check_partition_file(extra, what)
        check_time(r.issued, None, what)
        return r


@dataclass(frozen=True)
class AttestationRecord:
    """A validator's signed score of one checkpoint for one cluster (``admission.score``), announced by any peer
    (the signature inside, by a key the owner's manifest names, is what counts; ``admission.rule.decide``)."""

    version: Int
    subject: Text  # "checkpoint": an expert's score; "stats": a cluster-statistics blob that matches the data
    swarm: Id  # NAME of the swarm (a signature for one swarm means nothing in another)
    checkpoint_sha256: Text  # the expert's weights sha256 (subject "stats": the statistics blob's sha256)
    cluster: Int  # the cluster it was scored for (the one its record announces)
    num_clusters: Int
    partition_hash: Text
    score: Float  # mean flow-matching loss on the cluster's validation triples (stats: the largest relative deviation)
    baseline: Float  # loss of predicting v = 0 on the same triples (stats: 0)
    in_classes: OptFloat  # loss on the validation images of classes its data contains (None: n/a)
    out_classes: OptFloat  # loss on test images of classes its data does not contain (None: n/a)
    triples: Int  # triples scored (stats: images the statistics were recomputed from)
    seed: Int  # the admission seed the triples were drawn with
    issued: Float  # DHT time the score was computed
    validator_key: OwnerKey  # the validator's RSA public key, DER
    peer_id: Id  # the announcing peer (must be the announcing key's peer id)
    updated: Float  # DHT time of this announcement (not signed: re-announcing does not re-sign)
    signature: Signature  # validator's signature over canonical_bytes of every field but peer_id, updated, signature

    @property
    def subkey_suffix(self) -> bytes:
        return f"/{self.subject[:1]}{self.checkpoint_sha256[:16]}/{self.cluster}/{self.validator_key_fp}".encode()

    @property
    def validator_key_fp(self) -> str:
        return hashlib.sha256(self.validator_key).hexdigest()[:32]

    def to_dict(self) -> dict:
        d = asdict(self)
        for f in ("score", "baseline", "issued", "updated"):
            d[f] = float(d[f])
        return d

    def signed_bytes(self) -> bytes:
        d = self.to_dict()
        for f in ("peer_id", "updated", "signature"):
            del d[f]
        return canonical_bytes(d, _ATTESTATION_CONTEXT)

    @classmethod
    def from_dict(cls, d: Any) -> AttestationRecord:
        """Parse and check the fields (not the signature: ``verify_attestation``)."""
        r = cls(**strict_fields(AttestationRecordModel, d, "attestation"))
        what = f"attestation from {r.peer_id[:12]}"
        _check_peer(r, what)
        if r.version < 1:
            raise RecordError(f"{what}: version {r.version} < 1")
        if not _SHA256.match(r.checkpoint_sha256):
            raise RecordError(f"{what}: checkpoint_sha256 is not a sha256 hex digest")
        if not 1 <= r.num_clusters <= MAX_CLUSTERS or not 0 <= r.cluster < r.num_clusters:
            raise RecordError(f"{what}: cluster {r.cluster} of K={r.num_clusters} is out of range")
        floats = [r.score, r.baseline] + [v for v in (r.in_classes, r.out_classes) if v is not None]
        if not all(math.isfinite(v) and v >= 0 for v in floats):
            raise RecordError(f"{what}: scores must be finite and >= 0")
        if r.subject not in ATTESTATION_SUBJECTS:
            raise RecordError(f"{what}: subject {r.subject!r} not in {ATTESTATION_SUBJECTS}")
        if not (0 < r.triples <= 10**9 and 0 <= r.seed < 2**63):
            raise RecordError(f"{what}: triples {r.triples} or seed out of range")
        if not r.validator_key or not r.signature:
            raise RecordError(f"{what}: no validator key or signature")
        check_time(r.issued, None, what)
        check_time(r.updated, None, what)
        return r


def _check_partition_file(extra: dict, what: str) -> None:
    """A manifest's optional partition file fields: both or neither, a sha256 and a size within bounds."""
    sha, size = extra.get(PARTITION_SHA_FIELD), extra.get(PARTITION_BYTES_FIELD)
    if sha is None and size is None:
        return
    if not (isinstance(sha, str) and _SHA256.match(sha)):
        raise RecordError(f"{what}: {PARTITION_SHA_FIELD} is not a sha256 hex digest")
    if type(size) is not int or not 1 <= size <= MAX_PARTITION_BYTES:
        raise RecordError(f"{what}: {PARTITION_BYTES_FIELD} {size!r} outside 1..{MAX_PARTITION_BYTES} "
                          f"({MAX_PARTITION_BYTES >> 20} MiB)")


# the pydantic models hivemind's SchemaValidator checks stored values with (see diffswarm.dht.entries)
ExpertRecordModel = wire_model(ExpertRecord)
RouterProviderModel = wire_model(RouterProvider)
ClusterStatsRecordModel = wire_model(ClusterStatsRecord)
SwarmManifestModel = wire_model(SwarmManifest)
AttestationRecordModel = wire_model(AttestationRecord)
