"""The wire contract between peers and clients: RPC names, versions, message layout, limits, checks.

Both sides import this module and nothing of each other: the peer's servicer
(``diffswarm.peer.servicer.ExpertServicer``) registers handlers under ``handle_name(rpc)`` and the
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
- ``rpc_velocity_stream``: the same as ``rpc_velocity``, as a stream of parts (``stream_parts``)
  for payloads above ``MAX_UNARY_BYTES``; the first message carries uid and metadata.
- ``rpc_info``: ``ExpertUID -> ExpertInfo``; msgpack of {"protocol", "software", "peer_id", "swarm", "experts":
  [ExpertRecord dicts], "router": RouterProvider dict or None, "manifest": SwarmManifest dict or None}.
- ``rpc_checkpoint``: ``ExpertUID(uid=checkpoint weights sha256) -> stream of ExpertInfo`` chunks
  (``ROUTER_CHUNK`` bytes) of the served expert's safetensors file, at most ``MAX_CHECKPOINT_BYTES``;
  a client fetches it to check answers against its own evaluation of the same weights (it verifies
  the weights' sha256 after loading, so a peer cannot pass off other weights).
- ``rpc_router``: ``ExpertUID(uid=router sha256) -> stream of ExpertInfo`` chunks of the router
  file (``ROUTER_CHUNK`` bytes each); the client checks the sha256 of the concatenation.
- ``rpc_partition``: ``ExpertUID(uid=partition file sha256, "" = whichever it serves) -> stream of ExpertInfo``
  chunks (``ROUTER_CHUNK`` bytes) of the partition manifest file (``partition.json``) the peer serves; a joining
  volunteer stops reading past the size the owner's manifest signs (``partition_bytes``) and checks the sha256.
- ``rpc_dial_back``: ``ExpertInfo(msgpack {"addrs": [multiaddr, ...]}) -> ExpertInfo(msgpack {"reachable": bool,
  "via": multiaddr or ""})``: dial the caller back at its own addresses on a fresh connection
  (``diffswarm.peer.reachability``: at most 4 TCP addresses of the caller's own id, rate-limited).

Every incoming velocity request is checked against the expert's declared spec (``check_request``)
and refused with ``RequestError`` (which the caller receives as ``P2PHandlerError`` with the
message) instead of reaching the network.

Error answers carry one of three codes (``classify_error`` reads them back from either form):

- ``busy``: the peer is loaded or the caller is over its limits (``PeerBusy``, with ``retry_after``
  seconds): load, not a lie; try later or elsewhere.
- ``refused``: the request itself is wrong (``RequestError``): the message says what and what was expected.
- ``internal``: the peer failed on its own (``PeerInternalError``): the message carries only a short id that
  the peer logged with its traceback; nothing of the exception itself.

Session answers put them in the metadata ``{"id", "error", "code", "retry_after"}``; unary and stream
calls fail with a ``P2PHandlerError`` whose message contains ``format_error``'s prefix
``[diffswarm:CODE retry_after=S id=ID]`` (``retry_after`` for busy, ``id`` for internal).
"""

from __future__ import annotations

import math
import re
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
RPCS = ("rpc_velocity", "rpc_velocity_session", "rpc_velocity_stream", "rpc_info", "rpc_router", "rpc_checkpoint",
        "rpc_dial_back", "rpc_partition")
MAX_CHECKPOINT_BYTES = 256 << 20  # the largest expert file a peer serves and a client downloads over rpc_checkpoint

# 2 MiB: half of p2pd's 4 MiB message cap (hivemind's MAX_UNARY_PAYLOAD_SIZE); larger payloads stream
MAX_UNARY_BYTES = 2 << 20
STREAM_CHUNK_BYTES = 1 << 20  # tensor part size in streamed requests / responses
ROUTER_CHUNK = 1 << 20  # router file chunk size
MAX_METADATA_BYTES = 4096  # request metadata (msgpack map), refused above
MAX_REQUEST_ROWS = 8192  # rows in one request (a client splits larger batches)
MAX_GUIDANCE = 100.0
COMPRESSIONS = {"none": runtime_pb2.CompressionType.NONE, "float16": runtime_pb2.CompressionType.FLOAT16}

