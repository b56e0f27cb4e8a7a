"""A peer that lies: a red-team tool to test clients' defences (tests, ``bench/chaos.py``). Never for a real swarm.

It is a normal ``diffswarm peer`` (same options, same records, the real checkpoint and its sha256) whose
answers are corrupted after the honest forward pass:

    python -m diffswarm.testing.hostile --mode scale:1.5 [--after N] [--mode-file FILE] [--lie-t LO:HI]
        [--lie-share F] [--stats-file FILE] -- <diffswarm peer options>

Modes: ``honest``, ``nan``, ``inf``, ``huge`` (x 1e6), ``scale:S``, ``negate``, ``zero``, ``random`` (random
directions with the honest norm per row), ``noise:SIGMA`` (honest + N(0, SIGMA^2) relative noise),
``row0`` (only the first row negated), ``other:CHECKPOINT`` (another expert's answer), ``slow:SECONDS``
(answers after a delay, e.g. past the client's deadline), ``shape`` (one row short), ``refuse`` (every
request refused). ``--after N``: honest for the first N forward passes, then the mode (a sleeper).
``--mode-file FILE``: read the mode from FILE before every pass (a chaos driver switches it at run time).
``--lie-t LO:HI``: lie only on requests whose flow times all lie in (LO, HI) (a liar picking its noise levels,
e.g. never at a trajectory's first evaluation, t = 1, nor its last). ``--lie-share F``: lie on a random share F
of the passes it would lie on (an intermittent liar; its own generator).
``--stats-file FILE``: publish FILE's bytes as the served expert's cluster statistics, whatever they say (forged
statistics for the statistics router, e.g. a cluster claiming a billion images); answers follow ``--mode``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from diffswarm.peer.server import Peer
from diffswarm.utils.log import console

MODES = ("honest", "nan", "inf", "huge", "scale", "negate", "zero", "random", "noise", "row0", "other", "slow",
         "shape", "refuse")


class Corruptor:
    """Wraps a peer's honest ``velocity(x, t, labels, guidance)`` and corrupts what it returns."""

    def __init__(self, honest, mode: str, after: int = 0, mode_file: str | None = None, device="cpu",
                 lie_t: tuple[float, float] = (float("-inf"), float("inf")), lie_share: float = 1.0):
        self.honest, self.after, self.mode_file, self.device = honest, after, mode_file, device
        self.lie_t, self.lie_share, self.rng = lie_t, lie_share, random.Random()
        self.passes = 0
        self.mode, self.arg, self.other = "honest", "", None
        self.set_mode(mode)

    def set_mode(self, spec: str) -> None:
        name, _, arg = spec.strip().partition(":")
        if name not in MODES:
            raise ValueError(f"unknown hostile mode {name!r}; modes: {MODES}")
        if name == "other" and (self.other is None or arg != self.arg):
            from diffswarm.experts.expert import Expert

            self.other = Expert.from_checkpoint(arg, self.device)
        self.mode, self.arg = name, arg

    def picks(self, t) -> bool:
        """Whether this pass is one it lies on (``lie_t``, ``lie_share``)."""
        lo, hi = self.lie_t
        tf = t.detach().float().flatten() if torch.is_tensor(t) else torch.tensor([float(t)])
        if not bool(((tf > lo) & (tf < hi)).all()):
            return False
        return self.lie_share >= 1.0 or self.rng.random() < self.lie_share

    def __call__(self, x, t, labels, guidance):
        if self.mode_file:
            try:
                spec = Path(self.mode_file).read_text().strip()
                if spec and spec != f"{self.mode}{':' if self.arg else ''}{self.arg}":
                    self.set_mode(spec)
            except (OSError, ValueError):
                pass
        v = self.honest(x, t, labels, guidance)
        self.passes += 1
        m = "honest" if self.passes <= self.after or not self.picks(t) else self.mode
        if m == "honest":
            return v
        if m == "nan":
            return torch.full_like(v, float("nan"))
        if m == "inf":
            return torch.full_like(v, float("inf"))
        if m == "huge":
            return v * 1e6
        if m == "scale":
            return v * float(self.arg or 2.0)
        if m == "negate":
            return -v
        if m == "zero":
            return torch.zeros_like(v)
        if m == "random":
            r = torch.randn_like(v)
            return r * (v.flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1).clamp_min(1e-12)).reshape(-1, 1, 1, 1)
        if m == "noise":
            return v + float(self.arg or 0.1) * v.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) / v[0].numel() ** 0.5 \
                * torch.randn_like(v)
        if m == "row0":
            v = v.clone()
            v[0] = -v[0]
            return v
        if m == "other":
            dev = next(self.other.parameters()).device
            return self.other.velocity(x.to(dev), t.to(dev), labels.to(dev), guidance).to(v.device)
        if m == "slow":
            time.sleep(float(self.arg or 30.0))
            return v
        if m == "shape":
            return v[:-1]
        if m == "refuse":
            from diffswarm.protocol.wire import RequestError

            raise RequestError("this peer refuses every request")
        raise AssertionError(m)


class HostilePeer(Peer):
    """A ``Peer`` whose served experts answer through a ``Corruptor``."""

    def __init__(self, cfg, mode: str, after: int = 0, mode_file: str | None = None,
                 lie_t: tuple[float, float] = (float("-inf"), float("inf")), lie_share: float = 1.0,
                 stats_file: str | None = None):
        super().__init__(cfg)
        self.hostile = (mode, after, mode_file, lie_t, lie_share)
        self.stats_file = stats_file

    def load_expert(self, path: str):
        served = super().load_expert(path)
        mode, after, mode_file, lie_t, lie_share = self.hostile
        served.batcher.velocity = Corruptor(served.batcher.velocity, mode, after, mode_file, served.device, lie_t,
                                            lie_share)
        self.log(f"HOSTILE peer: answers of {served.expert.expert_id} are corrupted ({mode}, after {after} passes)")
        if self.stats_file:
            served.stats_blob = Path(self.stats_file).read_bytes()
            self.log(f"HOSTILE peer: publishes {self.stats_file} as the statistics of {served.expert.expert_id}")
        return served


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m diffswarm.testing.hostile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="honest", help=f"one of {MODES} (with :ARG where it takes one)")
    ap.add_argument("--after", type=int, default=0, help="honest forward passes before lying")
    ap.add_argument("--mode-file", default=None, help="read the mode from this file before every pass")
    ap.add_argument("--lie-t", default=None, help="LO:HI: lie only when every row's flow time is in (LO, HI)")
    ap.add_argument("--lie-share", type=float, default=1.0, help="lie on this random share of those passes")
    ap.add_argument("--stats-file", default=None, help="publish this file as the expert's cluster statistics")
    own, rest = ap.parse_known_args(argv)
    lie_t = tuple(float(v) for v in own.lie_t.split(":")) if own.lie_t else (float("-inf"), float("inf"))
    rest = [a for a in rest if a != "--"]
    from diffswarm.cli.dispatch import plan as plan_command
    from diffswarm.cli.parser import build_parser, given_options

    parser = build_parser()
    args = parser.parse_args(["peer", *rest])
    plan = plan_command(args, given_options(parser, "peer", ["peer", *rest]))
    import asyncio

    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    console()
    return runner(HostilePeer(plan.config, own.mode, own.after, own.mode_file, lie_t, own.lie_share,
                              own.stats_file).run())


if __name__ == "__main__":
    sys.exit(main())
