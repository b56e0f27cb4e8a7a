"""What it costs K peers to share one core, the way ``bench/swarm_vs_local.py --split-cores`` runs them.

On one machine the swarm benchmark puts the bootstrap and all K peers on half of the CPUs (one core of a 2-core
machine), so K processes take turns on one core where a real swarm has K machines. This bench times the very
forward passes a step at batch ``--batch`` asks of the K experts (top-2 of K: each expert gets ``2 * batch / K``
rows, CFG doubling them inside the expert), on one pinned CPU:

- ``at once``: K processes (one torch thread each), started together behind a barrier, each doing ``--passes``
  passes of its expert: what the peers do in the swarm benchmark;
- ``one after another``: the same K processes, one at a time: what the local run does (one expert after the
  other, each with the core and its caches to itself).

It prints the wall time of both and the sum of the processes' CPU time (``time.process_time``), and the ratios
at once / one after another: the part of the swarm's "peer compute" that is the emulation (K processes
time-sharing a core: switches, caches) and that peers on their own machines do not pay. Weights are random (a
forward pass costs the same as a trained expert's).

    python bench/colocated_peers.py                 # UNet 16x3, K=8, batch 64 (16 rows per expert), 10 passes
    python bench/colocated_peers.py --quick         # 3 passes
    python bench/colocated_peers.py --net dit --batch 16
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import NET_SIZES, footer, header, random_expert, tiny  # noqa: E402


def worker(net: str, k: int, cluster: int, rows: int, passes: int, cpu: int, barrier, out) -> None:
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    expert = random_expert(net, k, cluster, 0)
    gen = torch.Generator().manual_seed(cluster)
    x, t = torch.randn(rows, 1, 28, 28, generator=gen), torch.rand(rows, generator=gen).clamp_min(0.05)
    labels = torch.arange(rows) % 10
    expert.velocity(x, t, labels, 2.0)  # warm up (allocator, oneDNN primitives)
    barrier.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(passes):
        expert.velocity(x, t, labels, 2.0)
    out.put((cluster, time.perf_counter() - t0, time.process_time() - c0))


def run(args, together: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds summed over the processes) of every expert's passes, at once or in turn."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    groups = [list(range(args.k))] if together else [[c] for c in range(args.k)]
    wall, cpu = 0.0, 0.0
    for group in groups:
        barrier = ctx.Barrier(len(group))
        procs = [ctx.Process(target=worker, args=(args.net, args.k, c, args.rows, args.passes, args.cpu, barrier, out))
                 for c in group]
        for p in procs:
            p.start()
        res = [out.get(timeout=600) for _ in procs]
        for p in procs:
            p.join()
        wall += max(r[1] for r in res)  # at once: the last to finish; in turn: one after another
        cpu += sum(r[2] for r in res)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 passes per expert")
    ap.add_argument("--net", choices=list(NET_SIZES), default="unet")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64, help="the sampler's batch; each expert gets 2 * batch / K rows")
    ap.add_argument("--passes", type=int, default=10)
    ap.add_argument("--cpu", type=int, default=None, help="the CPU to pin to (default: the last one this may use)")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many timings of each order")
    args = ap.parse_args()
    if args.quick:
        args.passes, args.repeats = 3, 1
        if tiny():
            args.net, args.k, args.batch, args.passes = "mlp", 2, 4, 2
    if args.cpu is None:
        args.cpu = max(os.sched_getaffinity(0))
    args.rows = max(1, 2 * args.batch // args.k)  # each expert's share of a top-2 step
    header(f"{args.k} peers sharing one core: {args.net} {NET_SIZES[args.net]}, {args.rows} "
           f"rows per expert (batch {args.batch}, top-2 of K={args.k}), {args.passes} passes each, CPU {args.cpu}")
    best = {}
    for _ in range(args.repeats):  # alternate, so both orders see the same background load
        for together in (True, False):
            wall, cpu = run(args, together)
            prev = best.get(together)
            best[together] = (wall, cpu) if prev is None or wall < prev[0] else prev
    (w1, c1), (w0, c0) = best[True], best[False]
    print(f"at once:           wall {w1:7.2f} s, CPU {c1:7.2f} s")
    print(f"one after another: wall {w0:7.2f} s, CPU {c0:7.2f} s")
    print(f"at once / one after another: wall {w1 / w0:.2f}x, CPU {c1 / c0:.2f}x (best of {args.repeats}; > 1: what "
          f"sharing one core costs the {args.k} peers of the swarm benchmark)")
    footer()


if __name__ == "__main__":
    main()
