"""float16 transport (``--compression float16``, opt-in): how far its samples are from float32 ones, per row.

The swarm client with float16 transport rounds each call's rows x to float16 once (its own checks see the same
input), the peer computes in float32 and returns v in float16. This runs that path without the network: every
expert call goes through the wire codec (``encode_request`` with float16, ``check_request`` as a peer decodes it,
``encode_response`` / ``decode_response``), on the same toy experts as ``bench/swarm_vs_local.py`` (K experts,
DDPM and FM alternating, two training steps, seed 0; top-2, Euler 6, CFG 2). It prints, per batch size, the
samples' largest absolute difference from float32, their relative L2 difference, the rows that differ by more
than 1e-2 and their share of such pixels, and whether any routing choice changed (the router runs on the
client's float32 x, so the difference comes from the experts' answers only).

    python bench/fp16_transport.py              # UNet 16x3, K=8, batches 1 16 64
    python bench/fp16_transport.py --quick      # K=4, batches 1 16
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import NET_SIZES, footer, header, tiny  # noqa: E402

from diffswarm.peer.batching import BatchPolicy  # noqa: E402
from diffswarm.peer.hosted import ServedExpert  # noqa: E402
from diffswarm.protocol.wire import (  # noqa: E402
    as_sent,
    check_request,
    decode_response,
    encode_request,
    encode_response,
    request_metadata,
)
from diffswarm.router.local import generate, load_local_ensemble  # noqa: E402
from diffswarm.router.routing import RoutingConfig  # noqa: E402
from diffswarm.sampling.config import SamplingConfig  # noqa: E402
from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm  # noqa: E402


class OverTheWire:
    """An expert as a swarm client sees it with ``compression``: every call's request and answer encoded and
    decoded by the wire codec (the client's rounding of x included), computed on the peer's own code path."""

    def __init__(self, expert, compression: str):
        self.served, self.compression = ServedExpert(expert, BatchPolicy()), compression
        self.expert_id = expert.expert_id

    def velocity(self, x, t, labels, guidance):
        x = as_sent(x, self.compression)  # the client's rounding before the call (client/ensemble.py)
        tensors = encode_request(self.expert_id, x, t, labels, guidance, self.compression)
        req = check_request(self.served.spec, self.expert_id, tensors, request_metadata(guidance))
        v = self.served.batcher.velocity(req.x, req.t, req.labels, req.guidance)
        out, meta = encode_response(v, req.compression, {})
        return decode_response(out, meta, req.rows, tuple(x.shape[1:]))[0]


def sample(experts, router, batch: int, steps: int, compression: str):
    """(samples, the (B, K) choice of every evaluation) with every expert call made through the codec."""
    ens = load_local_ensemble(experts, router, RoutingConfig("top-k", 2), seed=0)
    ens.experts = [OverTheWire(e, compression) for e in ens.experts]
    chosen, choose = [], ens.choose

    def recording(*a, **kw):
        w = choose(*a, **kw)
        chosen.append(w > 0)
        return w

    ens.choose = recording
    labels = torch.arange(batch) % 10
    x = generate(ens, labels, (1, 28, 28), SamplingConfig(steps=steps, sampler="euler", guidance=2.0, seed=0))
    return x, chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="K=4, batches 1 16")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--net", choices=list(NET_SIZES), default="unet")
    args = ap.parse_args()
    if args.quick:
        args.k, args.batches = 4, [1, 16]
        if tiny():
            args.k, args.batches, args.steps, args.net = 2, [4], 3, "mlp"
    width, depth = NET_SIZES[args.net]
    header(f"float16 transport vs float32: samples per row, {args.net} {width}x{depth}, top-2 of K={args.k}")
    objectives = ["ddpm" if k % 2 == 0 else "fm" for k in range(args.k)]
    with tempfile.TemporaryDirectory(prefix="fp16-bench-") as tmp:
        experts, router = make_toy_swarm(tmp, ToySwarmSpec(objectives, size=28, num_classes=10, net=args.net,
                                                           width=width, depth=depth, steps=2, router_width=256))
        print(f"\nEuler {args.steps}, CFG 2; experts: {', '.join(objectives)} (two training steps, seed 0)")
        print(f"{'batch':>5} {'max|diff|':>9} {'rel L2':>8} {'rows > 1e-2':>11} {'their pixels > 1e-2':>19} "
              f"{'worst row rel L2':>16} {'routing changed':>15}")
        for b in args.batches:
            a, ca = sample(experts, router, b, args.steps, "none")
            h, ch = sample(experts, router, b, args.steps, "float16")
            d = (a - h).flatten(1)
            rows = (d.abs().max(1).values > 1e-2).nonzero().flatten().tolist()
            pixels = sum(int((d[r].abs() > 1e-2).sum()) for r in rows)
            worst = float((d.norm(dim=1) / a.flatten(1).norm(dim=1).clamp_min(1e-12)).max())
            flips = sum(int((x != y).any(1).sum()) for x, y in zip(ca, ch, strict=True))
            print(f"{b:5d} {float(d.abs().max()):9.1e} {float(d.norm() / a.norm()):8.1e} {len(rows):11d} "
                  f"{pixels:9d} of {len(rows) * d.shape[1]:7d} {worst:16.1e} "
                  f"{f'{flips} row-evaluations' if flips else 'no':>15}", flush=True)
    print("max|diff|, rel L2: over all samples of the batch; rows > 1e-2: rows whose largest pixel difference exceeds "
          "1e-2; routing changed: (row, evaluation) pairs whose top-2 choice differs from the float32 run")
    footer()


if __name__ == "__main__":
    main()
