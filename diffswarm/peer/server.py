"""A volunteer peer: joins the DHT, optionally trains its expert, serves it, announces it.

Lifecycle (``Peer``), all in one asyncio loop (uvloop where available):

1. ``start``: resolves the swarm's full name ``NAME@FINGERPRINT`` (``dht.names``; a founding peer
   with ``--router`` and an owner key makes it), P2P daemon + DHT node (``SwarmDHT``); prints the
   name and the multiaddrs others should use.
2. ``train`` (only without a checkpoint): trains the expert on its cluster in a worker thread
   while the heartbeat announces ``joining`` with the training progress.
3. ``serve``: loads the expert, measures its throughput, registers the RPC handlers, asks up to 5 DHT peers
   to dial it back at its addresses (``reachability``: it announces only addresses others reached, relay
   addresses marked ``relayed``, or, when nobody could dial it and it has no relay, says what to do and stops
   instead of going online; the first peer of a swarm has nobody to ask and says so), announces ``online``;
   re-announces every ``announce_period`` with expiration ``expire_factor`` times that, carrying the current load and
   throughput. Every heartbeat also re-announces (if it keeps a copy, ``manifest_copies``) the owner's
   newest valid manifest (signed by this peer if it holds the owner key) and, for a peer serving
   router bytes, its ``RouterProvider`` entry. Records carry what the peer served (``contribution``), whose
   totals its log prints every ``contribution_log_period``.
4. ``shutdown`` (SIGTERM / SIGINT / SIGHUP / ``stop()``): announces ``offline`` first, then removes the
   handlers and stops the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import torch

from diffswarm import __version__
from diffswarm.admission.rule import ADMISSION_FIELD
from diffswarm.dht.names import SwarmName
from diffswarm.dht.node import SwarmDHT, open_identity
from diffswarm.dht.records import (
    PARTITION_BYTES_FIELD,
    PARTITION_SHA_FIELD,
    STATS_HASHES_FIELD,
    ExpertRecord,
    RouterProvider,
    SwarmManifest,
)
from diffswarm.dht.schema import MAX_ADDRS, MAX_RECORD_AGE
from diffswarm.peer.announce import (
    ExpertStatus,
    admission_rule,
    announce_records,
    follow_manifest,
    heartbeat,
    make_expert_record,
    manifest_fields_for,
    provider_record_for,
    resolve_swarm,
    served_record,
    sign_own_manifest,
    stats_records,
    swarm_greeting,
    warn_misfits,
)
from diffswarm.peer.config import PeerConfig
from diffswarm.peer.contribution import Contribution
from diffswarm.peer.hosted import PartitionBlob, RouterBlob, ServedExpert, load_served
from diffswarm.peer.joining import TrainingProgress, train_while_joining
from diffswarm.peer.manifest_copies import ManifestCopies
from diffswarm.peer.placement import Move
from diffswarm.peer.reachability import DialBack, is_loopback, settle_addresses
from diffswarm.peer.servicer import ExpertServicer
from diffswarm.peer.services import PeerServices, check_validate_partition, served_partition
from diffswarm.protocol.wire import NAMESPACE, PROTOCOL_VERSION
from diffswarm.utils.fileio import atomic_write

logger = logging.getLogger(__name__)


class Peer:
    """One volunteer peer; see the module docstring for the lifecycle."""

    def __init__(self, cfg: PeerConfig):
        self.cfg = cfg
        self.log = logger.info  # what the peer says to its operator (stdout under the CLI: utils.log.console)
        self.dht: SwarmDHT | None = None
        self.served: dict[str, ServedExpert] = {}
        self.router: RouterBlob | None = None
        self.partition: PartitionBlob | None = None  # the partition manifest file served over rpc_partition
        self.move: Move | None = None  # set when a confirmed rebalancing move stopped this peer (--rebalance)
        self.servicer: ExpertServicer | None = None
        self.stop_event = asyncio.Event()
        self.state = "joining"
        self.progress = 0.0
        self.train_step: int | None = None  # current training step while training
        self.train_loss: float | None = None  # latest step's loss while training
        self.train_eta: float | None = None  # seconds of training left (estimated) while training
        self.training_cfg = None  # ExpertConfig while training
        self.maddrs: list[str] = []
        self.swarm: SwarmName | None = None  # the swarm's full name (None: a plain DHT node)
        self.owner_key = None  # RSAPrivateKey signing the manifest, when this peer holds the owner key
        self.own_manifest: SwarmManifest | None = None  # the manifest this peer signed (owner only)
        self.manifest: SwarmManifest | None = None  # the owner's newest valid manifest known (re-announced)
        self._warned: set[tuple[str, float]] = set()  # (expert id, manifest issued) already warned about
        self.copies = ManifestCopies()  # whether this peer keeps a copy of the manifest, and when it reads the key
        self._stats_notes: set[str] = set()  # statistics files the owner said it does not sign
        self._heartbeat: asyncio.Task | None = None
        self.contribution = Contribution()
        self.dial_back: DialBack | None = None
        self.reachable_addrs: list[str] | None = None  # what the dial-back check confirmed (None: not checked)
        self.relayed: bool | None = None  # announced through relay circuits only (None: not checked)
        self.exit_code = 0
        self.services = PeerServices(self)  # metrics, validator, balance checks, admission and contribution logs

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
        check_validate_partition(self.cfg)  # so does a partition a validator cannot read
        self.partition = served_partition(self.cfg, self.log)
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
        self.services.start_metrics()
        self.log(swarm_greeting(self.swarm, key_what if self.owner_key is not None else None, self.peer_id,
                                self.maddrs, bool(self.cfg.net.initial_peers)))
        self.write_info()
        if self.router is not None:
            role = "" if self.owner_key is not None else " (its bytes only: the owner's manifest decides the router)"
            self.log(f"serving router {self.router.sha256[:12]} (K={self.router.cfg.num_clusters}){role}")

    @property
    def metrics_url(self) -> str | None:
        return self.services.metrics_url

    # -- records -------------------------------------------------------------------------------

    @property
    def announced_addrs(self) -> list[str]:
        """The multiaddrs put in records (readers refuse more than ``MAX_ADDRS``): those the dial-back check
        confirmed, if it ran."""
        return (self.maddrs if self.reachable_addrs is None else self.reachable_addrs)[:MAX_ADDRS]

    def record_extra(self, expert_id: str | None) -> dict:
        """The optional version-5 record fields: ``relayed`` and, for a served expert, what it served."""
        extra = {} if self.relayed is None else {"relayed": self.relayed}
        if expert_id is not None and self.state == "online":
            extra.update(self.contribution.record_fields(expert_id, time.monotonic()))
        return extra

    def records(self) -> list[ExpertRecord]:
        """The records of the served experts; with none served yet, of the expert in training."""
        out = [served_record(s, self.state, self.peer_id, self.announced_addrs, self.record_extra(uid))
               for uid, s in self.served.items()]
        if self.training_cfg is not None and not self.served:
            status = ExpertStatus(self.state, progress=self.progress, max_batch=self.cfg.max_batch,
                                  train_steps=self.train_step, final_loss=self.train_loss, eta_s=self.train_eta)
            out.append(make_expert_record(self.training_cfg, status, self.peer_id, self.announced_addrs,
                                          self.record_extra(None)))
        return out

    def manifest_fields(self) -> dict:
        """What the owner signs about this peer's router or expert and the clusters' statistics
        (``announce.manifest_fields_for``); says once why a statistics file is not signed."""
        fields, notes = manifest_fields_for(self.swarm, self.router, self.served, self.training_cfg,
                                            self.cfg.sign_stats)
        if self.cfg.validate and self.owner_key is not None:  # the owner validates: it signs the admission rule
            fields[ADMISSION_FIELD] = admission_rule(self.owner_key, self.cfg.validators, fields["partition_hash"])
        part = self.partition
        if part is not None and part.partition_hash == fields["partition_hash"]:
            fields[PARTITION_SHA_FIELD], fields[PARTITION_BYTES_FIELD] = part.sha256, len(part.data)
        for n in notes:
            if n not in self._stats_notes:
                self._stats_notes.add(n)
                self.log(f"warning: {n}")
        return fields

    def provider_record(self) -> RouterProvider | None:
        return provider_record_for(self.router, self.peer_id, self.announced_addrs)

    def info(self) -> dict:
        prov = self.provider_record()
        return {"protocol": PROTOCOL_VERSION, "software": __version__, "peer_id": self.peer_id,
                "swarm": str(self.swarm) if self.swarm else None, "experts": [r.to_dict() for r in self.records()],
                "router": prov.to_dict() if prov else None,
                "manifest": self.manifest.to_dict() if self.manifest else None}

    # -- announcing ----------------------------------------------------------------------------

    async def current_manifest(self) -> SwarmManifest | None:
        """The owner's newest valid manifest among this peer's own (signed on first use, when it holds the
        owner key, and again whenever the statistics it can sign change: a cluster's file written after its
        training), the one it followed so far and those announced in the DHT; warns once per manifest
        about served experts that do not fit it (clients will skip them)."""
        founds = self.router is not None or any(s.expert.config.cluster is not None for s in self.served.values())
        if self.owner_key is not None and founds:
            fields = self.manifest_fields()
            if self.own_manifest is None or self.own_manifest.partition_hash != fields["partition_hash"] or \
                    self.own_manifest.signed_stats != fields.get(
                    STATS_HASHES_FIELD, [""] * fields["num_clusters"]):
                self.own_manifest = sign_own_manifest(self.owner_key, fields, self.swarm, self.router)
        self.manifest = await follow_manifest(self.dht, self.swarm, self.manifest, self.own_manifest,
                                              look=self.manifest is None or self.copies.read_due())
        warn_misfits(self.served.values(), self.manifest, self._warned)
        return self.manifest

    async def announce(self) -> None:
        """One heartbeat: the expert records and, in a swarm, the statistics, the router entry and the manifest."""
        # heartbeats expire after expire_factor periods, and never later than readers call a record stale
        expiration = min(self.cfg.announce_period * self.cfg.expire_factor, MAX_RECORD_AGE)
        experts, stats, manifest, provider = self.records(), [], None, None
        if self.swarm is not None and self.state == "online":
            stats = stats_records(self.served.values(), self.peer_id)
        if self.swarm is not None and self.state != "offline":
            manifest = await self.current_manifest()
            provider = self.provider_record()
        copy = await self.copies.copy_of(self.dht, manifest, experts, self.owner_key is not None)
        await announce_records(self.dht, expiration, experts, stats, copy, provider)
        await self.services.after_heartbeat(manifest)

    def start_heartbeat(self) -> None:
        if self._heartbeat is None:
            beat = heartbeat(self.announce, self.stop_event, self.cfg.announce_period)
            self._heartbeat = asyncio.get_running_loop().create_task(beat)

    async def train(self) -> str | None:
        """Train the expert (announcing ``joining``); returns the checkpoint path, None if stopped."""

        shown = TrainingProgress(time.monotonic())

        def joining(ecfg) -> None:
            self.training_cfg, self.state = ecfg, "joining"
            self.start_heartbeat()

        def on_step(step: int, loss: float, progress: float) -> None:
            self.progress, self.train_step, self.train_loss = progress, step, loss
            self.train_eta = shown.eta(progress, time.monotonic())
            line = shown.line(self.training_cfg.expert_id, step, loss, progress, time.monotonic())
            if line:
                self.log(line)

        return await train_while_joining(self.cfg.train, self.stop_event, joining, on_step)

    # -- serving -------------------------------------------------------------------------------

    def load_expert(self, path: str) -> ServedExpert:
        served = load_served(path, self.cfg, self.log)
        self.served[served.expert.expert_id] = served
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
        self.dial_back = DialBack(allow_loopback=bool(self.maddrs) and all(is_loopback(a) for a in self.maddrs))
        self.servicer = ExpertServicer(self.served, self.router, self.info, self.cfg.limits, self.contribution,
                                       self.dial_back, self.partition)
        self.services.observe(self.servicer)
        await self.servicer.add_p2p_handlers(self.dht.p2p, namespace=NAMESPACE)
        if self.cfg.check_reachability and not await self.check_reachable():
            self.exit_code = 1
            self.stop_event.set()
            return
        self.state = "online"
        self.contribution.start(time.monotonic())
        self.services.online()
        self.training_cfg = None
        self.progress = 1.0
        self.train_step = self.train_loss = self.train_eta = None  # the checkpoint's summary is announced instead
        # the ~350k objects of torch/diffusers/hivemind live as long as the peer: keep them out of the
        # cyclic GC, whose full passes over them (~0.2 s) would stall a request now and then
        gc.collect()
        gc.freeze()
        await self.announce()
        self.start_heartbeat()
        self.write_info()
        self.log(f"online as {self.peer_id} at {' '.join(self.announced_addrs)}")
        self.services.start_balance_checks()

    async def check_reachable(self) -> bool:
        """Ask DHT peers to dial this peer back (``reachability.settle_addresses``); False when nobody can and it
        has no relay address to announce instead (it has said what to do)."""
        s = await settle_addresses(self.dht, self.cfg.net.use_auto_relay, self.stop_event, self.log)
        self.maddrs = s.maddrs
        if s.online and s.announce is not None:
            self.reachable_addrs, self.relayed = s.announce, s.relayed
        return s.online

    def write_info(self) -> None:
        if self.cfg.info_file:
            write_info_file(self.cfg.info_file, self)

    async def shutdown(self) -> None:
        """Announce offline, stop serving, stop the daemon."""
        self.stop_event.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        await self.services.stop_tasks()
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
        if self.dial_back is not None:
            try:
                await self.dial_back.close()
            except Exception as e:  # its daemon may be gone already; shutting down regardless
                logger.debug(f"closing the dial-back probe: {e!r}")
        await self.dht.shutdown()
        self.dht = None
        self.services.close()

    async def run(self) -> int:
        """start -> (train) -> serve -> wait for stop -> shutdown. Returns an exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: its terminal was closed
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread (tests)
                loop.add_signal_handler(sig, self.stop)
        try:
            await self.start()
            self.services.start_validator()
            if self.cfg.checkpoint is None and self.cfg.train is not None:
                path = await self.train()
                if path is None:
                    return 1
                self.cfg = replace(self.cfg, checkpoint=path)
            if self.stop_event.is_set():
                return 0
            await self.serve()
            await self.stop_event.wait()
            if self.exit_code:
                return self.exit_code
            self.log("stopping: announcing offline")
            return 0
        finally:
            await self.shutdown()


def write_info_file(path: str, peer: Peer) -> None:
    """{peer_id, maddrs, pid, state, ...} for ``swarm up`` and tests, written whole or not at all (readers poll
    it); durable=False: a lost info file is written again next start."""
    info = {"peer_id": peer.peer_id, "maddrs": peer.maddrs, "pid": os.getpid(), "state": peer.state,
            "swarm": str(peer.swarm) if peer.swarm else None,
            "experts": list(peer.served), "router": peer.router.sha256 if peer.router else None,
            "sockets": peer.dht.socket_paths(), "metrics": peer.metrics_url}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(info)), durable=False)


def run(peer: Peer) -> int:
    """Run ``peer`` until SIGINT/SIGTERM/SIGHUP (or a rebalancing move), in a fresh event loop (uvloop where
    available)."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    return runner(peer.run())


def run_peer(cfg: PeerConfig) -> int:
    """Run a peer of ``cfg`` until SIGINT/SIGTERM/SIGHUP."""
    return run(Peer(cfg))
