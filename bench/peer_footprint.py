"""What one volunteer peer costs: resident memory of the peer process (and its p2pd daemon) and the
latency of one velocity call, for the CPU demo's expert network, over 127.0.0.1.

Starts a bootstrap and one expert peer (one torch thread) as processes, as `swarm up` does, then calls
the expert from a client in this process: batches of 1, 16 and 64 rows with classifier-free guidance
(the CPU demo's top-2 CFG 2 sampling sends batches of this size). Prints the median round trip of
each batch size, the peer's own compute time for it (from the answer's metadata), and the resident
memory (VmRSS) of the peer process and of its p2pd after the calls.

    .venv/bin/python bench/peer_footprint.py [--net unet|dit] [--calls 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import children, rss_mb  # noqa: E402

from diffswarm.client.client import SwarmClient
from diffswarm.client.config import ClientConfig
from diffswarm.client.selection import Replica
from diffswarm.dht.node import NetworkConfig
from diffswarm.swarm.local import local_swarm
from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--net", default="unet", choices=["dit", "unet"])
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--calls", type=int, default=30, help="calls per batch size")
    args = ap.parse_args()
    torch.set_num_threads(1)
    width = args.width or (96 if args.net == "dit" else 16)
    depth = args.depth or 3
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        experts, router = make_toy_swarm(tmp, ToySwarmSpec(["fm"], size=28, num_classes=10, net=args.net, width=width,
                                                           depth=depth, steps=2))
        with local_swarm(experts, router, run_dir=os.path.join(tmp, "swarm"), threads=1) as sw:
            info = sw.info("peer0")
            pid = next(p.pid for p in sw.procs if p.name == "peer0")
            rss_start = rss_mb(pid)
            cfg = ClientConfig(swarm=sw.swarm, net=NetworkConfig.loopback(client_mode=True))
            with SwarmClient(sw.initial_peers, cfg) as client:
                client.refresh()
                rec = next(r for r in client.records if r.peer_id == info["peer_id"])
                rep = Replica(rec.peer_id, rec.expert_id, rec.checkpoint_sha256, 0, rec.throughput, 0.0,
                              tuple(rec.addrs))
                print(f"{args.net} {width}x{depth} at 28x28, one torch thread per peer, CFG 2, 127.0.0.1")
                print(f"{'rows':>5s} {'round trip ms':>14s} {'peer compute ms':>16s}")
                for rows in (1, 16, 64):
                    x, t = torch.randn(rows, 1, 28, 28), torch.rand(rows)
                    labels = torch.randint(0, 10, (rows,))
                    rtts, computes = [], []
                    for i in range(args.calls + 3):
                        t0 = time.perf_counter()
                        _, meta = client.run(client.call_velocity(rep, x, t, labels, 2.0, 30.0))
                        if i >= 3:  # warm-up calls are not counted
                            rtts.append(1000 * (time.perf_counter() - t0))
                            computes.append(meta.get("compute_ms", float("nan")))
                    print(f"{rows:5d} {statistics.median(rtts):14.1f} {statistics.median(computes):16.1f}")
            kids = children(pid)
            print(f"peer process RSS: {rss_start:.0f} MB after start, {rss_mb(pid):.0f} MB after the calls; "
                  + ", ".join(f"child {k} (p2pd) {rss_mb(k):.0f} MB" for k in kids))


if __name__ == "__main__":
    main()
