"""An in-process peer serving a toy expert on 127.0.0.1 and a raw hivemind caller, for the limits and fuzz tests.

The peer runs ``Peer.start`` + ``Peer.serve`` on its own event loop in a thread (as in
tests/test_swarm_unit.py); ``InprocPeer.on_loop(fn)`` runs ``fn`` there to read or change its state
safely. ``RawCaller`` is a bare ``P2P`` daemon on another loop thread that talks to the peer only through
hivemind's public calls (``call_protobuf_handler``, ``iterate_protobuf_handler``,
``call_binary_stream_handler``) plus hand-written frames of hivemind's stream format, so it can send what
no honest client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from dataclasses import replace

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from diffswarm.dht.node import NetworkConfig
from diffswarm.peer.limits import PeerLimits
from diffswarm.protocol.wire import encode_request, handle_name, request_metadata

SHAPE = (1, 8, 8)  # the toy expert's (C, H, W)


def rss_mib(trim: bool = False) -> float:
    """Resident memory of this process (VmRSS), MiB. ``trim``: first collect garbage and hand freed heap pages
    back to the OS (glibc ``malloc_trim``), so the figure is memory still in use, not the allocator's cache."""
    if trim:
        import ctypes
        import gc

        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class InprocPeer:
    """``Peer`` with one toy fm expert (1x8x8, 4 classes) and, with ``router``, the toy router, started in a
    thread (on ``net``, default a new loopback swarm); ``config``: other ``PeerConfig`` fields; ``stop()`` ends
    it. A peer that does not go online (its reachability check failed) has ended when the constructor returns:
    ``peer.exit_code`` says so."""

    def __init__(self, tmp_dir, limits: PeerLimits | None = None, router: bool = False,
                 net: NetworkConfig | None = None, **config):
        from diffswarm.peer.config import PeerConfig
        from diffswarm.peer.server import Peer
        from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm

        experts, router_path = make_toy_swarm(tmp_dir, ToySwarmSpec(["fm"], size=SHAPE[1], channels=SHAPE[0],
                                                                    steps=2))
        self.checkpoint = experts[0]
        self.router_bytes = router_path.read_bytes() if router else None
        self.base_limits = limits or PeerLimits()
        self.cfg = PeerConfig(net=net or NetworkConfig.loopback(), checkpoint=str(experts[0]), threads=1,
                              router=str(router_path) if router else None, announce_period=60,
                              limits=self.base_limits, **config)
        self.unhandled: list[dict] = []  # what reached the peer loop's exception handler (must stay empty)
        started, holder = threading.Event(), {}

        def run():
            async def main():
                loop = asyncio.get_running_loop()
                loop.set_exception_handler(lambda lp, ctx: self.unhandled.append(ctx))
                peer = Peer(self.cfg)
                holder["peer"], holder["loop"] = peer, loop
                await peer.start()
                await peer.serve()
                started.set()
                await peer.stop_event.wait()
                await peer.shutdown()

            asyncio.run(main())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(90), "in-process peer did not start"
        self.peer, self.loop = holder["peer"], holder["loop"]
        self.servicer = self.peer.servicer
        self.uid = next(iter(self.peer.served))
        self.served = self.peer.served[self.uid]

    def on_loop(self, fn, timeout: float = 10):
        """``fn()`` run on the peer's loop; its result."""
        async def call():
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout)

    def configure(self, **changes) -> PeerLimits:
        """The peer's limits become its starting ones with ``changes`` (counters afresh; call it while idle)."""
        limits = replace(self.base_limits, **changes)
        self.on_loop(lambda: self.servicer.configure(limits))
        return limits

    def quiet(self, timeout: float = 10.0) -> dict:
        """Wait until nothing is held (bytes, streams, queued rows); returns what is held then."""
        deadline = time.monotonic() + timeout
        while True:
            held = self.on_loop(self.held)
            if not any(held.values()) or time.monotonic() > deadline:
                return held
            time.sleep(0.02)

    def held(self) -> dict:
        """On the loop: what the peer holds for callers right now (all 0 when idle)."""
        s = self.servicer
        control = self.peer.dht.p2p._client.control  # hivemind's unary handler tasks (private; a leak shows here)
        return {"bytes": s.budget.used, "streams": s.slots.open_total, "queued_rows": self.served.batcher.pending_rows,
                "queue": len(self.served.batcher.queue), "unary_tasks": len(control._handler_tasks)}

    def tasks(self) -> int:
        return self.on_loop(lambda: len(asyncio.all_tasks(self.loop)))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.peer.stop)
        self.thread.join(30)


class RawMessage:
    """Any bytes, sent where hivemind expects a protobuf (it only calls ``SerializeToString``)."""

    def __init__(self, data: bytes):
        self.data = data

    def SerializeToString(self) -> bytes:  # protobuf's name: hivemind calls it
        return self.data


def frame(data: bytes, marker: bytes = P2P.MESSAGE_MARKER, length: int | None = None) -> bytes:
    """One message in hivemind's stream framing (``length``: declare another length than the body's)."""
    n = len(data) if length is None else length
    return marker + n.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + data


END_OF_STREAM = frame(RPCError().SerializeToString(), P2P.ERROR_MARKER)


