"""Plans of the swarm's clients: `generate` (over the swarm or from local checkpoints), `dashboard`, `swarm status`.

A client finds the swarm by --initial-peers and --swarm NAME@FINGERPRINT, or as the local swarm of
`swarm up` in --run-dir (its ``swarm.json``: the only file planning reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from diffswarm.cli.planning import full_swarm_name, refuse
from diffswarm.router.routing import RoutingConfig
from diffswarm.sampling.config import SamplingConfig

if TYPE_CHECKING:
    from diffswarm.client.config import ClientConfig

DEFAULT_RUN_DIR = "runs/swarm"


@dataclass(frozen=True)
class SwarmSource:
    """Where a client finds the swarm: explicit multiaddrs, or the local swarm recorded in ``run_dir``."""

    initial_peers: tuple[str, ...]
    config: ClientConfig  # swarm name, network, deadlines


@dataclass(frozen=True)
class GeneratePlan:
    routing: RoutingConfig
    sampling: SamplingConfig
    n: int
    classes: tuple[str, ...] | None
    output: str
    save_samples: str | None
    nrow: int | None
    device: str
    local: tuple[str, ...] | None = None  # expert checkpoints (no network)
    router: str | None = None  # router file (local: required for several experts; swarm: instead of fetching)
    swarm: SwarmSource | None = None
    router_kind: str = "trained"  # local: trained (--router) | stats (from the stats files beside the experts)


@dataclass(frozen=True)
class ExportPlan:
    out: str
    routing: RoutingConfig  # the pipeline's default routing
    run: str | None = None  # run directory (local checkpoints)
    swarm: SwarmSource | None = None
    router_kind: str = "auto"  # run: trained (router.safetensors) | stats (cluster_stats.bin) | auto


@dataclass(frozen=True)
class WebPlan:
    """`dashboard --web`: where the page is served, and the dashboard command each browser tab runs."""

    host: str
    port: int
    command: str


@dataclass(frozen=True)
class DashboardPlan:
    swarm: SwarmSource
    out: str
    device: str
    web: WebPlan | None = None  # serve it to browsers instead of this terminal


@dataclass(frozen=True)
class SwarmStatusPlan:
    swarm: SwarmSource
    run_dir: str | None = None  # the local swarm's run dir (its recorded processes are listed too)
    chart: bool = False  # draw the coverage by cluster too


def _client_network(args, given, local: bool):
    """The client's ``NetworkConfig`` from --loopback/--no-relay/--no-nat (a local swarm is loopback)."""
    from diffswarm.dht.node import NetworkConfig

    if local:
        refuse(given, ["loopback", "no_relay", "no_nat"],
                "on a local swarm (`swarm up` listens on 127.0.0.1 only, without relays or NAT probing)")
        return NetworkConfig.loopback(client_mode=True)
    if args.loopback:
        refuse(given, ["no_relay", "no_nat"], "with --loopback (it turns relays and NAT probing off)")
        return NetworkConfig.loopback(client_mode=True)
    return NetworkConfig(client_mode=True, use_relay=not args.no_relay, auto_nat=not args.no_nat,
                         nat_port_map=not args.no_nat)


def _swarm_source(args, given, **client_kw) -> SwarmSource:
    """--initial-peers with --swarm NAME@FINGERPRINT, else the local swarm of --run-dir found by its own
    full name (``swarm.json``)."""
    from diffswarm.client.config import ClientConfig
    from diffswarm.dht.names import HOW_TO_NAME

    if args.initial_peers:
        refuse(given, ["run_dir"], "with --initial-peers (it names the local swarm to use instead)")
        if args.swarm is None:
            raise ValueError(f"--initial-peers needs --swarm NAME@FINGERPRINT: {HOW_TO_NAME}")
        net = _client_network(args, given, local=False)
        return SwarmSource(tuple(args.initial_peers), ClientConfig(swarm=full_swarm_name(args.swarm), net=net,
                                                                   **client_kw))
    from diffswarm.swarm.local import LocalSwarm

    run_dir = args.run_dir or DEFAULT_RUN_DIR
    sw = LocalSwarm.find(run_dir)
    if args.swarm is not None and full_swarm_name(args.swarm) != sw.swarm:
        raise ValueError(f"--swarm {args.swarm!r}: the local swarm in {run_dir} is {sw.swarm!r}; drop --swarm "
                         "or pass --initial-peers to join another swarm")
    net = _client_network(args, given, local=True)
    return SwarmSource(tuple(sw.initial_peers), ClientConfig(swarm=sw.swarm, net=net, **client_kw))


