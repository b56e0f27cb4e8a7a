"""The swarm client's I/O shell: a background event loop with a client-mode DHT node.

``SwarmClient`` owns one thread running one asyncio loop (uvloop where available) with the
client's P2P daemon and DHT node, and wires the parts that run on it:

- ``refresh.PeerDiscovery`` refreshes the expert records in the background every ``refresh`` seconds
  (never a DHT lookup per sampling step) and probes each new peer once with ``rpc_info`` (checks that
  the peer serves what its record says, measures a first latency);
- ``bootstrap.Bootstrap`` fetches the router that the swarm's owner chose (the newest manifest signed
  by the key whose fingerprint is in the swarm's name, then the file's bytes from any peer serving
  them, checked against the manifest's sha256), or builds a statistics router;
- ``transport.PeerTransport`` calls ``rpc_velocity`` / ``rpc_velocity_stream`` under a deadline;
- ``downloads.LocalExperts`` keeps the client's own verified copies of experts' weights.

Synchronous callers (the sampler) use ``run(coro)``; the decisions live in ``selection`` and
``discovery`` (pure) and in ``ensemble.SwarmEnsemble``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import replace

import torch

from diffswarm.client.bootstrap import Bootstrap
from diffswarm.client.config import ClientConfig
from diffswarm.client.discovery import SwarmTarget, SwarmView
from diffswarm.client.downloads import LocalExperts
from diffswarm.client.health import PeerHealth, peer_health
from diffswarm.client.refresh import PeerDiscovery
from diffswarm.client.selection import Blacklist, Replica, update_ema
from diffswarm.client.transport import PeerTransport
from diffswarm.dht.names import parse_swarm_name
from diffswarm.dht.node import SwarmDHT
from diffswarm.dht.records import ClusterStatsRecord, ExpertRecord, RouterProvider, SwarmManifest
from diffswarm.protocol.wire import MAX_CHECKPOINT_BYTES

logger = logging.getLogger(__name__)

_DAEMON_START = threading.Lock()


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
        self.transport: PeerTransport | None = None
        self.discovery: PeerDiscovery | None = None
        self.bootstrap: Bootstrap | None = None
        self.bans = Blacklist(self.cfg.ban_base, 2.0, self.cfg.ban_max)
        self.latency: dict[str, float] = {}  # peer -> EMA of velocity round trips (s): what this client measured
        self.fresh: dict[str, tuple[float, float]] = {}  # peer -> (load, throughput) from its last answer
        self.last_error: dict[str, str] = {}  # peer -> last failure
        self.events: deque[str] = deque()  # discovery events not yet reported through a step callback
        self._refresh_task = None
        self._closed = False
        self.local = LocalExperts(self.cfg, self._download_checkpoint)
        try:
            with _DAEMON_START:  # uvloop refuses two loops of one process spawning p2pd at once: one at a time
                self.dht = self.run(SwarmDHT.create(self.cfg.net, prefix), timeout=120)
        except BaseException:
            self.close()
            raise
        self.transport = PeerTransport(self.dht.p2p, self.cfg)
        self.discovery = PeerDiscovery(self.dht, self.transport, self.bans, self.last_error, self.events)
        self.bootstrap = Bootstrap(self.cfg, self.run, self.dht, self.transport, self.events)
        if self.cfg.verify_attestations:
            from diffswarm.client.attestation_check import AttestationCheck

            self.discovery.checker = AttestationCheck(self.cfg.verify_attestations,
                                                      lambda sha, recs: self.local.get(sha, recs, fetch=True))

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
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.run(self.transport.close_sessions(), timeout=5)
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

    @staticmethod
    async def _cancel_tasks() -> None:
        """Cancel what is left on the loop (the refresh loop, hivemind's background tasks)."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- discovery (refresh.PeerDiscovery) -------------------------------------------------------

    @property
    def records(self) -> list[ExpertRecord]:
        return self.discovery.records

    @property
    def view(self) -> SwarmView | None:
        return self.discovery.view

    @property
    def verified(self) -> dict[str, str]:
        return self.discovery.verified

    @property
    def probe_latency(self) -> dict[str, float]:
        return self.discovery.probe_latency

    def start_refresh(self) -> None:
        """Refresh the expert records in the background: every ``cfg.refresh`` seconds while the client samples,
        every ``cfg.idle_refresh`` while it is idle (``PeerDiscovery.refresh_loop``)."""
        if self._refresh_task is None:
            # cancelled with the loop's other tasks by close()
            self._refresh_task = asyncio.run_coroutine_threadsafe(
                self.discovery.refresh_loop(self.cfg.refresh, self.cfg.idle_refresh), self.loop)

    def refresh(self) -> None:
        self.run(self.discovery.refresh_once(), timeout=60)

    def mark_used(self) -> None:
        """The client is sampling: the background refresh keeps its short period (``start_refresh``)."""
        self.discovery.mark_used()

    def set_target(self, target: SwarmTarget) -> SwarmView:
        """Route for ``target`` (the router's clusters, partition, shapes): keep a view of the replicas that fit it."""
        return self.discovery.set_target(target)

    def health(self, now: float | None = None) -> dict[str, PeerHealth]:
        """Per announcing peer, what this client makes of it (``health.peer_health``)."""
        now = time.monotonic() if now is None else now
        return peer_health(self.records, self.view, self.bans, self.verified, self.latency, self.probe_latency,
                           self.last_error, now)

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

    # -- router and manifest (bootstrap.Bootstrap) -------------------------------------------------

    def swarm_manifests(self) -> tuple[list[SwarmManifest], list[str]]:
        """Well-formed manifests announced in the swarm (signatures not checked yet) and the skipped ones."""
        return self.bootstrap.swarm_manifests()

    def router_providers(self) -> tuple[list[RouterProvider], list[str]]:
        return self.bootstrap.router_providers()

    def stats_records(self, k: int | None = None) -> tuple[list[ClusterStatsRecord], list[str]]:
        return self.bootstrap.stats_records(k)

    def find_manifest(self, wait: float | None = None) -> SwarmManifest:
        """The owner's newest valid manifest (``Bootstrap.find_manifest``)."""
        return self.bootstrap.find_manifest(wait)

    def fetch_router(self, device="cpu", wait: float | None = None):
        """(router, SwarmManifest) as ``cfg.router_kind`` says (``Bootstrap.fetch_router``)."""
        return self.bootstrap.fetch_router(device, wait)

    def fetch_stats_router(self, manifest: SwarmManifest, device="cpu", deadline: float | None = None):
        """A ``StatsRouter`` from the statistics the swarm's peers publish (``Bootstrap.fetch_stats_router``)."""
        return self.bootstrap.fetch_stats_router(manifest, device, deadline)

    # -- calls ---------------------------------------------------------------------------------

    async def info(self, peer_id: str, addrs=(), timeout: float | None = None) -> dict:
        return await self.transport.info(peer_id, addrs, timeout)

    async def call_velocity(self, rep: Replica, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                            guidance: float, timeout: float) -> tuple[torch.Tensor, dict]:
        """v (B, C, H, W) float32 from ``rep`` for rows x (B, C, H, W), t (B,), labels (B,); records the round
        trip and the load the peer reported."""
        t0 = time.perf_counter()
        self.mark_used()
        v, info = await self.transport.velocity(rep, x, t, labels, guidance, timeout)
        rtt = time.perf_counter() - t0
        self.latency[rep.peer_id] = update_ema(self.latency.get(rep.peer_id), rtt)
        load, thr = info.get("load"), info.get("throughput")
        if isinstance(load, (int, float)) and isinstance(thr, (int, float)):
            self.fresh[rep.peer_id] = (float(load), float(thr))
        return v, info

    def local_expert(self, sha256: str, replicas=(), fetch: bool = False):
        """The client's own copy of the expert with weights ``sha256``, or None (``LocalExperts.get``)."""
        return self.local.get(sha256, replicas, fetch)

    def _download_checkpoint(self, src: Replica) -> bytes:
        return self.run(asyncio.wait_for(self.transport.download(
            src, "rpc_checkpoint", src.checkpoint_sha256, MAX_CHECKPOINT_BYTES,
            f"checkpoint from {src.peer_id[:12]} exceeds {MAX_CHECKPOINT_BYTES >> 20} MiB"), self.cfg.connect_timeout))
