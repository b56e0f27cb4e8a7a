"""The peer's RPC handlers (``ExpertServicer``): velocity requests (unary, session, streamed), info, and the
router, checkpoint and partition manifest files; the registration and error answers they rely on are in ``rpc``."""

from __future__ import annotations

import asyncio
import math
import time
from typing import AsyncIterator  # noqa: UP035  (hivemind's ServicerBase needs typing's alias to detect streams)

from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from diffswarm.peer.contribution import Contribution, first_step_rows
from diffswarm.peer.hosted import PartitionBlob, RouterBlob, ServedExpert
from diffswarm.peer.limits import Lease, PeerLimits, RateLimiter
from diffswarm.peer.reachability import DialBack
from diffswarm.peer.rpc import BoundedServicer
from diffswarm.peer.streams import IdleStream
from diffswarm.protocol.wire import (
    MAX_CHECKPOINT_BYTES,
    MAX_SESSION_MESSAGE_BYTES,
    MAX_SMALL_MESSAGE_BYTES,
    MAX_STREAM_PART_BYTES,
    ROUTER_CHUNK,
    PeerBusy,
    RequestError,
    check_request,
    combine_parts,
    dump_metadata,
    encode_info,
    encode_response,
    error_metadata,
    session_request_id,
    stream_parts,
)


class ExpertServicer(BoundedServicer):
    """RPC handlers (see ``diffswarm.protocol.wire`` for the message layout); registered under ``wire.handle_name``.

    Nothing a caller sends is trusted: unary requests are capped by p2pd (4 MiB), stream messages by this
    servicer's own framing (``streams``), whole requests by the expert's spec, and what all requests hold
    together by ``PeerLimits`` (memory budget, queue rows, open streams, rows per second per caller). Error
    answers are ``busy`` / ``refused`` / ``internal`` (``wire.classify_error``); an internal error sends only
    an id, logged with its traceback (``rpc``). ``stats`` counts what happened (the tests and the fuzzer read it)."""

    def __init__(self, served: dict[str, ServedExpert], router: RouterBlob | None, info,
                 limits: PeerLimits | None = None, contribution: Contribution | None = None,
                 dial_back: DialBack | None = None, partition: PartitionBlob | None = None):
        self.served, self.router, self.info, self.partition = served, router, info, partition
        self.contribution = contribution if contribution is not None else Contribution()
        self.dial_back = dial_back  # None: dial-back requests are refused
        self.observer = None  # observer(expert, caller, rows, seconds) per velocity answer (peer.metrics)
        super().__init__(limits)

    def configure(self, limits: PeerLimits) -> None:
        """Apply ``limits`` (rate buckets, held bytes and open streams are counted afresh: call it while idle,
        on the peer's loop)."""
        super().configure(limits)
        self.rates = RateLimiter(limits.rate_rows, limits.burst_rows, limits.max_callers)
        for s in self.served.values():
            s.batcher.policy.max_queue_rows = limits.max_queue_rows

    def _stream_bounds(self, rpc: str) -> tuple[int, float]:
        """(largest message, seconds to wait for the next one) of a stream RPC's requests."""
        if rpc == "rpc_velocity_session":
            return MAX_SESSION_MESSAGE_BYTES, self.limits.session_idle
        if rpc == "rpc_velocity_stream":
            return MAX_STREAM_PART_BYTES, self.limits.read_timeout
        return MAX_SMALL_MESSAGE_BYTES, self.limits.read_timeout

    # -- velocity --------------------------------------------------------------------------------

    def _expert(self, uid: str) -> ServedExpert:
        served = self.served.get(uid)
        if served is None:
            have = ", ".join(self.served) or "none"
            raise RequestError(f"this peer does not serve expert {uid[:100]!r} (it serves: {have})")
        return served

    async def _answer(self, uid: str, tensors, metadata: bytes, caller: str, extra: dict | None = None):
        """Check one velocity request, admit it (queue, then the caller's rate), compute it in a batch."""
        t0 = time.perf_counter()
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
        self.contribution.record(uid, caller, req.rows, first_step_rows(req.t))
        if self.observer is not None:
            self.observer(uid, caller, req.rows, time.perf_counter() - t0)
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

    # -- info, reachability and router -----------------------------------------------------------

    async def rpc_dial_back(self, request: runtime_pb2.ExpertInfo, context: P2PContext) -> runtime_pb2.ExpertInfo:
        """Dial the caller back at the multiaddrs it names, on a fresh connection (``reachability.DialBack``)."""
        if self.dial_back is None:
            raise RequestError("this peer does not answer dial-back requests")
        return runtime_pb2.ExpertInfo(serialized_info=await self.dial_back.answer(request.serialized_info,
                                                                                  str(context.remote_id)))

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

    async def rpc_partition(self, request: runtime_pb2.ExpertUID,
                            context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertInfo]:
        """The partition manifest file this peer serves (``uid`` = its sha256, or "" for whichever it serves)."""
        if self.partition is None:
            raise RequestError("this peer does not serve a partition manifest")
        if request.uid and request.uid != self.partition.sha256:
            raise RequestError(f"this peer serves partition file {self.partition.sha256[:12]}, "
                               f"not {request.uid[:12]!r}")
        for s in range(0, len(self.partition.data), ROUTER_CHUNK):
            yield runtime_pb2.ExpertInfo(serialized_info=self.partition.data[s:s + ROUTER_CHUNK])

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
