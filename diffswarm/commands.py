"""The CLI subcommands, each in two halves: ``plan`` (options -> config objects) and ``run`` (the I/O shell).

``plan(args, given)`` builds the dataclasses the library runs on (``TrainJob``, ``PeerConfig``,
``ClientConfig``, ``SamplingConfig``, ``RoutingConfig``, ...) and refuses, with a ``ValueError`` that
names the option, every option that would have no effect in the combination given: ``given`` maps
the options the user typed to their spelling. Planning reads nothing but a local swarm's
``swarm.json`` (to find the swarm by its own name), so it is tested offline option by option
(``tests/test_cli_options.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from diffswarm.data import DatasetSpec
from diffswarm.experts.train import TrainConfig
from diffswarm.router.routing import RoutingConfig
from diffswarm.router.sampler import SamplingConfig
from diffswarm.router.train import RouterTrainConfig
from diffswarm.training.jobs import RouterJob, TrainJob

DEFAULT_RUN_DIR = "runs/swarm"


def _refuse(given: dict[str, str], dests, why: str) -> None:
    """ValueError if any of ``dests`` was typed: '--x has no effect <why>'."""
    bad = [given[d] for d in dests if d in given]
    if bad:
        verb = "has" if len(bad) == 1 else "have"
        raise ValueError(f"{', '.join(bad)} {verb} no effect {why}")


def _dataset(args) -> DatasetSpec:
    spec = DatasetSpec(args.dataset, args.data_root, args.size, args.channels)
    spec.resolved()  # refuse options the dataset would not honour, now
    return spec


DATASET_DESTS = ("dataset", "data_root", "size", "channels")


# ---------------------------------------------------------------------------------------------
# plans


@dataclass(frozen=True)
class PartitionPlan:
    data: DatasetSpec
    k: int
    seed: int
    out: str


@dataclass(frozen=True)
class RouterPlan:
    job: RouterJob
    device: str


@dataclass(frozen=True)
class SwarmSource:
    """Where a client finds the swarm: explicit multiaddrs, or the local swarm recorded in ``run_dir``."""

    initial_peers: tuple[str, ...]
    config: object  # ClientConfig (swarm name, network, deadlines)
    local_run_dir: str | None = None  # the `swarm up` folder it came from


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
class DashboardPlan:
    swarm: SwarmSource
    out: str
    device: str


@dataclass(frozen=True)
class PeerPlan:
    config: object  # PeerConfig


@dataclass(frozen=True)
class SwarmUpPlan:
    run_dir: str
    swarm: str  # NAME, or NAME@FINGERPRINT that must match the owner key
    owner_key: str | None  # None: RUN_DIR/owner.key
    replicas: int
    threads: int
    port: int
    timeout: float
    checkpoints: tuple[str, ...] | None = None  # serve these (no training)
    router: str | None = None
    experts: int = 4  # K (training mode)
    partition: str | None = None  # existing manifest; None: partition `data` in the run dir
    data: DatasetSpec = field(default_factory=DatasetSpec)
    objectives: str = "mixed"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300))
    router_train: RouterTrainConfig = field(default_factory=lambda: RouterTrainConfig(steps=300))
    net: str = "unet"
    width: int | None = None
    depth: int | None = None
    seed: int = 0
    router_kind: str = "trained"  # stats: no router peer (clients use the statistics the peers publish)


@dataclass(frozen=True)
class SwarmDownPlan:
    run_dir: str
    timeout: float


@dataclass(frozen=True)
class SwarmStatusPlan:
    swarm: SwarmSource


@dataclass(frozen=True)
class QualityPlan:
    samples: str
    partition: str | None
    data: DatasetSpec | None  # None: the partition's own dataset


@dataclass(frozen=True)
class DemoPlan:
    config: object  # demo.DemoConfig


@dataclass(frozen=True)
class EvalPlan:
    config: object  # eval.study.StudyConfig
    command: str  # the command line, recorded in the report


def plan(args, given: dict[str, str]):
    """The plan of the parsed command ``args``; ``given``: {dest: option string} of the typed options."""
    name = args.command + (f"_{args.swarm_command}" if args.command == "swarm" else "")
    return globals()["plan_" + name.replace("-", "_")](args, given)


def run(p) -> int:
    """Execute a plan (the I/O half)."""
    return _RUNNERS[type(p)](p)


def plan_partition(args, given) -> PartitionPlan:
    return PartitionPlan(_dataset(args), args.k, args.seed, args.out)


def _train_job(args, given, *, out: str | None, resume: bool, device: str, threads: int) -> TrainJob:
    """``TrainJob`` from the shared training options of `train` and `peer`."""
    if args.objective != "ddpm":
        _refuse(given, ["schedule"], "on an FM expert (the schedule is DDPM's)")
    if args.objective != "fm":
        _refuse(given, ["init_from"], "on a DDPM expert (it initialises an FM expert from a DDPM one)")
    length = {"minutes": args.minutes, "steps": None} if args.minutes is not None else {"steps": args.steps or 2000}
    train = TrainConfig(**length, batch=args.batch, lr=args.lr, seed=args.seed, ckpt_every=args.ckpt_every,
                        threads=threads, device=device, resume=resume, init_from=args.init_from)
    return TrainJob(partition=args.partition, cluster=args.cluster, objective=args.objective, schedule=args.schedule,
                    net=args.net, width=args.width, depth=args.depth, unconditional=args.unconditional,
                    out=out or f"runs/peer-c{args.cluster}-{args.objective}", train=train)


TRAIN_DESTS = ("partition", "cluster", "objective", "schedule", "net", "width", "depth", "unconditional", "steps",
               "minutes", "batch", "lr", "seed", "ckpt_every", "init_from", "out")


def plan_train(args, given) -> TrainJob:
    for need in ("partition", "cluster", "out"):
        if getattr(args, need) is None:
            raise ValueError(f"`diffswarm train` needs --{need.replace('_', '-')}")
    return _train_job(args, given, out=args.out, resume=args.resume, device=args.device, threads=args.threads)


def plan_train_router(args, given) -> RouterPlan:
    train = RouterTrainConfig(steps=args.steps, batch=args.batch, seed=args.seed, device=args.device)
    return RouterPlan(RouterJob(args.partition, args.out, args.unconditional, args.width, train), args.device)


def _client_network(args, given, local: bool):
    """The client's ``NetworkConfig`` from --loopback/--no-relay/--no-nat (a local swarm is loopback)."""
    from diffswarm.dht.node import NetworkConfig

    if local:
        _refuse(given, ["loopback", "no_relay", "no_nat"],
                "on a local swarm (`swarm up` listens on 127.0.0.1 only, without relays or NAT probing)")
        return NetworkConfig.loopback(client_mode=True)
    if args.loopback:
        _refuse(given, ["no_relay", "no_nat"], "with --loopback (it turns relays and NAT probing off)")
        return NetworkConfig.loopback(client_mode=True)
    return NetworkConfig(client_mode=True, use_relay=not args.no_relay, auto_nat=not args.no_nat,
                         nat_port_map=not args.no_nat)


