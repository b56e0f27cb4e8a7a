"""What the swarm client is told (``ClientConfig``) and how it fails (its exception types)."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffswarm.client.answer_checks import TrustConfig
from diffswarm.dht.node import NetworkConfig

ROUTER_SOURCES = ("auto", "trained", "stats")  # where the client's router comes from (ClientConfig.router_kind)


@dataclass
class ClientConfig:
    """How the client finds, trusts and calls peers (one commented field per knob)."""

    swarm: str = ""  # the swarm's full name NAME@FINGERPRINT (its DHT key prefix; needed to discover it)
    net: NetworkConfig = field(default_factory=lambda: NetworkConfig(client_mode=True))
    refresh: float = 5.0  # seconds between background DHT lookups of expert records while the client samples
    idle_refresh: float = 60.0  # the same while it has not sampled for 30 s (client.refresh.IDLE_AFTER)
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
    allow_unsigned_stats: bool = False  # stats router: for clusters whose statistics the owner signed no sha256 of,
    #   take the blob most serving peers announce (a crowd of Sybils serving the cluster's checkpoint can forge it)
    verify_attestations: str | None = None  # partition manifest: recompute validators' attested scores on its test
    #   split; a validator caught signing a wrong score is reported and ignored (client/attestation_check.py)
    cache_dir: str | None = None  # fetched routers and experts (default $DIFFSWARM_CACHE or ~/.cache/diffswarm)
    trust: TrustConfig = field(default_factory=TrustConfig)  # how peers' answers are checked (client/answer_checks.py)
    trusted_checkpoints: tuple[str, ...] = ()  # expert files the client holds: arbiters and local fallback
    reroute: bool = True  # a chosen cluster with no source left: its rows go to the next-ranked experts (True) or
    #                       the step fails with NoExpertsError naming it (False: never an image the router
    #                       did not ask for)


class SwarmClientError(RuntimeError):
    """The client cannot use the swarm (no router announced, router fails its hash check, ...)."""


class PeerCallError(RuntimeError):
    """A velocity call failed (timeout, unreachable peer, refused request, malformed answer)."""
