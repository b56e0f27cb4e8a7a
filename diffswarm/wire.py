"""The wire contract between peers and clients: RPC names, versions, message layout, limits, checks.

Both sides import this module and nothing of each other: the peer's servicer
(``diffswarm.peer.server.ExpertServicer``) registers handlers under ``handle_name(rpc)`` and the
client calls those names through hivemind's public ``P2P.call_protobuf_handler`` /
``iterate_protobuf_handler`` / ``call_binary_stream_handler``. Protobufs are hivemind's
``runtime_pb2``; metadata is msgpack.

RPCs (handle names ``diffswarm::ExpertServicer.<rpc>``):

- ``rpc_velocity``: unary ``ExpertRequest -> ExpertResponse``.
  request: ``uid`` = expert id, ``tensors`` = [x (B, C, H, W) float32 (optionally float16-compressed), t (B,) float32,
  labels (B,) int64], ``metadata`` = {"protocol": 1, "guidance": float}.
  response: ``tensors`` = [v (B, C, H, W) float32, compressed like x], ``metadata`` = {"rows", "queue_ms",
  "compute_ms", "load", "throughput"}.
- ``rpc_velocity_session``: a long-lived stream of velocity requests, each tagged with an ``id`` in
  its metadata; answers come back tagged with the same id (``{"id", "error"}`` for a refused
  request, the session goes on). One session per client and peer saves the per-call stream setup
  of unary calls (4x less daemon CPU per call on loopback); the client uses it for payloads up to
  ``MAX_UNARY_BYTES``.
- ``rpc_velocity_stream``: the same as ``rpc_velocity``, as a stream of parts (``split_for_streaming``)
  for payloads above ``MAX_UNARY_BYTES``; the first message carries uid and metadata.
- ``rpc_info``: ``ExpertUID -> ExpertInfo``; msgpack of {"protocol", "software", "experts":
  [ExpertRecord dicts], "router": SwarmRecord dict or None}.
- ``rpc_router``: ``ExpertUID(uid=router sha256) -> stream of ExpertInfo`` chunks of the router
  file (``ROUTER_CHUNK`` bytes each); the client checks the sha256 of the concatenation.

Every incoming velocity request is checked against the expert's declared spec (``check_request``)
and refused with ``RequestError`` (which the caller receives as ``P2PHandlerError`` with the
message) instead of reaching the network.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

PROTOCOL_VERSION = 1  # RPC protocol; clients skip peers that speak another one
NAMESPACE = "diffswarm"  # handle-name prefix of every RPC
SERVICER = "ExpertServicer"  # the servicer class name in handle names (hivemind's ServicerBase convention)
OBJECTIVES = ("ddpm", "fm")  # training objectives an expert may announce
RPCS = ("rpc_velocity", "rpc_velocity_session", "rpc_velocity_stream", "rpc_info", "rpc_router")

# 2 MiB: half of p2pd's 4 MiB message cap (hivemind's MAX_UNARY_PAYLOAD_SIZE); larger payloads stream
MAX_UNARY_BYTES = 2 << 20
STREAM_CHUNK_BYTES = 1 << 20  # tensor part size in streamed requests / responses
ROUTER_CHUNK = 1 << 20  # router file chunk size
MAX_METADATA_BYTES = 4096
MAX_REQUEST_ROWS = 8192  # rows in one request (a client splits larger batches)
MAX_GUIDANCE = 100.0
COMPRESSIONS = {"none": runtime_pb2.CompressionType.NONE, "float16": runtime_pb2.CompressionType.FLOAT16}


def handle_name(rpc: str) -> str:
    """The p2pd handle name of ``rpc`` (``"diffswarm::ExpertServicer.rpc_velocity"``): what hivemind's
    ``ServicerBase`` registers for a handler method ``rpc`` of a class named ``SERVICER`` under ``NAMESPACE``."""
    if rpc not in RPCS:
        raise ValueError(f"unknown RPC {rpc!r}; the protocol has {RPCS}")
    return f"{NAMESPACE}::{SERVICER}.{rpc}"


class RequestError(ValueError):
    """A request the peer refuses; the message says what was wrong and what was expected."""


@dataclass(frozen=True)
class ExpertSpec:
    """What requests to one expert must look like (from its checkpoint config)."""

    uid: str  # expert id
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int  # labels in -1..num_classes (num_classes itself = the null label)
    max_rows: int = MAX_REQUEST_ROWS


@dataclass
class VelocityRequest:
    x: torch.Tensor  # (B, C, H, W) float32
    t: torch.Tensor  # (B,) float32
    labels: torch.Tensor  # (B,) int64
    guidance: float
    compression: str  # how x travelled ("none" | "float16"); the answer goes back the same way

    @property
    def rows(self) -> int:
        return self.x.shape[0]


def _meta_dumps(d: dict) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def _meta_loads(b: bytes) -> dict:
    if len(b) > MAX_METADATA_BYTES:
        raise RequestError(f"metadata of {len(b)} bytes exceeds {MAX_METADATA_BYTES}")
    try:
        d = msgpack.unpackb(b, raw=False) if b else {}
    except Exception as e:  # msgpack raises several exception types for garbage
        raise RequestError(f"metadata is not msgpack: {e}") from None
    if not isinstance(d, dict):
        raise RequestError("metadata must be a msgpack map")
    return d


# ---------------------------------------------------------------------------------------------
# client side


def encode_request(uid: str, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float,
                   compression: str = "none") -> list[runtime_pb2.Tensor]:
    """Serialized [x, t, labels] (CPU tensors)."""
    comp = COMPRESSIONS[compression]
    return [serialize_torch_tensor(x.detach().cpu().float().contiguous(), comp),
            serialize_torch_tensor(t.detach().cpu().float().contiguous()),
            serialize_torch_tensor(labels.detach().cpu().long().contiguous())]


def request_metadata(guidance: float, request_id: int | None = None) -> bytes:
    d = {"protocol": PROTOCOL_VERSION, "guidance": float(guidance)}
    if request_id is not None:
        d["id"] = int(request_id)
    return _meta_dumps(d)


def load_metadata(b: bytes) -> dict:
    """Decode request or response metadata (msgpack map, at most ``MAX_METADATA_BYTES``)."""
    return _meta_loads(b)


def dump_metadata(d: dict) -> bytes:
    return _meta_dumps(d)


def payload_bytes(tensors: Iterable[runtime_pb2.Tensor]) -> int:
    return sum(len(t.buffer) for t in tensors)


def stream_parts(tensors: Iterable[runtime_pb2.Tensor]) -> list[runtime_pb2.Tensor]:
    return [p for t in tensors for p in split_for_streaming(t, STREAM_CHUNK_BYTES)]


def combine_parts(parts: Iterable[runtime_pb2.Tensor]) -> list[runtime_pb2.Tensor]:
    """Inverse of ``stream_parts``: a new tensor starts at each part that carries a dtype."""
    out, cur = [], []
    for p in parts:
        if p.dtype and cur:
            out.append(combine_from_streaming(cur))
            cur = []
        cur.append(p)
    if cur:
        out.append(combine_from_streaming(cur))
    return out


def decode_response(tensors: list[runtime_pb2.Tensor], metadata: bytes | dict, rows: int,
                    shape: tuple[int, ...]) -> tuple[torch.Tensor, dict]:
    """(v float32 (B, C, H, W), response metadata); raises ``RequestError`` on a malformed answer."""
    meta = metadata if isinstance(metadata, dict) else _meta_loads(metadata)
    if "error" in meta:
        raise RequestError(f"the peer refused the request: {meta['error']}")
    if len(tensors) != 1:
        raise RequestError(f"response carries {len(tensors)} tensors, expected 1")
    v = _deserialize(tensors[0], "v").float()
    if tuple(v.shape) != (rows, *shape):
        raise RequestError(f"response v has shape {tuple(v.shape)}, expected {(rows, *shape)}")
    return v, meta


# ---------------------------------------------------------------------------------------------
# peer side


def _deserialize(t: runtime_pb2.Tensor, name: str) -> torch.Tensor:
    try:
        return deserialize_torch_tensor(t)
    except Exception as e:  # unknown dtype, buffer size not matching the shape, ...
        raise RequestError(f"tensor {name} cannot be deserialized: {e}") from None


def check_request(spec: ExpertSpec, uid: str, tensors: list[runtime_pb2.Tensor], metadata: bytes) -> VelocityRequest:
    """Decode and check one velocity request against ``spec``; raise ``RequestError`` if anything is off."""
    if uid != spec.uid:
        raise RequestError(f"this peer serves expert {spec.uid!r}, not {uid!r}")
    meta = _meta_loads(metadata)
    proto = meta.get("protocol")
    if proto != PROTOCOL_VERSION:
        raise RequestError(f"protocol {proto!r} is not supported (this peer speaks {PROTOCOL_VERSION})")
    guidance = meta.get("guidance", 1.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or not 0 <= guidance <= MAX_GUIDANCE:
        raise RequestError(f"guidance must be a finite number in [0, {MAX_GUIDANCE}], got {guidance!r}")
    if len(tensors) != 3:
        raise RequestError(f"expected 3 tensors [x, t, labels], got {len(tensors)}")
    c, h, w = spec.image_shape
    # check declared shapes before allocating anything
    sizes = [tuple(tt.size) for tt in tensors]
    b = sizes[0][0] if sizes[0] else 0
    if len(sizes[0]) != 4 or sizes[0][1:] != (c, h, w):
        raise RequestError(f"x has shape {sizes[0]}, expert {spec.uid} expects (B, {c}, {h}, {w})")
    if not 1 <= b <= spec.max_rows:
        raise RequestError(f"batch of {b} rows outside 1..{spec.max_rows}")
    if sizes[1] != (b,) or sizes[2] != (b,):
        raise RequestError(f"t and labels must have shape ({b},), got {sizes[1]} and {sizes[2]}")
    allowed = {v: k for k, v in COMPRESSIONS.items()}
    if tensors[0].compression not in allowed or tensors[1].compression != COMPRESSIONS["none"] \
            or tensors[2].compression != COMPRESSIONS["none"]:
        raise RequestError("x may be sent uncompressed or as float16; t and labels uncompressed")
    x = _deserialize(tensors[0], "x")
    t = _deserialize(tensors[1], "t")
    labels = _deserialize(tensors[2], "labels")
    if x.dtype != torch.float32:
        raise RequestError(f"x has dtype {x.dtype}, expected float32 (optionally sent as float16)")
    if t.dtype != torch.float32:
        raise RequestError(f"t has dtype {t.dtype}, expected float32")
    if labels.dtype not in (torch.int64, torch.int32):
        raise RequestError(f"labels have dtype {labels.dtype}, expected int64")
    if not torch.isfinite(x).all():
        raise RequestError("x contains NaN or inf")
    if not (torch.isfinite(t).all() and (t >= 0).all() and (t <= 1).all()):
        raise RequestError("t must be finite and in [0, 1]")
    if ((labels < -1) | (labels > spec.num_classes)).any():
        raise RequestError(f"labels must be in -1..{spec.num_classes} (-1 = unconditional)")
    return VelocityRequest(x, t, labels.long(), float(guidance), allowed[tensors[0].compression])


def encode_response(v: torch.Tensor, compression: str, meta: dict) -> tuple[list[runtime_pb2.Tensor], bytes]:
    return [serialize_torch_tensor(v.detach().cpu().float().contiguous(), COMPRESSIONS[compression])], _meta_dumps(meta)


def encode_info(d: dict) -> bytes:
    return _meta_dumps(d)


def decode_info(b: bytes) -> dict:
    if len(b) > 1 << 20:
        raise RequestError("info answer too large")
    try:
        d = msgpack.unpackb(b, raw=False)
    except Exception as e:
        raise RequestError(f"info answer is not msgpack: {e}") from None
    if not isinstance(d, dict):
        raise RequestError("info answer must be a map")
    return d
