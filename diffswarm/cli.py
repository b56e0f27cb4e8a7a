"""The ``diffswarm`` command line: one subcommand per step of the path a user walks."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
    p.add_argument("--net", choices=["mlp", "dit", "unet"], default="mlp")
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

    p = sub.add_parser("generate", help="generate images from experts (local checkpoints with --local)")
    p.add_argument("--local", nargs="+", metavar="EXPERT", help="expert checkpoints (one per cluster)")
    p.add_argument("--router", default=None, help="router checkpoint")
    _add_sampling_args(p)
    _add_routing_args(p)

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
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import commands

    try:
        return getattr(commands, "cmd_" + args.command.replace("-", "_"))(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"diffswarm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
