"""The swarm client's I/O shell: a background event loop with a client-mode DHT node.

``SwarmClient`` owns one thread running one asyncio loop (uvloop where available) with the
client's P2P daemon and DHT node. It

- refreshes the expert records in the background every ``refresh`` seconds (never a DHT lookup
  per sampling step) and probes each new peer once with ``rpc_info`` (checks that the peer serves
  what its record says, measures a first latency);
- fetches the router that the swarm's owner chose: the newest manifest signed by the key whose
  fingerprint is in the swarm's name (``dht.trust``), then the file's bytes from any peer serving
  them, checked against the manifest's sha256 (so a crowd of fresh peer ids announcing another
  router changes nothing);
- calls ``rpc_velocity`` / ``rpc_velocity_stream`` under a deadline.

Synchronous callers (the sampler) use ``run(coro)``; the decisions live in ``selection`` and
``discovery`` (pure) and in ``ensemble.SwarmEnsemble``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.multiaddr import Multiaddr

from diffswarm.client.answer_checks import TrustConfig
from diffswarm.client.discovery import SwarmTarget, SwarmView, choose_stats, router_mismatch, router_sources
from diffswarm.client.selection import Blacklist, Replica, update_ema
from diffswarm.dht.names import SwarmName, SwarmNameError, choose_manifest, parse_swarm_name
from diffswarm.dht.node import NetworkConfig, SwarmDHT
from diffswarm.dht.records import ExpertRecord, RouterProvider, SwarmManifest
from diffswarm.protocol.wire import (
    MAX_CHECKPOINT_BYTES,
    MAX_UNARY_BYTES,
    PROTOCOL_VERSION,
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
from diffswarm.utils.fileio import atomic_write

logger = logging.getLogger(__name__)

ROUTER_KINDS = ("auto", "trained", "stats")


@dataclass
class ClientConfig:
    """How the client finds, trusts and calls peers (one commented field per knob)."""

    swarm: str = ""  # the swarm's full name NAME@FINGERPRINT (its DHT key prefix; needed to discover it)
    net: NetworkConfig = field(default_factory=lambda: NetworkConfig(client_mode=True))
    refresh: float = 5.0  # seconds between background DHT lookups of expert records
    call_timeout: float = 10.0  # deadline of one velocity call, seconds
    info_timeout: float = 5.0  # deadline of the first-contact rpc_info probe
    connect_timeout: float = 60.0  # how long connect() waits for a router and full cluster coverage
    ban_base: float = 1.0  # first ban of a failing peer, seconds (doubles per strike)
    ban_max: float = 60.0
    compression: str = "none"  # none | float16 (x and v on the wire)
    sessions: bool = True  # one long-lived rpc_velocity_session stream per peer (False: a unary call each time)
    threads: int = 1  # torch threads while a step is evaluated (router + mixing are small; more threads
    #                   busy-wait and steal CPU from peers on the same machine); 0 = leave torch's setting
    router_sha256: str | None = None  # use the owner's newest manifest naming this router (file/weights sha256 prefix)
    router_kind: str = "auto"  # trained (the router file the manifest names) | stats (closed form from the statistics
    #                            peers publish: no router peer needed) | auto (trained if the manifest names one)
    cache_dir: str | None = None  # fetched routers and experts (default $DIFFSWARM_CACHE or ~/.cache/diffswarm)
    trust: TrustConfig = field(default_factory=TrustConfig)  # how peers' answers are checked (client/trust.py)
    trusted_checkpoints: tuple[str, ...] = ()  # expert files the client holds: arbiters and local fallback
    reroute: bool = True  # a chosen cluster with no source left: its rows go to the next-ranked experts (True) or
    #                       the step fails with NoExpertsError naming it (False: never an image the router
    #                       did not ask for)


@dataclass(frozen=True)
class PeerHealth:
    """This client's verdict on one peer (a copy for observers such as the dashboard)."""

    verdict: str  # ok (probe matched its record) | banned | skipped (serves another partition/protocol) | unverified
    banned_for: float = 0.0  # seconds of ban left (verdict banned)
    reason: str = ""  # last failure (banned) or why its record is not used (skipped)
    latency: float | None = None  # EMA of round trips, seconds


class SwarmClientError(RuntimeError):
    """The client cannot use the swarm (no router announced, router fails its hash check, ...)."""


