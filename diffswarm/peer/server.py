"""A volunteer peer: joins the DHT, optionally trains its expert, serves it, announces it.

Lifecycle (``Peer``), all in one asyncio loop (uvloop where available):

1. ``start``: resolves the swarm's full name ``NAME@FINGERPRINT`` (``dht.trust``; a founding peer
   with ``--router`` and an owner key makes it), P2P daemon + DHT node (``SwarmDHT``); prints the
   name and the multiaddrs others should use.
2. ``train`` (only without a checkpoint): trains the expert on its cluster in a worker thread
   while the heartbeat announces ``joining`` with the training progress.
3. ``serve``: loads the expert, measures its throughput, registers the RPC handlers, announces
   ``online``; re-announces every ``announce_period`` with expiration ``expire_factor`` times
   that, carrying the current load and throughput. Every heartbeat also re-announces the owner's
   newest valid manifest (signed by this peer if it holds the owner key) and, for a peer serving
   router bytes, its ``RouterProvider`` entry.
4. ``shutdown`` (SIGTERM / SIGINT / ``stop()``): announces ``offline`` first, then removes the
   handlers and stops the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import secrets
import signal
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import AsyncIterator  # noqa: UP035  (hivemind's ServicerBase needs typing's alias to detect streams)

import torch
from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils.timed_storage import get_dht_time

from diffswarm import __version__
from diffswarm.dht.names import (
    DEFAULT_SWARM_NAME,
    SwarmName,
    choose_manifest,
    is_full_name,
    parse_swarm_name,
    sign_manifest,
    swarm_name_of,
)
from diffswarm.dht.node import Identity, NetworkConfig, SwarmDHT, load_or_create_key, open_identity
from diffswarm.dht.records import RECORD_VERSION, ClusterStatsRecord, ExpertRecord, RouterProvider, SwarmManifest
from diffswarm.dht.schema import MAX_ADDRS, MAX_RECORD_AGE, MAX_ROUTER_BYTES
from diffswarm.experts.expert import Expert
from diffswarm.peer.batching import Batcher, BatchPolicy
from diffswarm.peer.limits import ByteBudget, Lease, PeerLimits, RateLimiter, StreamSlots
from diffswarm.peer.streams import (
    IdleStream,
    StreamClosed,
    StuckReader,
    linger,
    read_messages,
    write_error,
    write_message,
)
from diffswarm.protocol.wire import (
    MAX_CHECKPOINT_BYTES,
    MAX_SESSION_MESSAGE_BYTES,
    MAX_SMALL_MESSAGE_BYTES,
    MAX_STREAM_PART_BYTES,
    NAMESPACE,
    PROTOCOL_VERSION,
    ROUTER_CHUNK,
    ExpertSpec,
    PeerBusy,
    PeerInternalError,
    RequestError,
    check_request,
    combine_parts,
    dump_metadata,
    encode_info,
    encode_response,
    error_metadata,
    format_error,
    session_request_id,
    stream_parts,
)
from diffswarm.training.jobs import TrainJob

logger = logging.getLogger(__name__)



@dataclass
class PeerConfig:
    """Everything one ``diffswarm peer`` process needs; one commented field per knob."""

    net: NetworkConfig = field(default_factory=NetworkConfig)
    # the swarm: its full name NAME@FINGERPRINT to join it; a bare NAME (or None) with `router` and an owner
    # key founds swarm NAME (default "diffswarm") owned by that key; None without a router: a plain DHT node
    swarm: str | None = None
    owner_key: str | None = None  # owner key file signing the manifest (created if missing); None: the identity key
    checkpoint: str | None = None  # expert to serve; None with `train`: train it first; None without: no expert
    train: TrainJob | None = None  # what to train first when there is no checkpoint
    router: str | None = None  # router file to serve (the owner also signs the swarm's manifest naming it)
    device: str = "auto"
    threads: int = 0  # torch CPU threads (0: torch default)
    max_batch: int = 256  # request rows per forward pass
    batch_wait_ms: float = 2.0  # wait for more requests when several clients are active
    inline_ms: float = 20.0  # forward passes expected to be shorter run on the event loop (no thread hop)
    announce_period: float = 10.0  # seconds between heartbeats
    expire_factor: float = 3.0  # records expire after this many periods without a heartbeat
    info_file: str | None = None  # write {peer_id, maddrs, pid, ...} here once online (swarm up, tests)
    limits: PeerLimits = field(default_factory=PeerLimits)  # what callers can make the peer hold (peer/limits.py)


class ServedExpert:
    """One loaded expert with its request spec and batcher."""

    def __init__(self, expert: Expert, policy: BatchPolicy, path: str | os.PathLike | None = None):
        cfg = expert.config
        self.expert = expert
        self.path = Path(path) if path is not None else None  # the checkpoint file (served by rpc_checkpoint)
        self.precision = "bf16" if next(expert.parameters()).device.type == "cuda" else "fp32"  # autocast on CUDA
        self.spec = ExpertSpec(expert.expert_id, (cfg.net.channels, cfg.net.size, cfg.net.size), cfg.net.num_classes)
        self.device = next(expert.parameters()).device
        self.batcher = Batcher(self._velocity, policy)
        self.stats_blob: bytes | None = None  # the cluster's statistics beside the checkpoint (load_stats)

    def load_stats(self) -> str | None:
        """Read ``cluster_stats.bin`` beside the checkpoint, if there is one, for publishing; returns why it is
        not published (None: published, or no file)."""
        from diffswarm.router.stats.blob import StatsFormatError
        from diffswarm.router.stats.publish import read_cluster_stats, stats_path

        cfg = self.expert.config
        if self.path is None or cfg.cluster is None or not stats_path(self.path).exists():
            return None
        try:
            blob, st = read_cluster_stats(stats_path(self.path))
        except (OSError, StatsFormatError) as e:
            return f"not publishing {stats_path(self.path)}: {e}"
        shape = (cfg.net.channels, cfg.net.size, cfg.net.size)
        if (st.cluster, st.partition_hash or "", tuple(st.image_shape), st.num_classes) != (
                cfg.cluster, cfg.partition_hash or "", shape, cfg.net.num_classes):
            return (f"not publishing {stats_path(self.path)}: it describes cluster {st.cluster} of partition "
                    f"{(st.partition_hash or '')[:12]}, not this expert's")
        self.stats_blob = blob
        return None

    @torch.inference_mode()  # answers leave the process as bytes: no autograd bookkeeping at all
    def _velocity(self, x, t, labels, guidance):
        if self.device.type == "cpu":
            return self.expert.velocity(x, t, labels, guidance)
        v = self.expert.velocity(x.to(self.device), t.to(self.device), labels.to(self.device), guidance)
        return v.float().cpu()

    def warm_up(self, rows: int = 16) -> float:
        """One timed forward pass (CFG) to prime kernels; returns rows per second."""
        c, h, w = self.spec.image_shape
        x = torch.randn(rows, c, h, w)
        t = torch.full((rows,), 0.5)
        labels = torch.zeros(rows, dtype=torch.long) if self.spec.num_classes else torch.full((rows,), -1)
        self._velocity(x, t, labels, 2.0)
        t0 = time.perf_counter()
        self._velocity(x, t, labels, 2.0)
        return rows / max(time.perf_counter() - t0, 1e-6)


class RouterBlob:
    """The router file as served bytes, with the facts the swarm's manifest names."""

    def __init__(self, path: str | os.PathLike):
        from diffswarm.router.model import Router

        self.path = Path(path)
        size = self.path.stat().st_size
        if size > MAX_ROUTER_BYTES:
            raise ValueError(f"router {self.path} is {size / 2**20:.1f} MiB; swarm routers are at most "
                             f"{MAX_ROUTER_BYTES >> 20} MiB (clients refuse larger ones)")
        self.data = self.path.read_bytes()
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        router = Router.load(self.path)  # checks the file's own weights hash
        self.cfg = router.cfg
        self.weights_sha256 = router.weights_sha256


