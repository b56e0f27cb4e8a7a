"""Calls to one peer over the client's P2P daemon: dialing, unary and streamed RPCs under deadlines, one
long-lived ``rpc_velocity_session`` per peer (``PeerSession``), velocity requests and file downloads."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.multiaddr import Multiaddr

from diffswarm.client.config import ClientConfig, PeerCallError
from diffswarm.client.selection import Replica
from diffswarm.protocol.wire import (
    MAX_UNARY_BYTES,
    RequestError,
    combine_parts,
    decode_info,
    decode_response,
    encode_request,
    handle_name,
    load_metadata,
    payload_bytes,
    request_metadata,
    stream_parts,
)

logger = logging.getLogger(__name__)


class PeerSession:
    """One open ``rpc_velocity_session`` stream to a peer: requests go out tagged with an id, a reader
    task resolves the matching futures. A broken stream fails every pending call at once (a dead peer
    is noticed immediately, not at the deadline); a call that times out closes the session."""

    def __init__(self, p2p: P2P, peer_id: str):
        self.p2p, self.peer_id = p2p, peer_id
        self.pending: dict[int, asyncio.Future] = {}
        self.next_id = 0
        self.closed = False
        self.write_lock = asyncio.Lock()
        self.reader = self.writer = self.read_task = None

    async def open(self) -> None:
        _, self.reader, self.writer = await self.p2p.call_binary_stream_handler(
            PeerID.from_base58(self.peer_id), handle_name("rpc_velocity_session"))
        self.read_task = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        try:
            while True:
                resp, err = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, self.reader)
                if err is not None:
                    raise PeerCallError(f"the peer ended the session: {err.message}")
                meta = load_metadata(resp.metadata)
                fut = self.pending.pop(meta.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result((list(resp.tensors), meta))
        except asyncio.IncompleteReadError:
            self.close(PeerCallError("connection to the peer was closed"))
        except asyncio.CancelledError:
            self.close(PeerCallError("session closed"))
            raise
        except Exception as e:
            self.close(PeerCallError(f"session failed: {e!r}"))

    async def call(self, uid: str, tensors, guidance: float, timeout: float):
        """(response tensors, response metadata) for one velocity request."""
        if self.closed:
            raise PeerCallError("session is closed")
        rid, self.next_id = self.next_id, self.next_id + 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        msg = runtime_pb2.ExpertRequest(uid=uid, tensors=tensors, metadata=request_metadata(guidance, rid))
        try:
            async with asyncio.timeout(timeout):  # one deadline for sending and answering
                async with self.write_lock:
                    await P2P.send_protobuf(msg, self.writer)
                return await fut
        except BaseException:
            self.pending.pop(rid, None)
            self.close(PeerCallError("a call on this session failed"))  # never reuse a session in doubt
            raise

    def close(self, exc: Exception | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(exc or PeerCallError("session closed"))
        self.pending.clear()
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        if self.read_task is not None and self.read_task is not asyncio.current_task():
            self.read_task.cancel()


class PeerTransport:
    """The client's RPCs to peers over ``p2p`` (the client DHT node's daemon); one open session per peer."""

    def __init__(self, p2p: P2P, cfg: ClientConfig):
        self.p2p, self.cfg = p2p, cfg  # cfg: the client's (compression and sessions are read at each call)
        self.sessions: dict[str, PeerSession] = {}

    async def close_sessions(self) -> None:
        for s in list(self.sessions.values()):
            s.close()
        self.sessions.clear()

    async def session(self, peer_id: str, timeout: float) -> PeerSession:
        s = self.sessions.get(peer_id)
        if s is None or s.closed:
            s = PeerSession(self.p2p, peer_id)
            self.sessions[peer_id] = s
            try:
                await asyncio.wait_for(s.open(), timeout)
            except BaseException:
                s.close()
                raise
        return s

    async def connect(self, peer_id: str, addrs) -> None:
        """Tell our daemon where the peer listens (its record's multiaddrs); best effort."""
        maddrs = []
        for a in addrs:
            try:
                m = Multiaddr(a)
                maddrs.append(m.decapsulate(Multiaddr(f"/p2p/{peer_id}")) if f"/p2p/{peer_id}" in a else m)
            except Exception:
                continue
        if maddrs:
            try:
                await self.p2p._client.connect(PeerID.from_base58(peer_id), maddrs)  # no public API in 1.1.12
            except Exception as e:
                logger.debug(f"connect to {peer_id[:12]} via {addrs}: {e!r}")

    async def unary(self, peer_id: str, rpc: str, request, response_type, timeout: float):
        """One unary RPC under a deadline (hivemind's public ``P2P.call_protobuf_handler``)."""
        return await asyncio.wait_for(self.p2p.call_protobuf_handler(
            PeerID.from_base58(peer_id), handle_name(rpc), request, response_type), timeout)

    async def stream(self, peer_id: str, rpc: str, requests, response_type):
        """An async iterator over the answers of a streaming RPC (``P2P.iterate_protobuf_handler``)."""
        return await self.p2p.iterate_protobuf_handler(PeerID.from_base58(peer_id), handle_name(rpc), requests,
                                                       response_type)

    async def info(self, peer_id: str, addrs=(), timeout: float | None = None) -> dict:
        await self.connect(peer_id, addrs)
        resp = await self.unary(peer_id, "rpc_info", runtime_pb2.ExpertUID(uid=""), runtime_pb2.ExpertInfo,
                                timeout or self.cfg.info_timeout)
        return decode_info(resp.serialized_info)

    async def velocity(self, rep: Replica, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                       guidance: float, timeout: float) -> tuple[torch.Tensor, dict]:
        """v (B, C, H, W) float32 and the answer's metadata from ``rep`` for rows x (B, C, H, W), t (B,),
        labels (B,): over the peer's session, a unary call, or a stream for requests above the unary limit.
        Any failure raises ``PeerCallError``."""
        try:
            tensors = encode_request(rep.expert_id, x, t, labels, guidance, self.cfg.compression)
            meta = request_metadata(guidance)
            small = payload_bytes(tensors) <= MAX_UNARY_BYTES
            if small and self.cfg.sessions:
                session = await self.session(rep.peer_id, timeout)
                out, out_meta = await session.call(rep.expert_id, tensors, guidance, timeout)
            elif small:
                resp = await self.unary(rep.peer_id, "rpc_velocity", runtime_pb2.ExpertRequest(
                    uid=rep.expert_id, tensors=tensors, metadata=meta), runtime_pb2.ExpertResponse, timeout)
                out, out_meta = list(resp.tensors), resp.metadata
            else:
                out, out_meta = await asyncio.wait_for(self._stream_call(rep.peer_id, rep.expert_id, tensors, meta),
                                                       timeout)
            return decode_response(out, out_meta, x.shape[0], tuple(x.shape[1:]))
        except TimeoutError:
            raise PeerCallError(f"timed out after {timeout:.1f}s") from None
        except Exception as e:
            raise PeerCallError(f"{type(e).__name__}: {e}"[:400]) from None

    async def _stream_call(self, peer_id: str, uid: str, tensors, meta: bytes):
        async def requests():
            for i, part in enumerate(stream_parts(tensors)):
                yield runtime_pb2.ExpertRequest(uid=uid if i == 0 else "", tensors=[part],
                                                metadata=meta if i == 0 else b"")

        stream = await self.stream(peer_id, "rpc_velocity_stream", requests(), runtime_pb2.ExpertResponse)
        parts, out_meta = [], b""
        async for msg in stream:
            if not out_meta and msg.metadata:
                out_meta = msg.metadata
            parts.extend(msg.tensors)
        return combine_parts(parts), out_meta

    async def download(self, src, rpc: str, uid: str, limit: int, too_large: str) -> bytes:
        """The bytes a peer streams for ``rpc(uid)``, refused (``too_large``) as soon as they exceed ``limit``."""
        await self.connect(src.peer_id, src.addrs)
        stream = await self.stream(src.peer_id, rpc, runtime_pb2.ExpertUID(uid=uid), runtime_pb2.ExpertInfo)
        chunks, size = [], 0
        async for msg in stream:
            size += len(msg.serialized_info)
            if size > limit:
                raise RequestError(too_large)
            chunks.append(msg.serialized_info)
        return b"".join(chunks)