def _routing(args, given) -> RoutingConfig:
    d = RoutingConfig()
    if args.routing not in ("top-k", "sample-k"):
        refuse(given, ["k"], f"with --routing {args.routing} (it sets the experts of top-k and sample-k)")
    if args.routing != "threshold":
        refuse(given, ["threshold"], f"with --routing {args.routing} (it is the cut-off of --routing threshold)")
    if args.routing == "full":
        refuse(given, ["full_above"], "with --routing full (the full ensemble is used at every t already)")
    if args.routing != "sample-k":
        refuse(given, ["sample_draw"], f"with --routing {args.routing} (it says when sample-k draws its experts)")
    return RoutingConfig(args.routing, args.k if args.k is not None else d.k,
                         args.threshold if args.threshold is not None else d.threshold, args.full_above,
                         getattr(args, "sample_draw", None) or d.draw)


def plan_generate(args, given) -> GeneratePlan:
    common = dict(routing=_routing(args, given),
                  sampling=SamplingConfig(steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                                          seed=args.seed),
                  n=args.n, classes=tuple(args.classes) if args.classes else None, output=args.output,
                  save_samples=args.save_samples, nrow=args.nrow, device=args.device)
    swarm_only = ["initial_peers", "run_dir", "swarm", "router_sha256", "timeout", "compression", "loopback",
                  "no_relay", "no_nat", "allow_unsigned_stats", "verify_attestations"]
    if args.router_kind == "stats":
        refuse(given, ["router", "router_sha256"], "with --router-kind stats (it routes with cluster statistics, "
                                                    "not a router file)")
    if args.router_kind == "trained" and args.local and len(args.local) > 1 and not args.router:
        raise ValueError("several --local experts need their --router with --router-kind trained")
    if args.local:
        refuse(given, swarm_only, "with --local (it generates from local checkpoints, without a network)")
        kind = "trained" if args.router or len(args.local) == 1 else "stats"
        if args.router_kind != "auto":
            kind = args.router_kind
        return GeneratePlan(**common, local=tuple(args.local), router=args.router, router_kind=kind)
    if args.router:
        refuse(given, ["router_sha256"], "with --router (it pins an announced router; --router uses a local file)")
        if args.router_kind != "auto":
            refuse(given, ["router_kind"], "with --router (a local router file is a trained router)")
    kw = {"call_timeout": args.timeout} if args.timeout is not None else {}
    kw["router_kind"] = args.router_kind
    if args.router_kind == "trained" or args.router:
        refuse(given, ["allow_unsigned_stats"], "with a trained router (it concerns the statistics router)")
    kw["allow_unsigned_stats"] = args.allow_unsigned_stats
    kw["verify_attestations"] = args.verify_attestations
    if args.compression is not None:
        kw["compression"] = args.compression
    src = _swarm_source(args, given, router_sha256=args.router_sha256, **kw)
    return GeneratePlan(**common, router=args.router, swarm=src)


def plan_export(args, given) -> ExportPlan:
    if args.run:
        refuse(given, ["initial_peers", "run_dir", "swarm", "router_sha256", "loopback", "no_relay", "no_nat",
                       "allow_unsigned_stats"],
               "with --run (it exports the checkpoints of a run directory, without a network)")
        return ExportPlan(args.out, _routing(args, given), run=args.run, router_kind=args.router_kind)
    if args.router_kind == "trained":
        refuse(given, ["allow_unsigned_stats"], "with a trained router (it concerns the statistics router)")
    if args.router_kind == "stats":
        refuse(given, ["router_sha256"], "with --router-kind stats (it routes with cluster statistics, not a "
                                         "router file)")
    src = _swarm_source(args, given, router_sha256=args.router_sha256, router_kind=args.router_kind,
                        allow_unsigned_stats=args.allow_unsigned_stats)
    return ExportPlan(args.out, _routing(args, given), swarm=src)


def plan_dashboard(args, given) -> DashboardPlan:
    web = None
    if args.web:
        from diffswarm.tui.web import dashboard_command

        if not 0 < args.port < 65536:
            raise ValueError(f"--port {args.port} must be a TCP port (1-65535)")
        web = WebPlan(args.host, args.port, dashboard_command(getattr(args, "argv", None) or ["dashboard"]))
    else:
        refuse(given, ["host", "port"], "without --web (the browser page's address)")
    return DashboardPlan(_swarm_source(args, given, call_timeout=args.timeout, connect_timeout=20.0,
                                       router_kind=args.router_kind, allow_unsigned_stats=args.allow_unsigned_stats,
                                       verify_attestations=args.verify_attestations),
                        args.out, args.device, web)


def plan_swarm_status(args, given) -> SwarmStatusPlan:
    local = None if args.initial_peers else (args.run_dir or DEFAULT_RUN_DIR)
    return SwarmStatusPlan(_swarm_source(args, given), local, args.chart)