class _ErrorAnswer(Exception):
    """Raised by a unary handler to answer an error. hivemind's p2pclient sends ``repr(e)`` of a unary
    handler's exception to the caller, so repr (and str) are exactly the wire message (``format_error``)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


class _RawRequest:
    """Stands in for the protobuf type when a unary handler is registered: hivemind hands the handler the
    request bytes unparsed, so a malformed protobuf gets a diffswarm error answer, not hivemind's DecodeError."""

    @staticmethod
    def FromString(data: bytes) -> bytes:  # protobuf's name: hivemind calls it
        return data


class ExpertServicer(ServicerBase):
    """RPC handlers (see ``diffswarm.protocol.wire`` for the message layout); registered under ``wire.handle_name``.

    Nothing a caller sends is trusted: unary requests are capped by p2pd (4 MiB), stream messages by this
    servicer's own framing (``streams``), whole requests by the expert's spec, and what all requests hold
    together by ``PeerLimits`` (memory budget, queue rows, open streams, rows per second per caller). Error
    answers are ``busy`` / ``refused`` / ``internal`` (``wire.classify_error``); an internal error sends only
    an id, logged here with its traceback. ``stats`` counts what happened (the tests and the fuzzer read it)."""

    def __init__(self, served: dict[str, ServedExpert], router: RouterBlob | None, info,
                 limits: PeerLimits | None = None):
        self.served, self.router, self.info = served, router, info
        self.configure(limits or PeerLimits())
        # requests (velocity requests decoded), answered, refused, busy, internal, closed (caller went away),
        # stuck (caller did not read), cancelled (unary caller gave up)
        self.stats: Counter[str] = Counter()

    def configure(self, limits: PeerLimits) -> None:
        """Apply ``limits`` (rate buckets, held bytes and open streams are counted afresh: call it while idle,
        on the peer's loop)."""
        self.limits = limits
        self.rates = RateLimiter(limits.rate_rows, limits.burst_rows, limits.max_callers)
        self.budget = ByteBudget(limits.max_inflight_bytes, limits.max_caller_inflight_bytes)
        self.slots = StreamSlots(limits.max_streams, limits.max_streams_per_caller)
        for s in self.served.values():
            s.batcher.policy.max_queue_rows = limits.max_queue_rows

    # -- registration ----------------------------------------------------------------------------

    async def add_p2p_handlers(self, p2p: P2P, wrapper=None, *, namespace: str | None = None,
                               balanced: bool = False) -> None:
        """Register every ``rpc_*`` method: unary ones through hivemind's ``add_protobuf_handler``, stream
        ones through ``add_binary_stream_handler`` with the bounded framing of ``streams`` (hivemind's own
        stream handler buffers whatever length a caller declares). ``remove_p2p_handlers`` is hivemind's."""
        if wrapper is not None:
            raise ValueError("ExpertServicer registers its own handlers; it takes no wrapper")
        self._collect_rpc_handlers()
        for h in self._rpc_handlers:
            name = self._get_handle_name(namespace, h.method_name)
            if h.stream_input or h.stream_output:
                await p2p.add_binary_stream_handler(name, self._stream_handler(p2p, h, name), balanced=balanced)
            else:
                await p2p.add_protobuf_handler(name, self._unary_handler(h), _RawRequest, balanced=balanced)

    def _as_answer(self, e: BaseException, caller: str, rpc: str) -> RequestError:
        """The error answer for ``e``: a ``RequestError`` is written for the caller and goes as it is; anything
        else is the peer's own failure, answered as ``PeerInternalError`` with a fresh id that is logged here
        with the traceback (nothing of the exception itself reaches the caller)."""
        if isinstance(e, RequestError):
            self.stats[e.code] += 1
            logger.debug(f"{rpc} from {caller[:12]}: {e.code}: {e}")
            return e
        error_id = secrets.token_hex(4)
        self.stats["internal"] += 1
        logger.error(f"internal error {error_id} in {rpc} for {caller[:12]}", exc_info=e)
        return PeerInternalError(error_id)

    def _unary_handler(self, h):
        method = getattr(self, h.method_name)

        async def handle(request: bytes, context: P2PContext):
            caller = str(context.remote_id)
            lease = Lease(self.budget, caller)
            try:
                lease.take(len(request))
                try:
                    msg = h.request_type.FromString(request)
                except Exception:  # DecodeError
                    raise RequestError(f"the request is not a valid {h.request_type.__name__} protobuf") from None
                return await method(msg, context)
            except asyncio.CancelledError:
                # p2pclient cancels the handler when the caller gives up (its deadline) and then skips its own
                # bookkeeping (hivemind 1.1.12 keeps the cancelled task, and with it the request, for good):
                # end normally instead; the answer goes nowhere
                self.stats["cancelled"] += 1
                raise _ErrorAnswer(format_error("refused", "the caller cancelled the call")) from None
            except Exception as e:
                raise _ErrorAnswer(self._as_answer(e, caller, h.method_name).wire_message) from None
            finally:
                lease.release()

        return handle

    def _stream_bounds(self, rpc: str) -> tuple[int, float]:
        """(largest message, seconds to wait for the next one) of a stream RPC's requests."""
        if rpc == "rpc_velocity_session":
            return MAX_SESSION_MESSAGE_BYTES, self.limits.session_idle
        if rpc == "rpc_velocity_stream":
            return MAX_STREAM_PART_BYTES, self.limits.read_timeout
        return MAX_SMALL_MESSAGE_BYTES, self.limits.read_timeout

    def _stream_handler(self, p2p: P2P, h, name: str):
        method = getattr(self, h.method_name)

        async def handle(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            caller = stream_info.peer_id.to_base58()
            max_bytes, idle = self._stream_bounds(h.method_name)
            context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=stream_info.peer_id)
            slots = self.slots  # the one this stream is counted in, even if the limits change meanwhile
            try:
                slots.open(caller)
            except PeerBusy as e:
                if await write_error(writer, self._as_answer(e, caller, h.method_name).wire_message):
                    await linger(reader)
                writer.close()
                return
            answers, abort = None, False
            try:
                requests = read_messages(reader, h.request_type, max_bytes, idle, self.limits.read_timeout)
                if h.stream_input:
                    answers = method(requests, context)
                else:
                    first = await anext(requests, None)
                    if first is None or await anext(requests, None) is not None:  # then the end of input
                        raise RequestError(f"{h.method_name} takes exactly one request")
                    answers = method(first, context)
                async for resp in answers:
                    await write_message(writer, resp, self.limits.write_timeout)
            except (StreamClosed, StuckReader) as e:  # nobody to answer: close at once, drop what is buffered
                abort = True
                self.stats["stuck" if isinstance(e, StuckReader) else "closed"] += 1
                logger.debug(f"{h.method_name} from {caller[:12]}: {e}")
            except Exception as e:
                if await write_error(writer, self._as_answer(e, caller, h.method_name).wire_message):
                    await linger(reader)
            finally:
                if answers is not None:
                    await answers.aclose()
                if abort:
                    writer.transport.abort()
                else:
                    writer.close()
                slots.close(caller)

        return handle

    # -- velocity --------------------------------------------------------------------------------

    def _expert(self, uid: str) -> ServedExpert:
        served = self.served.get(uid)
        if served is None:
            have = ", ".join(self.served) or "none"
            raise RequestError(f"this peer does not serve expert {uid[:100]!r} (it serves: {have})")
        return served

    async def _answer(self, uid: str, tensors, metadata: bytes, caller: str, extra: dict | None = None):
        """Check one velocity request, admit it (queue, then the caller's rate), compute it in a batch."""
        served = self._expert(uid)
        req = check_request(served.spec, uid, tensors, metadata)
        self.stats["requests"] += 1
        served.batcher.admit(req.rows)  # queue full: busy, and the caller's rows are not spent
        wait = self.rates.take(caller, req.rows, time.monotonic())
        if wait == math.inf:
            raise RequestError(f"a request of {req.rows} rows exceeds this peer's burst of {self.rates.burst} rows "
                               "per caller; split it")
        if wait > 0:
            raise PeerBusy(f"over this peer's rate limit of {self.rates.rate:g} rows/s per caller", wait)
        v, st = await served.batcher.submit(req, caller)
        meta = {"rows": req.rows, "queue_ms": st.queue_ms, "compute_ms": st.compute_ms, "batch_rows": st.batch_rows,
                "precision": served.precision,
                "load": float(served.batcher.pending_rows), "throughput": float(served.batcher.throughput),
                **(extra or {})}
        self.stats["answered"] += 1
        return encode_response(v, req.compression, meta)

    async def rpc_velocity(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        tensors, meta = await self._answer(request.uid, list(request.tensors), request.metadata,
                                           str(context.remote_id))
        return runtime_pb2.ExpertResponse(tensors=tensors, metadata=meta)

    async def rpc_velocity_session(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                                   context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Many requests over one stream, answered as they complete, matched by metadata ``id``.

        At most ``limits.session_inflight`` requests are read and not yet answered: the next message is read
        only when an answer has left (back-pressure through the stream), so the answer queue is bounded by
        the same number and a caller that sends without reading stalls its own stream, then loses it after
        ``limits.write_timeout``. A refused request gets an error answer and the session goes on."""
        caller = str(context.remote_id)
        n = self.limits.session_inflight
        slots = asyncio.Semaphore(n)
        out: asyncio.Queue = asyncio.Queue(maxsize=n + 1)  # one answer per slot, and the end marker
        lease = Lease(self.budget, caller)
        tasks: set[asyncio.Task] = set()
        end = object()

        async def one(msg: runtime_pb2.ExpertRequest, size: int) -> None:
            rid, held = None, 0
            try:
                rid = session_request_id(msg.metadata)
                lease.take(size)
                held = size
                tensors, meta = await self._answer(msg.uid, list(msg.tensors), msg.metadata, caller, {"id": rid})
                resp = runtime_pb2.ExpertResponse(tensors=tensors, metadata=meta)
            except Exception as e:  # answered to this request only; the session goes on
                err = self._as_answer(e, caller, "rpc_velocity_session")
                resp = runtime_pb2.ExpertResponse(metadata=dump_metadata(error_metadata(rid, err)))
            out.put_nowait((resp, held))

        async def read() -> None:
            try:
                while True:
                    await slots.acquire()
                    msg = await anext(requests, None)
                    if msg is None:
                        break
                    task = asyncio.get_running_loop().create_task(one(msg, msg.ByteSize()))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            except IdleStream:  # a quiet session ends like one the caller closed; the client opens another
                pass
            except Exception as e:
                out.put_nowait(e)
                return
            await asyncio.gather(*tasks)
            out.put_nowait(end)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while True:
                item = await out.get()
                if item is end:
                    return
                if isinstance(item, Exception):
                    raise item
                resp, held = item
                yield resp
                lease.give(held)
                slots.release()
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)
            lease.release()

    async def rpc_velocity_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                                  context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """One request in parts; refused as soon as its running size passes the expert's largest request
        (``ExpertSpec.max_request_bytes``, at most the caller's memory budget) or its parts pass
        ``ExpertSpec.max_stream_parts``: the rest is never read."""
        caller = str(context.remote_id)
        lease = Lease(self.budget, caller)
        try:
            uid, metadata, parts, size = None, b"", [], 0
            max_bytes = max_parts = 0
            async for msg in requests:
                if uid is None:
                    uid, metadata = msg.uid, msg.metadata
                    spec = self._expert(uid).spec
                    max_bytes = min(spec.max_request_bytes, self.limits.max_caller_inflight_bytes)
                    max_parts = spec.max_stream_parts
                lease.take(msg.ByteSize())
                size += sum(len(p.buffer) for p in msg.tensors)
                if size > max_bytes:
                    raise RequestError(f"streamed request exceeds {max_bytes} bytes (expert {uid}: at most "
                                       f"{spec.max_rows} rows of {spec.row_bytes} bytes)")
                parts.extend(msg.tensors)
                if len(parts) > max_parts:
                    raise RequestError(f"streamed request has more than {max_parts} parts")
            if uid is None:
                raise RequestError("the stream carried no request")
            tensors = combine_parts(parts)
            parts = None  # the combined copy is all that is needed now
            tensors, meta = await self._answer(uid, tensors, metadata, caller)
            for i, part in enumerate(stream_parts(tensors)):
                yield runtime_pb2.ExpertResponse(tensors=[part], metadata=meta if i == 0 else b"")
        finally:
            lease.release()

    # -- info and router -------------------------------------------------------------------------

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        return runtime_pb2.ExpertInfo(serialized_info=encode_info(self.info()))

    async def rpc_router(self, request: runtime_pb2.ExpertUID,
                         context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertInfo]:
        if self.router is None:
            raise RequestError("this peer does not serve a router")
        if request.uid and request.uid != self.router.sha256:
            raise RequestError(f"this peer serves router {self.router.sha256[:12]}, not {request.uid[:12]!r}")
        for s in range(0, len(self.router.data), ROUTER_CHUNK):
            yield runtime_pb2.ExpertInfo(serialized_info=self.router.data[s:s + ROUTER_CHUNK])


    async def rpc_checkpoint(self, request: runtime_pb2.ExpertUID,
                             context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertInfo]:
        """The served expert's checkpoint file (``uid`` = its weights sha256), for clients that check answers."""
        served = next((s for s in self.served.values() if s.expert.weights_sha256 == request.uid), None)
        if served is None or served.path is None:
            raise RequestError(f"this peer serves no checkpoint with weights sha256 {request.uid[:12]!r}")
        size = served.path.stat().st_size
        if size > MAX_CHECKPOINT_BYTES:
            raise RequestError(f"the checkpoint is {size >> 20} MiB, above the protocol's {MAX_CHECKPOINT_BYTES >> 20}")
        data = await asyncio.get_running_loop().run_in_executor(None, served.path.read_bytes)
        for s in range(0, len(data), ROUTER_CHUNK):
            yield runtime_pb2.ExpertInfo(serialized_info=data[s:s + ROUTER_CHUNK])


def schedule_name(expert_cfg) -> str:
    if expert_cfg.objective == "fm":
        return "flow"
    return f"vp-{expert_cfg.schedule.kind}-{expert_cfg.schedule.steps}"


@dataclass(frozen=True)
class ExpertStatus:
    """What a peer announces about an expert beyond its ``ExpertConfig``: its state and serving figures."""

    state: str  # joining | online | offline
    sha256: str = ""  # checkpoint weights sha256 ("" while joining)
    progress: float = 1.0  # training progress in [0, 1]
    throughput: float = 0.0  # measured rows per second
    load: float = 0.0  # rows queued or computing
    max_batch: int = 256  # rows per forward pass
    train_steps: int | None = None  # training steps done
    final_loss: float | None = None  # last training loss (non-finite: announced as None)

    @classmethod
    def serving(cls, state: str, sha256: str, summary: dict, throughput: float, load: float,
                max_batch: int) -> ExpertStatus:
        """The status of a loaded checkpoint; ``summary`` is its training summary (keys ``steps``, ``final_loss``)."""
        steps, loss = summary.get("steps"), summary.get("final_loss")
        return cls(state, sha256, 1.0, float(throughput), float(load), int(max_batch),
                   int(steps) if steps is not None else None, float(loss) if loss is not None else None)


def make_expert_record(cfg, status: ExpertStatus, peer_id: str, addrs: list[str]) -> ExpertRecord:
    """The record announcing an expert of ``ExpertConfig`` cfg in ``status``. A non-finite ``final_loss``
    (no step done yet, or a diverged run) is announced as None: readers reject non-finite losses."""
    loss = status.final_loss
    if loss is not None and not math.isfinite(float(loss)):
        loss = None
    return ExpertRecord(
        version=RECORD_VERSION, expert_id=cfg.expert_id, cluster=cfg.cluster, num_clusters=cfg.num_clusters or 1,
        partition_hash=cfg.partition_hash or "", objective=cfg.objective, schedule=schedule_name(cfg),
        image_shape=[cfg.net.channels, cfg.net.size, cfg.net.size], num_classes=cfg.net.num_classes,
        checkpoint_sha256=status.sha256, software=__version__, protocol=PROTOCOL_VERSION, state=status.state,
        progress=float(status.progress), throughput=float(status.throughput), load=float(status.load),
        max_batch=int(status.max_batch), peer_id=peer_id, addrs=list(addrs), updated=float(get_dht_time()),
        train_steps=int(status.train_steps) if status.train_steps is not None else None,
        final_loss=float(loss) if loss is not None else None)


def resolve_swarm(swarm: str | None, owner_key: str | None, identity: Identity,
                  serves_router: bool) -> tuple[SwarmName | None, object, str]:
    """(full swarm name or None, the RSA key this peer signs the manifest with or None, what that key is).

    - ``swarm`` NAME@FINGERPRINT: join it; this peer signs only if its owner key (``owner_key``, else its
      identity when it serves a router) has that fingerprint. An explicit ``owner_key`` of another
      fingerprint is an error; an identity of another one makes a mirror (serves router bytes only).
    - ``swarm`` a bare NAME or None, with a router: found swarm NAME (default ``diffswarm``) owned by the
      owner key.
    - None and no router: a plain DHT node (no swarm)."""
    key, what = None, ""
    if owner_key:
        key, created = load_or_create_key(owner_key)
        what = f"owner key {owner_key}" + (" (new)" if created else "")
    elif serves_router:
        key, what = identity.key, "this peer's identity key" + (" (throw-away: pass --identity or --owner-key to keep "
                                                                "the swarm's name)" if identity.ephemeral else "")
    if swarm is not None and is_full_name(swarm):
        name = parse_swarm_name(swarm)
        if key is not None and swarm_name_of(name.name, key) == name:
            return name, key, what
        if owner_key:
            raise ValueError(f"--owner-key {owner_key} has fingerprint {swarm_name_of(name.name, key).fingerprint}, "
                             f"not the one of swarm {name}")
        return name, None, ""
    if key is None:
        if swarm is None:
            return None, None, ""
        parse_swarm_name(swarm)  # raises SwarmNameError with how to get the full name
    return swarm_name_of(swarm or DEFAULT_SWARM_NAME, key), key, what


class Peer:
    """One volunteer peer; see the module docstring for the lifecycle."""

    def __init__(self, cfg: PeerConfig, log=print):
        self.cfg = cfg
        self.log = log
        self.dht: SwarmDHT | None = None
        self.served: dict[str, ServedExpert] = {}
        self.router: RouterBlob | None = None
        self.servicer: ExpertServicer | None = None
        self.stop_event = asyncio.Event()
        self.state = "joining"
        self.progress = 0.0
        self.train_step: int | None = None  # current training step while training
        self.train_loss: float | None = None  # latest step's loss while training
        self.training_cfg = None  # ExpertConfig while training
        self.maddrs: list[str] = []
        self.swarm: SwarmName | None = None  # the swarm's full name (None: a plain DHT node)
        self.owner_key = None  # RSAPrivateKey signing the manifest, when this peer holds the owner key
        self.own_manifest: SwarmManifest | None = None  # the manifest this peer signed (owner only)
        self.manifest: SwarmManifest | None = None  # the owner's newest valid manifest known (re-announced)
        self._warned: set[tuple[str, float]] = set()  # (expert id, manifest issued) already warned about
        self._heartbeat: asyncio.Task | None = None

    def stop(self) -> None:
        self.stop_event.set()

    @property
    def peer_id(self) -> str:
        return self.dht.peer_id.to_base58()

    async def start(self) -> None:
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        if self.cfg.router:  # a bad router file fails before the daemon starts
            self.router = RouterBlob(self.cfg.router)
        ident = open_identity(self.cfg.net.identity_path)
        try:
            self.swarm, self.owner_key, key_what = resolve_swarm(self.cfg.swarm, self.cfg.owner_key, ident,
                                                                 self.router is not None)
        except BaseException:
            if ident.ephemeral:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(ident.path)
            raise
        self.dht = await SwarmDHT.create(self.cfg.net, str(self.swarm) if self.swarm else None, ident)
        self.maddrs = await self.dht.visible_maddrs()
        where = " ".join(self.maddrs)
        if self.swarm is None:
            self.log(f"running a plain DHT node (no swarm) as {self.peer_id}; others join with:\n  --initial-peers "
                     + where)
        elif self.owner_key is not None:
            self.log(f"swarm {self.swarm} (owned by {key_what}; this peer signs its manifest). Others join with:\n"
                     f"  --swarm {self.swarm} --initial-peers {where}")
        elif self.cfg.net.initial_peers:
            self.log(f"joined swarm {self.swarm} as {self.peer_id}")
        else:
            self.log(f"started swarm {self.swarm} as {self.peer_id} (its owner must announce the manifest); others "
                     f"join with:\n  --swarm {self.swarm} --initial-peers {where}")
        self.write_info()
        if self.router is not None:
            role = "" if self.owner_key is not None else " (its bytes only: the owner's manifest decides the router)"
            self.log(f"serving router {self.router.sha256[:12]} (K={self.router.cfg.num_clusters}){role}")

    # -- records -------------------------------------------------------------------------------

    @property
    def announced_addrs(self) -> list[str]:
        """The multiaddrs put in records (readers refuse more than ``MAX_ADDRS``)."""
        return self.maddrs[:MAX_ADDRS]

    def records(self) -> list[ExpertRecord]:
        out = []
        addrs = self.announced_addrs
        for s in self.served.values():
            status = ExpertStatus.serving(self.state, s.expert.weights_sha256, s.expert.summary, s.batcher.throughput,
                                          s.batcher.pending_rows, s.batcher.policy.max_rows)
            out.append(make_expert_record(s.expert.config, status, self.peer_id, addrs))
        if self.training_cfg is not None and not self.served:
            status = ExpertStatus(self.state, progress=self.progress, max_batch=self.cfg.max_batch,
                                  train_steps=self.train_step, final_loss=self.train_loss)
            out.append(make_expert_record(self.training_cfg, status, self.peer_id, addrs))
        return out

    def stats_records(self) -> list[ClusterStatsRecord]:
        out = []
        for s in self.served.values():
            c = s.expert.config
            if s.stats_blob is not None:
                out.append(ClusterStatsRecord(version=RECORD_VERSION, cluster=c.cluster, num_clusters=c.num_clusters,
                                              partition_hash=c.partition_hash or "",
                                              stats_sha256=hashlib.sha256(s.stats_blob).hexdigest(),
                                              blob=s.stats_blob, software=__version__, peer_id=self.peer_id,
                                              updated=float(get_dht_time())))
        return out

    def manifest_fields(self) -> dict:
        """What the owner signs (``SwarmManifest`` fields but the key and signature): about this peer's router,
        or, with no router, about its expert's partition (a swarm routed by its peers' published statistics)."""
        if self.router is None:
            c = next(s.expert.config for s in self.served.values())
            return dict(version=RECORD_VERSION, swarm=self.swarm.name, partition_hash=c.partition_hash or "",
                        num_clusters=c.num_clusters or 1, dataset_id=c.dataset_id,
                        image_shape=[c.net.channels, c.net.size, c.net.size], num_classes=c.net.num_classes,
                        router_sha256="", router_weights_sha256="", router_bytes=0, protocol=PROTOCOL_VERSION,
                        software=__version__, issued=float(get_dht_time()))
        rc = self.router.cfg
        # the router's own (routers trained before it was recorded: a served or trained expert's; else "")
        configs = [s.expert.config for s in self.served.values()] + [c for c in [self.training_cfg] if c is not None]
        dataset_id = rc.dataset_id or next((c.dataset_id for c in configs if c.dataset_id), "")
        return dict(version=RECORD_VERSION, swarm=self.swarm.name, partition_hash=rc.partition_hash or "",
                    num_clusters=rc.num_clusters, dataset_id=dataset_id, image_shape=[rc.channels, rc.size, rc.size],
                    num_classes=rc.num_classes, router_sha256=self.router.sha256,
                    router_weights_sha256=self.router.weights_sha256, router_bytes=len(self.router.data),
                    protocol=PROTOCOL_VERSION, software=__version__, issued=float(get_dht_time()))

    def provider_record(self) -> RouterProvider | None:
        if self.router is None:
            return None
        return RouterProvider(version=RECORD_VERSION, router_sha256=self.router.sha256,
                              router_bytes=len(self.router.data), software=__version__, peer_id=self.peer_id,
                              addrs=self.announced_addrs, updated=float(get_dht_time()))

    def info(self) -> dict:
        prov = self.provider_record()
        return {"protocol": PROTOCOL_VERSION, "software": __version__, "peer_id": self.peer_id,
                "swarm": str(self.swarm) if self.swarm else None, "experts": [r.to_dict() for r in self.records()],
                "router": prov.to_dict() if prov else None,
                "manifest": self.manifest.to_dict() if self.manifest else None}

    async def current_manifest(self) -> SwarmManifest | None:
        """The owner's newest valid manifest among this peer's own (signed on first use, when it holds the
        owner key), the one it followed so far and those announced in the DHT; warns once per manifest
        about served experts that do not fit it (clients will skip them)."""
        founds = self.router is not None or any(s.expert.config.cluster is not None for s in self.served.values())
        if self.owner_key is not None and self.own_manifest is None and founds:
            self.own_manifest = sign_manifest(self.owner_key, self.manifest_fields())
            what = (f"router {self.router.sha256[:12]}" if self.router is not None
                    else "no trained router (clients route with the statistics peers publish)")
            self.log(f"signed the manifest of swarm {self.swarm}: {what}, "
                     f"partition {self.own_manifest.partition_hash[:12] or '(none)'}")
        found: list[SwarmManifest] = []
        try:
            found, errors = await self.dht.get_manifests()
            for e in errors:
                logger.debug(f"skipped an invalid manifest: {e}")
        except Exception as e:  # the DHT being briefly unreachable: keep the manifest we have
            logger.debug(f"manifest lookup failed: {e!r}")
        candidates = found + [m for m in (self.own_manifest, self.manifest) if m is not None]
        best, _ = choose_manifest(candidates, self.swarm)
        if best is not None and best != self.manifest:
            if self.manifest is not None or best != self.own_manifest:
                self.log(f"following the owner's manifest of {self.swarm} issued at {best.issued:.0f}: router "
                         f"{best.router_sha256[:12]}")
            self.manifest = best
        self._check_experts(self.manifest)
        return self.manifest

    def _check_experts(self, m: SwarmManifest | None) -> None:
        if m is None:
            return
        for s in self.served.values():
            c = s.expert.config
            if (c.expert_id, m.issued) in self._warned:
                continue
            shape = [c.net.channels, c.net.size, c.net.size]
            if ((c.partition_hash or "") != m.partition_hash or (c.num_clusters or 1) != m.num_clusters
                    or shape != list(m.image_shape) or c.net.num_classes != m.num_classes):
                self._warned.add((c.expert_id, m.issued))
                self.log(f"warning: expert {c.expert_id} (partition {(c.partition_hash or '')[:12]}, "
                         f"K={c.num_clusters}, {shape}, {c.net.num_classes} classes) does not fit the swarm's "
                         f"manifest (partition {m.partition_hash[:12]}, K={m.num_clusters}, {list(m.image_shape)}, "
                         f"{m.num_classes} classes): clients will skip it")

    async def announce(self) -> None:
        # heartbeats expire after expire_factor periods, and never later than readers call a record stale
        expiration = min(self.cfg.announce_period * self.cfg.expire_factor, MAX_RECORD_AGE)
        tasks = [self.dht.announce_expert(r, expiration) for r in self.records()]
        if self.swarm is not None and self.state == "online":
            tasks += [self.dht.announce_stats(r, expiration) for r in self.stats_records()]
        if self.swarm is not None and self.state != "offline":
            manifest = await self.current_manifest()
            if manifest is not None:
                tasks.append(self.dht.announce_manifest(manifest, expiration))
            prov = self.provider_record()
            if prov is not None:
                tasks.append(self.dht.announce_provider(prov, expiration))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if r is not True:
                logger.warning(f"announcement not stored: {r!r}")

    async def _heartbeat_loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                await self.announce()
            except Exception as e:  # the DHT being briefly unreachable must not kill the peer
                logger.warning(f"heartbeat failed: {e!r}")
            with contextlib.suppress(TimeoutError):  # the period passed: announce again
                await asyncio.wait_for(self.stop_event.wait(), self.cfg.announce_period)

    def start_heartbeat(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    # -- training ------------------------------------------------------------------------------

    async def train(self) -> str | None:
        """Train the expert (announcing ``joining``); returns the checkpoint path, None if stopped."""
        from diffswarm.training.jobs import run_train_job

        job = self.cfg.train
        prepared = job.load_data()
        ecfg, images = prepared[0], prepared[1]
        self.training_cfg = ecfg
        self.state = "joining"
        self.start_heartbeat()
        length = f"{job.train.steps} steps" if job.train.steps else f"{job.train.minutes:g} minutes"
        self.log(f"training {ecfg.expert_id} on {len(images)} images of cluster {job.cluster} for {length} "
                 f"(announced as joining)")

        class Stopped(Exception):
            pass

        def on_step(step: int, loss: float, progress: float) -> None:
            self.progress = progress
            self.train_step, self.train_loss = step, loss
            if self.stop_event.is_set():
                raise Stopped

        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, lambda: run_train_job(job, progress=False, on_step=on_step,
                                                                   prepared=prepared))
        except Stopped:
            self.log("training interrupted; the last checkpoint is kept (run again to resume)")
            return None
        return str(Path(job.out) / "expert.safetensors")

    # -- serving -------------------------------------------------------------------------------

    def load_expert(self, path: str) -> ServedExpert:
        from diffswarm.experts.train import pick_device

        expert = Expert.from_checkpoint(path, pick_device(self.cfg.device))
        served = ServedExpert(expert, BatchPolicy(max_rows=self.cfg.max_batch,
                                                  max_wait=self.cfg.batch_wait_ms / 1000,
                                                  inline_s=self.cfg.inline_ms / 1000), path)
        served.batcher.throughput = served.warm_up(min(16, self.cfg.max_batch))
        why = served.load_stats()
        if why:
            self.log(f"warning: {why}")
        self.served[expert.expert_id] = served
        return served

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        if self.cfg.checkpoint:
            served = await loop.run_in_executor(None, self.load_expert, self.cfg.checkpoint)
            e = served.expert
            self.log(f"serving {e.expert_id} ({e.config.objective}, sha256 {e.weights_sha256[:12]}, "
                     f"{served.batcher.throughput:.0f} rows/s)")
        for s in self.served.values():
            s.batcher.start()
        self.servicer = ExpertServicer(self.served, self.router, self.info, self.cfg.limits)
        await self.servicer.add_p2p_handlers(self.dht.p2p, namespace=NAMESPACE)
        self.state = "online"
        self.training_cfg = None
        self.progress = 1.0
        self.train_step = self.train_loss = None  # the served checkpoint's summary is announced instead
        # the ~350k objects of torch/diffusers/hivemind live as long as the peer: keep them out of the
        # cyclic GC, whose full passes over them (~0.2 s) would stall a request now and then
        gc.collect()
        gc.freeze()
        await self.announce()
        self.start_heartbeat()
        self.write_info()
        self.log(f"online as {self.peer_id} at {' '.join(self.maddrs)}")

    def write_info(self) -> None:
        if not self.cfg.info_file:
            return
        info = {"peer_id": self.peer_id, "maddrs": self.maddrs, "pid": os.getpid(), "state": self.state,
                "swarm": str(self.swarm) if self.swarm else None,
                "experts": list(self.served), "router": self.router.sha256 if self.router else None,
                "sockets": self.dht.socket_paths()}
        path = Path(self.cfg.info_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, path)

    async def shutdown(self) -> None:
        """Announce offline, stop serving, stop the daemon."""
        self.stop_event.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self.dht is None:
            return
        if self.served or self.training_cfg is not None:
            self.state = "offline"
            try:
                await asyncio.wait_for(self.announce(), timeout=5)
            except Exception as e:
                logger.warning(f"could not announce offline: {e!r}")
        if self.servicer is not None:
            try:
                await self.servicer.remove_p2p_handlers(self.dht.p2p, namespace=NAMESPACE)
            except Exception as e:  # the daemon may already be gone; shutting down regardless
                logger.debug(f"removing handlers: {e!r}")
        for s in self.served.values():
            await s.batcher.close()
        await self.dht.shutdown()
        self.dht = None

    async def run(self) -> int:
        """start -> (train) -> serve -> wait for stop -> shutdown. Returns an exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread (tests)
                loop.add_signal_handler(sig, self.stop)
        try:
            await self.start()
            if self.cfg.checkpoint is None and self.cfg.train is not None:
                path = await self.train()
                if path is None:
                    return 1
                self.cfg = replace(self.cfg, checkpoint=path)
            if self.stop_event.is_set():
                return 0
            await self.serve()
            await self.stop_event.wait()
            self.log("stopping: announcing offline")
            return 0
        finally:
            await self.shutdown()


def run_peer(cfg: PeerConfig, log=print) -> int:
    """Run a peer until SIGINT/SIGTERM, in a fresh event loop (uvloop where available)."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    return runner(Peer(cfg, log).run())
