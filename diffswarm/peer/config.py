"""The configuration of one ``diffswarm peer`` process: ``PeerConfig``, one commented field per knob."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffswarm.dht.node import NetworkConfig
from diffswarm.peer.limits import PeerLimits
from diffswarm.peer.placement import RebalanceConfig
from diffswarm.training.jobs import TrainJob


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
    partition_file: str | None = None  # partition manifest to serve over rpc_partition (the owner signs its sha256);
    #                                    None: the training job's partition, if any
    rebalance: RebalanceConfig | None = None  # watch the swarm's coverage while serving (None: never)
    sign_stats: tuple[str, ...] = ()  # owner: cluster_stats.bin files (or checkpoints beside them) whose sha256 it
    #                                   signs in the manifest, with its own expert's (clients route only by those)
    device: str = "auto"
    threads: int = 0  # torch CPU threads (0: torch default)
    max_batch: int = 256  # request rows per forward pass
    batch_wait_ms: float = 2.0  # wait for more requests when several clients are active
    inline_ms: float = 20.0  # forward passes expected to be shorter run on the event loop (no thread hop)
    announce_period: float = 10.0  # seconds between heartbeats
    expire_factor: float = 3.0  # records expire after this many periods without a heartbeat
    info_file: str | None = None  # write {peer_id, maddrs, pid, ...} here once online (swarm up, tests)
    # before going online, ask up to 5 DHT peers to dial this peer back at the addresses it announces
    # (peer.reachability); off: announce them unchecked
    check_reachability: bool = True
    contribution_log_period: float = 600.0  # seconds between the log lines of what this peer served (0: never)
    validate: str | None = None  # partition manifest: score the swarm's checkpoints on its test split and announce
    #                              signed attestations (peer/validator.py); the owner also signs the admission rule
    validators: tuple[str, ...] = ()  # owner: fingerprints of more validator keys its admission rule names
    validator_key: str | None = None  # key file a validator signs with (None: the owner key, else the identity key)
    limits: PeerLimits = field(default_factory=PeerLimits)  # what callers can make the peer hold (peer/limits.py)
    metrics_port: int | None = None  # serve Prometheus metrics on this port (0: any free port); None: no metrics
    metrics_host: str = "127.0.0.1"  # where the metrics listen (they show load and clients: local by default)
