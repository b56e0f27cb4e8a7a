"""What one training step of each candidate recipe costs on this CPU, natively and with AVX-512 switched off.

The demo chooses its recipe by timing the candidates at start (``diffswarm.training.recipes``) because a
step's cost differs by machine kind: on a 2-core AVX2-only AMD EPYC the UNet 16x3 step took 942 ms (one
thread, batch 96) and the DiT 96x3 348 ms, against 282 and 157 ms where the recipe table was measured
(issue 21). This bench times each candidate in a fresh subprocess per CPU kind:

- ``native``: torch and oneDNN use what this CPU has;
- ``avx2``: ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` (torch's kernels and oneDNN's
  convolutions without AVX-512, what an AVX2-only machine runs);

and prints each recipe's step time per kind, the avx2/native ratio, and the UNet/DiT ratio per kind
against the EPYC's. Without ``--quick`` it also measures what might make the step cheaper: channels-last
memory format, 2 threads in one process, and 6 single-thread processes on the cores (the demo's 4 experts
+ router + classifier) against as many processes as cores.

    python bench/cpu_kinds.py [--quick] [--steps N]

Step times are CPU seconds of the process (``time.process_time``; one thread), the median of N steps
after 2 untimed ones, so the load of a shared machine inflates them less than wall time would.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import footer, header, tiny

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
# the figures of issue 21: (UNet 16x3, DiT 96x3) ms per step, one thread, batch 96
EPYC_AVX2 = (942.0, 348.0)
TABLE_MACHINE = (282.0, 157.0)


def _step_ms(recipe_name: str, steps: int, channels_last: bool = False, threads: int = 1) -> float:
    """Median CPU ms (process time) of one training step of a recipe, after 2 untimed steps."""
    import torch

    from diffswarm.experts.config import ExpertConfig
    from diffswarm.experts.expert import Expert
    from diffswarm.experts.networks import NetConfig, default_patch
    from diffswarm.experts.objectives import expert_loss
    from diffswarm.training.recipes import RECIPES

    torch.set_num_threads(threads)
    r = RECIPES[recipe_name]
    net = NetConfig.for_kind(r.net, channels=1, size=28, num_classes=10, width=r.width, depth=r.depth,
                             patch=default_patch(28))
    g = torch.Generator().manual_seed(0)
    e = Expert(ExpertConfig(objective="fm", net=net))
    if channels_last:
        e.net = e.net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(e.net.parameters(), lr=1e-4)
    x, labels = torch.randn(r.batch, 1, 28, 28, generator=g), torch.randint(0, 10, (r.batch,), generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(steps + 2):
        t0 = time.process_time()
        loss, _ = expert_loss(e, x, labels, g)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()
        if i >= 2:  # process time of all threads: divide by the threads for the wall time of a quiet machine
            times.append((time.process_time() - t0) / threads)
    return 1000 * statistics.median(times)


def worker(args) -> None:
    """In the subprocess of one CPU kind: time every recipe (and variants); print one JSON line."""
    import torch

    out = {"capability": torch.backends.cpu.get_cpu_capability(), "steps": {}, "variants": {}}
    for name in args.recipes.split(","):
        out["steps"][name] = _step_ms(name, args.steps)
    if args.variants:
        out["variants"]["unet16x3-b96 channels-last"] = _step_ms("unet16x3-b96", args.steps, channels_last=True)
        out["variants"]["unet16x3-b96 2 threads"] = _step_ms("unet16x3-b96", args.steps, threads=2)
    print("RESULT " + json.dumps(out), flush=True)


def _run_kind(kind: str, args, extra: list[str]) -> dict:
    env = dict(os.environ, **KINDS[kind], PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--worker", "--recipes", args.recipes, "--steps", str(args.steps), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{kind} worker failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def _processes(kind: str, n: int, args) -> float:
    """Training steps per second of ``n`` single-thread processes stepping the UNet at once, all of them together
    (wall clock: what the cores deliver when oversubscribed)."""
    env = dict(os.environ, **KINDS[kind], PYTHONPATH=str(ROOT))
    here = str(Path(__file__).parent)
    code = (f"import sys,time; sys.path.insert(0, {here!r}); import cpu_kinds as c; t=time.perf_counter(); "
            f"c._step_ms('unet16x3-b96', {args.steps}); print('WALL', time.perf_counter() - t)")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(n)]
    walls = []
    for p in procs:
        out, _ = p.communicate(timeout=1800)
        walls.extend(float(ln.split()[1]) for ln in out.splitlines() if ln.startswith("WALL"))
    if len(walls) != n:
        raise SystemExit(f"{n - len(walls)} of {n} processes failed")
    return n * (args.steps + 2) / max(walls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the demo's UNet and DiT only, few steps, no variants")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per recipe (default 8; quick 3)")
    ap.add_argument("--recipes", default=None, help="comma-separated names of diffswarm.training.recipes.RECIPES")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variants", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    from diffswarm.training.recipes import RECIPES

    args.steps = args.steps or (1 if tiny() else 3 if args.quick else 8)
    args.recipes = args.recipes or ("unet16x3-b96,dit96x3-b96" if args.quick else ",".join(RECIPES))
    header("one training step per recipe and CPU kind (CPU ms of one thread, median of "
           f"{args.steps} steps)")
    res = {k: _run_kind(k, args, [] if args.quick else ["--variants"]) for k in KINDS}
    print(f"\n{'recipe':28s} " + " ".join(f"{k + ' (' + res[k]['capability'] + ')':>18s}" for k in KINDS)
          + f" {'avx2/native':>12s}")
    rows = {**{n: n for n in res["native"]["steps"]}, **{n: n for n in res["native"]["variants"]}}
    for name in rows:
        ms = [res[k]["steps"].get(name, res[k]["variants"].get(name)) for k in KINDS]
        print(f"{name:28s} " + " ".join(f"{m:18.0f}" for m in ms) + f" {ms[1] / ms[0]:12.2f}")
    print("\nUNet 16x3 / DiT 96x3 step ratio (what decides between them):")
    for k in KINDS:
        s = res[k]["steps"]
        print(f"  {k:8s} {s['unet16x3-b96'] / s['dit96x3-b96']:.2f}")
    print(f"  EPYC AVX2-only (issue 21) {EPYC_AVX2[0] / EPYC_AVX2[1]:.2f}; recipe-table machine "
          f"{TABLE_MACHINE[0] / TABLE_MACHINE[1]:.2f}")
    print(f"  slowdown EPYC/table machine: UNet {EPYC_AVX2[0] / TABLE_MACHINE[0]:.2f}x, DiT "
          f"{EPYC_AVX2[1] / TABLE_MACHINE[1]:.2f}x; here avx2/native: UNet "
          f"{res['avx2']['steps']['unet16x3-b96'] / res['native']['steps']['unet16x3-b96']:.2f}x, DiT "
          f"{res['avx2']['steps']['dit96x3-b96'] / res['native']['steps']['dit96x3-b96']:.2f}x")
    if not args.quick:
        cores = os.cpu_count() or 1
        print("\nUNet 16x3 steps per second of all processes together (wall clock), native:")
        base = None
        for n in sorted({cores, 6}):
            rate = _processes("native", n, args)
            base = base or rate
            print(f"  {n} single-thread processes on {cores} cores: {rate:.2f} steps/s ({rate / base:.2f}x)")
    footer()


if __name__ == "__main__":
    main()
