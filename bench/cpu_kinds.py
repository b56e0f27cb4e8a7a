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

``--emulate`` (root, cgroups) calibrates the slow-machine emulation of ``bench/slowcpu.py``: the AVX2
switches do not slow this host's UNet step anywhere near the EPYC's 3.34x, so a CPU quota does the rest.
It times one single-thread process per core stepping at once (wall clock, every core busy, as in the
demo's training; all in a cgroup with high ``cpu.shares`` so that other work on a shared machine takes
little), natively and with the AVX2 switches, sets the quota to ``cores x (AVX2 CPU-time factor) /
--target``, and prints the UNet and DiT ratios it achieves: measured (wall) and for a quiet machine.

    python bench/cpu_kinds.py [--quick] [--steps N]
    python bench/cpu_kinds.py --emulate [--target 3.34 | --cpus C]   (root: calibrate bench/slowcpu.py)

Step times are CPU seconds of the process (``time.process_time``; one thread), the median of N steps
after 2 untimed ones, so the load of a shared machine inflates them less than wall time would.
"""

from __future__ import annotations

import argparse
import contextlib
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
    return _step_times(recipe_name, steps, channels_last, threads)[0]


def _step_times(recipe_name: str, steps: int, channels_last: bool = False, threads: int = 1,
                start_at: float | None = None) -> tuple[float, float]:
    """(median CPU ms, median wall ms) of one training step of a recipe, after 2 untimed steps; with
    ``start_at`` (time.time()) the timed steps start then, so that processes started together step together."""
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
    times, walls = [], []
    for i in range(steps + 2):
        if i == 2 and start_at is not None:
            time.sleep(max(0.0, start_at - time.time()))
        t0, w0 = time.process_time(), time.perf_counter()
        loss, _ = expert_loss(e, x, labels, g)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()
        if i >= 2:  # process time of all threads: divide by the threads for the wall time of a quiet machine
            times.append((time.process_time() - t0) / threads)
            walls.append(time.perf_counter() - w0)
    return 1000 * statistics.median(times), 1000 * statistics.median(walls)


def worker(args) -> None:
    """In the subprocess of one CPU kind: time every recipe (and variants); print one JSON line."""
    import torch

    out = {"capability": torch.backends.cpu.get_cpu_capability(), "steps": {}, "variants": {}, "wall": {}}
    for i, name in enumerate(args.recipes.split(",")):
        start = args.start_at if args.start_at and i == 0 else None  # the processes start stepping together
        out["steps"][name], out["wall"][name] = _step_times(name, args.steps, start_at=start)
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


def _loaded(kind: str, args, cpus: float | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """(median wall ms, median CPU ms) per training step of each recipe with one single-thread process per core
    stepping at once (what the demo's training sees: every core busy), all in one cgroup of ``args.shares``
    cpu.shares; ``cpus``: a quota of that many CPUs on it."""
    import slowcpu

    cores = os.cpu_count() or 1
    env = dict(os.environ, **KINDS[kind], PYTHONPATH=str(ROOT))
    with contextlib.ExitStack() as stack:
        # a cgroup for every kind, native too: its cpu.shares keep other work on a shared machine from taking the cores
        pre = slowcpu.prefix(stack.enter_context(slowcpu.quota_cgroup(cpus, shares=args.shares)))
        start = time.time() + 20  # after every process's imports and set-up
        cmd = [*pre, sys.executable, __file__, "--worker", "--recipes", args.recipes, "--steps", str(args.steps),
               "--start-at", str(start)]
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(cores)]
        outs = [p.communicate(timeout=1800) for p in procs]
    res, cpu = [], []
    for p, (out, err) in zip(procs, outs, strict=True):
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            raise SystemExit(f"{kind} worker failed (exit {p.returncode}):\n{out[-2000:]}{err[-2000:]}")
        rec = json.loads(lines[-1].removeprefix("RESULT "))
        res.append(rec["wall"]), cpu.append(rec["steps"])
    med = lambda rs: {name: statistics.median(r[name] for r in rs) for name in rs[0]}  # noqa: E731
    return med(res), med(cpu)


def emulate(args) -> None:
    """Calibrate the slow-machine emulation (AVX2 switches + a CPU quota, bench/slowcpu.py): the quota that
    makes the loaded UNet step ``--target`` times slower than native, and the UNet and DiT ratios it achieves."""
    import slowcpu

    why = slowcpu.reason_unavailable()
    if why:
        print(f"no emulation here: {why}")
        return
    cores = os.cpu_count() or 1
    header(f"slow-machine emulation: {cores} single-thread processes stepping at once, median wall ms per step")
    native, native_cpu = _loaded("native", args)
    slow, slow_cpu = _loaded("avx2", args, args.cpus)  # calibration: the switches alone (a full quota)
    factor = slow_cpu["unet16x3-b96"] / native_cpu["unet16x3-b96"]  # CPU time: what load inflates least
    print(f"AVX2 switches alone (CPU time per step): UNet x{factor:.2f}, "
          f"DiT x{slow_cpu['dit96x3-b96'] / native_cpu['dit96x3-b96']:.2f}")
    cpus = args.cpus or round(cores * factor / args.target, 2)
    if not args.cpus:
        print(f"quota {cpus:g} CPUs for UNet x{args.target:g} on a quiet machine ({cores} x {factor:.2f} / "
              f"{args.target:g})")
        slow, slow_cpu = _loaded("avx2", args, cpus)
    print(f"\n{'recipe':16s} {'native ms':>10s} {'emulated ms':>12s} {'wall ratio':>11s} {'quiet ratio':>12s}  "
          "(EPYC AVX2-only / table machine)")
    epyc = {"unet16x3-b96": EPYC_AVX2[0] / TABLE_MACHINE[0], "dit96x3-b96": EPYC_AVX2[1] / TABLE_MACHINE[1]}
    for name in native:  # quiet ratio: CPU-time slowdown x the quota's share of the cores (load shrinks the wall one)
        ref = f"  ({epyc[name]:.2f})" if name in epyc else ""
        quiet = slow_cpu[name] / native_cpu[name] * max(1.0, cores / cpus)
        print(f"{name:16s} {native[name]:10.0f} {slow[name]:12.0f} {slow[name] / native[name]:11.2f} "
              f"{quiet:12.2f}{ref}")
    # the quota is relative to this host as it runs now; a loaded host is already slower than a quiet one
    absolute = cores * native["unet16x3-b96"] * factor / EPYC_AVX2[0]
    print(f"\nfor the EPYC's own UNet step ({EPYC_AVX2[0]:.0f} ms) from this host's loaded native step now "
          f"({native['unet16x3-b96']:.0f} ms wall): quota {absolute:.2f} CPUs"
          + (" (more than the cores: this host is that slow already)" if absolute >= cores else ""))
    env = " ".join(f"{k}={v}" for k, v in slowcpu.AVX2_ENV.items())
    print(f"\nemulation: {env} in a cgroup of {cpus:g} CPUs (cfs_quota_us {int(cpus * slowcpu.PERIOD_US)} / "
          f"cfs_period_us {slowcpu.PERIOD_US}); run a command on it:\n"
          f"  python bench/slowcpu.py --cpus {cpus:g} -- CMD...")
    footer()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the demo's UNet and DiT only, few steps, no variants")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per recipe (default 8; quick 3)")
    ap.add_argument("--recipes", default=None, help="comma-separated names of diffswarm.training.recipes.RECIPES")
    ap.add_argument("--emulate", action="store_true",
                    help="calibrate the slow-machine emulation (AVX2 switches + CPU quota; needs root and cgroups)")
    ap.add_argument("--target", type=float, default=round(EPYC_AVX2[0] / TABLE_MACHINE[0], 2),
                    help="--emulate: UNet slowdown to calibrate the quota for (default: the EPYC's)")
    ap.add_argument("--cpus", type=float, default=None, help="--emulate: use this quota instead of calibrating")
    ap.add_argument("--shares", type=int, default=16384,
                    help="--emulate: cpu.shares of the measured processes' cgroup (a nice-0 process: 1024)")
    ap.add_argument("--start-at", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variants", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    from diffswarm.training.recipes import RECIPES

    args.steps = args.steps or (1 if tiny() else 3 if args.quick else 8)
    args.recipes = args.recipes or ("unet16x3-b96,dit96x3-b96" if args.quick or args.emulate else ",".join(RECIPES))
    if args.emulate:
        return emulate(args)
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