def _full_swarm_name(text: str, option: str = "--swarm") -> str:
    """The canonical ``NAME@FINGERPRINT`` of ``text``, or a ValueError naming ``option`` that says how to get it."""
    from diffswarm.dht.names import SwarmNameError, parse_swarm_name

    try:
        return str(parse_swarm_name(text))
    except SwarmNameError as e:
        raise ValueError(f"{option}: {e}") from None


def _swarm_source(args, given, **client_kw) -> SwarmSource:
    """--initial-peers with --swarm NAME@FINGERPRINT, else the local swarm of --run-dir found by its own
    full name (``swarm.json``)."""
    from diffswarm.client.config import ClientConfig
    from diffswarm.dht.names import HOW_TO_NAME

    if args.initial_peers:
        _refuse(given, ["run_dir"], "with --initial-peers (it names the local swarm to use instead)")
        if args.swarm is None:
            raise ValueError(f"--initial-peers needs --swarm NAME@FINGERPRINT: {HOW_TO_NAME}")
        net = _client_network(args, given, local=False)
        return SwarmSource(tuple(args.initial_peers), ClientConfig(swarm=_full_swarm_name(args.swarm), net=net,
                                                                   **client_kw))
    from diffswarm.swarm.local import LocalSwarm

    run_dir = args.run_dir or DEFAULT_RUN_DIR
    sw = LocalSwarm.find(run_dir)
    if args.swarm is not None and _full_swarm_name(args.swarm) != sw.swarm:
        raise ValueError(f"--swarm {args.swarm!r}: the local swarm in {run_dir} is {sw.swarm!r}; drop --swarm "
                         "or pass --initial-peers to join another swarm")
    net = _client_network(args, given, local=True)
    return SwarmSource(tuple(sw.initial_peers), ClientConfig(swarm=sw.swarm, net=net, **client_kw), str(run_dir))


