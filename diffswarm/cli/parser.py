"""The ``diffswarm`` argparse parser: one function per subcommand group, and what the user typed.

``build_parser`` composes the groups (training, clients, peer, local swarm, evaluation) from the shared
option groups of ``diffswarm.cli.options``; ``given_options`` tells which options the user actually typed,
so that planning can refuse the ones without effect.
"""

from __future__ import annotations

import argparse

from diffswarm import __version__
from diffswarm.cli.options import (
    LazyChoices,
    add_dataset_args,
    add_network_args,
    add_router_kind_arg,
    add_routing_args,
    add_sampling_args,
    add_swarm_source_args,
    add_train_args,
    add_verify_attestations_arg,
)


def _parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, allow_abbrev=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffswarm", allow_abbrev=False,
        description="Decentralized diffusion: train experts alone, generate with the swarm.")
    parser.add_argument("--version", action="version", version=f"diffswarm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_training_commands(sub)
    _add_client_commands(sub)
    _add_peer_command(sub)
    _add_validate_command(sub)
    _add_join_command(sub)
    _add_swarm_commands(sub)
    _add_evaluation_commands(sub)
    return parser


def _add_training_commands(sub) -> None:
    """`partition`, `train`, `train-router`."""
    p = _parser(sub, "partition", "split a dataset into K semantic clusters (k-means, no labels)")
    add_dataset_args(p)
    p.add_argument("--k", type=int, default=4, help="number of clusters / experts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/partition.json", help="partition manifest to write")

    p = _parser(sub, "train", "train one expert on its cluster (DDPM or flow matching)")
    add_train_args(p)
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.safetensors")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")

    p = _parser(sub, "train-router", "train the router p(cluster | x_t, t, class)")
    p.add_argument("--partition", required=True)
    p.add_argument("--out", default="runs/router.safetensors")
    p.add_argument("--unconditional", action="store_true", help="router without class input (the papers' kind)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def _add_client_commands(sub) -> None:
    """`generate`, `export` and `dashboard`: the swarm's clients."""
    p = _parser(sub, "generate", "generate images over the swarm (default) or from local checkpoints (--local)")
    p.add_argument("--local", nargs="+", metavar="EXPERT", help="expert checkpoints (one per cluster): no network")
    p.add_argument("--router", default=None,
                   help="router checkpoint (swarm: default is the router the swarm announces)")
    add_swarm_source_args(p)
    g = p.add_argument_group("swarm client")
    g.add_argument("--router-sha256", default=None, help="only use an announced router with this sha256 (prefix)")
    add_router_kind_arg(p)
    add_verify_attestations_arg(p)
    g.add_argument("--timeout", type=float, default=None, help="deadline of one expert call, seconds (default 10)")
    g.add_argument("--compression", choices=["none", "float16"], default=None,
                   help="tensor encoding on the wire (default none)")
    add_network_args(p, client=True)
    add_sampling_args(p)
    add_routing_args(p)

    p = _parser(sub, "export", "write a diffusers pipeline folder (DiffswarmPipeline: one folder per expert, "
                               "router/, model_index.json) from a run directory (--run) or from a swarm")
    p.add_argument("out", metavar="OUT", help="the pipeline folder to write (new, or empty)")
    p.add_argument("--run", default=None, metavar="DIR",
                   help="run directory holding experts/*/expert.safetensors and router.safetensors (no network)")
    add_swarm_source_args(p)
    p.add_argument_group("swarm client").add_argument(
        "--router-sha256", default=None, help="only use an announced router with this sha256 (prefix)")
    add_router_kind_arg(p)
    add_network_args(p, client=True)
    add_routing_args(p)  # the pipeline's default routing (``__call__`` can override it)

    p = _parser(sub, "dashboard", "terminal dashboard: watch the swarm's experts and generate from it")
    add_swarm_source_args(p)
    p.add_argument("--out", default="runs/dashboard", help="folder for the generated PNG grids")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline of one expert call, seconds")
    p.add_argument("--device", default="cpu")
    add_router_kind_arg(p)
    add_verify_attestations_arg(p)
    add_network_args(p, client=True)
    g = p.add_argument_group("in a browser")
    g.add_argument("--web", action="store_true",
                   help="serve the dashboard to web browsers (textual-serve) instead of this terminal; each browser "
                        "tab runs its own dashboard process here")
    g.add_argument("--host", default="127.0.0.1",
                   help="with --web: listen address (default 127.0.0.1: this machine only; whoever reaches the page "
                        "can start generations on this machine, so open it wider only behind your own access control)")
    g.add_argument("--port", type=int, default=8000, help="with --web: listen TCP port (default 8000)")


def _add_peer_command(sub) -> None:
    """`peer`: a volunteer that (trains and) serves one expert, or a router, or only a DHT node."""
    p = _parser(sub, "peer", "volunteer: join the swarm, (train and) serve one expert")
    g = p.add_argument_group("what to serve")
    g.add_argument("--checkpoint", default=None, help="expert checkpoint to serve (expert.safetensors)")
    g.add_argument("--router", default=None,
                   help="also serve this router file; with the owner key, found the swarm and sign its manifest")
    g.add_argument("--owner-key", default=None, metavar="FILE",
                   help="the swarm owner's key file (created if missing) that signs the manifest naming --router "
                        "(default: the peer's identity key), or, without --router, naming no router: clients then "
                        "route with the statistics the experts' peers publish; its fingerprint is in the swarm's name")
    g.add_argument("--sign-stats", nargs="+", default=None, metavar="FILE",
                   help="with the owner key: also sign the sha256 of these clusters' statistics (cluster_stats.bin "
                        "files, or checkpoints with one beside them) in the manifest, besides this peer's own; "
                        "clients route by owner-signed statistics only (a missing file is signed once it appears)")
    g = p.add_argument_group("admission (experts earn their place: docs/security.md)")
    g.add_argument("--validate", default=None, metavar="PARTITION",
                   help="score the swarm's checkpoints on this partition's test split and announce signed "
                        "attestations; with the owner key, also sign the admission rule (clients then use only "
                        "admitted checkpoints)")
    g.add_argument("--validators", nargs="+", default=None, metavar="FINGERPRINT",
                   help="with the owner key and --validate: more validator key fingerprints the rule names "
                        "(as `diffswarm validate` prints them)")
    g.add_argument("--validator-key", default=None, metavar="FILE",
                   help="with --validate: the key file attestations are signed with (default: the owner key, else "
                        "the peer's identity key)")
    g.add_argument("--serve-partition", default=None, metavar="FILE",
                   help="serve this partition manifest (partition.json) to volunteers that `diffswarm join`; with the "
                        "owner key, sign its sha256 in the manifest (default: a training peer serves its job's)")
    g = p.add_argument_group("training first (instead of --checkpoint); the run resumes from --out")
    add_train_args(g)
    g.add_argument("--train-job", default=None, help="a training job file (job.json, as `swarm up` writes them)")
    g = p.add_argument_group("serving")
    g.add_argument("--swarm", default=None, metavar="NAME@FINGERPRINT",
                   help="the swarm to join (its full name); with --router a bare NAME founds swarm NAME owned by the "
                        "owner key (default name diffswarm)")
    g.add_argument("--device", default=None, help="device for training and serving (default auto)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    g.add_argument("--max-batch", type=int, default=None, help="rows per forward pass (default 256)")
    g.add_argument("--batch-wait-ms", type=float, default=None,
                   help="wait for other clients' requests (ms, default 2)")
    g.add_argument("--announce-period", type=float, default=10.0,
                   help="seconds between DHT heartbeats (at most 300: readers call records stale after 600 s)")
    g.add_argument("--info-file", default=None, help="write peer id, multiaddrs and state here (JSON)")
    g.add_argument("--no-reachability-check", action="store_true",
                   help="go online without first asking up to 5 peers to dial this peer back at its addresses")
    g.add_argument("--rate-rows", type=float, default=None,
                   help="request rows per second one caller may send; more is answered busy (default 10000; 0 = off)")
    g.add_argument("--burst-rows", type=int, default=None,
                   help="rows one caller may send at once after idling (default 16384)")
    g = p.add_argument_group("monitoring")
    g.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port, printed and written "
                        "to --info-file); names in docs/volunteer.md")
    g.add_argument("--metrics-host", default="127.0.0.1",
                   help="with --metrics-port: listen address (default 127.0.0.1; the metrics show load and clients)")
    add_network_args(p, client=False)


def _add_validate_command(sub) -> None:
    """`validate`: score a swarm's checkpoints on held-out data and announce signed attestations."""
    p = _parser(sub, "validate", "validator: score the swarm's new checkpoints on the test split, attest the scores")
    p.add_argument("--swarm", required=True, metavar="NAME@FINGERPRINT", help="the swarm to validate (its full name)")
    p.add_argument("--partition", required=True, help="the swarm's partition manifest (its dataset must be here)")
    p.add_argument("--validator-key", default=None, metavar="FILE",
                   help="key file attestations are signed with (created if missing; default: the node's identity "
                        "key); the owner names its fingerprint with `diffswarm peer --validators`")
    p.add_argument("--announce-period", type=float, default=10.0, help="seconds between validation rounds")
    p.add_argument("--info-file", default=None, help="write peer id, multiaddrs and state here (JSON)")
    add_network_args(p, client=False)


def _add_join_command(sub) -> None:
    """`join`: a volunteer joins a swarm by its name: the swarm hands it the partition and the cluster it needs."""
    from diffswarm.experts.config import OBJECTIVES
    from diffswarm.experts.networks import NETWORKS
    from diffswarm.experts.train import TrainConfig

    d = TrainConfig()
    p = _parser(sub, "join", "volunteer: join a swarm by its name; it picks the cluster the swarm needs, "
                                     "trains, serves")
    p.add_argument("--swarm", default=None, metavar="NAME@FINGERPRINT", help="the swarm's full name (from its owner)")
    g = p.add_argument_group("what to train (default: what the swarm needs)")
    g.add_argument("--cluster", type=int, default=None,
                   help="train this cluster instead of the one the swarm needs most (and keep it across restarts)")
    g.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="fm or ddpm (default: the one fewer live experts of the swarm have)")
    g.add_argument("--minutes", type=float, default=30.0,
                   help="wall-clock training budget (default 30; a restart resumes and counts what was spent)")
    g.add_argument("--net", choices=sorted(NETWORKS), default="unet", help="denoiser network (default unet)")
    g.add_argument("--width", type=int, default=None, help="network width (default: the network's)")
    g.add_argument("--depth", type=int, default=None, help="network depth (default: the network's)")
    g.add_argument("--batch", type=int, default=d.batch)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--data-root", default=None,
                   help="this machine's copy of the swarm's dataset (fashion: the IDX folder; default: where the "
                        "Debian package dataset-fashion-mnist puts it)")
    g.add_argument("--out", default=None,
                   help="folder of the partition copy, the choice (join.json) and the training runs (default: "
                        "IDENTITY's folder/<identity>-join/NAME, else runs/join/NAME)")
    g.add_argument("--start-delay", type=float, default=10.0,
                   help="wait a random 0..S seconds before choosing, so that volunteers joining together spread "
                        "(default 10; 0: choose at once)")
    g.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the owner's manifest (default 60)")
    g = p.add_argument_group("rebalancing (checks always run and say what they see)")
    g.add_argument("--rebalance", action="store_true",
                   help="move to a cluster without live experts once the imbalance is confirmed (retrain, then serve)")
    g.add_argument("--rebalance-interval", type=float, default=120.0, help="seconds between balance checks (120)")
    g.add_argument("--rebalance-checks", type=int, default=3,
                   help="consecutive checks that must agree before moving (3)")
    g.add_argument("--rebalance-margin", type=float, default=0.1,
                   help="least gain in balance quality a move must bring (0.1; moves only below quality 0.75)")
    g = p.add_argument_group("serving")
    g.add_argument("--device", default=None, help="device for training and serving (default auto: the GPU if any)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    g.add_argument("--max-batch", type=int, default=None, help="rows per forward pass (default 256)")
    g.add_argument("--announce-period", type=float, default=10.0, help="seconds between DHT heartbeats")
    g.add_argument("--info-file", default=None, help="write peer id, multiaddrs and state here (JSON)")
    g.add_argument("--no-reachability-check", action="store_true",
                   help="go online without first asking up to 5 peers to dial this peer back at its addresses")
    add_network_args(p, client=False)


def _add_swarm_commands(sub) -> None:
    """`swarm up`, `swarm down`, `swarm status`."""
    p = _parser(sub, "swarm", "a local swarm on 127.0.0.1: `swarm up` / `swarm down` / `swarm status`")
    ssub = p.add_subparsers(dest="swarm_command", required=True, metavar="ACTION")
    q = _parser(ssub, "up", "start a bootstrap node and K peers as separate processes, wait until online")
    q.add_argument("--run-dir", default="runs/swarm")
    q.add_argument("--checkpoints", nargs="+", default=None, help="serve these experts instead of training new ones")
    q.add_argument("--router", default=None, help="router to serve (with --checkpoints)")
    q.add_argument("--router-kind", choices=["trained", "stats"], default="trained",
                   help="trained (default): a router peer serves the router (--router, or one trained here); stats: no "
                        "router at all, clients route with the statistics each expert's peer publishes")
    q.add_argument("--replicas", type=int, default=1, help="peers per expert")
    q.add_argument("--threads", type=int, default=1, help="torch threads per peer")
    q.add_argument("--port", type=int, default=0, help="bootstrap TCP port (0: any)")
    q.add_argument("--swarm", default="diffswarm",
                   help="swarm NAME; its full name NAME@FINGERPRINT (the owner key's) is printed and kept in "
                        "RUN_DIR/swarm.json")
    q.add_argument("--owner-key", default=None, metavar="FILE",
                   help="the swarm owner's key file (default RUN_DIR/owner.key; created if missing)")
    q.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for every peer to be online")
    g = q.add_argument_group("training the experts (without --checkpoints)")
    g.add_argument("--experts", type=int, default=None, help="K: number of experts (clusters; default 4)")
    g.add_argument("--partition", default=None,
                   help="partition manifest (default: make one in the run dir); with --checkpoints: the data the "
                        "owner scores them on before clients use them (admission; without it admission is off)")
    g.add_argument("--objectives", choices=["auto", "mixed", "ddpm", "fm"], default=None,
                   help="expert objectives: mixed alternates DDPM and FM; auto (default): mixed where the steps each "
                        "expert trains make a DDPM expert about as good as an FM one by its measured quality curve, "
                        "else all FM")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--train-steps", type=int, default=None,
                        help="expert training steps (instead of the wall-clock --train-minutes)")
    length.add_argument("--train-minutes", type=float, default=None,
                        help="expert training budget, wall-clock minutes (default 4: a slower machine trains fewer "
                             "steps)")
    g.add_argument("--router-steps", type=int, default=None, help="router training steps (default 300)")
    g.add_argument("--net", choices=["dit", "mlp", "unet"], default="unet", help="expert network (default unet)")
    g.add_argument("--width", type=int, default=None, help="expert network width")
    g.add_argument("--depth", type=int, default=None, help="expert network depth")
    g.add_argument("--seed", type=int, default=None, help="partition and training seed (default 0)")
    add_dataset_args(q)
    q = _parser(ssub, "down", "stop the local swarm started from --run-dir")
    q.add_argument("--run-dir", default="runs/swarm")
    q.add_argument("--timeout", type=float, default=20.0, help="seconds before SIGKILL")
    q = _parser(ssub, "status", "list the experts a swarm announces")
    add_swarm_source_args(q)
    q.add_argument("--chart", action="store_true",
                   help="also draw each cluster's coverage: online replicas and rows/s as unicode bars")
    add_network_args(q, client=True)


