"""What the channels-last layout buys a loaded UNet expert answering on the CPU: NCHW vs channels-last, one run.

``Expert.from_checkpoint`` on the CPU puts a UNet's weights in the channels-last layout and its forward pass feeds
oneDNN NHWC inputs (``UNetDenoiser.inference_layout``); a training run keeps NCHW. This bench times the answering
path a peer and the client's own copies run, ``Expert.velocity`` with CFG 2 (two network rows per row asked), at
``--rows`` rows per call, for one expert of the CPU demo's network (UNet 16x3, 28x28, random weights: a forward
pass costs what a trained expert's costs), both layouts alternating in one process, one torch thread, best of
``--repeats``. With ``--avx2`` (the default where this CPU has more than AVX2) the same runs again in a child
process limited to AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``),
the kernels of an AVX2-only CPU. It prints per-call times, NCHW / channels-last (> 1: channels-last faster) and the
largest difference between the layouts' answers (their rounding differs; ``bench/check_precision.py`` holds it to
the cross-check's tolerance with trained experts).

    python bench/inference_layout.py                  # rows 1 4 8 16, native and AVX2 kernels
    python bench/inference_layout.py --quick          # rows 1 8, fewer calls
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import NET_SIZES, beyond_avx2, footer, header, random_expert, tiny, with_avx2_kernels  # noqa: E402

NET = "unet"
WORKER_FLAG = "--layout-worker"


def measure(rows: list[int], calls: int | None, repeats: int) -> dict:
    """{rows: [NCHW s per call, channels-last s per call, largest |difference|]} at one torch thread; ``calls``
    per timing (None: about 64 rows' worth)."""
    torch.set_num_threads(1)
    cl = random_expert(NET, 1, 0, 0)  # DDPM, channels-last as loaded
    nchw = copy.deepcopy(cl)
    nchw.net.inference_layout(channels_last=False)
    out = {}
    g = torch.Generator().manual_seed(1)
    for b in rows:
        n = calls or max(2, 64 // b)
        x, t = torch.randn(b, 1, 28, 28, generator=g), torch.rand(b, generator=g).clamp(0.02, 1.0)
        labels = torch.arange(b) % 10
        best = [float("inf"), float("inf")]
        with torch.inference_mode():
            diff = float((nchw.velocity(x, t, labels, 2.0) - cl.velocity(x, t, labels, 2.0)).abs().max())
            for _ in range(repeats):  # alternate, so both layouts see the same background load
                for i, e in enumerate((nchw, cl)):
                    e.velocity(x, t, labels, 2.0)  # warm (oneDNN primitives for this shape)
                    t0 = time.perf_counter()
                    for _ in range(n):
                        e.velocity(x, t, labels, 2.0)
                    best[i] = min(best[i], (time.perf_counter() - t0) / n)
        out[b] = [best[0], best[1], diff]
    return out


def worker() -> None:
    rows, calls, repeats = json.loads(sys.argv[sys.argv.index(WORKER_FLAG) + 1])
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "res": measure(rows, calls, repeats)}))


def report(title: str, capability: str, res: dict) -> None:
    print(f"\n{title} (torch capability {capability}), one thread, Expert.velocity with CFG 2:")
    print(f"{'rows':>5} | {'NCHW ms':>8} | {'chan-last ms':>12} | {'NCHW / chan-last':>16} | {'max |diff|':>10}")
    for b, (a, c, d) in res.items():
        print(f"{b:>5} | {a * 1e3:8.2f} | {c * 1e3:12.2f} | {a / c:15.2f}x | {d:10.1e}")


def main() -> None:
    if WORKER_FLAG in sys.argv:
        return worker()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16], help="rows per call (x2 network rows)")
    ap.add_argument("--calls", type=int, default=None, help="calls per timing (default: ~64 rows' worth)")
    ap.add_argument("--repeats", type=int, default=5, help="best of this many timings per layout")
    ap.add_argument("--no-avx2", action="store_true", help="skip the run limited to AVX2 kernels")
    ap.add_argument("--quick", action="store_true", help="rows 1 and 8, best of 2")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.repeats = [1, 8], 2
        if tiny():
            args.rows, args.repeats, args.calls = [2], 1, 2
    header(f"inference layout: UNet {'x'.join(map(str, NET_SIZES[NET]))}, NCHW vs channels-last, rows {args.rows}")
    report("native kernels", torch.backends.cpu.get_cpu_capability(), measure(args.rows, args.calls, args.repeats))
    if not args.no_avx2 and beyond_avx2():
        job = json.dumps([args.rows, args.calls, args.repeats])
        got = json.loads(with_avx2_kernels(os.path.abspath(__file__), WORKER_FLAG, job))
        report("AVX2 kernels (a child process limited to AVX2 kernels)", got["capability"],
               {int(k): v for k, v in got["res"].items()})
    footer()


if __name__ == "__main__":
    main()