# Bounds of single stream messages, checked from the 8-byte length header before the body is read:
# protobuf framing, uid and metadata around the tensor buffers of one message fit in this slack
MESSAGE_SLACK_BYTES = 64 << 10
# one rpc_velocity_session message: the client sends requests of up to MAX_UNARY_BYTES of tensors over sessions
MAX_SESSION_MESSAGE_BYTES = MAX_UNARY_BYTES + MESSAGE_SLACK_BYTES
# one rpc_velocity_stream message: one part of split_for_streaming (STREAM_CHUNK_BYTES of buffer)
MAX_STREAM_PART_BYTES = STREAM_CHUNK_BYTES + MESSAGE_SLACK_BYTES
MAX_SMALL_MESSAGE_BYTES = 16 << 10  # requests of rpc_router (an ExpertUID) and the stream end marker
# The whole streamed request is bounded by the expert's spec (``ExpertSpec.max_request_bytes``: its most rows
# times the bytes of a row, plus slack) and so is the number of its parts (``ExpertSpec.max_stream_parts``).

MAX_RETRY_AFTER = 60.0  # a busy answer's retry_after is clipped to [0, this] (a hostile peer may claim anything)
DEFAULT_RETRY_AFTER = 1.0  # retry_after of a busy answer that gives none (or an unreadable one)
ERROR_CODES = ("busy", "refused", "internal")
# dtype names each request tensor may declare (checked before anything is decoded)
_DTYPES = {"x": ("float32",), "t": ("float32",), "labels": ("int64", "int32")}
_ITEMSIZE = {"float32": 4, "int64": 8, "int32": 4}


def handle_name(rpc: str) -> str:
    """The p2pd handle name of ``rpc`` (``"diffswarm::ExpertServicer.rpc_velocity"``): what hivemind's
    ``ServicerBase`` registers for a handler method ``rpc`` of a class named ``SERVICER`` under ``NAMESPACE``."""
    if rpc not in RPCS:
        raise ValueError(f"unknown RPC {rpc!r}; the protocol has {RPCS}")
    return f"{NAMESPACE}::{SERVICER}.{rpc}"


class RequestError(ValueError):
    """An error answer: by default a request the peer refuses (code ``refused``); the message says what
    was wrong and what was expected. Subclasses: ``PeerBusy`` (load) and ``PeerInternalError``."""

    code = "refused"

    @property
    def wire_message(self) -> str:
        """The message as a peer sends it in a ``P2PHandlerError`` (``format_error``)."""
        return format_error(self.code, str(self))


class PeerBusy(RequestError):
    """The peer cannot take this request now (its queue or memory budget is full, or the caller is over its
    rate or stream limits): load, not a lie. ``retry_after``: seconds after which it may succeed."""

    code = "busy"

    def __init__(self, message: str, retry_after: float = DEFAULT_RETRY_AFTER):
        super().__init__(message)
        self.retry_after = _clip_retry_after(retry_after)

    @property
    def wire_message(self) -> str:
        return format_error(self.code, str(self), retry_after=self.retry_after)


class PeerInternalError(RequestError):
    """The peer failed on its own (a bug, a failing forward pass). Only ``error_id`` travels: the peer logs the
    traceback under that id; no text of the exception reaches the caller."""

    code = "internal"

    def __init__(self, error_id: str, message: str | None = None):
        super().__init__(message or f"internal error on the peer (logged there as {error_id})")
        self.error_id = error_id

    @property
    def wire_message(self) -> str:
        return format_error(self.code, str(self), error_id=self.error_id)


