"""The plan of `peer`: what a volunteer serves (a checkpoint, a training job first, a router), where, and how."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from diffswarm.cli.planning import full_swarm_name, refuse
from diffswarm.cli.train_plans import TRAIN_DESTS, train_job
from diffswarm.training.jobs import TrainJob

if TYPE_CHECKING:
    from diffswarm.peer.config import PeerConfig


@dataclass(frozen=True)
class PeerPlan:
    config: PeerConfig


def _server_network(args, given):
    """A peer's ``NetworkConfig`` from the server network options."""
    from diffswarm.dht.node import NetworkConfig

    if not args.identity:
        refuse(given, ["no_identity_check"], "without --identity (an ephemeral identity is never online elsewhere)")
    if args.loopback:
        refuse(given, ["host", "announce_maddrs", "use_auto_relay", "no_relay", "no_nat"],
                "with --loopback (it listens on 127.0.0.1 only, without relays or NAT probing)")
    if args.no_relay:
        refuse(given, ["use_auto_relay"], "with --no-relay (auto relay needs relays)")
    peers = list(args.initial_peers or [])
    net = NetworkConfig.loopback(peers) if args.loopback else NetworkConfig(
        initial_peers=peers, use_relay=not args.no_relay, auto_nat=not args.no_nat, nat_port_map=not args.no_nat)
    host = args.host or ("127.0.0.1" if args.loopback else "0.0.0.0")
    net.host_maddrs = [f"/{'ip6' if ':' in host else 'ip4'}/{host}/tcp/{args.port}"]
    net.announce_maddrs = list(args.announce_maddrs or [])
    net.identity_path = args.identity
    net.check_identity = net.check_identity and not args.no_identity_check
    net.use_auto_relay = args.use_auto_relay
    return net


MAX_ANNOUNCE_PERIOD = 300.0  # seconds; heartbeats expire after min(3 periods, 600 s), records are stale after 600 s


def _peer_swarm(args, given, serves: bool) -> str | None:
    """A peer's --swarm: a full name to join; a bare NAME only when founding (with --router, or with --owner-key
    and an expert: a swarm without a trained router, routed by its peers' statistics), owned by the owner key;
    none: found "diffswarm" when founding, a plain DHT node without anything to serve."""
    from diffswarm.dht.names import HOW_TO_NAME, SwarmNameError, check_bare_name, is_full_name

    founds = bool(args.router) or (bool(args.owner_key) and serves)
    if not founds:
        refuse(given, ["owner_key"], "without --router or an expert to serve (the owner key signs the manifest of "
                                      "the swarm, naming its router or, without one, its partition)")
    if args.swarm is None:
        if serves and not founds:
            what = next((given[d] for d in ("checkpoint", "train_job", "cluster", "partition") if d in given),
                        "serving an expert")
            raise ValueError(f"a peer serving an expert ({what}) needs --swarm NAME@FINGERPRINT: {HOW_TO_NAME}")
        return None
    if is_full_name(args.swarm):
        return full_swarm_name(args.swarm)
    if not founds:
        return full_swarm_name(args.swarm)  # raises: a bare NAME only founds a swarm
    try:
        return check_bare_name(args.swarm)
    except SwarmNameError as e:
        raise ValueError(f"--swarm: {e}") from None


def _fingerprint(v: str) -> str:
    import re

    if not re.fullmatch(r"[0-9a-fA-F]{32}", v):
        raise ValueError(f"--validators: {v!r} is not a key fingerprint (32 hex digits)")
    return v.lower()


def plan_validate(args, given) -> PeerPlan:
    """`validate`: a peer that serves nothing and runs the validator (``peer.validator``)."""
    from diffswarm.peer.config import PeerConfig

    if not 0 < args.announce_period <= MAX_ANNOUNCE_PERIOD:
        raise ValueError(f"--announce-period must be in (0, {MAX_ANNOUNCE_PERIOD:g}] seconds")
    return PeerPlan(PeerConfig(net=_server_network(args, given), swarm=full_swarm_name(args.swarm),
                               validate=args.partition, validator_key=args.validator_key,
                               announce_period=args.announce_period, info_file=args.info_file))


def plan_peer(args, given) -> PeerPlan:
    from diffswarm.peer.config import PeerConfig

    train = None
    training = [d for d in TRAIN_DESTS if d in given]
    if args.checkpoint:
        refuse(given, [*TRAIN_DESTS, "train_job"], "with --checkpoint (the peer serves it instead of training)")
    elif args.train_job:
        refuse(given, TRAIN_DESTS, "with --train-job (the job file says what to train)")
        train = TrainJob.load(args.train_job)
        train = replace(train, train=replace(train.train, resume=True, device=args.device or train.train.device,
                                             threads=args.threads if args.threads is not None else train.train.threads))
    elif args.cluster is not None or training:
        if args.partition is None or args.cluster is None:
            raise ValueError(f"training an expert first needs --partition and --cluster (given: "
                             f"{', '.join(given[d] for d in training)})")
        train = train_job(args, given, out=args.out, resume=True, device=args.device or "auto",
                           threads=args.threads or 0)
    if not args.checkpoint and train is None:
        refuse(given, ["device", "threads", "max_batch", "batch_wait_ms", "rate_rows", "burst_rows"],
                "without an expert to serve (--checkpoint, --cluster or --train-job)")
    swarm = _peer_swarm(args, given, serves=bool(args.checkpoint or train))
    if not (args.router or args.owner_key):
        refuse(given, ["sign_stats"], "without --owner-key or --router (only the swarm's owner signs statistics)")
    if not 0 < args.announce_period <= MAX_ANNOUNCE_PERIOD:
        raise ValueError(f"--announce-period {args.announce_period:g} must be in (0, {MAX_ANNOUNCE_PERIOD:g}] seconds "
                         "(readers call records older than 600 s stale)")
    if args.metrics_port is None:
        refuse(given, ["metrics_host"], "without --metrics-port")
    elif not 0 <= args.metrics_port < 65536:
        raise ValueError(f"--metrics-port {args.metrics_port} must be a TCP port (0: any free port)")
    d = PeerConfig()
    try:
        limits = replace(d.limits, **{k: getattr(args, k) for k in ("rate_rows", "burst_rows")
                                      if getattr(args, k) is not None})
    except ValueError as e:
        raise ValueError(f"--rate-rows / --burst-rows: {e}") from None
    if not args.validate:
        refuse(given, ["validators", "validator_key"], "without --validate")
    if args.validators and not (args.router or args.owner_key):
        refuse(given, ["validators"], "without --owner-key or --router (only the swarm's owner names validators)")
    validators = tuple(_fingerprint(v) for v in args.validators or ())
    cfg = PeerConfig(net=_server_network(args, given), swarm=swarm, owner_key=args.owner_key,
                     validate=args.validate, validators=validators, validator_key=args.validator_key,
                     checkpoint=args.checkpoint, train=train, router=args.router, device=args.device or d.device,
                     partition_file=args.serve_partition,
                     sign_stats=tuple(args.sign_stats or ()),
                     threads=args.threads if args.threads is not None else d.threads,
                     max_batch=args.max_batch or d.max_batch,
                     batch_wait_ms=args.batch_wait_ms if args.batch_wait_ms is not None else d.batch_wait_ms,
                     announce_period=args.announce_period, info_file=args.info_file, limits=limits,
                     check_reachability=not args.no_reachability_check,
                     metrics_port=args.metrics_port, metrics_host=args.metrics_host)
    return PeerPlan(cfg)