def _routing(args, given) -> RoutingConfig:
    d = RoutingConfig()
    if args.routing not in ("top-k", "sample-k"):
        _refuse(given, ["k"], f"with --routing {args.routing} (it sets the experts of top-k and sample-k)")
    if args.routing != "threshold":
        _refuse(given, ["threshold"], f"with --routing {args.routing} (it is the cut-off of --routing threshold)")
    if args.routing == "full":
        _refuse(given, ["full_above"], "with --routing full (the full ensemble is used at every t already)")
    return RoutingConfig(args.routing, args.k if args.k is not None else d.k,
                         args.threshold if args.threshold is not None else d.threshold, args.full_above)


def plan_generate(args, given) -> GeneratePlan:
    common = dict(routing=_routing(args, given),
                  sampling=SamplingConfig(steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                                          seed=args.seed),
                  n=args.n, classes=tuple(args.classes) if args.classes else None, output=args.output,
                  save_samples=args.save_samples, nrow=args.nrow, device=args.device)
    swarm_only = ["initial_peers", "run_dir", "swarm", "router_sha256", "timeout", "compression", "loopback",
                  "no_relay", "no_nat"]
    if args.router_kind == "stats":
        _refuse(given, ["router", "router_sha256"], "with --router-kind stats (it routes with cluster statistics, "
                                                    "not a router file)")
    if args.router_kind == "trained" and args.local and len(args.local) > 1 and not args.router:
        raise ValueError("several --local experts need their --router with --router-kind trained")
    if args.local:
        _refuse(given, swarm_only, "with --local (it generates from local checkpoints, without a network)")
        kind = "trained" if args.router or len(args.local) == 1 else "stats"
        if args.router_kind != "auto":
            kind = args.router_kind
        return GeneratePlan(**common, local=tuple(args.local), router=args.router, router_kind=kind)
    if args.router:
        _refuse(given, ["router_sha256"], "with --router (it pins an announced router; --router uses a local file)")
        if args.router_kind != "auto":
            _refuse(given, ["router_kind"], "with --router (a local router file is a trained router)")
    kw = {"call_timeout": args.timeout} if args.timeout is not None else {}
    kw["router_kind"] = args.router_kind
    if args.compression is not None:
        kw["compression"] = args.compression
    src = _swarm_source(args, given, router_sha256=args.router_sha256, **kw)
    return GeneratePlan(**common, router=args.router, swarm=src)


def plan_dashboard(args, given) -> DashboardPlan:
    return DashboardPlan(_swarm_source(args, given, call_timeout=args.timeout, connect_timeout=20.0,
                                       router_kind=args.router_kind), args.out, args.device)


def _server_network(args, given):
    """A peer's ``NetworkConfig`` from the server network options."""
    from diffswarm.dht.node import NetworkConfig

    if not args.identity:
        _refuse(given, ["no_identity_check"], "without --identity (an ephemeral identity is never online elsewhere)")
    if args.loopback:
        _refuse(given, ["host", "announce_maddrs", "use_auto_relay", "no_relay", "no_nat"],
                "with --loopback (it listens on 127.0.0.1 only, without relays or NAT probing)")
    if args.no_relay:
        _refuse(given, ["use_auto_relay"], "with --no-relay (auto relay needs relays)")
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
        _refuse(given, ["owner_key"], "without --router or an expert to serve (the owner key signs the manifest of "
                                      "the swarm, naming its router or, without one, its partition)")
    if args.swarm is None:
        if serves and not founds:
            what = next((given[d] for d in ("checkpoint", "train_job", "cluster", "partition") if d in given),
                        "serving an expert")
            raise ValueError(f"a peer serving an expert ({what}) needs --swarm NAME@FINGERPRINT: {HOW_TO_NAME}")
        return None
    if is_full_name(args.swarm):
        return _full_swarm_name(args.swarm)
    if not founds:
        return _full_swarm_name(args.swarm)  # raises: a bare NAME only founds a swarm
    try:
        return check_bare_name(args.swarm)
    except SwarmNameError as e:
        raise ValueError(f"--swarm: {e}") from None


