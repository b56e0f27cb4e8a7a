"""The option groups several subcommands share: dataset, training, routing, sampling, swarm and network options.

Each ``add_*`` function adds one group to a subcommand's parser; ``diffswarm.cli.parser`` composes them.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator


class LazyChoices:
    """An option's ``choices`` read from ``module.attribute`` on first use (checking a value, printing the
    option's help), so that building the parser does not import ``module``: the evaluation studies
    (``diffswarm.eval.studies``, with scipy) for ``eval --studies`` would add ~0.4 s to every command's start.
    The option needs a ``metavar`` (argparse formats it when the option is added: without one it lists the
    choices there) and can name them in its help with ``%(choices)s``."""

    def __init__(self, module: str, attribute: str):
        self.module, self.attribute = module, attribute

    def _names(self) -> tuple:
        return tuple(getattr(importlib.import_module(self.module), self.attribute))

    def __contains__(self, value: object) -> bool:
        return value in self._names()

    def __iter__(self) -> Iterator:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    from diffswarm.data.datasets import DATASET_NAMES

    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default=None, choices=DATASET_NAMES,
                   help="default: fashion if installed (Debian's dataset-fashion-mnist), else digits")
    g.add_argument("--data-root", default=None, help="fashion: IDX folder; folder: your image directory")
    g.add_argument("--size", type=int, default=None, help="resize images to SIZE x SIZE")
    g.add_argument("--channels", type=int, default=None, help="folder datasets: 1 (grayscale) or 3 (RGB)")


def add_train_args(g, minutes_default: float | None = None) -> None:
    """What one volunteer trains and how: shared by `train` and `peer` (-> ``training.jobs.TrainJob``)."""
    from diffswarm.experts.config import OBJECTIVES
    from diffswarm.experts.networks import NETWORKS
    from diffswarm.experts.train import TrainConfig

    d = TrainConfig()
    g.add_argument("--partition", default=None, help="partition manifest (from `diffswarm partition`)")
    g.add_argument("--cluster", type=int, default=None, help="the cluster whose images the expert trains on")
    g.add_argument("--objective", choices=OBJECTIVES, default="fm", help="fm (velocity) or ddpm (epsilon)")
    g.add_argument("--schedule", choices=["cosine", "linear"], default="cosine", help="DDPM noise schedule")
    g.add_argument("--net", choices=sorted(NETWORKS), default="unet", help="denoiser network (default unet)")
    g.add_argument("--width", type=int, default=None, help="network width (default: the network's)")
    g.add_argument("--depth", type=int, default=None, help="network depth (default: the network's)")
    g.add_argument("--unconditional", action="store_true", help="ignore class labels (no classifier-free guidance)")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {d.steps})")
    length.add_argument("--minutes", type=float, default=minutes_default,
                        help="wall-clock training budget instead of a step count: steps follow from the measured speed")
    g.add_argument("--batch", type=int, default=d.batch)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="steps between checkpoints")
    g.add_argument("--init-from", default=None, help="DDPM expert checkpoint whose trunk initialises this FM expert")
    g.add_argument("--out", default=None, help="output folder (expert.safetensors, state.safetensors, train_log.jsonl, "
                                               "job.json)")


def add_routing_args(p: argparse.ArgumentParser) -> None:
    from diffswarm.router.routing import DRAWS, STRATEGIES, RoutingConfig

    d = RoutingConfig()
    g = p.add_argument_group("routing")
    g.add_argument("--routing", default=d.strategy, choices=STRATEGIES)
    g.add_argument("--k", type=int, default=None, help=f"experts per step for top-k / sample-k (default {d.k})")
    g.add_argument("--threshold", type=float, default=None,
                   help=f"minimum router probability for --routing threshold (default {d.threshold})")
    g.add_argument("--full-above", type=float, default=None, help="use the full ensemble while t > this value")
    g.add_argument("--sample-draw", default=None, choices=DRAWS,
                   help=f"--routing sample-k: draw the experts once per trajectory or at every step, as DDM "
                        f"(default {d.draw})")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    from diffswarm.sampling.config import SamplingConfig
    from diffswarm.sampling.steps import SAMPLERS

    d = SamplingConfig()
    g = p.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=16, help="number of images")
    g.add_argument("--class", dest="classes", action="append", default=None,
                   help="class id or name to generate (repeatable; 'all' cycles through every class); "
                        "default unconditional")
    g.add_argument("--steps", type=int, default=d.steps)
    g.add_argument("--sampler", default=d.sampler, choices=SAMPLERS)
    g.add_argument("--guidance", type=float, default=d.guidance, help="classifier-free guidance scale (1 = none)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--output", default="grid.png", help="PNG grid to write")
    g.add_argument("--save-samples", default=None, help="also write the raw samples (npz: samples, labels)")
    g.add_argument("--nrow", type=int, default=None, help="images per grid row")
    g.add_argument("--device", default="auto")


def add_swarm_source_args(p: argparse.ArgumentParser) -> None:
    """How a client finds a swarm: --initial-peers, or the local swarm of `swarm up` in --run-dir."""
    g = p.add_argument_group("which swarm")
    g.add_argument("--initial-peers", nargs="+", default=None, metavar="MADDR",
                   help="multiaddr(s) of swarm peers (default: those of `diffswarm swarm up` in --run-dir)")
    g.add_argument("--run-dir", default=None,
                   help="local swarm state folder (default runs/swarm; without --initial-peers)")
    g.add_argument("--swarm", default=None, metavar="NAME@FINGERPRINT",
                   help="the swarm's full name, as `swarm up` and the founding peer print it (needed with "
                        "--initial-peers; default: the local swarm's own name)")


def add_network_args(p: argparse.ArgumentParser, client: bool) -> None:
    g = p.add_argument_group("network")
    if not client:
        g.add_argument("--initial-peers", nargs="+", default=None, metavar="MADDR",
                       help="multiaddrs of running peers; none: start a new swarm and print its multiaddr")
        g.add_argument("--host", default=None,
                       help="listen address (default all interfaces; 127.0.0.1 with --loopback)")
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


def add_verify_attestations_arg(p) -> None:
    p.add_argument("--verify-attestations", default=None, metavar="PARTITION",
                   help="recompute the validators' attested scores on this partition's test split (its dataset must be "
                        "here); a validator caught signing a wrong score is reported and its attestations ignored")


def add_router_kind_arg(p) -> None:
    p.add_argument("--router-kind", choices=["auto", "trained", "stats"], default="auto",
                   help="trained: the router file (the swarm's, or --router); stats: p(cluster | x_t, t, class) in "
                        "closed form from the statistics each expert's peer publishes (no router peer, no central "
                        "data); auto (default): trained if the swarm's manifest names a router (locally: if --router "
                        "is given or there is one expert), else stats")
    p.add_argument("--allow-unsigned-stats", action="store_true",
                   help="stats router: for clusters whose statistics the swarm's owner did not sign, use those most "
                        "of their serving peers announce (RISK: a few peers serving a cluster's real checkpoint can "
                        "forge them and pull rows to their cluster); default: refuse unsigned statistics")
