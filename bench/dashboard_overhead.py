"""What the dashboard costs a generation, and how responsive it stays while one runs, in one run.

Starts a bootstrap node and K peer processes on 127.0.0.1 serving toy experts (the CPU demo's
network: DiT 96x3, patch 4, 28x28, 10 classes; weights from 2 training steps, which cost the same to
evaluate as trained ones), then generates the same request (n images, top-2, CFG 1, Euler)

- directly: ``generate`` on a ``SwarmEnsemble`` client (what ``diffswarm generate`` does),
- through the dashboard: a headless ``DashboardApp`` (Textual's ``run_test`` at 120x40) pressing
  ``g``; its wall time is the one the history tab shows (request to finished images, PNG included),

alternating, best of ``--repeats`` each. While the dashboard generates, a probe on the app's event
loop sleeps 20 ms at a time and records how late it wakes: keys and redraws wait that long.
Prints the direct / dashboard time ratio (1.0 = no overhead) and the event-loop lag.

    python bench/dashboard_overhead.py                 # K=4, n=16, 20 steps
    python bench/dashboard_overhead.py --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time

import torch

from diffswarm.client.config import ClientConfig
from diffswarm.dht.node import NetworkConfig
from diffswarm.router.local import generate
from diffswarm.router.routing import RoutingConfig
from diffswarm.swarm.local import local_swarm
from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm
from diffswarm.tui.app import make_app
from diffswarm.tui.model import GenRequest, labels_for


async def dashboard_runs(app, req: GenRequest, repeats: int, direct) -> tuple[list[float], list[float], list[float]]:
    """Generate ``repeats`` times through the app (alternating with ``direct()`` in a thread), probing
    the event loop while the app generates. Returns (dashboard wall times, direct times, lags in s)."""
    walls, directs, lags = [], [], []
    async with app.run_test(size=(120, 40)) as pilot:
        while not any(r.state == "online" for r in app.rows):
            await pilot.pause(0.2)
        for field, value in (("n", req.n), ("steps", req.steps), ("k", req.k), ("guidance", req.guidance),
                             ("seed", req.seed), ("classes", " ".join(map(str, req.classes)))):
            app.query_one(f"#gen-{field}").value = str(value)
        for _ in range(repeats):
            directs.append(await asyncio.to_thread(direct))
            before = len(app.history)
            app.action_generate()  # what g does (pilot.press would wait for the whole generation)
            while len(app.history) == before:
                t0 = time.perf_counter()
                await asyncio.sleep(0.02)
                lags.append(time.perf_counter() - t0 - 0.02)
                if app.generating is None and len(app.history) == before:
                    await pilot.pause(0.05)
                    if len(app.history) == before:
                        raise RuntimeError("the dashboard's generation failed; see its notifications")
            walls.append(app.history[-1].wall_s)
        await pilot.press("q")
    return walls, directs, lags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--n", type=int, default=16, help="images per generation")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    objectives = ["ddpm" if k % 2 == 0 else "fm" for k in range(args.k)]
    req = GenRequest(tuple(range(10)), args.n, args.steps, 2, 1.0, args.seed)
    torch.set_num_threads(1)  # the client's own work is small; the peers need the cores
    with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as tmp:
        experts, router = make_toy_swarm(tmp, ToySwarmSpec(objectives, size=28, num_classes=10, net="dit", width=96,
                                                           depth=3,
                                         steps=2, router_width=256, seed=args.seed))
        with local_swarm(experts, router, run_dir=os.path.join(tmp, "swarm"), threads=1, announce_period=30.0) as sw:
            config = ClientConfig(swarm=sw.swarm, net=NetworkConfig.loopback(client_mode=True), refresh=30.0,
                                  cache_dir=os.path.join(tmp, "cache"))
            with sw.client(RoutingConfig("top-k", req.k), seed=args.seed, config=config) as model:
                labels = labels_for(req, 10)

                def direct() -> float:
                    t0 = time.perf_counter()
                    generate(model, labels, model.image_shape, req.sampling())
                    return time.perf_counter() - t0

                direct()  # warm-up: sessions to every peer
                app = make_app(initial_peers=sw.initial_peers, out_dir=os.path.join(tmp, "png"), config=config,
                               poll_seconds=2.0)
                walls, directs, lags = asyncio.run(dashboard_runs(app, req, args.repeats + 1, direct))
    walls, directs = walls[1:], directs[1:]  # the first dashboard run opens its sessions: a warm-up
    d, w = min(directs), min(walls)
    lags_ms = sorted(1000 * x for x in lags)
    p95 = lags_ms[int(0.95 * (len(lags_ms) - 1))]
    print(f"K={args.k} peers, n={args.n}, {args.steps} Euler steps, top-2; best of {args.repeats}")
    print(f"direct   {d:7.3f} s   (all: {' '.join(f'{x:.3f}' for x in directs)})")
    print(f"dashboard{w:7.3f} s   (all: {' '.join(f'{x:.3f}' for x in walls)})")
    print(f"direct / dashboard: {d / w:.2f}")
    print(f"event-loop lag while generating ({len(lags_ms)} probes of 20 ms): "
          f"median {statistics.median(lags_ms):.1f} ms,"
          f" p95 {p95:.1f} ms, max {lags_ms[-1]:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "direct_s": directs, "dashboard_s": walls, "ratio": d / w,
                       "lag_ms": {"median": statistics.median(lags_ms), "p95": p95, "max": lags_ms[-1]}}, f, indent=2)


if __name__ == "__main__":
    main()
