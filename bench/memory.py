"""Resident memory of a serving peer (and its p2pd) and of a client: idle, under 16 concurrent clients, and over
many images generated in a row.

Starts a bootstrap and one peer serving the default expert (UNet 16x3 at 28x28, one torch thread) on 127.0.0.1,
then ``--clients`` client processes (each a ``SwarmClient`` with its own p2pd, as in
``bench/serving_throughput.py``) that call the peer back to back for ``--seconds`` while this process samples the
peer's RSS every 100 ms. Then a ``SwarmEnsemble`` client in this process generates ``--images`` images one after
another (Euler ``--steps`` steps, CFG 2), its RSS read every tenth of the run: a client that stays flat shows no
growth per 100 images over the second half.

    python bench/memory.py                 # 16 clients for 10 s, 1,000 images
    python bench/memory.py --quick         # 8 clients for 3 s, 40 images
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import children, footer, header, rss_mb, swarm_net, tiny  # noqa: E402
from serving_throughput import Clients, start_peers  # noqa: E402


def with_daemon(pid: int) -> tuple[float, float]:
    """(RSS of ``pid``, RSS of its children: the p2pd daemon) in MB."""
    return rss_mb(pid), sum(rss_mb(c) for c in children(pid))


def under_load(clients: Clients, n: int, peer: dict, pid: int, seconds: float) -> tuple[float, float]:
    """Peak RSS of the peer and of its p2pd while ``n`` clients call it for ``seconds``."""
    peak = [0.0, 0.0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            own, daemon = with_daemon(pid)
            peak[0], peak[1] = max(peak[0], own), max(peak[1], daemon)
            stop.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        clients.run(n, peer, seconds, rows=1)
    finally:
        stop.set()
        th.join()
    return peak[0], peak[1]


def many_images(sw, images: int, steps: int) -> list[tuple[int, float]]:
    """[(images done, RSS of this process MB)] while a client generates ``images`` images one at a time."""
    import torch

    from diffswarm.router.local import generate
    from diffswarm.router.routing import RoutingConfig
    from diffswarm.sampling.config import SamplingConfig

    torch.set_num_threads(1)
    marks = []
    with sw.client(RoutingConfig("top-k", 1)) as model:
        every = max(1, images // 10)
        for i in range(images):
            generate(model, torch.tensor([i % 10]), (1, 28, 28), SamplingConfig(steps=steps, sampler="euler", seed=i))
            if i == 0 or (i + 1) % every == 0:
                marks.append((i + 1, rss_mb(os.getpid())))
    return marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 clients for 3 s, 40 images")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=2, help="Euler steps per image in the many-images run")
    ap.add_argument("--net", choices=["unet", "dit"], default="unet")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.seconds, args.images = (2, 1.0, 10) if tiny() else (8, 3.0, 40)
        args.net = swarm_net(args.net)
    header(f"memory: peer idle and under {args.clients} clients; a client over {args.images} images")
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        sw, name = start_peers(tmp, args.net, batched_only=True)
        try:
            peer = sw.info("batched")
            pid = peer["pid"]
            idle = with_daemon(pid)
            with Clients(args.clients, sw.initial_peers) as clients:
                client_idle = [with_daemon(p.pid) for p in clients.procs]
                busy = under_load(clients, args.clients, peer, pid, args.seconds)
                client_busy = [with_daemon(p.pid) for p in clients.procs]
            hwm = rss_mb(pid, "VmHWM")
            marks = many_images(sw, args.images, args.steps)
        finally:
            sw.stop()
    print(f"\n{name} peer, one torch thread, 127.0.0.1 (MB, resident)")
    print(f"{'':28} {'process':>8} {'p2pd':>6} {'total':>6}")
    print(f"{'peer idle':28} {idle[0]:8.0f} {idle[1]:6.0f} {sum(idle):6.0f}")
    print(f"{f'peer under {args.clients} clients (peak)':28} {busy[0]:8.0f} {busy[1]:6.0f} {sum(busy):6.0f}   "
          f"(process VmHWM {hwm:.0f})")
    ci = [sum(c) for c in client_idle]
    cb = [sum(c) for c in client_busy]
    print(f"{'client idle (mean of all)':28} {sum(c[0] for c in client_idle) / len(ci):8.0f} "
          f"{sum(c[1] for c in client_idle) / len(ci):6.0f} {sum(ci) / len(ci):6.0f}")
    print(f"{'client after its calls':28} {sum(c[0] for c in client_busy) / len(cb):8.0f} "
          f"{sum(c[1] for c in client_busy) / len(cb):6.0f} {sum(cb) / len(cb):6.0f}")
    print(f"\nsampling client (this process; {args.steps} Euler steps per image, top-1, CFG 2), RSS MB by images done:")
    print("  " + ", ".join(f"{n}: {m:.0f}" for n, m in marks))
    half = [m for m in marks if m[0] >= marks[-1][0] // 2]
    if len(half) >= 2 and half[-1][0] > half[0][0]:
        growth = (half[-1][1] - half[0][1]) / (half[-1][0] - half[0][0]) * 100
        print(f"  growth over the second half: {growth:+.2f} MB per 100 images (flat: |growth| < 1)")
    footer()


if __name__ == "__main__":
    main()