class PeerCallError(RuntimeError):
    """A velocity call failed (timeout, unreachable peer, refused request, malformed answer)."""


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


MIN_DOWNLOAD_RATE = 1e6  # bytes/s: a router source slower than this (after info_timeout) is given up
MAX_ROUTER_SOURCES = 16  # router providers (and checkpoint sources) tried per lookup round
_DAEMON_START = threading.Lock()
FETCH_RETRY_S = 60.0  # an expert whose checkpoint could not be fetched is not tried again for this long


def _cache_root(cfg: ClientConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("DIFFSWARM_CACHE") or Path.home() / ".cache" / "diffswarm")


def _cache_dir(cfg: ClientConfig) -> Path:
    return _cache_root(cfg) / "routers"


def _floor_path(cfg: ClientConfig, name: SwarmName) -> Path:
    return _cache_root(cfg) / "manifests" / f"{name}.json"


def read_manifest_floor(cfg: ClientConfig, name: SwarmName) -> float | None:
    """The issue time of the newest manifest of ``name`` this client (cache) accepted; None if none."""
    try:
        issued = json.loads(_floor_path(cfg, name).read_text())["issued"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(issued) if isinstance(issued, (int, float)) else None


def _write_manifest_floor(cfg: ClientConfig, name: SwarmName, m: SwarmManifest) -> None:
    path = _floor_path(cfg, name)
    old = read_manifest_floor(cfg, name)
    if old is not None and old >= m.issued:
        return
    with contextlib.suppress(OSError):  # a read-only cache only loses the rollback guard
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"issued": m.issued, "router_sha256": m.router_sha256}))
        os.replace(tmp, path)