def _clip_retry_after(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return DEFAULT_RETRY_AFTER
    return min(max(float(v), 0.0), MAX_RETRY_AFTER)


# "[diffswarm:busy retry_after=0.250] message": the fixed, parseable prefix of every error message a peer
# sends in a P2PHandlerError (hivemind prefixes it with "Failed to call handler ...: " for streams)
_ERROR_RE = re.compile(r"\[diffswarm:(busy|refused|internal)"
                       r"(?: retry_after=([^\]\s]{1,32}))?(?: id=([0-9a-f]{1,32}))?\]")


def format_error(code: str, message: str, retry_after: float | None = None, error_id: str | None = None) -> str:
    """``[diffswarm:CODE retry_after=S id=ID] message`` (retry_after only for busy, id only for internal)."""
    if code not in ERROR_CODES:
        raise ValueError(f"error code {code!r} not in {ERROR_CODES}")
    tags = f"diffswarm:{code}"
    if code == "busy":
        tags += f" retry_after={_clip_retry_after(retry_after):.3f}"
    if code == "internal" and error_id:
        tags += f" id={error_id}"
    return f"[{tags}] {message}"


def classify_error(error) -> tuple[str, float | None]:
    """(code, retry_after) of an error answer, for the client to tell load from refusals and failures.

    ``error``: a session answer's metadata (dict), the message of a ``P2PHandlerError`` from a unary or stream
    call (str), or an exception (a ``RequestError`` gives its own code; anything else is read from ``str(e)``).
    code: ``busy`` (retry_after in [0, MAX_RETRY_AFTER] seconds), ``refused``, ``internal`` (retry_after None),
    ``unknown`` (an error that is not a diffswarm error answer: an older peer, a transport failure, a timeout),
    ``ok`` (metadata without an ``error``: not an error at all)."""
    if isinstance(error, RequestError):
        return error.code, getattr(error, "retry_after", None) if error.code == "busy" else None
    if isinstance(error, dict):
        if "error" not in error:
            return "ok", None
        code = error.get("code")
        if code in ERROR_CODES:
            return code, _clip_retry_after(error.get("retry_after")) if code == "busy" else None
        error = error.get("error")
    text = error if isinstance(error, str) else str(error)
    m = _ERROR_RE.search(text)
    if m is None:
        return "unknown", None
    code = m.group(1)
    if code != "busy":
        return code, None
    try:
        retry = float(m.group(2)) if m.group(2) else DEFAULT_RETRY_AFTER
    except ValueError:
        retry = DEFAULT_RETRY_AFTER
    return code, _clip_retry_after(retry)


def error_metadata(request_id, error: RequestError) -> dict:
    """Session answer metadata of an error answer: {"id", "error", "code"} (+ "retry_after" when busy)."""
    d = {"id": request_id, "error": str(error), "code": error.code}
    if error.code == "busy":
        d["retry_after"] = float(error.retry_after)
    if error.code == "internal":
        d["error_id"] = error.error_id
    return d


def error_from_metadata(meta: dict) -> RequestError:
    """The typed error of an error answer's metadata (``PeerBusy`` / ``PeerInternalError`` / ``RequestError``)."""
    code, retry = classify_error(meta)
    text = str(meta.get("error"))[:500]
    if code == "busy":
        return PeerBusy(f"the peer is busy: {text}", retry)
    if code == "internal":
        return PeerInternalError(str(meta.get("error_id", "")), f"the peer failed: {text}")
    return RequestError(f"the peer refused the request: {text}")


@dataclass(frozen=True)
class ExpertSpec:
    """What requests to one expert must look like (from its checkpoint config)."""

    uid: str  # expert id
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int  # labels in -1..num_classes (num_classes itself = the null label)
    max_rows: int = MAX_REQUEST_ROWS

    @property
    def row_bytes(self) -> int:
        """Wire bytes of one request row: x float32 (C*H*W), t float32, label int64."""
        c, h, w = self.image_shape
        return 4 * c * h * w + 4 + 8

    @property
    def max_request_bytes(self) -> int:
        """The largest valid request's tensor bytes plus slack: streamed requests are refused above it."""
        return self.max_rows * self.row_bytes + MESSAGE_SLACK_BYTES

    @property
    def max_stream_parts(self) -> int:
        """Parts of the largest valid streamed request (STREAM_CHUNK_BYTES each, at least one per tensor)."""
        return -(-self.max_request_bytes // STREAM_CHUNK_BYTES) + 3


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


def as_sent(x: torch.Tensor, compression: str) -> torch.Tensor:
    """x as the peer receives it with ``compression`` (float16: rounded, in x's dtype): the client rounds once, so
    that its own checks of an answer compute on the peer's input (DDPM experts amplify the rounding)."""
    return x.half().to(x.dtype) if compression == "float16" else x


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


def session_request_id(metadata: bytes) -> int:
    """The ``id`` of a session request (an integer: answers are matched by it)."""
    rid = _meta_loads(metadata).get("id")
    if isinstance(rid, bool) or not isinstance(rid, int):
        raise RequestError(f"a session request needs an integer metadata id, got {str(rid)[:20]!r}")
    return rid


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
        raise error_from_metadata(meta)
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


def _check_declared(t: runtime_pb2.Tensor, name: str, shape: tuple[int, ...], compressions: tuple[int, ...]) -> None:
    """What a request tensor declares (dtype name, compression, shape, buffer length), checked before any of it
    is decoded: hivemind's decoders trust the declared dtype (``np.dtype(...)`` of any string) and shape."""
    if t.dtype not in _DTYPES[name]:
        raise RequestError(f"{name} declares dtype {t.dtype[:40]!r}, expected {' or '.join(_DTYPES[name])}")
    if t.compression not in compressions:
        raise RequestError(f"{name} uses compression {t.compression}; allowed: x uncompressed or float16, "
                           "t and labels uncompressed")
    if tuple(t.size) != shape:
        raise RequestError(f"{name} has shape {tuple(t.size)[:8]}, expected {shape}")
    itemsize = 2 if t.compression == COMPRESSIONS["float16"] else _ITEMSIZE[t.dtype]
    want = math.prod(shape) * itemsize
    if len(t.buffer) != want:
        raise RequestError(f"{name} cannot be deserialized: its shape {shape} needs {want} bytes, it carries "
                           f"{len(t.buffer)}")
    if t.requires_grad:
        raise RequestError(f"{name} must not require grad")


def check_request(spec: ExpertSpec, uid: str, tensors: list[runtime_pb2.Tensor], metadata: bytes) -> VelocityRequest:
    """Decode and check one velocity request against ``spec``; raise ``RequestError`` if anything is off.
    Everything a tensor declares (rank, shape, dtype, compression, buffer length) is checked before it is decoded."""
    if uid != spec.uid:
        raise RequestError(f"this peer serves expert {spec.uid!r}, not {uid[:100]!r}")
    meta = _meta_loads(metadata)
    proto = meta.get("protocol")
    if proto != PROTOCOL_VERSION:
        raise RequestError(f"protocol {str(proto)[:20]!r} is not supported (this peer speaks {PROTOCOL_VERSION})")
    guidance = meta.get("guidance", 1.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or not 0 <= guidance <= MAX_GUIDANCE:
        raise RequestError(f"guidance must be a finite number in [0, {MAX_GUIDANCE}], got {str(guidance)[:20]}")
    if len(tensors) != 3:
        raise RequestError(f"expected 3 tensors [x, t, labels], got {len(tensors)}")
    c, h, w = spec.image_shape
    # check declared shapes before allocating anything
    sizes = [tuple(tt.size) for tt in tensors]
    b = sizes[0][0] if sizes[0] else 0
    if len(sizes[0]) != 4 or sizes[0][1:] != (c, h, w):
        raise RequestError(f"x has shape {sizes[0][:8]}, expert {spec.uid} expects (B, {c}, {h}, {w})")
    if not 1 <= b <= spec.max_rows:
        raise RequestError(f"batch of {b} rows outside 1..{spec.max_rows}")
    if sizes[1] != (b,) or sizes[2] != (b,):
        raise RequestError(f"t and labels must have shape ({b},), got {sizes[1][:8]} and {sizes[2][:8]}")
    allowed = {v: k for k, v in COMPRESSIONS.items()}
    none = (COMPRESSIONS["none"],)
    _check_declared(tensors[0], "x", (b, c, h, w), tuple(allowed))
    _check_declared(tensors[1], "t", (b,), none)
    _check_declared(tensors[2], "labels", (b,), none)
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
