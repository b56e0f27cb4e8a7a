"""Local vs swarm sampling time on the same experts and seeds, in one run.

Builds K experts (default K=8, the CPU demo's network: DiT 96x3, patch 4, on 28x28, 10 classes; weights
from a few training steps on random data, which costs the same to evaluate as trained ones) and a
router, then times ``generate`` at each batch size

- locally: ``load_local_ensemble`` in this process (best of 1 thread and all threads),
- over the swarm: a bootstrap node + K peer processes on 127.0.0.1 (``local_swarm``), one torch
  thread per peer, and a ``SwarmEnsemble`` client in this process,

with top-2 routing, CFG 2, Euler. Local and swarm runs alternate (the peers sit idle during local
runs), so both see the same background load; each time is the best of ``--repeats``. Prints local
time / swarm time per batch size (>= 1: the swarm is as fast as local) and the largest difference
between the two sets of samples.

    python bench/swarm_vs_local.py                 # K=8, batches 1 16 64
    python bench/swarm_vs_local.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from functools import partial

import torch

from diffswarm.client.config import ClientConfig
from diffswarm.dht.node import NetworkConfig
from diffswarm.router.local import generate, load_local_ensemble
from diffswarm.router.routing import RoutingConfig
from diffswarm.sampling.config import SamplingConfig
from diffswarm.swarm.local import local_swarm
from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--steps", type=int, default=20, help="sampling steps per generation")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--net", choices=["dit", "mlp", "unet"], default="dit")
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timings per setting")
    ap.add_argument("--peer-threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    routing = RoutingConfig("top-k", 2)
    shape = (1, args.size, args.size)
    objectives = ["ddpm" if k % 2 == 0 else "fm" for k in range(args.k)]
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as tmp:
        t0 = time.perf_counter()
        experts, router = make_toy_swarm(tmp, ToySwarmSpec(objectives, size=args.size, num_classes=args.classes,
                                                           net=args.net,
                                         width=args.width, depth=args.depth, steps=2, router_width=256,
                                         seed=args.seed))
        print(f"built K={args.k} experts ({args.net} {args.width}x{args.depth}, {args.size}x{args.size}, "
              f"{' '.join(objectives)}) in {time.perf_counter() - t0:.0f}s; {cores} CPU cores")
        labels = {b: torch.arange(b) % args.classes for b in args.batches}
        local = load_local_ensemble(experts, router, routing, seed=args.seed)
        t0 = time.perf_counter()
        # heartbeats and record refreshes every 30 s: the idle swarm stays out of the local timings
        with local_swarm(experts, router, run_dir=os.path.join(tmp, "swarm"), threads=args.peer_threads,
                         announce_period=30.0) as sw:
            print(f"swarm up: bootstrap + {args.k} peers in {time.perf_counter() - t0:.0f}s")
            config = ClientConfig(swarm=sw.swarm, net=NetworkConfig.loopback(client_mode=True), refresh=30.0,
                                  cache_dir=os.path.join(tmp, "cache"))
            with sw.client(routing, seed=args.seed, config=config) as model:
                # local and swarm runs alternate, so both see the same background load; best of repeats
                local_t, local_x, local_threads, swarm_t, diff = {}, {}, {}, {}, {}
                for b in args.batches:
                    run_local = partial(generate, local, labels[b], shape, args.steps, "euler", 2.0, args.seed)
                    run_swarm = partial(generate, model, labels[b], shape, args.steps, "euler", 2.0, args.seed)
                    for threads in sorted({1, cores}):  # warm-up
                        torch.set_num_threads(threads)
                        generate(local, labels[b], shape, SamplingConfig(steps=2, guidance=2.0, seed=args.seed))
                    torch.set_num_threads(1)
                    generate(model, labels[b], shape, SamplingConfig(steps=2, guidance=2.0, seed=args.seed))
                    for _ in range(args.repeats):
                        for threads in sorted({1, cores}):  # local: best of one thread and all threads
                            torch.set_num_threads(threads)
                            dt, x = timed(run_local, 1)
                            if dt < local_t.get(b, float("inf")):
                                local_t[b], local_x[b], local_threads[b] = dt, x, threads
                        # the swarm client's own work (router, mixing) is small: one thread, so that no
                        # idle OpenMP worker spins on a core the peers need
                        torch.set_num_threads(1)
                        dt, x = timed(run_swarm, 1)
                        swarm_t[b] = min(dt, swarm_t.get(b, float("inf")))
                    diff[b] = float((x - local_x[b]).abs().max())
        torch.set_num_threads(cores)

    print(f"\n{args.steps} Euler steps, top-2 over K={args.k}, CFG 2; best of {args.repeats}")
    print(f"{'batch':>5} {'local s':>9} {'swarm s':>9} {'local/swarm':>12} {'ms/step swarm':>14} {'max |diff|':>11}")
    rows = []
    for b in args.batches:
        ratio = local_t[b] / swarm_t[b]
        rows.append({"batch": b, "local_s": local_t[b], "local_threads": local_threads[b], "swarm_s": swarm_t[b],
                     "ratio": ratio, "max_abs_diff": diff[b]})
        print(f"{b:5d} {local_t[b]:9.3f} {swarm_t[b]:9.3f} {ratio:12.2f} {1000 * swarm_t[b] / args.steps:14.1f} "
              f"{diff[b]:11.2e}   (local best with {local_threads[b]} thread(s))")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cpu_cores": cores, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