def plan_peer(args, given) -> PeerPlan:
    from diffswarm.peer.server import PeerConfig

    train = None
    training = [d for d in TRAIN_DESTS if d in given]
    if args.checkpoint:
        _refuse(given, [*TRAIN_DESTS, "train_job"], "with --checkpoint (the peer serves it instead of training)")
    elif args.train_job:
        _refuse(given, TRAIN_DESTS, "with --train-job (the job file says what to train)")
        train = TrainJob.load(args.train_job)
        train = replace(train, train=replace(train.train, resume=True, device=args.device or train.train.device,
                                             threads=args.threads if args.threads is not None else train.train.threads))
    elif args.cluster is not None or training:
        if args.partition is None or args.cluster is None:
            raise ValueError(f"training an expert first needs --partition and --cluster (given: "
                             f"{', '.join(given[d] for d in training)})")
        train = _train_job(args, given, out=args.out, resume=True, device=args.device or "auto",
                           threads=args.threads or 0)
    if not args.checkpoint and train is None:
        _refuse(given, ["device", "threads", "max_batch", "batch_wait_ms", "rate_rows", "burst_rows"],
                "without an expert to serve (--checkpoint, --cluster or --train-job)")
    swarm = _peer_swarm(args, given, serves=bool(args.checkpoint or train))
    if not 0 < args.announce_period <= MAX_ANNOUNCE_PERIOD:
        raise ValueError(f"--announce-period {args.announce_period:g} must be in (0, {MAX_ANNOUNCE_PERIOD:g}] seconds "
                         "(readers call records older than 600 s stale)")
    d = PeerConfig()
    try:
        limits = replace(d.limits, **{k: getattr(args, k) for k in ("rate_rows", "burst_rows")
                                      if getattr(args, k) is not None})
    except ValueError as e:
        raise ValueError(f"--rate-rows / --burst-rows: {e}") from None
    cfg = PeerConfig(net=_server_network(args, given), swarm=swarm, owner_key=args.owner_key,
                     checkpoint=args.checkpoint, train=train, router=args.router, device=args.device or d.device,
                     threads=args.threads if args.threads is not None else d.threads,
                     max_batch=args.max_batch or d.max_batch,
                     batch_wait_ms=args.batch_wait_ms if args.batch_wait_ms is not None else d.batch_wait_ms,
                     announce_period=args.announce_period, info_file=args.info_file, limits=limits)
    return PeerPlan(cfg)


def plan_swarm_up(args, given) -> SwarmUpPlan:
    from diffswarm.dht.names import SwarmNameError, check_bare_name, is_full_name

    try:
        swarm = _full_swarm_name(args.swarm) if is_full_name(args.swarm) else check_bare_name(args.swarm)
    except SwarmNameError as e:
        raise ValueError(f"--swarm: {e}") from None
    common = dict(run_dir=args.run_dir, swarm=swarm, owner_key=args.owner_key, replicas=args.replicas,
                  threads=args.threads, port=args.port, timeout=args.timeout, router_kind=args.router_kind)
    if args.router_kind == "stats":
        _refuse(given, ["router", "router_steps"], "with --router-kind stats (the swarm has no router peer)")
    training = ["experts", "partition", "objectives", "train_steps", "train_minutes", "router_steps", "net", "width",
                "depth", "seed", *DATASET_DESTS]
    if args.checkpoints:
        _refuse(given, training, "with --checkpoints (the peers serve them instead of training new experts)")
        if len(args.checkpoints) > 1 and not args.router and args.router_kind == "trained":
            raise ValueError("serving several --checkpoints needs their --router (or --router-kind stats)")
        return SwarmUpPlan(**common, checkpoints=tuple(args.checkpoints), router=args.router)
    _refuse(given, ["router"], "without --checkpoints (the swarm trains its own router)")
    if args.partition:
        _refuse(given, DATASET_DESTS, "with --partition (the manifest names its dataset)")
    length = ({"steps": None, "minutes": args.train_minutes} if args.train_minutes
              else {"steps": args.train_steps or 300})
    seed = args.seed if args.seed is not None else 0
    return SwarmUpPlan(**common, experts=args.experts or 4, partition=args.partition,
                       data=DatasetSpec() if args.partition else _dataset(args),
                       objectives=args.objectives or "mixed", train=TrainConfig(**length, seed=seed),
                       router_train=RouterTrainConfig(steps=args.router_steps or 300, seed=seed),
                       net=args.net or "unet", width=args.width, depth=args.depth, seed=seed)


