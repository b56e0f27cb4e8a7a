"""The ``diffswarm`` command line: one subcommand per step of the path a user walks."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None, help="fashion | digits | folder (default: fashion if installed, else digits)")
    p.add_argument("--data-root", default=None, help="fashion: IDX folder; folder: your image directory")
    p.add_argument("--size", type=int, default=None, help="resize images to SIZE x SIZE")
    p.add_argument("--channels", type=int, default=None, help="folder datasets: 1 (grayscale) or 3 (RGB)")


def _add_routing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--routing", default="top-k", choices=["top-k", "full", "threshold", "sample-k"])
    p.add_argument("--k", type=int, default=2, help="experts per step for top-k / sample-k (default 2)")
    p.add_argument("--threshold", type=float, default=0.1, help="minimum router probability for --routing threshold")
    p.add_argument("--full-above", type=float, default=None, help="use the full ensemble while t > this value")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=16, help="number of images")
    p.add_argument("--class", dest="classes", action="append", default=None,
                   help="class id or name to generate (repeatable; 'all' cycles through every class); default unconditional")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sampler", default="euler", choices=["euler", "heun"])
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="grid.png", help="PNG grid to write")
    p.add_argument("--save-samples", default=None, help="also write the raw samples (npz: samples, labels)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row")
    p.add_argument("--device", default="auto")


def _add_network_args(p: argparse.ArgumentParser, client: bool) -> None:
    g = p.add_argument_group("network")
    if not client:
        g.add_argument("--initial-peers", nargs="+", default=None, metavar="MADDR",
                       help="multiaddrs of running peers; none: start a new swarm and print its multiaddr")
        g.add_argument("--host", default="0.0.0.0", help="listen address (default all interfaces)")
        g.add_argument("--port", type=int, default=0, help="listen TCP port (0: any free port)")
        g.add_argument("--announce-maddrs", nargs="+", default=None, metavar="MADDR",
                       help="public multiaddrs to announce (behind NAT/port forwarding), e.g. /ip4/1.2.3.4/tcp/31337")
        g.add_argument("--identity", default=None, help="identity key file (created if missing): keeps the peer id")
        g.add_argument("--no-identity-check", action="store_true",
                       help="skip checking that --identity is not already online (faster start)")
    g.add_argument("--loopback", action="store_true", help="127.0.0.1 only, no NAT traversal or relays (local swarms)")
    g.add_argument("--no-relay", action="store_true", help="do not use libp2p circuit relays")
    g.add_argument("--no-nat", action="store_true", help="no AutoNAT probing or UPnP port mapping")
    if not client:
        g.add_argument("--use-auto-relay", action="store_true",
                       help="behind NAT without port forwarding: become reachable through libp2p relays (slow)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffswarm", description="Decentralized diffusion: train experts alone, generate with the swarm.")
    parser.add_argument("--version", action="version", version=f"diffswarm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("partition", help="split a dataset into K semantic clusters (k-means, no labels)")
    _add_dataset_args(p)
    p.add_argument("--k", type=int, default=4, help="number of clusters / experts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/partition.json", help="partition manifest to write")

    p = sub.add_parser("train", help="train one expert on its cluster (DDPM or flow matching)")
    p.add_argument("--partition", required=True, help="partition manifest (from `diffswarm partition`)")
    p.add_argument("--cluster", type=int, required=True)
    p.add_argument("--objective", choices=["ddpm", "fm"], default="fm")
    p.add_argument("--schedule", choices=["cosine", "linear"], default="cosine", help="DDPM noise schedule")
    p.add_argument("--net", choices=["dit", "mlp", "unet"], default="dit", help="denoiser network (default dit)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--unconditional", action="store_true", help="ignore class labels")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--out", required=True, help="output folder (expert.safetensors, state.safetensors, train_log.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.safetensors")
    p.add_argument("--init-from", default=None, help="DDPM expert checkpoint to initialise an FM expert from")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)

    p = sub.add_parser("train-router", help="train the router p(cluster | x_t, t, class)")
    p.add_argument("--partition", required=True)
    p.add_argument("--out", default="runs/router.safetensors")
    p.add_argument("--unconditional", action="store_true", help="router without class input (the papers' kind)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("generate",
                       help="generate images over the swarm (--initial-peers) or from local checkpoints (--local)")
    p.add_argument("--local", nargs="+", metavar="EXPERT", help="expert checkpoints (one per cluster): no network")
    p.add_argument("--router", default=None,
                   help="router checkpoint (swarm: default is the router the swarm announces)")
    p.add_argument("--initial-peers", nargs="+", default=None, metavar="MADDR",
                   help="multiaddr(s) of swarm peers (default: those of `diffswarm swarm up` in --run-dir)")
    p.add_argument("--run-dir", default="runs/swarm", help="local swarm state folder (when --initial-peers is omitted)")
    p.add_argument("--swarm", default="diffswarm", help="swarm name (DHT key prefix)")
    p.add_argument("--router-sha256", default=None, help="only use a router with this sha256 (prefix)")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline of one expert call, seconds")
    p.add_argument("--compression", choices=["none", "float16"], default="none", help="tensor encoding on the wire")
    _add_network_args(p, client=True)
    _add_sampling_args(p)
    _add_routing_args(p)

    p = sub.add_parser("dashboard", help="terminal dashboard: watch the swarm's experts and generate from it")
    p.add_argument("--initial-peers", nargs="+", default=None, metavar="MADDR",
                   help="multiaddr(s) of swarm peers (default: those of `diffswarm swarm up` in --run-dir)")
    p.add_argument("--local", action="store_true",
                   help="use the local swarm of `diffswarm swarm up` in --run-dir (the default without --initial-peers)")
    p.add_argument("--run-dir", default="runs/swarm", help="local swarm state folder (when --initial-peers is omitted)")
    p.add_argument("--swarm", default="diffswarm", help="swarm name (DHT key prefix)")
    p.add_argument("--out", default="runs/dashboard", help="folder for the generated PNG grids")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline of one expert call, seconds")
    p.add_argument("--device", default="cpu")
    _add_network_args(p, client=True)

    p = sub.add_parser("peer", help="volunteer: join the swarm, (train and) serve one expert")
    g = p.add_argument_group("what to serve")
    g.add_argument("--checkpoint", default=None, help="expert checkpoint to serve (expert.safetensors)")
    g.add_argument("--router", default=None, help="also serve this router file and announce it for the swarm")
    g = p.add_argument_group("training (without --checkpoint)")
    g.add_argument("--partition", default=None, help="partition manifest (from `diffswarm partition`)")
    g.add_argument("--cluster", type=int, default=None, help="cluster to train an expert on")
    g.add_argument("--objective", choices=["ddpm", "fm"], default="fm")
    g.add_argument("--train-steps", type=int, default=2000)
    g.add_argument("--out", default=None, help="checkpoint folder (default runs/peer-c{cluster}-{objective}); resumes")
    g.add_argument("--net", choices=["dit", "mlp", "unet"], default="dit", help="denoiser network (default dit)")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--depth", type=int, default=None)
    g.add_argument("--batch", type=int, default=128)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("serving")
    g.add_argument("--swarm", default="diffswarm", help="swarm name (DHT key prefix)")
    g.add_argument("--device", default="auto")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    g.add_argument("--max-batch", type=int, default=256, help="rows per forward pass")
    g.add_argument("--batch-wait-ms", type=float, default=2.0, help="wait for other clients' requests (ms)")
    g.add_argument("--announce-period", type=float, default=10.0, help="seconds between DHT heartbeats")
    g.add_argument("--info-file", default=None, help="write peer id, multiaddrs and state here (JSON)")
    _add_network_args(p, client=False)

    p = sub.add_parser("swarm", help="a local swarm on 127.0.0.1: `swarm up` / `swarm down`")
    ssub = p.add_subparsers(dest="swarm_command", required=True, metavar="ACTION")
    q = ssub.add_parser("up", help="start a bootstrap node and K peers as separate processes, wait until online")
    q.add_argument("--experts", type=int, default=4, help="K: number of experts (clusters)")
    q.add_argument("--run-dir", default="runs/swarm")
    q.add_argument("--checkpoints", nargs="+", default=None, help="serve these experts instead of training new ones")
    q.add_argument("--router", default=None, help="router to serve (with --checkpoints)")
    q.add_argument("--partition", default=None, help="partition manifest (default: make one in the run dir)")
    q.add_argument("--objectives", choices=["mixed", "ddpm", "fm"], default="mixed",
                   help="expert objectives: mixed alternates DDPM and FM (default)")
    q.add_argument("--train-steps", type=int, default=300, help="expert training steps (peers train on start)")
    q.add_argument("--router-steps", type=int, default=300)
    q.add_argument("--net", choices=["dit", "mlp", "unet"], default="dit", help="expert network (default dit)")
    q.add_argument("--width", type=int, default=None, help="expert network width")
    q.add_argument("--depth", type=int, default=None, help="expert network depth")
    q.add_argument("--replicas", type=int, default=1, help="peers per expert")
    q.add_argument("--threads", type=int, default=1, help="torch threads per peer")
    q.add_argument("--port", type=int, default=0, help="bootstrap TCP port (0: any)")
    q.add_argument("--swarm", default="diffswarm")
    q.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for every peer to be online")
    q.add_argument("--seed", type=int, default=0)
    _add_dataset_args(q)
    q = ssub.add_parser("down", help="stop the local swarm started from --run-dir")
    q.add_argument("--run-dir", default="runs/swarm")
    q.add_argument("--timeout", type=float, default=20.0, help="seconds before SIGKILL")
    q = ssub.add_parser("status", help="list the experts a swarm announces")
    q.add_argument("--run-dir", default="runs/swarm")
    q.add_argument("--initial-peers", nargs="+", default=None, metavar="MADDR")
    q.add_argument("--swarm", default="diffswarm")
    _add_network_args(q, client=True)

    p = sub.add_parser("quality", help="Frechet distance and class accuracy of saved samples")
    p.add_argument("samples", help="npz written by --save-samples")
    p.add_argument("--partition", default=None, help="manifest, to compare cluster shares")
    _add_dataset_args(p)

    p = sub.add_parser("demo", help="partition, train mixed DDPM/FM experts in parallel, route, generate, evaluate")
    p.add_argument("--out", default="runs/demo")
    _add_dataset_args(p)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--preset", choices=["cpu", "gpu", "tiny"], default=None, help="sizes (default: gpu if CUDA, else cpu)")
    p.add_argument("--steps", type=int, default=None, help="override expert training steps")
    p.add_argument("--workers", type=int, default=None, help="parallel training processes (default: CPU cores)")
    p.add_argument("--local-generation", action="store_true",
                   help="generate in this process instead of over a local swarm of peer processes")
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import commands
    from .client.client import SwarmClientError
    from .dht.node import SwarmNetworkError
    from .peer.launch import SwarmLaunchError
    from .router.routing import NoExpertsError

    try:
        return getattr(commands, "cmd_" + args.command.replace("-", "_"))(args) or 0
    except (ValueError, FileNotFoundError, NoExpertsError, SwarmClientError, SwarmLaunchError,
            SwarmNetworkError) as e:
        print(f"diffswarm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