def _add_evaluation_commands(sub) -> None:
    """`quality`, `prepare`, `demo`, `eval`."""
    p = _parser(sub, "quality", "Frechet distance and class accuracy of saved samples")
    p.add_argument("samples", help="npz written by --save-samples")
    p.add_argument("--partition", default=None, help="manifest: its dataset, and cluster shares to compare")
    add_dataset_args(p)

    p = _parser(sub, "prepare", "train and cache the quality classifier the demo, eval and quality score with (once "
                                "per dataset; scripts/setup.sh runs it, so that the demo's budget goes to its experts)")
    add_dataset_args(p)

    p = _parser(sub, "demo", "partition, train DDPM/FM experts in parallel, route, generate, evaluate")
    p.add_argument("--out", default="runs/demo")
    add_dataset_args(p)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--preset", choices=["cpu", "gpu", "tiny"], default=None,
                   help="sizes (default: gpu if CUDA, else cpu)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=None,
                        help="wall-clock budget of the whole demo (default: the preset's); training gets what is left")
    length.add_argument("--steps", type=int, default=None, help="train each expert this many steps instead of a budget")
    p.add_argument("--workers", type=int, default=None, help="parallel training processes (default: CPU cores)")
    p.add_argument("--local-generation", action="store_true",
                   help="generate in this process instead of over a local swarm of peer processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objectives", choices=["auto", "mixed", "fm", "ddpm"], default="auto",
                   help="the experts' objectives: DDPM and FM alternating (mixed), all FM, all DDPM, or auto (the "
                        "default): mixed where the steps the budget trains make a DDPM expert about as good as an "
                        "FM one by its measured quality curve, else all FM")

    p = _parser(sub, "eval", "test the papers' claims on a cached expert pool: routing, objectives, translator, "
                             "stability, alignment, routers, 2-D Gaussian mixture; writes OUT/report.md")
    p.add_argument("--out", default="runs/eval", help="report folder: report.md, PNG plots, results.json, cells/")
    p.add_argument("--quick", action="store_true",
                   help="toy sizes (digits 8x8, K=4, tiny MLP experts, 1 training seed, 2 sampling seeds): minutes")
    p.add_argument("--save-samples", action="store_true",
                   help="write every scored sample set to OUT/samples/<cell>.npz (+ index.json)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="sampling seeds, averaged within a training seed (default 0; quick 0 1)")
    p.add_argument("--train-seeds", type=int, nargs="+", default=None,
                   help="training seeds, one expert pool each: the unit the tests replicate over (default 0 1 2 3 4; "
                        "quick 0, which tests nothing)")
    p.add_argument("--budget", type=int, default=None,
                   help="optimizer steps per expert (default 100; quick 500); the monolith trains K times as many")
    p.add_argument("--samples", type=int, default=None, help="samples per sample set (default 300; quick 300)")
    p.add_argument("--studies", nargs="+", choices=LazyChoices("diffswarm.eval.studies", "STUDIES"), default=None,
                   metavar="STUDY",  # not the choices: argparse formats the metavar when the option is added
                   help="run only these studies (%(choices)s; default all; quick all but hddm and scaling)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda[:i]")
    p.add_argument("--jobs", type=int, default=None,
                   help="parallel training processes (default: one per core)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the sampling process and of each training process (default: every "
                        "core for sampling, the cores shared out among the training processes)")
    p.add_argument("--report-only", action="store_true",
                   help="only re-render OUT/report.md and its plots from OUT/results.json (and OUT/reading.md)")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its command path ("generate", "swarm up", ...)."""
    out: dict[str, argparse.ArgumentParser] = {}

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs and path:
            out[path] = p
        for a in subs:
            for name, child in a.choices.items():
                walk(child, f"{path} {name}".strip())

    walk(parser, "")
    return out


def command_path(args) -> str:
    """"generate", "swarm up", ... of parsed ``args``."""
    return args.command + (f" {args.swarm_command}" if args.command == "swarm" else "")


def given_options(parser: argparse.ArgumentParser, path: str, argv: list[str]) -> dict[str, str]:
    """{dest: option string} of the options of subcommand ``path`` that appear in ``argv`` (abbreviations are
    off, so an option is given exactly when one of its strings, or ``--opt=value``, is a token before ``--``)."""
    tokens = argv[:argv.index("--")] if "--" in argv else argv
    out: dict[str, str] = {}
    for a in subparsers(parser)[path]._actions:
        for s in a.option_strings:
            if any(tok == s or tok.startswith(s + "=") for tok in tokens):
                out[a.dest] = s
    return out