def plan_swarm_down(args, given) -> SwarmDownPlan:
    return SwarmDownPlan(args.run_dir, args.timeout)


def plan_swarm_status(args, given) -> SwarmStatusPlan:
    return SwarmStatusPlan(_swarm_source(args, given))


def plan_quality(args, given) -> QualityPlan:
    if args.partition:
        _refuse(given, DATASET_DESTS, "with --partition (the samples are compared with the manifest's dataset)")
        return QualityPlan(args.samples, args.partition, None)
    return QualityPlan(args.samples, None, _dataset(args))


def plan_demo(args, given) -> DemoPlan:
    from diffswarm.demo import DemoConfig

    return DemoPlan(DemoConfig(out=args.out, data=_dataset(args), k=args.k, preset=args.preset, minutes=args.minutes,
                               steps=args.steps, workers=args.workers, local_generation=args.local_generation,
                               seed=args.seed))


EVAL_POOL_DESTS = ("budget", "train_seeds", "jobs", "device", "samples", "save_samples")


def eval_config(quick: bool, out: str, **over):
    """The ``diffswarm eval`` configuration: the network, batch, router steps and sampling of the demo's
    ``tiny`` (quick) or ``cpu`` (full) preset, so that changing the preset changes the eval; ``over``
    replaces StudyConfig fields (``budget``: expert steps; ``samples``: n)."""
    from diffswarm.demo import PRESETS
    from diffswarm.eval.pool import PoolConfig
    from diffswarm.eval.study import QUICK_GMM, GMMSettings, StudyConfig

    pr = PRESETS["tiny" if quick else "cpu"]
    budget = over.pop("budget", None)
    pool = PoolConfig(data=DatasetSpec(pr.dataset or "fashion").resolved(), k=4 if quick else 8, net=pr.net,
                      width=pr.width, depth=pr.depth, batch=pr.batch, lr=pr.lr,
                      expert_steps=budget or (500 if quick else 1000), router_steps=pr.router_steps)
    if quick:
        sizes = dict(train_seeds=(0,), seeds=(0, 1), n=300, stability_n=32, align_n=128, router_eval_n=360,
                     gmm=QUICK_GMM)
    else:
        sizes = dict(train_seeds=(0, 1), seeds=(0, 1, 2), n=400, stability_n=32, gmm=GMMSettings())
    if over.get("n") is None:
        over.pop("n", None)
    for k in [k for k, v in over.items() if v is None]:
        del over[k]
    cfg = {**sizes, **over}
    cfg["stability_n"] = min(cfg.get("stability_n", 48), cfg.get("n", 500))
    return StudyConfig(out=out, pool=pool, sampling=pr.sampling, quick=quick, classifier_epochs=pr.classifier_epochs,
                       **cfg)


@dataclass(frozen=True)
class EvalReportPlan:
    out: str  # re-render OUT/report.md from OUT/results.json


