"""Time to a first image: a cold ``diffswarm generate --n 1`` over a running loopback swarm of 4 experts.

Starts a local swarm (bootstrap peer serving the router + 4 expert peers on 127.0.0.1; the experts are the
default UNet 16x3 on 28x28, a couple of training steps on random data, which cost the same to evaluate as
trained ones), then, each in a fresh process:

1. ``python -c pass``: the interpreter's own start;
2. ``python -m diffswarm generate --run-dir RUN --n 1``, the command a user types: its wall time, minus the
   sampling time it prints, is what the user waits beyond sampling (the target: < 5 s on loopback);
3. the same path in stages (this script's ``--stages`` mode, the calls ``run_generate`` and
   ``SwarmEnsemble.connect`` make, in order): process start, imports, planning, daemon start + DHT
   join, manifest + router fetch, expert discovery + first-contact probes, sampling, close.

Then prints the ten slowest imports of the generate path (``python -X importtime``, cumulative).

    python bench/first_image.py [--quick] [--repeats 3]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what `diffswarm generate` over a swarm imports before it connects (diffswarm/cli/__init__.py, dispatch.py,
# client_runs.run_generate)
IMPORTS = ("diffswarm.cli.parser", "diffswarm.cli.dispatch", "diffswarm.client.ensemble", "diffswarm.experts.train",
           "diffswarm.router.local", "diffswarm.utils.images")


def stages(run_dir: str, spawned_at: float) -> None:
    """The generate path in stages, in a fresh process: prints one JSON line of {stage: seconds}."""
    out = {"process start": time.time() - spawned_at}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        out[name] = now - t
        t = now

    import importlib

    for m in IMPORTS:
        importlib.import_module(m)
    lap("imports")
    from diffswarm.cli import dispatch
    from diffswarm.cli.parser import build_parser, given_options
    from diffswarm.client.client import SwarmClient
    from diffswarm.client.ensemble import SwarmEnsemble
    from diffswarm.router.local import generate, make_labels

    argv = ["generate", "--run-dir", run_dir, "--n", "1"]
    parser = build_parser()
    plan = dispatch.plan(parser.parse_args(argv), given_options(parser, "generate", argv))
    lap("planning (swarm.json)")
    client = SwarmClient(list(plan.swarm.initial_peers), plan.swarm.config)
    lap("daemon start + DHT join")
    try:
        router, rec = client.fetch_router("cpu")
        lap("manifest + router fetch")
        ens = SwarmEnsemble(client, router, plan.routing, seed=plan.sampling.seed, swarm_record=rec)
        uncovered = ens.wait_for_experts()
        client.start_refresh()
        lap("expert discovery + first-contact probes")
        labels = make_labels(1, None, ens.num_classes)
        generate(ens, labels, ens.image_shape, plan.sampling, "cpu")
        lap("sampling")
    finally:
        client.close()
    lap("close")
    out["uncovered"] = uncovered
    print("STAGES " + json.dumps(out), flush=True)


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _wall(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return dt, proc.stdout + proc.stderr


def _sampling_s(out: str) -> float:
    """The sampling time `diffswarm generate` prints ("generated 1 images over the swarm in 0.4s")."""
    for line in out.splitlines():
        if line.startswith("generated ") and " in " in line:
            return float(line.split(" in ")[1].split("s")[0])
    raise SystemExit(f"no 'generated ... in Ns' line in:\n{out[-2000:]}")


def _slowest_imports(n: int = 10) -> list[tuple[float, str]]:
    code = "; ".join(f"import {m}" for m in IMPORTS)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=_env(), capture_output=True,
                          text=True, timeout=600)
    rows = []
    for line in proc.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]) / 1e6, parts[2].rstrip()))
    return sorted(rows, reverse=True)[:n]


def main() -> None:
    import argparse
    import statistics
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one cold run of each kind")
    ap.add_argument("--repeats", type=int, default=None, help="cold runs of each kind (default 3; quick 1)")
    ap.add_argument("--stages", default=None, help=argparse.SUPPRESS)  # RUN_DIR: the staged run (internal)
    ap.add_argument("--spawned-at", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stages:
        return stages(args.stages, args.spawned_at)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from benchlib import footer, header, tiny

    from diffswarm.swarm.local import local_swarm
    from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm

    repeats = args.repeats if args.repeats is not None else 0 if tiny() else 1 if args.quick else 3
    header("time to first image: cold `diffswarm generate --n 1` over a loopback swarm of 4 UNet experts")
    with tempfile.TemporaryDirectory(prefix="first-image-") as tmp:
        experts, router = make_toy_swarm(tmp, ToySwarmSpec(["ddpm", "fm", "ddpm", "fm"], size=28, num_classes=10,
                                                           net="unet", width=16, depth=3, steps=2, router_width=256))
        run_dir = os.path.join(tmp, "swarm")
        t0 = time.perf_counter()
        with local_swarm(experts, router, run_dir=run_dir, announce_period=30.0):
            print(f"swarm up (bootstrap + 4 peers) in {time.perf_counter() - t0:.1f}s", flush=True)
            env_cache = os.path.join(tmp, "cache")
            os.environ["DIFFSWARM_CACHE"] = env_cache  # the first run fills the router cache, as a user's would
            starts, totals, samplings, staged = [], [], [], []
            for i in range(repeats + 1):  # the first run fills the cache (the router file): reported apart
                starts.append(_wall([sys.executable, "-c", "pass"])[0])
                total, out = _wall([sys.executable, "-m", "diffswarm", "generate", "--run-dir", run_dir, "--n", "1",
                                    "--output", os.path.join(tmp, f"first{i}.png")])
                totals.append(total)
                samplings.append(_sampling_s(out))
                _, out = _wall([sys.executable, os.path.abspath(__file__), "--stages", run_dir,
                                "--spawned-at", repr(time.time())])
                staged.append(json.loads(next(ln for ln in out.splitlines()
                                              if ln.startswith("STAGES ")).removeprefix("STAGES ")))
    beyond = [t - s for t, s in zip(totals, samplings, strict=True)]
    c = slice(1, None) if repeats else slice(0, 1)  # the cached runs (none: the empty-cache run)
    print(f"\ncold runs: 1 with an empty router cache, then {repeats} with it filled (median of those)")
    print(f"  python -c pass:                      {statistics.median(starts[c]):6.2f} s")
    print(f"  diffswarm generate --n 1, wall:      {statistics.median(totals[c]):6.2f} s (empty cache: "
          f"{totals[0]:.2f} s)")
    print(f"    of which sampling (as printed):    {statistics.median(samplings[c]):6.2f} s")
    print(f"    beyond sampling:                   {statistics.median(beyond[c]):6.2f} s (target < 5 s; empty "
          f"cache: {beyond[0]:.2f} s)")
    print("\nthe same path in stages (median of the cached runs, seconds):")
    for k in staged[0]:
        if k != "uncovered":
            print(f"  {k:42s} {statistics.median(s[k] for s in staged[c]):6.2f}")
    print(f"  (uncovered clusters at the start of sampling: {staged[-1]['uncovered']})")
    print("\nslowest imports of the generate path (cumulative s, python -X importtime):")
    for s, name in _slowest_imports():
        print(f"  {s:6.2f} {name}")
    footer()


if __name__ == "__main__":
    main()
