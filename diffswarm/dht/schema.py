"""The DHT records' bounds and strict field types: one table for DHT nodes and readers' error messages.

Bounds (every size a record carries; ``from_dict`` raises ``RecordError`` before anything is
allocated for an oversized value, and DHT nodes refuse to store oversized strings, lists and bytes):
ids and peer ids <= 64 characters, other strings <= 128, <= 16 addresses of <= 256 characters, image
shape (C, H, W) with C <= 16, H, W <= 4096 and C*H*W <= 2**24, num_classes <= 100,000, K <= 1024,
max_batch <= 65,536, served counts <= 10**15 and uptime <= 10 years, router file <= 64 MiB, owner key
and signature <= 1 KiB each, a manifest's signed encoding <= 16 KiB. Times: a record ``updated`` (or a manifest
``issued``) more than ``MAX_CLOCK_SKEW`` (30 s) in the future is rejected; expert and provider records
``updated`` more than ``MAX_RECORD_AGE`` (600 s) ago are stale. Throughput, load, progress and losses must be finite.

Each record is declared once, as a dataclass (:mod:`diffswarm.dht.records`) whose fields carry their
wire type (``Int``, ``Id``, ``Addrs``, ...: the Python type annotated with its strict pydantic type);
:func:`wire_model` derives from it the pydantic model hivemind's ``SchemaValidator`` checks.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Annotated, Any

import pydantic.v1 as pydantic
from pydantic.v1 import StrictBool, StrictFloat, StrictInt, conbytes, conlist, constr

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
MAX_SERVED_COUNT = 10**15  # an ExpertRecord's served_rows / served_images / served_clients (claims)
MAX_UPTIME = 10 * 365 * 86400.0  # seconds; an ExpertRecord's uptime (a claim)
MAX_ROUTER_BYTES = 64 << 20  # the router file a client will download
MAX_PARTITION_BYTES = 64 << 20  # the partition manifest file a joining volunteer will download (rpc_partition)
MAX_STATS_RECORD_BYTES = 64 << 10  # a cluster-statistics blob in a stats record (router.stats.blob.MAX_STATS_BYTES)
MAX_KEY_BYTES = 1024  # owner public key (DER; RSA-4096 is 550 bytes)
MAX_SIGNATURE_BYTES = 1024  # base64 of an RSA-4096 signature is 684 bytes
MAX_MANIFEST_BYTES = 16 << 10  # canonical signed encoding of a manifest, unknown fields included
MAX_CLOCK_SKEW = 30.0  # seconds a record's time may be ahead of ours
MAX_RECORD_AGE = 600.0  # seconds after which an expert or provider record is stale (heartbeats are every ~10 s)


class RecordError(ValueError):
    """A DHT record that does not follow the schema; the caller skips it and logs why."""


# ---------------------------------------------------------------------------------------------
# pydantic v1 types for hivemind's SchemaValidator (strict types, no conversions allowed).
# Extra fields are allowed inside a record so that older nodes keep storing newer peers' records.
# Fields with a default are optional (added by later versions); a nullable field without a default
# is still required (pydantic v1 makes ``X | None`` optional otherwise). The constrained types
# carry the size bounds; ``check_sizes`` reads them from here, so the DHT's check and the reader's
# clear error message share one table.

IdStr = constr(strict=True, max_length=MAX_ID_CHARS)
TextStr = constr(strict=True, max_length=MAX_TEXT_CHARS)
AddrStr = constr(strict=True, max_length=MAX_ADDR_CHARS)
AddrList = conlist(AddrStr, max_items=MAX_ADDRS)
ShapeList = conlist(StrictInt, max_items=3)
KeyBytes = conbytes(strict=True, max_length=MAX_KEY_BYTES)
SigBytes = conbytes(strict=True, max_length=MAX_SIGNATURE_BYTES)
StatsBytes = conbytes(strict=True, max_length=MAX_STATS_RECORD_BYTES)

# The field types of the record dataclasses: the Python type, annotated with its wire type.
Int = Annotated[int, StrictInt]
OptInt = Annotated[int | None, StrictInt | None]
Float = Annotated[float, StrictFloat]
OptFloat = Annotated[float | None, StrictFloat | None]
OptBool = Annotated[bool | None, StrictBool | None]
Id = Annotated[str, IdStr]
Text = Annotated[str, TextStr]
Addrs = Annotated[list[str], AddrList]
Shape = Annotated[list[int], ShapeList]
OwnerKey = Annotated[bytes, KeyBytes]
Signature = Annotated[bytes, SigBytes]
StatsBlob = Annotated[bytes, StatsBytes]


class RecordModel(pydantic.BaseModel):
    """Base of the derived pydantic models: unknown (newer) fields allowed, optional fields left out."""

    def dict(self, **kwargs) -> dict:
        """Leave out optional fields the record did not carry: ``SchemaValidator`` compares this with
        the stored value, so a version-1 record (without version-2 fields) must come back unchanged."""
        d = super().dict(**kwargs)
        for name, f in self.__fields__.items():
            if not f.required and name not in self.__fields_set__:
                d.pop(f.alias if kwargs.get("by_alias") else name, None)
        return d

    class Config:
        extra = pydantic.Extra.allow


def wire_model(record: type) -> type[RecordModel]:
    """The pydantic model ``<Record>Model`` of a record dataclass: one strict field per dataclass field
    annotated with a wire type, in the same order, required unless the dataclass gives a default.
    Fields without a wire type (``SwarmManifest.extra``) are not on the wire."""
    hints = typing.get_type_hints(record, include_extras=True)
    fields = {}
    for f in dataclasses.fields(record):
        hint = hints[f.name]
        if typing.get_origin(hint) is not Annotated:
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        fields[f.name] = (hint.__metadata__[0], ... if required else f.default)
    return pydantic.create_model(f"{record.__name__}Model", __base__=RecordModel, __module__=record.__module__,
                                 **fields)


def check_sizes(model: type[RecordModel], d: dict, what: str) -> None:
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


def strict_fields(model: type[RecordModel], d: Any, what: str) -> dict:
    """The schema's fields of ``d``, exactly typed and within the schema's sizes; optional fields that
    ``d`` lacks (records of an older version) read as None."""
    if not isinstance(d, dict):
        raise RecordError(f"{what} must be a dict, got {type(d).__name__}")
    known = {k: v for k, v in d.items() if k in model.__fields__}
    missing = sorted(name for name, f in model.__fields__.items() if f.required and name not in known)
    if missing:
        raise RecordError(f"{what} lacks fields {missing}")
    check_sizes(model, known, what)
    try:
        parsed = model.parse_obj(known).dict()  # only the fields present (RecordModel.dict)
    except pydantic.ValidationError as e:
        raise RecordError(f"{what} has wrong field types: {e.errors()}") from None
    if parsed != known:  # strict types should make this impossible; guard against silent coercion
        raise RecordError(f"{what} needed type conversions")
    return {name: parsed.get(name) for name in model.__fields__}


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
