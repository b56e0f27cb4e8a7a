"""The client's picture of the swarm's experts, refreshed from the DHT in the background (never a lookup per
sampling step); each new peer is probed once with ``rpc_info`` before it is used."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from diffswarm.client.admission import describe
from diffswarm.client.admission import verdicts as admission_verdicts
from diffswarm.client.discovery import SwarmTarget, SwarmView
from diffswarm.client.selection import Blacklist, Replica
from diffswarm.client.transport import PeerTransport
from diffswarm.dht.attestations import AttestationMemory
from diffswarm.dht.node import SwarmDHT
from diffswarm.dht.records import ExpertRecord
from diffswarm.protocol.wire import RequestError

logger = logging.getLogger(__name__)
IDLE_AFTER = 30.0  # seconds without a sampler evaluation or velocity call after which a client counts as idle
FULL_EVERY = 15.0  # seconds between the background refreshes that merge every storing node's answer; those between
#                   stop at the first answer (``SwarmDHT._get_many``); below the view's grace for a missed replica


class PeerDiscovery:
    """Expert records, the view of the replicas that fit the client's target, and which peers passed their probe.

    ``bans``, ``last_error`` and ``events`` are the client's own (a failed probe bans its peer like a failed call).
    """

    def __init__(self, dht: SwarmDHT, transport: PeerTransport, bans: Blacklist, last_error: dict[str, str],
                 events: deque[str]):
        self.dht, self.transport = dht, transport
        self.bans, self.last_error, self.events = bans, last_error, events
        self.records: list[ExpertRecord] = []
        self.view: SwarmView | None = None
        self.verified: dict[str, str] = {}  # peer -> "ok" once its rpc_info probe matched its record
        self.probe_latency: dict[str, float] = {}  # peer -> round trip of its rpc_info probe (s), until it is called
        self.manifest = None  # the owner's manifest this client routes by (its admission rule; set by SwarmEnsemble)
        self.memory = AttestationMemory()
        self.attestations: list = []  # every AttestationRecord seen (``memory``)
        self.liars: dict[str, str] = {}  # validator fingerprint -> why its attestations are ignored (AttestationCheck)
        self.checker = None  # client.attestation_check.AttestationCheck with --verify-attestations
        self._admitted: dict[tuple[str, int], bool] = {}
        self.last_used = -float("inf")  # time.monotonic() of the last evaluation or call (``mark_used``)

    def set_target(self, target: SwarmTarget) -> SwarmView:
        """Route for ``target`` (the router's clusters, partition, shapes): keep a view of the replicas that fit it."""
        self.view = SwarmView(target)
        if self.manifest is not None and self.manifest.admission is not None:
            self.view.admission = {}  # nothing is admitted before the attestations are read (next refresh)
        self.view.update(self.records)
        return self.view

    def clusters(self) -> range | None:
        """The clusters whose expert keys a refresh reads: every cluster of the router's target, in one batched
        lookup (routing may pick any cluster at any step, so each one's replicas are kept fresh), else of the owner's
        manifest (None: ``SwarmDHT`` reads K from it)."""
        if self.view is not None:
            return range(self.view.target.num_clusters)
        return range(self.manifest.num_clusters) if self.manifest is not None else None

    async def refresh_once(self, newest: bool = True) -> None:
        """Look the expert records up (``newest``: the merge of every storing node's answer, else the cheaper
        first answer), update the view and probe new peers."""
        recs, errors, lifetimes = await self.dht.get_experts_expiring(self.clusters(), newest=newest)
        for e in errors:
            logger.info(f"skipped an invalid expert record: {e}")
        self.records = recs
        if self.view is None:
            return
        await self.update_admission(recs)
        events = self.view.update(recs, lifetimes=lifetimes)
        for key, reason in self.view.skipped.items():
            logger.debug(f"not using {key}: {reason}")
        now = time.monotonic()
        new = [r for r in self.view.all_replicas()
               if r.peer_id not in self.verified and not self.bans.is_banned(r.peer_id, now)]
        if new:
            await asyncio.gather(*(self.probe(r) for r in {r.peer_id: r for r in new}.values()))
        self.events.extend(events)

    async def update_admission(self, recs: list[ExpertRecord]) -> None:
        """The verdict on each online checkpoint under the owner's admission rule (``client.admission``); says when a
        checkpoint is admitted or put on probation."""
        if self.manifest is None or self.manifest.admission is None:
            self.view.admission = None
            return
        try:
            found, errors = await self.dht.get_attestations(range(self.manifest.num_clusters))
        except Exception as e:  # a failed lookup keeps the attestations seen before
            logger.info(f"attestation lookup failed: {e!r}")
            found, errors = [], []
        self.attestations = self.memory.update(found)  # a lookup that misses some does not forget them
        for e in errors:
            logger.debug(f"skipped an invalid attestation: {e}")
        if self.checker is not None:
            self.checker.records = recs
            await self.checker.check(self.attestations, self.manifest, self.liars, self.events)
        verdicts, notes = admission_verdicts(self.manifest, self.attestations, recs, self.liars)
        for n in notes:
            logger.debug(f"not counting an attestation: {n}")
        for key, v in verdicts.items():
            if self._admitted.get(key) != v.admitted and (v.admitted or key in self._admitted or v.score is not None):
                self.events.append(f"checkpoint {key[0][:12]} of cluster {key[1]}: {describe(v)}")
            self._admitted[key] = v.admitted
        self.view.admission = verdicts

    def mark_used(self) -> None:
        """The client is sampling (any thread may call it): refreshes keep their short period."""
        self.last_used = time.monotonic()

    async def refresh_loop(self, period: float, idle_period: float | None = None) -> None:
        """Refresh every ``period`` seconds while the client is in use (an evaluation or call within ``IDLE_AFTER``
        seconds), every ``idle_period`` while it is idle: at 1,000 volunteers one refresh is ~9 MB of DHT traffic
        (docs/performance.md, section 7), which an idle notebook or API session need not pay every 5 s. The first
        tick after the client is used again refreshes if ``period`` has passed. A refresh merges every storing
        node's answer at least every ``FULL_EVERY`` seconds and takes the first answer in between (~1/6 of the
        bytes); an entry that first answer lacks stays in the view for its grace period (``SwarmView.update``)."""
        idle_period = period if idle_period is None else max(idle_period, period)
        last = last_full = time.monotonic()
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            if now - self.last_used > IDLE_AFTER and now - last < idle_period:
                continue
            newest = now - last_full >= FULL_EVERY  # also the first refresh after an idle spell
            last = now
            if newest:
                last_full = now
            try:
                await self.refresh_once(newest)
            except Exception as e:  # a failed lookup keeps the previous view
                logger.warning(f"swarm refresh failed: {e!r}")

    async def probe(self, rep: Replica) -> None:
        """First contact: the peer must serve the announced expert with the announced weights."""
        t0 = time.perf_counter()
        try:
            info = await self.transport.info(rep.peer_id, rep.addrs)
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