def plan_eval(args, given) -> EvalPlan | EvalReportPlan:
    from diffswarm.eval.study import STUDIES

    if args.report_only:
        _refuse(given, [a for a in ("quick", "studies", "seeds", "threads", *EVAL_POOL_DESTS) if a in given],
                "with --report-only (it re-renders OUT/report.md from OUT/results.json)")
        return EvalReportPlan(args.out)

    studies = tuple(s for s in STUDIES if s in (args.studies or STUDIES))
    if set(studies) == {"gmm"}:
        _refuse(given, EVAL_POOL_DESTS, "with --studies gmm only (the Gaussian-mixture study trains no expert pool, "
                                        "draws no image samples and runs on the CPU)")
    if args.samples is not None and args.samples < 10:
        raise ValueError(f"--samples must be >= 10, got {args.samples}")
    if args.budget is not None and args.budget < 1:
        raise ValueError(f"--budget must be >= 1 expert training step, got {args.budget}")
    for name, vals in (("--seeds", args.seeds), ("--train-seeds", args.train_seeds)):
        if vals is not None and len(set(vals)) != len(vals):
            raise ValueError(f"{name} repeats a seed: {vals}")
    cfg = eval_config(args.quick, args.out, budget=args.budget, n=args.samples, studies=studies,
                      seeds=tuple(args.seeds) if args.seeds else None,
                      train_seeds=tuple(args.train_seeds) if args.train_seeds else None,
                      save_samples=args.save_samples, jobs=args.jobs, threads=args.threads, device=args.device)
    return EvalPlan(cfg, " ".join(["diffswarm", "eval", *getattr(args, "argv", [])]))


# ---------------------------------------------------------------------------------------------
# runs


def run_partition(p: PartitionPlan) -> int:
    from diffswarm.data import make_partition

    ds = p.data.load("train")
    t0 = time.perf_counter()
    part = make_partition(ds, p.k, seed=p.seed)
    part.source = p.data.resolved().to_dict()
    part.save(p.out)
    print(f"partitioned {ds.dataset_id} ({len(ds)} images) into K={p.k} clusters in {time.perf_counter() - t0:.1f}s")
    print(part.describe(ds.class_names))
    print(f"manifest: {p.out}  partition hash: {part.partition_hash[:16]}")
    return 0


def run_train(job: TrainJob) -> int:
    from diffswarm.training.jobs import run_train_job

    cfg, images, labels = job.load_data()
    length = f"{job.train.steps} steps" if job.train.steps else f"{job.train.minutes:g} minutes"
    print(f"training {cfg.expert_id} on {len(images)} images of cluster {job.cluster} ({job.net}, {length})")
    summary = run_train_job(job, prepared=(cfg, images, labels))
    print(f"done: {summary['steps']} steps in {summary['seconds']:.0f}s, final loss {summary['final_loss']:.4f} "
          f"-> {Path(job.out) / 'expert.safetensors'}")
    return 0


def run_train_router(p: RouterPlan) -> int:
    from diffswarm.router.train import format_router_accuracy
    from diffswarm.training.jobs import run_router_job

    router = run_router_job(p.job)
    print(format_router_accuracy(router.summary))
    print(f"router -> {p.job.out}")
    return 0


def parse_classes(classes, ds_names: list[str]) -> list[int] | None:
    if not classes:
        return None
    out: list[int] = []
    for c in classes:
        if c == "all":
            out.extend(range(len(ds_names)))
        elif c.lstrip("-").isdigit():
            out.append(int(c))
        elif c in ds_names:
            out.append(ds_names.index(c))
        else:
            raise ValueError(f"unknown class {c!r}; use an id or one of {ds_names}")
    return out


def _connect(src: SwarmSource, routing=None, *, router_path=None, device="cpu", seed=0, log=print):
    from diffswarm.client.ensemble import SwarmEnsemble

    log(f"joining swarm {src.config.swarm!r} via {src.initial_peers[0]}")
    return SwarmEnsemble.connect(list(src.initial_peers), routing, seed=seed, router_path=router_path,
                                 config=src.config, device=device, log=log)