async def read_frame(reader: asyncio.StreamReader, timeout: float = 10.0):
    """("msg", bytes) | ("error", text) | ("eof", None) | ("timeout", None): the peer's next frame."""
    try:
        async with asyncio.timeout(timeout):
            marker = await reader.readexactly(1)
            n = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
            body = await reader.readexactly(n)
    except TimeoutError:  # before OSError: TimeoutError is one
        return "timeout", None
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        return "eof", None
    if marker == P2P.ERROR_MARKER:
        return "error", RPCError.FromString(body).message
    return "msg", body


class RawCaller:
    """A bare P2P daemon on its own loop thread, connected to ``peer``."""

    def __init__(self, peer: InprocPeer):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.peer_id = PeerID.from_base58(peer.peer.peer_id)
        net = NetworkConfig.loopback()
        self.p2p = self.run(P2P.create(initial_peers=peer.peer.maddrs, host_maddrs=net.host_maddrs,
                                       use_relay=False, auto_nat=False, nat_port_map=False), timeout=60)
        self.id = self.p2p.peer_id.to_base58()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.run(self.p2p.shutdown(), timeout=15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    # -- calls (coroutines, run them with .run) ----------------------------------------------------

    async def unary(self, rpc: str, msg, response_type=runtime_pb2.ExpertResponse, timeout: float = 10):
        return await asyncio.wait_for(self.p2p.call_protobuf_handler(self.peer_id, handle_name(rpc), msg,
                                                                     response_type), timeout)

    async def stream(self, rpc: str, msgs, response_type=runtime_pb2.ExpertResponse, timeout: float = 20) -> list:
        async def gen():
            for m in msgs:
                yield m

        async def go():
            out = []
            async for r in await self.p2p.iterate_protobuf_handler(self.peer_id, handle_name(rpc), gen(),
                                                                   response_type):
                out.append(r)
            return out

        return await asyncio.wait_for(go(), timeout)

    async def send(self, writer, data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    async def open(self, rpc: str):
        """(reader, writer) of a raw stream to ``rpc``."""
        _, reader, writer = await self.p2p.call_binary_stream_handler(self.peer_id, handle_name(rpc))
        return reader, writer


def valid_request(rows: int = 3, seed: int = 0, uid: str = "c0-fm", guidance: float = 2.0, request_id=None):
    """(ExpertRequest, x, t, labels) of a valid request to the toy expert."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *SHAPE, generator=g)
    t = torch.rand(rows, generator=g)
    labels = torch.randint(-1, 4, (rows,), generator=g)
    msg = runtime_pb2.ExpertRequest(uid=uid, tensors=encode_request(uid, x, t, labels, guidance),
                                    metadata=request_metadata(guidance, request_id))
    return msg, x, t, labels


def quiet_hivemind() -> None:
    """hivemind logs every refused stream at WARNING with a traceback; keep test output readable."""
    for name in ("hivemind", "hivemind.p2p.p2p_daemon", "hivemind.p2p.p2p_daemon_bindings.control"):
        logging.getLogger(name).setLevel(logging.ERROR)


os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_system")


class FakeSwarmClient:
    """SwarmClient's surface for SwarmEnsemble, with no network (tests/test_swarm_unit.py, test_answer_trust.py).

    ``peers`` maps a peer id to a local velocity model (an Expert, or a wrapper that lies); peers in ``dead``
    refuse every call; ``local`` maps a checkpoint sha256 to the client's own hash-checked copy of those
    weights (none by default). ``calls`` records (peer id, rows) of every call made.
    """

    def __init__(self, peers: dict, trust=None, local: dict | None = None):
        from collections import deque

        from diffswarm.client.config import ClientConfig
        from diffswarm.client.selection import Blacklist

        self.cfg = ClientConfig(call_timeout=0.3, threads=0, **({} if trust is None else {"trust": trust}))
        self.peers, self.dead, self.local = peers, set(), dict(local or {})
        self.view, self.bans = None, Blacklist()
        self.latency, self.fresh, self.last_error, self.events = {}, {}, {}, deque()
        self.calls: list[tuple[str, int]] = []
        self.used = 0  # mark_used() calls (one per evaluation)

    def usable(self, rep, now):
        return not self.bans.is_banned(rep.peer_id, now)

    def set_target(self, target):
        from diffswarm.client.discovery import SwarmView

        self.view = SwarmView(target)
        return self.view

    def with_fresh_load(self, reps):
        return reps

    def mark_used(self):
        self.used += 1

    def drain_events(self):
        out = list(self.events)
        self.events.clear()
        return out

    def run(self, coro, timeout=None):
        return asyncio.run(coro)

    def local_expert(self, sha, replicas=(), fetch=False):
        return self.local.get(sha)

    async def call_velocity(self, rep, x, t, labels, guidance, timeout):
        from diffswarm.client.config import PeerCallError

        self.calls.append((rep.peer_id, x.shape[0]))
        if rep.peer_id in self.dead:
            raise PeerCallError("connection refused")
        model = self.peers[rep.peer_id]  # the precision a (lying) model says it computed in, as a peer's metadata
        return model.velocity(x, t, labels, guidance), {"precision": getattr(model, "precision", "fp32")}