class SwarmClient:
    """Background loop + DHT node + RPC calls. Use as a context manager or call ``close()``."""

    def __init__(self, initial_peers: list[str], cfg: ClientConfig | None = None):
        self.cfg = replace(cfg or ClientConfig())  # a copy: the caller's config stays as it was
        if not initial_peers:
            raise ValueError("the swarm client needs --initial-peers (the multiaddr a peer or `swarm up` printed)")
        self.cfg.net = replace(self.cfg.net, initial_peers=list(initial_peers))
        # the DHT key prefix; a name without the owner's fingerprint raises SwarmNameError saying how to get it.
        # No name: a client that only calls peers it is given (tests, tools), with no discovery
        prefix = str(parse_swarm_name(self.cfg.swarm)) if self.cfg.swarm else None
        try:
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="swarm-client", daemon=True)
        self._thread.start()
        self.dht: SwarmDHT | None = None
        self.view: SwarmView | None = None
        self.records: list[ExpertRecord] = []
        self.bans = Blacklist(self.cfg.ban_base, 2.0, self.cfg.ban_max)
        self.latency: dict[str, float] = {}  # peer -> EMA of velocity round trips (s): what this client measured
        self.probe_latency: dict[str, float] = {}  # peer -> round trip of its rpc_info probe (s), until it is called
        self.fresh: dict[str, tuple[float, float]] = {}  # peer -> (load, throughput) from its last answer
        self.verified: dict[str, str] = {}  # peer -> "ok" once its rpc_info probe matched its record
        self.last_error: dict[str, str] = {}  # peer -> last failure
        self.events: deque[str] = deque()  # discovery events not yet reported through a step callback
        self._refresh_task = None
        self.sessions: dict[str, PeerSession] = {}
        self._closed = False
        self._local: dict[str, object] = {}  # checkpoint sha256 -> Expert (the client's own verified copies)
        self._fetch_failed: dict[str, float] = {}  # checkpoint sha256 -> when fetching it may be tried again
        self._load_trusted()
        try:
            with _DAEMON_START:  # uvloop refuses two loops of one process spawning p2pd at once: one at a time
                self.dht = self.run(SwarmDHT.create(self.cfg.net, prefix), timeout=120)
        except BaseException:
            self.close()
            raise

    # -- plumbing ------------------------------------------------------------------------------

    def run(self, coro, timeout: float | None = None):
        """Run ``coro`` on the client loop and wait for its result (from a non-loop thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> SwarmClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.run(self._close_sessions(), timeout=5)
        if self.dht is not None:
            try:
                self.run(self.dht.shutdown(), timeout=15)
            except Exception as e:
                logger.warning(f"swarm client shutdown: {e!r}")
        with contextlib.suppress(Exception):  # best effort: the loop is going away anyway
            self.run(self._cancel_tasks(), timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()

    async def _close_sessions(self) -> None:
        for s in list(self.sessions.values()):
            s.close()
        self.sessions.clear()

    async def _session(self, peer_id: str, timeout: float) -> PeerSession:
        s = self.sessions.get(peer_id)
        if s is None or s.closed:
            s = PeerSession(self.dht.p2p, peer_id)
            self.sessions[peer_id] = s
            try:
                await asyncio.wait_for(s.open(), timeout)
            except BaseException:
                s.close()
                raise
        return s

    @staticmethod
    async def _cancel_tasks() -> None:
        """Cancel what is left on the loop (the refresh loop, hivemind's background tasks)."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- discovery -----------------------------------------------------------------------------

    async def _refresh_once(self) -> None:
        recs, errors, lifetimes = await self.dht.get_experts_expiring()
        for e in errors:
            logger.info(f"skipped an invalid expert record: {e}")
        self.records = recs
        if self.view is None:
            return
        events = self.view.update(recs, lifetimes=lifetimes)
        for key, reason in self.view.skipped.items():
            logger.debug(f"not using {key}: {reason}")
        now = time.monotonic()
        new = [r for r in self.view.all_replicas()
               if r.peer_id not in self.verified and not self.bans.is_banned(r.peer_id, now)]
        if new:
            await asyncio.gather(*(self._probe(r) for r in {r.peer_id: r for r in new}.values()))
        self.events.extend(events)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.refresh)
            try:
                await self._refresh_once()
            except Exception as e:  # a failed lookup keeps the previous view
                logger.warning(f"swarm refresh failed: {e!r}")

    def start_refresh(self) -> None:
        """Refresh the expert records every ``cfg.refresh`` seconds in the background."""
        if self._refresh_task is None:
            # cancelled with the loop's other tasks by close()
            self._refresh_task = asyncio.run_coroutine_threadsafe(self._refresh_loop(), self.loop)

    def refresh(self) -> None:
        self.run(self._refresh_once(), timeout=60)

    async def _connect(self, peer_id: str, addrs) -> None:
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
                await self.dht.p2p._client.connect(PeerID.from_base58(peer_id), maddrs)  # no public API in 1.1.12
            except Exception as e:
                logger.debug(f"connect to {peer_id[:12]} via {addrs}: {e!r}")

    async def _unary(self, peer_id: str, rpc: str, request, response_type, timeout: float):
        """One unary RPC under a deadline (hivemind's public ``P2P.call_protobuf_handler``)."""
        return await asyncio.wait_for(self.dht.p2p.call_protobuf_handler(
            PeerID.from_base58(peer_id), handle_name(rpc), request, response_type), timeout)

    async def _stream(self, peer_id: str, rpc: str, requests, response_type):
        """An async iterator over the answers of a streaming RPC (``P2P.iterate_protobuf_handler``)."""
        return await self.dht.p2p.iterate_protobuf_handler(PeerID.from_base58(peer_id), handle_name(rpc), requests,
                                                           response_type)

    async def info(self, peer_id: str, addrs=(), timeout: float | None = None) -> dict:
        await self._connect(peer_id, addrs)
        resp = await self._unary(peer_id, "rpc_info", runtime_pb2.ExpertUID(uid=""), runtime_pb2.ExpertInfo,
                                 timeout or self.cfg.info_timeout)
        return decode_info(resp.serialized_info)

    async def _probe(self, rep: Replica) -> None:
        """First contact: the peer must serve the announced expert with the announced weights."""
        t0 = time.perf_counter()
        try:
            info = await self.info(rep.peer_id, rep.addrs)
            served = {(e.get("expert_id"), e.get("checkpoint_sha256")) for e in info.get("experts", [])
                      if isinstance(e, dict)}
            if info.get("peer_id") != rep.peer_id or (rep.expert_id, rep.checkpoint_sha256) not in served:
                raise RequestError(f"peer {rep.peer_id[:12]} does not serve {rep.expert_id} "
                                   f"{rep.checkpoint_sha256[:12]} as announced")
            self.probe_latency[rep.peer_id] = time.perf_counter() - t0  # a hint for observers, not a measurement of
            self.verified[rep.peer_id] = "ok"                              # its velocity calls (selection ignores it)
        except Exception as e:
            reason = f"probe failed: {e!r}"[:300]
            self.last_error[rep.peer_id] = reason
            length = self.bans.ban(rep.peer_id, time.monotonic())
            self.events.append(f"{rep.expert_id} at {rep.peer_id[:12]}: {reason}; banned {length:.0f}s")
            self.verified.pop(rep.peer_id, None)  # probed again once the ban is over

    def _load_trusted(self) -> None:
        from diffswarm.experts.expert import Expert

        for path in self.cfg.trusted_checkpoints:
            e = Expert.from_checkpoint(path, "cpu")  # raises CheckpointError on a hash mismatch
            self._local[e.weights_sha256] = e

    def local_expert(self, sha256: str, replicas=(), fetch: bool = False):
        """The client's own copy of the expert with weights ``sha256`` (an Expert whose weights hash to it), or
        None. ``fetch``: download it first (``rpc_checkpoint``) from one of ``replicas`` serving it, any of them
        (the hash check makes the source irrelevant); a failed fetch is not retried for ``FETCH_RETRY_S``."""
        if sha256 in self._local or not fetch or not sha256:
            return self._local.get(sha256)
        if time.monotonic() < self._fetch_failed.get(sha256, float("-inf")):
            return None
        from diffswarm.experts.checkpoint import CheckpointError
        from diffswarm.experts.expert import Expert

        path = _cache_root(self.cfg) / "experts" / f"{sha256}.safetensors"
        sources = [r for r in replicas if r.checkpoint_sha256 == sha256]
        random.shuffle(sources)
        errs = []
        for src in [None, *sources[:MAX_ROUTER_SOURCES]]:  # None: the cache
            try:
                if src is not None:
                    data = self.run(asyncio.wait_for(self._download_checkpoint(src), self.cfg.connect_timeout))
                    atomic_write(path, lambda tmp, data=data: Path(tmp).write_bytes(data))
                elif not path.exists():
                    continue
                e = Expert.from_checkpoint(path, "cpu")  # checks the tensors against the file's recorded sha256
                if e.weights_sha256 != sha256:
                    raise CheckpointError(f"its weights hash to {e.weights_sha256[:12]}, not {sha256[:12]}")
                self._local[sha256] = e
                return e
            except Exception as ex:
                errs.append(f"{'cache' if src is None else src.peer_id[:12]}: {ex}"[:200])
        self._fetch_failed[sha256] = time.monotonic() + FETCH_RETRY_S
        logger.info(f"could not fetch expert {sha256[:12]}: {'; '.join(errs)}")
        return None

    async def _download(self, src, rpc: str, uid: str, limit: int, too_large: str) -> bytes:
        """The bytes a peer streams for ``rpc(uid)``, refused (``too_large``) as soon as they exceed ``limit``."""
        await self._connect(src.peer_id, src.addrs)
        stream = await self._stream(src.peer_id, rpc, runtime_pb2.ExpertUID(uid=uid), runtime_pb2.ExpertInfo)
        chunks, size = [], 0
        async for msg in stream:
            size += len(msg.serialized_info)
            if size > limit:
                raise RequestError(too_large)
            chunks.append(msg.serialized_info)
        return b"".join(chunks)

    async def _download_checkpoint(self, src: Replica) -> bytes:
        return await self._download(src, "rpc_checkpoint", src.checkpoint_sha256, MAX_CHECKPOINT_BYTES,
                                    f"checkpoint from {src.peer_id[:12]} exceeds {MAX_CHECKPOINT_BYTES >> 20} MiB")

    def set_target(self, target: SwarmTarget) -> SwarmView:
        """Route for ``target`` (the router's clusters, partition, shapes): keep a view of the replicas that fit it."""
        self.view = SwarmView(target)
        self.view.update(self.records)
        return self.view

    def health(self, now: float | None = None) -> dict[str, PeerHealth]:
        """Per announcing peer, what this client makes of it (peers whose records are neither online nor
        skipped, e.g. joining, are left out)."""
        now = time.monotonic() if now is None else now
        skipped = self.view.skipped if self.view is not None else {}  # "peer_id/expert_id" -> why
        out: dict[str, PeerHealth] = {}
        for r in self.records:
            p = r.peer_id
            lat = self.latency.get(p, self.probe_latency.get(p))
            if self.bans.is_banned(p, now):
                out[p] = PeerHealth("banned", self.bans.until[p] - now, self.last_error.get(p, ""), lat)
            elif self.verified.get(p) == "ok":
                out[p] = PeerHealth("ok", latency=lat)
            elif f"{p}/{r.expert_id}" in skipped:
                out[p] = PeerHealth("skipped", reason=skipped[f"{p}/{r.expert_id}"], latency=lat)
            elif r.state == "online":
                out[p] = PeerHealth("unverified", latency=lat)
        return out

    def drain_events(self) -> list[str]:
        out = []
        while self.events:
            out.append(self.events.popleft())
        return out

    def usable(self, rep: Replica, now: float) -> bool:
        return self.verified.get(rep.peer_id) == "ok" and not self.bans.is_banned(rep.peer_id, now)

    def with_fresh_load(self, reps: list[Replica]) -> list[Replica]:
        out = []
        for r in reps:
            f = self.fresh.get(r.peer_id)
            out.append(replace(r, load=f[0], throughput=f[1] if f[1] > 0 else r.throughput) if f else r)
        return out

    # -- router --------------------------------------------------------------------------------

    async def _download_router(self, src: RouterProvider, manifest: SwarmManifest) -> bytes:
        """The router file from ``src``, refused as soon as it grows past the manifest's ``router_bytes``."""
        return await self._download(src, "rpc_router", manifest.router_sha256, manifest.router_bytes,
                                    f"router from {src.peer_id[:12]} is larger than the manifest's "
                                    f"{manifest.router_bytes} B")

    def _swarm_name(self) -> SwarmName:
        try:
            return parse_swarm_name(self.cfg.swarm)
        except SwarmNameError as e:
            raise SwarmClientError(str(e)) from None

    def swarm_manifests(self) -> tuple[list[SwarmManifest], list[str]]:
        """Well-formed manifests announced in the swarm (signatures not checked yet) and the skipped ones."""
        return self.run(self.dht.get_manifests(), timeout=60)

    def router_providers(self) -> tuple[list[RouterProvider], list[str]]:
        return self.run(self.dht.get_providers(), timeout=60)

    def find_manifest(self, wait: float | None = None) -> SwarmManifest:
        """The owner's newest valid manifest (``trust.choose_manifest``), waiting up to ``wait`` seconds
        (default ``cfg.connect_timeout``; 0 = look once) for one to appear. Manifests older than the newest
        this client accepted before (its cache) are refused unless ``cfg.router_sha256`` pins a router."""
        name = self._swarm_name()
        pin = self.cfg.router_sha256
        floor = None if pin else read_manifest_floor(self.cfg, name)
        deadline = time.monotonic() + (self.cfg.connect_timeout if wait is None else wait)
        while True:
            manifests, errors = self.swarm_manifests()
            for e in errors:
                logger.info(f"skipped an invalid manifest: {e}")
            manifest, notes = choose_manifest(manifests, name, pin=pin, floor=floor)
            for n in notes:
                logger.info(f"not using a manifest: {n}")
            if manifest is not None:
                break
            if time.monotonic() > deadline:
                pinned = f" naming router {pin}" if pin else ""
                why = f" ({len(notes)} announced manifest(s) rejected, e.g. {notes[0]})" if notes else ""
                raise SwarmClientError(f"no manifest{pinned} signed by the owner of swarm {name} is announced{why}; "
                                       "the owner starts it with `diffswarm peer --router FILE` (or `swarm up`), or "
                                       "pass --router to use a local file")
            time.sleep(1.0)
        if notes:
            self.events.append(f"ignored {len(notes)} manifest(s) not validly signed by the owner of {name}")
        if manifest.protocol != PROTOCOL_VERSION:
            raise SwarmClientError(f"swarm {name} speaks protocol {manifest.protocol}, this client "
                                   f"{PROTOCOL_VERSION}: use a matching diffswarm version")
        return manifest

    def _fetch_router_bytes(self, manifest: SwarmManifest, deadline: float) -> bytes:
        """The manifest's router file from any provider whose bytes hash to its sha256 (in random order, so a
        crowd of lying providers cannot always go first; each under a deadline scaled by the file size)."""
        per_source = self.cfg.info_timeout + manifest.router_bytes / MIN_DOWNLOAD_RATE
        errs: list[str] = []
        while True:
            providers, errors = self.router_providers()
            for e in errors:
                logger.info(f"skipped an invalid router provider record: {e}")
            sources = router_sources(providers, manifest)
            random.shuffle(sources)
            for src in sources[:MAX_ROUTER_SOURCES]:
                try:
                    data = self.run(asyncio.wait_for(self._download_router(src, manifest), per_source))
                except Exception as e:
                    errs.append(f"{src.peer_id[:12]}: {e!r}"[:200])
                    continue
                if hashlib.sha256(data).hexdigest() == manifest.router_sha256:
                    return data
                errs.append(f"{src.peer_id[:12]}: bytes do not match the manifest's sha256")
                logger.info(f"router provider {src.peer_id} served bytes that do not match the manifest")
            if time.monotonic() > deadline:
                why = "; ".join(errs[-5:]) or "no peer announces it"
                raise SwarmClientError(f"could not fetch router {manifest.router_sha256[:12]}: {why}")
            time.sleep(1.0)

    def fetch_router(self, device="cpu", wait: float | None = None):
        """(router, SwarmManifest): with ``cfg.router_kind`` trained, the router the swarm's owner chose, from
        the cache or any peer, verified (file sha256, weights hash, and the router's own config against the
        manifest); with stats, a ``StatsRouter`` from the statistics the peers publish (``fetch_stats_router``);
        auto: trained when the manifest names a router file, else stats.
        ``wait``: seconds to wait for the manifest and a router source (default ``cfg.connect_timeout``;
        0 = look once)."""
        from diffswarm.experts.checkpoint import file_sha256
        from diffswarm.router.model import Router

        deadline = time.monotonic() + (self.cfg.connect_timeout if wait is None else wait)
        manifest = self.find_manifest(wait)
        kind = self.cfg.router_kind
        if kind not in ROUTER_KINDS:
            raise SwarmClientError(f"router kind must be one of {ROUTER_KINDS}, got {kind!r}")
        if kind == "stats" or (kind == "auto" and not manifest.has_router):
            return self.fetch_stats_router(manifest, device, deadline), manifest
        if not manifest.has_router:
            raise SwarmClientError(f"swarm {self._swarm_name()} has no trained router (its owner's manifest names "
                                   "none): route with the statistics its peers publish (--router-kind stats or auto)")
        path = _cache_dir(self.cfg) / f"{manifest.router_sha256}.safetensors"
        if not (path.exists() and file_sha256(path) == manifest.router_sha256):
            data = self._fetch_router_bytes(manifest, deadline)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        router = Router.load(path, device)
        problem = router_mismatch(manifest, router.cfg, router.weights_sha256)
        if problem is not None:
            raise SwarmClientError(f"router {path} does not match the owner's manifest: {problem}")
        if not self.cfg.router_sha256:
            _write_manifest_floor(self.cfg, self._swarm_name(), manifest)
        return router, manifest

    def stats_records(self):
        return self.run(self.dht.get_stats(), timeout=60)

    def fetch_stats_router(self, manifest: SwarmManifest, device="cpu", deadline: float | None = None):
        """A ``StatsRouter`` from the cluster statistics the swarm's peers publish, waiting until ``deadline``
        (monotonic; default now + ``cfg.connect_timeout``) for every cluster of ``manifest`` to have a blob
        that parses within bounds and fits the manifest (cluster, partition, image shape, classes, dataset)."""
        from diffswarm.router.stats.blob import ClusterStats, StatsFormatError
        from diffswarm.router.stats.router import StatsRouter

        deadline = time.monotonic() + self.cfg.connect_timeout if deadline is None else deadline
        bad: set[str] = set()
        shape = tuple(manifest.image_shape)
        while True:
            recs, errors = self.stats_records()
            for e in errors:
                logger.info(f"skipped an invalid stats record: {e}")
            experts, _ = self.run(self.dht.get_experts(), timeout=60)
            serving = {(r.peer_id, r.cluster) for r in experts if r.state == "online" and r.cluster is not None}
            cands, notes = choose_stats(recs, manifest, serving)
            for n in notes:
                logger.debug(f"not using {n}")
            chosen: list[ClusterStats | None] = []
            for k, options in enumerate(cands):
                pick = None
                for r in options:
                    if r.stats_sha256 in bad:
                        continue
                    try:
                        st = ClusterStats.from_bytes(r.blob)
                        got = (st.cluster, st.partition_hash or "", tuple(st.image_shape), st.num_classes)
                        if got != (k, manifest.partition_hash, shape, manifest.num_classes):
                            raise StatsFormatError(f"describes {got}, the manifest wants "
                                                   f"{(k, manifest.partition_hash, shape, manifest.num_classes)}")
                        if st.dataset_id and manifest.dataset_id and st.dataset_id != manifest.dataset_id:
                            raise StatsFormatError(f"dataset {st.dataset_id!r}, not {manifest.dataset_id!r}")
                    except StatsFormatError as e:
                        bad.add(r.stats_sha256)
                        self.events.append(f"ignored cluster {k} statistics from {r.peer_id[:12]}: {e}"[:300])
                        continue
                    pick = st
                    break
                chosen.append(pick)
            missing = [k for k, st in enumerate(chosen) if st is None]
            if not missing:
                router = StatsRouter(chosen, partition_hash=manifest.partition_hash,
                                     dataset_id=manifest.dataset_id or None)
                return router.to(device)
            if time.monotonic() > deadline:
                raise SwarmClientError(f"no usable statistics for cluster(s) {', '.join(map(str, missing))} of swarm "
                                       f"{self._swarm_name()}: the statistics router needs every cluster's (their "
                                       "peers publish cluster_stats.bin from beside their checkpoints)")
            time.sleep(1.0)

    # -- velocity calls ------------------------------------------------------------------------

    async def call_velocity(self, rep: Replica, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                            guidance: float, timeout: float) -> tuple[torch.Tensor, dict]:
        """v (B, C, H, W) float32 from ``rep`` for rows x (B, C, H, W), t (B,), labels (B,)."""
        t0 = time.perf_counter()
        try:
            tensors = encode_request(rep.expert_id, x, t, labels, guidance, self.cfg.compression)
            meta = request_metadata(guidance)
            small = payload_bytes(tensors) <= MAX_UNARY_BYTES
            if small and self.cfg.sessions:
                session = await self._session(rep.peer_id, timeout)
                out, out_meta = await session.call(rep.expert_id, tensors, guidance, timeout)
            elif small:
                resp = await self._unary(rep.peer_id, "rpc_velocity", runtime_pb2.ExpertRequest(
                    uid=rep.expert_id, tensors=tensors, metadata=meta), runtime_pb2.ExpertResponse, timeout)
                out, out_meta = list(resp.tensors), resp.metadata
            else:
                out, out_meta = await asyncio.wait_for(self._stream_call(rep.peer_id, rep.expert_id, tensors, meta),
                                                       timeout)
            v, info = decode_response(out, out_meta, x.shape[0], tuple(x.shape[1:]))
        except TimeoutError:
            raise PeerCallError(f"timed out after {timeout:.1f}s") from None
        except Exception as e:
            raise PeerCallError(f"{type(e).__name__}: {e}"[:400]) from None
        rtt = time.perf_counter() - t0
        self.latency[rep.peer_id] = update_ema(self.latency.get(rep.peer_id), rtt)
        load, thr = info.get("load"), info.get("throughput")
        if isinstance(load, (int, float)) and isinstance(thr, (int, float)):
            self.fresh[rep.peer_id] = (float(load), float(thr))
        return v, info

    async def _stream_call(self, peer_id: str, uid: str, tensors, meta: bytes):
        async def requests():
            for i, part in enumerate(stream_parts(tensors)):
                yield runtime_pb2.ExpertRequest(uid=uid if i == 0 else "", tensors=[part],
                                                metadata=meta if i == 0 else b"")

        stream = await self._stream(peer_id, "rpc_velocity_stream", requests(), runtime_pb2.ExpertResponse)
        parts, out_meta = [], b""
        async for msg in stream:
            if not out_meta and msg.metadata:
                out_meta = msg.metadata
            parts.extend(msg.tensors)
        return combine_parts(parts), out_meta
