"""The optional services around a peer's lifecycle (``server.Peer``), each switched on by its option:

- ``--metrics-port``: the Prometheus endpoint (``peer.metrics``; prometheus_client imported only then);
- ``--validate``: the validator that scores the swarm's checkpoints and announces attestations (``peer.validator``);
- ``--rebalance`` (``join``): the periodic balance checks of a serving peer (``peer.rebalance``);
- in a swarm with an admission rule: saying when this peer's experts were admitted, with what score, or why not;
- every ``contribution_log_period``: the log line of what this peer served (``peer.contribution``).

``PeerServices`` starts and stops them; the peer calls it at the points of its lifecycle named below."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from diffswarm.dht.attestations import AttestationMemory
from diffswarm.dht.records import SwarmManifest
from diffswarm.peer.announce import admission_verdicts
from diffswarm.peer.hosted import PartitionBlob
from diffswarm.peer.placement import Move
from diffswarm.peer.rebalance import watch_balance

if TYPE_CHECKING:
    from diffswarm.peer.config import PeerConfig


def check_validate_partition(cfg: PeerConfig) -> None:
    """A partition a validator cannot read fails before the daemon starts."""
    if not cfg.validate:
        return
    from diffswarm.data.partition import Partition

    try:
        Partition.load(cfg.validate)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot validate with partition manifest {cfg.validate}: {e}") from None


def served_partition(cfg: PeerConfig, log) -> PartitionBlob | None:
    """The partition manifest a peer serves over ``rpc_partition``: ``cfg.partition_file`` (a bad one is an error),
    else its training job's (a bad one is only not served: training says what is wrong with it)."""
    if cfg.partition_file:
        return PartitionBlob(cfg.partition_file)
    if cfg.train is None:
        return None
    try:
        return PartitionBlob(cfg.train.partition)
    except (OSError, ValueError) as e:
        log(f"warning: not serving partition {cfg.train.partition}: {e}")
        return None


class PeerServices:
    """The optional services of one ``Peer`` (see the module docstring)."""

    def __init__(self, peer):  # a server.Peer (which imports this module)
        self.peer = peer
        self.metrics = None  # PeerMetrics with cfg.metrics_port (peer/metrics.py)
        self.metrics_url: str | None = None
        self.validator = None  # peer.validator.Validator when cfg.validate
        self.admission: dict[str, str] = {}  # expert id -> its verdict under the owner's admission rule (last said)
        self.seen_attestations = AttestationMemory()  # attestations read so far (a lookup may miss some)
        self._tasks: list[asyncio.Task] = []
        self._contribution_logged = time.monotonic()

    def start_metrics(self) -> None:
        """Once the daemon is up (so that it covers training while joining)."""
        cfg = self.peer.cfg
        if cfg.metrics_port is None:
            return
        from diffswarm.peer.metrics import PeerMetrics  # prometheus_client only on this path

        self.metrics = PeerMetrics(self.peer, cfg.metrics_host, cfg.metrics_port)
        try:
            self.metrics_url = self.metrics.start()
        except OSError as e:  # the port is taken, the host is not this machine's
            self.metrics = None
            raise ValueError(f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port}: {e}") from e
        self.peer.log(f"metrics at {self.metrics_url}")

    def observe(self, servicer) -> None:
        """Hook the metrics into the servicer's answers (one call per answer)."""
        if self.metrics is not None:
            servicer.observer = self.metrics.answered

    def start_validator(self) -> None:
        """With ``cfg.validate``: score the swarm's checkpoints and announce attestations (``peer.validator``), signed
        by ``cfg.validator_key``, else the owner key, else this peer's identity key."""
        peer = self.peer
        if not peer.cfg.validate or peer.swarm is None or self.validator is not None:
            return
        from diffswarm.dht.node import load_or_create_key
        from diffswarm.peer.validator import Validator

        key = (load_or_create_key(peer.cfg.validator_key)[0] if peer.cfg.validator_key
               else peer.owner_key or peer.dht.private_key)
        self.validator = Validator(peer.dht, peer.swarm, key, peer.cfg.validate, period=peer.cfg.announce_period,
                                   own_manifest=lambda: peer.own_manifest, log=peer.log)
        self._tasks.append(asyncio.get_running_loop().create_task(self.validator.run(peer.stop_event)))

    def start_balance_checks(self) -> None:
        """With ``cfg.rebalance``: check the swarm's balance periodically (``peer.rebalance``); a confirmed move with
        ``--rebalance`` stops the peer with ``peer.move`` set (its runner restarts it on the other cluster)."""
        peer = self.peer
        mine = next((s.expert.config.cluster for s in peer.served.values()), None)
        if peer.cfg.rebalance is None or mine is None or peer.swarm is None:
            return

        def on_move(move: Move) -> None:
            peer.move = move
            peer.stop()

        task = watch_balance(lambda: peer.dht, lambda: peer.manifest, peer.cfg.rebalance, mine, peer.stop_event,
                             on_move, peer.log)
        self._tasks.append(asyncio.get_running_loop().create_task(task))

    def online(self) -> None:
        """The peer went online: its contribution counts from now."""
        self._contribution_logged = time.monotonic()

    async def after_heartbeat(self, manifest: SwarmManifest | None) -> None:
        """After each heartbeat of an online peer: the contribution log line when due, and what the admission rule
        says of its experts whenever that changed (when it was admitted and with what score, or why not)."""
        peer = self.peer
        if peer.state != "online":
            return
        period = peer.cfg.contribution_log_period
        if period > 0 and time.monotonic() - self._contribution_logged >= period:
            self._contribution_logged = time.monotonic()
            peer.log(peer.contribution.summary(time.monotonic()))
        if manifest is not None and manifest.admission is not None:
            found = await admission_verdicts(peer.dht, manifest, peer.served.values(), self.seen_attestations)
            for eid, verdict in found.items():
                if self.admission.get(eid) != verdict:
                    self.admission[eid] = verdict
                    peer.log(f"{eid}: {verdict}")

    async def stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def close(self) -> None:
        """After the daemon stopped."""
        if self.metrics is not None:
            self.metrics.stop()