def run_generate(p: GeneratePlan) -> int:
    from diffswarm.experts.train import pick_device
    from diffswarm.router.local import ProgressCallback, generate, load_local_ensemble, make_labels
    from diffswarm.utils.images import save_grid, save_samples

    dev = pick_device(p.device)
    if p.local:
        model = load_local_ensemble(p.local, p.router, p.routing, dev, seed=p.sampling.seed, router_kind=p.router_kind)
        ncfg = model.experts[0].config.net
        shape, num_classes = (ncfg.channels, ncfg.size, ncfg.size), ncfg.num_classes
        where = "locally"
    else:
        model = _connect(p.swarm, p.routing, router_path=p.router, device=dev, seed=p.sampling.seed)
        shape, num_classes = model.image_shape, model.num_classes
        cov = model.client.view.coverage()
        print("experts: " + ", ".join(f"{model.expert_ids[k]} x{n}" for k, n in enumerate(cov)))
        where = "over the swarm"
    try:
        labels = make_labels(p.n, parse_classes(p.classes, [str(i) for i in range(num_classes)]), num_classes)
        t0 = time.perf_counter()
        x = generate(model, labels, shape, p.sampling, dev, callback=ProgressCallback())
        dt = time.perf_counter() - t0
    finally:
        if not p.local:
            model.close()
    nrow = p.nrow or (len(set(labels.tolist())) if p.classes else int(max(1, round(p.n**0.5))))
    print(f"generated {p.n} images {where} in {dt:.1f}s -> {save_grid(x, p.output, nrow)}")
    if p.save_samples:
        print(f"samples -> {save_samples(p.save_samples, x, labels)}")
    return 0


def run_dashboard(p: DashboardPlan) -> int:
    from diffswarm.tui.app import make_app

    make_app(initial_peers=list(p.swarm.initial_peers), out_dir=p.out, config=p.swarm.config, device=p.device).run()
    return 0


def run_peer(p: PeerPlan) -> int:
    from diffswarm.peer.server import run_peer as serve

    return serve(p.config, log=lambda m: print(m, flush=True))  # a peer with nothing to serve says it is a DHT node


