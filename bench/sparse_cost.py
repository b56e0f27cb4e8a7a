"""Sparse vs full routing: expert forward calls and FLOPs per image for top-1, top-2 and the full ensemble at K=8,
router included. Exact counts, not timings: the machine's speed does not enter.

Builds K experts of the CPU demo's default network (UNet 16x3 at 28x28, 10 classes; ``--net dit`` for the DiT
96x3) with random weights (a forward pass costs the same as a trained one's) and the default router (width 256),
then samples ``--n`` class-conditional images locally with each routing strategy (Heun 6 steps = 11 evaluations,
CFG 2, the sampling defaults). Every expert call and every router call is run under
``torch.utils.flop_counter.FlopCounterMode``; calls = rows an expert evaluated (each with CFG runs the network on
2 rows: conditional and unconditional, and the FLOPs count both). FlopCounterMode counts matrix products,
convolutions and attention (2 FLOPs per multiply-add), not elementwise work.

Target (DDM paper: 642 of 2,490 GFLOPs = 0.258): top-2 costs at most 0.27 of full.

    python bench/sparse_cost.py            # UNet (default) and DiT, n = 16
    python bench/sparse_cost.py --quick    # UNet only, n = 4
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import footer, header, tiny  # noqa: E402

from diffswarm.experts.expert import Expert  # noqa: E402
from diffswarm.router.ensemble import RoutedEnsemble  # noqa: E402
from diffswarm.router.local import generate  # noqa: E402
from diffswarm.router.model import Router  # noqa: E402
from diffswarm.router.routing import RoutingConfig  # noqa: E402
from diffswarm.sampling.config import SamplingConfig  # noqa: E402
from diffswarm.training.jobs import ClusterData, expert_config, router_config  # noqa: E402

STRATEGIES = {"top-1": RoutingConfig("top-k", 1), "top-2": RoutingConfig("top-k", 2), "full": RoutingConfig("full")}


class Counted:
    """Wraps a velocity model (or the router's ``probs``): FLOPs and rows of every call."""

    def __init__(self, fn):
        self.fn, self.flops, self.rows, self.calls = fn, 0, 0, 0

    def __call__(self, x, *args, **kw):
        with FlopCounterMode(display=False) as fc:
            out = self.fn(x, *args, **kw)
        self.flops += fc.get_total_flops()
        self.rows += x.shape[0]
        self.calls += 1
        return out


def build(net: str, k: int, width: int | None, depth: int | None, seed: int) -> tuple[list[Expert], Router]:
    torch.manual_seed(seed)
    data = ClusterData((1, 28, 28), 10, k, f"bench-{k}")
    experts = [Expert(expert_config(data, "ddpm" if c % 2 == 0 else "fm", c, net=net, width=width, depth=depth)).eval()
               for c in range(k)]
    router = Router(router_config(data, width=256)).eval()
    with torch.no_grad():  # the AdaLN gates start at zero: randomise the head so routing is not uniform
        router.head.weight.normal_(0, 1.0)
    return experts, router


def measure(net: str, k: int, n: int, sampling: SamplingConfig, width=None, depth=None) -> dict[str, dict]:
    experts, router = build(net, k, width, depth, sampling.seed)
    labels = torch.arange(n) % 10
    out = {}
    for name, routing in STRATEGIES.items():
        ens = RoutedEnsemble(experts, router, routing, seed=sampling.seed)
        counters = [Counted(e.velocity) for e in experts]
        ens.experts = [type("C", (), {"velocity": staticmethod(c), "expert_id": str(i)})()
                       for i, c in enumerate(counters)]
        rc = Counted(router.probs)
        ens.route_probs = lambda x, t, lab, rc=rc: rc(x, t, lab)
        generate(ens, labels, (1, 28, 28), sampling)
        expert_flops = sum(c.flops for c in counters)
        out[name] = {"expert_calls": sum(c.rows for c in counters) / n, "expert_gflops": expert_flops / n / 1e9,
                     "router_gflops": rc.flops / n / 1e9, "gflops": (expert_flops + rc.flops) / n / 1e9}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="UNet only, 4 images")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--n", type=int, default=16, help="images per strategy")
    ap.add_argument("--nets", nargs="+", default=["unet", "dit"], choices=["unet", "dit", "mlp"])
    args = ap.parse_args()
    if args.quick:
        args.nets, args.n = ["unet"], 2 if tiny() else 4
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    sampling = SamplingConfig()  # Heun 6 (11 evaluations), CFG 2: the defaults
    if args.quick and tiny():  # the test's size: the ratios do not depend on the number of steps
        sampling = SamplingConfig(steps=2, sampler="euler")
    header(f"sparse vs full: expert calls and FLOPs per image, K={args.k}, {sampling.sampler} {sampling.steps} "
           f"({sampling.evaluations} evaluations), CFG {sampling.guidance}, n={args.n}")
    for net in args.nets:
        res = measure(net, args.k, args.n, sampling)
        full = res["full"]["gflops"]
        print(f"\n{net} (default size), K={args.k}")
        print(f"{'routing':>8} {'expert calls/img':>17} {'expert GFLOPs/img':>18} {'router GFLOPs/img':>18} "
              f"{'total GFLOPs/img':>17} {'/ full':>7}")
        for name, r in res.items():
            print(f"{name:>8} {r['expert_calls']:17.1f} {r['expert_gflops']:18.3f} {r['router_gflops']:18.4f} "
                  f"{r['gflops']:17.3f} {r['gflops'] / full:7.3f}")
        ratio = res["top-2"]["gflops"] / full
        print(f"top-2 / full = {ratio:.3f} (target <= 0.27: {'met' if ratio <= 0.27 else 'NOT met'}); "
              f"top-1 / full = {res['top-1']['gflops'] / full:.3f}")
    footer()


if __name__ == "__main__":
    main()
