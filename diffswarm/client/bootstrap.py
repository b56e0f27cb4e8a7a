"""What a client needs before its first step: the owner's signed manifest, the router it names (or a statistics
router from what the peers publish). Each is looked up until a deadline by one helper, ``poll_until``.

The router is the one the swarm's owner chose: the newest manifest signed by the key whose fingerprint is in
the swarm's name (``dht.names``), then the file's bytes from any peer serving them, checked against the
manifest's sha256 (so a crowd of fresh peer ids announcing another router changes nothing).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from diffswarm.client.config import ROUTER_SOURCES, ClientConfig, SwarmClientError
from diffswarm.client.discovery import NOT_SIGNED, choose_stats, router_mismatch, router_sources
from diffswarm.client.downloads import (
    MAX_ROUTER_SOURCES,
    MIN_DOWNLOAD_RATE,
    cached_router,
    read_manifest_floor,
    write_manifest_floor,
)
from diffswarm.client.transport import PeerTransport
from diffswarm.dht.names import SwarmName, SwarmNameError, choose_manifest, parse_swarm_name
from diffswarm.dht.node import SwarmDHT
from diffswarm.dht.records import ClusterStatsRecord, RouterProvider, SwarmManifest
from diffswarm.protocol.wire import PROTOCOL_VERSION
from diffswarm.utils.signals import raise_if_stopped

logger = logging.getLogger(__name__)

T = TypeVar("T")
POLL_S = 1.0  # seconds between two lookups while waiting for a manifest, a router source or statistics


def poll_until(deadline: float, attempt: Callable[[], T | None], give_up: Callable[[], Exception]) -> T:
    """The first result of ``attempt()`` that is not None, trying every ``POLL_S`` seconds; once past ``deadline``
    (``time.monotonic``) a failed attempt raises ``give_up()`` instead."""
    while True:
        raise_if_stopped()
        out = attempt()
        if out is not None:
            return out
        if time.monotonic() > deadline:
            raise give_up()
        time.sleep(POLL_S)


class Bootstrap:
    """Manifest, router and statistics lookups of one client (``run``: the client loop's ``run``)."""

    def __init__(self, cfg: ClientConfig, run: Callable, dht: SwarmDHT, transport: PeerTransport,
                 events: deque[str]):
        self.cfg, self.run, self.dht, self.transport, self.events = cfg, run, dht, transport, events

    def swarm_name(self) -> SwarmName:
        try:
            return parse_swarm_name(self.cfg.swarm)
        except SwarmNameError as e:
            raise SwarmClientError(str(e)) from None

    def swarm_manifests(self) -> tuple[list[SwarmManifest], list[str]]:
        """Well-formed manifests announced in the swarm (signatures not checked yet) and the skipped ones."""
        return self.run(self.dht.get_manifests(), timeout=60)

    def router_providers(self) -> tuple[list[RouterProvider], list[str]]:
        return self.run(self.dht.get_providers(), timeout=60)

    def stats_records(self, k: int | None = None) -> tuple[list[ClusterStatsRecord], list[str]]:
        """Statistics records of clusters 0..k-1 (None: every cluster of the owner's manifest)."""
        return self.run(self.dht.get_stats(None if k is None else range(k)), timeout=60)

    def deadline(self, wait: float | None) -> float:
        """Monotonic time ``wait`` seconds from now (default ``cfg.connect_timeout``)."""
        return time.monotonic() + (self.cfg.connect_timeout if wait is None else wait)

    # -- manifest --------------------------------------------------------------------------------

    def find_manifest(self, wait: float | None = None) -> SwarmManifest:
        """The owner's newest valid manifest (``names.choose_manifest``), waiting up to ``wait`` seconds
        (default ``cfg.connect_timeout``; 0 = look once) for one to appear. Manifests older than the newest
        this client accepted before (its cache) are refused unless ``cfg.router_sha256`` pins a router."""
        name = self.swarm_name()
        pin = self.cfg.router_sha256
        floor = None if pin else read_manifest_floor(self.cfg, name)
        notes: list[str] = []  # why the last lookup's manifests were rejected

        def attempt() -> SwarmManifest | None:
            manifests, errors = self.swarm_manifests()
            for e in errors:
                logger.info(f"skipped an invalid manifest: {e}")
            manifest, found = choose_manifest(manifests, name, pin=pin, floor=floor)
            notes[:] = found
            for n in notes:
                logger.info(f"not using a manifest: {n}")
            return manifest

        def give_up() -> SwarmClientError:
            pinned = f" naming router {pin}" if pin else ""
            why = f" ({len(notes)} announced manifest(s) rejected, e.g. {notes[0]})" if notes else ""
            return SwarmClientError(f"no manifest{pinned} signed by the owner of swarm {name} is announced{why}; "
                                    "the owner starts it with `diffswarm peer --router FILE` (or `swarm up`), or "
                                    "pass --router to use a local file")

        manifest = poll_until(self.deadline(wait), attempt, give_up)
        if notes:
            self.events.append(f"ignored {len(notes)} manifest(s) not validly signed by the owner of {name}")
        if manifest.protocol != PROTOCOL_VERSION:
            raise SwarmClientError(f"swarm {name} speaks protocol {manifest.protocol}, this client "
                                   f"{PROTOCOL_VERSION}: use a matching diffswarm version")
        return manifest

    # -- trained router --------------------------------------------------------------------------

    def fetch_router(self, device="cpu", wait: float | None = None):
        """(router, SwarmManifest): with ``cfg.router_kind`` trained, the router the swarm's owner chose, from
        the cache or any peer, verified (file sha256, weights hash, and the router's own config against the
        manifest); with stats, a ``StatsRouter`` from the statistics the peers publish (``fetch_stats_router``);
        auto: trained when the manifest names a router file, else stats.
        ``wait``: seconds to wait for the manifest and a router source (default ``cfg.connect_timeout``;
        0 = look once)."""
        from diffswarm.router.model import Router

        deadline = self.deadline(wait)
        manifest = self.find_manifest(wait)
        kind = self.cfg.router_kind
        if kind not in ROUTER_SOURCES:
            raise SwarmClientError(f"router kind must be one of {ROUTER_SOURCES}, got {kind!r}")
        if kind == "stats" or (kind == "auto" and not manifest.has_router):
            return self.fetch_stats_router(manifest, device, deadline), manifest
        if not manifest.has_router:
            raise SwarmClientError(f"swarm {self.swarm_name()} has no trained router (its owner's manifest names "
                                   "none): route with the statistics its peers publish (--router-kind stats or auto)")
        path = cached_router(self.cfg, manifest, lambda: self._fetch_router_bytes(manifest, deadline))
        router = Router.load(path, device)
        problem = router_mismatch(manifest, router.cfg, router.weights_sha256)
        if problem is not None:
            raise SwarmClientError(f"router {path} does not match the owner's manifest: {problem}")
        if not self.cfg.router_sha256:
            write_manifest_floor(self.cfg, self.swarm_name(), manifest)
        return router, manifest

    def _fetch_router_bytes(self, manifest: SwarmManifest, deadline: float) -> bytes:
        """The manifest's router file from any provider whose bytes hash to its sha256 (in random order, so a
        crowd of lying providers cannot always go first; each under a deadline scaled by the file size)."""
        per_source = self.cfg.info_timeout + manifest.router_bytes / MIN_DOWNLOAD_RATE
        errs: list[str] = []

        def attempt() -> bytes | None:
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
            return None

        def give_up() -> SwarmClientError:
            why = "; ".join(errs[-5:]) or "no peer announces it"
            return SwarmClientError(f"could not fetch router {manifest.router_sha256[:12]}: {why}")

        return poll_until(deadline, attempt, give_up)

    async def _download_router(self, src: RouterProvider, manifest: SwarmManifest) -> bytes:
        """The router file from ``src``, refused as soon as it grows past the manifest's ``router_bytes``."""
        return await self.transport.download(src, "rpc_router", manifest.router_sha256, manifest.router_bytes,
                                             f"router from {src.peer_id[:12]} is larger than the manifest's "
                                             f"{manifest.router_bytes} B")

    # -- statistics router -----------------------------------------------------------------------

    def fetch_stats_router(self, manifest: SwarmManifest, device="cpu", deadline: float | None = None):
        """A ``StatsRouter`` from the cluster statistics the swarm's peers publish, waiting until ``deadline``
        (monotonic; default now + ``cfg.connect_timeout``) for every cluster of ``manifest`` to have a blob
        that parses within bounds and fits the manifest (cluster, partition, image shape, classes, dataset).
        Only blobs whose sha256 the owner signed in the manifest are used; clusters it signed none for are
        refused (``SwarmClientError`` naming the remedy) unless ``cfg.allow_unsigned_stats``, which takes the
        majority of their serving peers and warns of the risk."""
        from diffswarm.router.stats.router import StatsRouter

        self._check_unsigned(manifest, self._attested_stats(manifest))
        deadline = self.deadline(None) if deadline is None else deadline
        bad: set[str] = set()  # sha256 of blobs that failed their checks (not parsed again)
        missing: list[int] = []  # clusters the last lookup found no usable statistics for

        def attempt():
            chosen = self._choose_stats(manifest, bad)
            missing[:] = [k for k, st in enumerate(chosen) if st is None]
            if missing:
                return None
            router = StatsRouter(chosen, partition_hash=manifest.partition_hash,
                                 dataset_id=manifest.dataset_id or None)
            return router.to(device)

        def give_up() -> SwarmClientError:
            return SwarmClientError(f"no usable statistics for cluster(s) {', '.join(map(str, missing))} of swarm "
                                    f"{self.swarm_name()}: the statistics router needs every cluster's (their "
                                    "peers publish cluster_stats.bin from beside their checkpoints)")

        return poll_until(deadline, attempt, give_up)

    def _attested_stats(self, manifest: SwarmManifest) -> list[set[str]]:
        """Per cluster, the statistics blobs the admission rule's validators attested (none without a rule, or when
        the lookup fails)."""
        from diffswarm.dht.attestations import attested_stats

        if manifest.admission is None:
            return [set() for _ in range(manifest.num_clusters)]
        try:
            recs, _ = self.run(self.dht.get_attestations(range(manifest.num_clusters)), timeout=60)
        except Exception as e:  # a failed lookup: only what the owner signed
            logger.info(f"attestation lookup failed: {e!r}")
            recs = []
        return attested_stats(recs, manifest)

    def _check_unsigned(self, manifest: SwarmManifest, attested: list[set[str]] | None = None) -> None:
        """Refuse (default) or warn about (``cfg.allow_unsigned_stats``) the clusters whose statistics the owner's
        manifest signs no sha256 of and no validator of its admission rule attested."""
        unsigned = [k for k, h in enumerate(manifest.signed_stats) if not h and not (attested and attested[k])]
        if not unsigned:
            return
        which = ", ".join(map(str, unsigned))
        if not self.cfg.allow_unsigned_stats:
            raise SwarmClientError(
                f"the owner of swarm {self.swarm_name()} signed no statistics for cluster(s) {which} (manifest issued "
                f"at {manifest.issued:.0f}): the statistics router uses only statistics whose sha256 the owner signed. "
                "The owner signs them with `diffswarm swarm up --router-kind stats`, or a founding `diffswarm peer "
                "--owner-key KEY --sign-stats FILE...`; or pass --allow-unsigned-stats to take, for those clusters, "
                "the statistics most of their serving peers announce (peers serving a cluster's real checkpoint can "
                "forge them and pull rows to their cluster)")
        msg = (f"warning: using UNSIGNED statistics for cluster(s) {which} of swarm {self.swarm_name()} "
               "(--allow-unsigned-stats): the blob most of their serving peers announce is taken; a few Sybil peers "
               "serving a cluster's real checkpoint can forge it and pull every row to their cluster")
        logger.warning(msg)
        self.events.append(msg)

    def _choose_stats(self, manifest: SwarmManifest, bad: set[str]) -> list:
        """Per cluster of ``manifest``, the first candidate statistics (``choose_stats``) that parse and fit it
        (a ``ClusterStats``), or None; blobs that fail are added to ``bad`` and reported as events."""
        recs, errors = self.stats_records(manifest.num_clusters)
        for e in errors:
            logger.info(f"skipped an invalid stats record: {e}")
        experts, _ = self.run(self.dht.get_experts(range(manifest.num_clusters)), timeout=60)
        serving = {(r.peer_id, r.cluster) for r in experts if r.state == "online" and r.cluster is not None}
        cands, notes = choose_stats(recs, manifest, serving, allow_unsigned=self.cfg.allow_unsigned_stats,
                                    attested=self._attested_stats(manifest))
        for n in notes:
            logger.debug(f"not using {n}")
        forged = sum(NOT_SIGNED in n for n in notes)
        if forged:
            self.events.append(f"ignored {forged} statistics record(s) that are not the ones the owner signed")
        return [self._pick_stats(k, options, manifest, bad) for k, options in enumerate(cands)]

    def _pick_stats(self, k: int, options: list[ClusterStatsRecord], manifest: SwarmManifest, bad: set[str]):
        """The first of ``options`` whose blob parses and fits cluster k of ``manifest`` (a ``ClusterStats``), else
        None."""
        from diffswarm.router.stats.blob import ClusterStats, StatsFormatError

        want = (k, manifest.partition_hash, tuple(manifest.image_shape), manifest.num_classes)
        for r in options:
            if r.stats_sha256 in bad:
                continue
            try:
                st = ClusterStats.from_bytes(r.blob)
                got = (st.cluster, st.partition_hash or "", tuple(st.image_shape), st.num_classes)
                if got != want:
                    raise StatsFormatError(f"describes {got}, the manifest wants {want}")
                if st.dataset_id and manifest.dataset_id and st.dataset_id != manifest.dataset_id:
                    raise StatsFormatError(f"dataset {st.dataset_id!r}, not {manifest.dataset_id!r}")
            except StatsFormatError as e:
                bad.add(r.stats_sha256)
                self.events.append(f"ignored cluster {k} statistics from {r.peer_id[:12]}: {e}"[:300])
                continue
            return st
        return None