def run_swarm_up(p: SwarmUpPlan) -> int:
    from diffswarm.data import Partition, make_partition
    from diffswarm.swarm.local import PeerSpec, start_local_swarm

    run_dir = Path(p.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    names = [f"peer{i}-r{r}" if p.replicas > 1 else f"peer{i}"
             for i in range(len(p.checkpoints) if p.checkpoints else p.experts) for r in range(p.replicas)]
    if p.checkpoints:
        paths = [c for c in p.checkpoints for _ in range(p.replicas)]
        specs = [PeerSpec(n, checkpoint=c) for n, c in zip(names, paths, strict=True)]
        router = p.router
    else:
        from diffswarm.training.jobs import run_router_job

        k = p.experts
        if p.partition:
            part_path = p.partition
            part = Partition.load(part_path)
        else:
            ds = p.data.load("train")
            part = make_partition(ds, k, seed=p.seed)
            part.source = p.data.resolved().to_dict()
            part_path = str(run_dir / "partition.json")
            part.save(part_path)
            print(f"partitioned {ds.dataset_id} into K={k} clusters -> {part_path}")
        if part.k != k:
            raise ValueError(f"--experts {k} but the partition has K={part.k}")
        router = None
        if p.router_kind == "trained":
            router = str(run_dir / "router.safetensors")
            print(f"training the router ({p.router_train.steps} steps)")
            run_router_job(RouterJob(part_path, router, train=p.router_train), progress=False, evaluate=False)
        objectives = {"mixed": ["ddpm" if i % 2 == 0 else "fm" for i in range(k)], "ddpm": ["ddpm"] * k,
                      "fm": ["fm"] * k}[p.objectives]
        specs = []
        for i, obj in enumerate(objectives):
            for r in range(p.replicas):
                out = run_dir / "experts" / (f"c{i}-{obj}" + (f"-r{r}" if p.replicas > 1 else ""))
                job = TrainJob(part_path, i, str(out), objective=obj, net=p.net, width=p.width, depth=p.depth,
                               train=replace(p.train, seed=p.seed + i, resume=True, threads=p.threads))
                specs.append(PeerSpec(names[i * p.replicas + r], train=job))
        if p.replicas > 1:
            print("note: replicas of a cluster each train their own expert (same data and seed)")
    print(f"starting a bootstrap node and {len(specs)} peer(s) on 127.0.0.1 (logs in {run_dir / 'logs'})")
    sw = start_local_swarm(specs, router, run_dir, swarm=p.swarm, owner_key=p.owner_key, threads=p.threads,
                           timeout=p.timeout, port=p.port, log=print)
    owner = p.owner_key or run_dir / "owner.key"
    print(f"swarm {sw.swarm} is up with {len(specs)} expert peer(s) (owner key {owner}). Multiaddr:\n"
          f"  {' '.join(sw.initial_peers)}")
    print(f"generate with: diffswarm generate --run-dir {run_dir} --class all   (or --loopback --swarm {sw.swarm} "
          f"--initial-peers {sw.initial_peers[0]})")
    print(f"stop with:     diffswarm swarm down --run-dir {run_dir}")
    return 0


def run_swarm_down(p: SwarmDownPlan) -> int:
    from diffswarm.swarm.local import stop_local_swarm

    n = stop_local_swarm(p.run_dir, p.timeout)
    print(f"stopped {n} process(es) of the swarm in {p.run_dir}")
    return 0


def run_swarm_status(p: SwarmStatusPlan) -> int:
    import asyncio

    from diffswarm.client.discovery import router_sources
    from diffswarm.dht.names import choose_manifest, parse_swarm_name
    from diffswarm.dht.node import SwarmDHT

    net = replace(p.swarm.config.net, initial_peers=list(p.swarm.initial_peers))
    name = parse_swarm_name(p.swarm.config.swarm)

    async def query():
        node = await SwarmDHT.create(net, str(name))
        try:
            return await node.get_experts(), await node.get_manifests(), await node.get_providers()
        finally:
            await node.shutdown()

    (experts, errs), (manifests, merrs), (providers, perrs) = asyncio.run(query())
    m, notes = choose_manifest(manifests, name)
    if m is None:
        print(f"swarm {name}: no manifest signed by its owner is announced")
    else:
        n = len(router_sources(providers, m))
        print(f"swarm {name}: router {m.router_sha256[:12]} K={m.num_clusters} partition {m.partition_hash[:12]} "
              f"dataset {m.dataset_id or '?'} (signed by the owner, issued {m.issued:.0f}; {n} peer(s) serve it)")
    for r in sorted(experts, key=lambda r: (r.cluster if r.cluster is not None else -1, r.peer_id)):
        print(f"{r.expert_id:10s} {r.state:8s} {r.peer_id[:12]} {r.throughput:8.0f} rows/s  load {r.load:.0f}"
              + (f"  training {r.progress:.0%}" if r.state == "joining" else ""))
    for e in errs + merrs + perrs + notes:
        print(f"invalid record skipped: {e}")
    return 0


def run_quality(p: QualityPlan) -> int:
    import numpy as np
    import torch

    from diffswarm.data import Partition
    from diffswarm.eval import get_classifier, quality_report
    from diffswarm.training.jobs import dataset_for_partition

    data = np.load(p.samples)
    samples, labels = torch.from_numpy(data["samples"]), torch.from_numpy(data["labels"])
    part = Partition.load(p.partition) if p.partition else None
    if part is not None:
        train, test = dataset_for_partition(part), dataset_for_partition(part, "test")
    else:
        train, test = p.data.load("train"), p.data.load("test")
    clf = get_classifier(train)
    rep = quality_report(samples, labels if (labels >= 0).any() else None, train, test, clf, part)
    print(rep.format())
    return 0


def run_demo(p: DemoPlan) -> int:
    from diffswarm.demo import run_demo as demo

    demo(p.config)
    return 0


def run_eval(p: EvalPlan) -> int:
    from diffswarm.eval.study import run_study

    run_study(p.config, log=lambda m: print(m, flush=True), command=p.command)
    return 0


def run_eval_report(p: EvalReportPlan) -> int:
    from diffswarm.eval.report import rerender

    print(f"report -> {rerender(p.out)}")
    return 0


_RUNNERS = {EvalPlan: run_eval, EvalReportPlan: run_eval_report,
            PartitionPlan: run_partition, TrainJob: run_train, RouterPlan: run_train_router,
            GeneratePlan: run_generate, DashboardPlan: run_dashboard, PeerPlan: run_peer, SwarmUpPlan: run_swarm_up,
            SwarmDownPlan: run_swarm_down, SwarmStatusPlan: run_swarm_status, QualityPlan: run_quality,
            DemoPlan: run_demo}
