"""Time to a first image: a cold ``diffswarm generate --n 1`` over a running loopback swarm of 4 experts.

Starts a local swarm (bootstrap peer serving the router + 4 expert peers on 127.0.0.1; the experts are the
default UNet 16x3 on 28x28, a couple of training steps on random data, which cost the same to evaluate as
trained ones), then, each in a fresh process:

1. ``python -c pass``: the interpreter's own start;
2. ``python -m diffswarm generate --run-dir RUN --n 1``, the command a user types: its wall time, minus the
   sampling time it prints, is what the user waits beyond sampling (the target: < 5 s on loopback). Its output
   lines are time-stamped as they arrive, which splits the wall time into: start + imports + planning (to the
   "joining swarm" log line), connecting (daemon, DHT join, manifest, router, discovery, probes: to the
   "experts:" line), sampling + saving the image (to the "generated" line, which prints the sampling time),
   and closing + exit (from that line to the process's end: stopping the client's daemon, interpreter exit);
3. the same path in stages (this script's ``--stages`` mode, the calls ``run_generate`` and
   ``SwarmEnsemble.connect`` make, in order): process start, imports, planning, daemon start + DHT join,
   manifest + router fetch, expert discovery + first-contact probes, sampling (its first step, and within
   sampling the client's own copies of experts' weights that the answer checks fetch and build), close, and
   exit (from the last line printed to the process's end: a normal interpreter exit, the teardown that
   ``generate`` itself skips since it ends with ``utils.signals.quick_exit``).

``--baseline TREE`` runs every cold run twice, interleaved, once with ``PYTHONPATH=TREE`` (another checkout,
the code before a change) and once with this one, against the same swarm: before/after in one window. Then
prints the ten slowest imports of the generate command (``python -X importtime``, cumulative).

    python bench/first_image.py [--quick] [--repeats 3] [--baseline /path/to/old/checkout]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what `diffswarm generate` over a swarm imports before it connects, when the tree has no list of its own
# (diffswarm/cli/__init__.py, dispatch.py, client_runs.run_generate)
IMPORTS = ("diffswarm.cli.parser", "diffswarm.cli.dispatch", "diffswarm.client.ensemble", "diffswarm.experts.train",
           "diffswarm.router.local", "diffswarm.utils.images")
CLI_MARKS = (("joining swarm", "start + imports + planning"), ("experts:", "connect (daemon ... probes)"),
             ("generated ", "sampling + saving"), (None, "close + exit"))


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
    local_s = [0.0]
    get = client.local.get

    def timed_get(*a, **kw):  # the client's own copies of experts' weights (fetched and built for the checks)
        t0 = time.perf_counter()
        try:
            return get(*a, **kw)
        finally:
            local_s[0] += time.perf_counter() - t0

    client.local.get = timed_get
    try:
        router, rec = client.fetch_router("cpu")
        lap("manifest + router fetch")
        ens = SwarmEnsemble(client, router, plan.routing, seed=plan.sampling.seed, swarm_record=rec)
        uncovered = ens.wait_for_experts()
        client.start_refresh()
        lap("expert discovery + first-contact probes")
        labels = make_labels(1, None, ens.num_classes)
        t_sample, first = time.perf_counter(), []
        generate(ens, labels, ens.image_shape, plan.sampling, "cpu",
                 callback=lambda info: first or first.append(time.perf_counter() - t_sample))
        lap("sampling")
        out["  of which the first step"] = first[0]
        out["  of which own copies of experts (checks)"] = local_s[0]
    finally:
        client.close()
    lap("close")
    out["uncovered"] = uncovered
    print("STAGES " + json.dumps(out), flush=True)


def _env(tree: str) -> dict:
    return dict(os.environ, PYTHONPATH=tree)


def _timed(cmd: list[str], tree: str) -> tuple[float, list[tuple[float, str]]]:
    """Run ``cmd`` with ``tree`` first on the path: its wall time and its output lines, each with the time it
    arrived (seconds after the start). It runs in ``tree``: ``python -m`` puts its working directory before
    PYTHONPATH."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(tree), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tree)
    lines = [(time.perf_counter() - t0, line) for line in proc.stdout]
    rc = proc.wait(timeout=600)
    dt = time.perf_counter() - t0
    if rc != 0:
        text = "".join(line for _, line in lines)
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}):\n{text[-5000:]}")
    return dt, lines


def _sampling_s(line: str) -> float:
    """The sampling time `diffswarm generate` prints ("generated 1 images over the swarm in 0.4s")."""
    return float(line.split(" in ")[1].split("s")[0])


def cli_run(tree: str, run_dir: str, output: str) -> dict:
    """One cold `diffswarm generate --n 1`: wall, sampling (as printed), and the wall split at its output lines."""
    total, lines = _timed([sys.executable, "-u", "-m", "diffswarm", "generate", "--run-dir", run_dir, "--n", "1",
                           "--output", output], tree)
    out, prev = {"wall": total}, 0.0
    for mark, name in CLI_MARKS:
        at = total if mark is None else next((t for t, ln in lines if mark in ln), None)
        if at is None:
            raise SystemExit(f"no {mark!r} line in:\n{''.join(ln for _, ln in lines)[-3000:]}")
        out[name], prev = at - prev, at
    gen = next(ln for _, ln in lines if ln.startswith("generated "))
    out["sampling (as printed)"] = _sampling_s(gen)
    out["beyond sampling"] = total - out["sampling (as printed)"]
    return out


def staged_run(tree: str, run_dir: str) -> dict:
    total, lines = _timed([sys.executable, os.path.abspath(__file__), "--stages", run_dir,
                           "--spawned-at", repr(time.time())], tree)
    at, line = next((t, ln) for t, ln in lines if ln.startswith("STAGES "))
    out = json.loads(line.removeprefix("STAGES "))
    out["exit (a normal interpreter exit)"] = total - at  # the teardown `generate` skips (quick_exit)
    return out


def _slowest_imports(tree: str, run_dir: str, output: str, n: int = 10) -> list[tuple[float, str]]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "diffswarm", "generate", "--run-dir", run_dir,
                           "--n", "1", "--output", output], env=_env(tree), capture_output=True, text=True,
                          timeout=600, cwd=tree)
    rows = []
    for line in proc.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]) / 1e6, parts[2].rstrip()))
    return sorted(rows, reverse=True)[:n]


def _table(title: str, runs: dict[str, list[dict]], keys, c: slice) -> None:
    """Median per key of the cached runs of each tree, side by side."""
    import statistics

    print(f"\n{title} (median of the cached runs, seconds):")
    print(f"  {'':44s}" + "".join(f"{name:>10s}" for name in runs))
    for k in keys:
        print(f"  {k:44s}" + "".join(f"{statistics.median(r[k] for r in rs[c]):10.2f}" for rs in runs.values()))


def main() -> None:
    import argparse
    import statistics
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one cold run of each kind")
    ap.add_argument("--repeats", type=int, default=None, help="cold runs of each kind (default 3; quick 1)")
    ap.add_argument("--baseline", default=None, help="another checkout (the code before a change): every cold run "
                                                     "also with PYTHONPATH=BASELINE, interleaved, same swarm")
    ap.add_argument("--stages", default=None, help=argparse.SUPPRESS)  # RUN_DIR: the staged run (internal)
    ap.add_argument("--spawned-at", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stages:
        return stages(args.stages, args.spawned_at)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from benchlib import NET_SIZES, footer, header, swarm_net, tiny

    from diffswarm.swarm.local import local_swarm
    from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm

    repeats = args.repeats if args.repeats is not None else 0 if tiny() else 1 if args.quick else 3
    trees = {"this": ROOT} if not args.baseline else {"baseline": os.path.abspath(args.baseline), "this": ROOT}
    net = swarm_net("unet")
    width, depth = NET_SIZES[net]
    header(f"time to first image: cold `diffswarm generate --n 1` over a loopback swarm of 4 {net} {width}x{depth} "
           "experts")
    print("trees: " + ", ".join(f"{k} = {v}" for k, v in trees.items()))
    starts: list[float] = []
    cli: dict[str, list[dict]] = {k: [] for k in trees}
    staged: dict[str, list[dict]] = {k: [] for k in trees}
    with tempfile.TemporaryDirectory(prefix="first-image-") as tmp:
        spec = ToySwarmSpec(["ddpm", "fm", "ddpm", "fm"], size=28, num_classes=10, net=net, width=width, depth=depth,
                            steps=2, router_width=256)
        experts, router = make_toy_swarm(tmp, spec)
        run_dir = os.path.join(tmp, "swarm")
        t0 = time.perf_counter()
        with local_swarm(experts, router, run_dir=run_dir, announce_period=30.0):
            print(f"swarm up (bootstrap + 4 peers) in {time.perf_counter() - t0:.1f}s", flush=True)
            for i in range(repeats + 1):  # the first run of each tree fills its cache (router, experts): apart
                starts.append(_timed([sys.executable, "-c", "pass"], ROOT)[0])
                for name, tree in trees.items():
                    # one cache per tree, filled by its first run, as a user's would be
                    os.environ["DIFFSWARM_CACHE"] = os.path.join(tmp, f"cache-{name}")
                    png = os.path.join(tmp, f"first-{name}{i}.png")
                    cli[name].append(cli_run(tree, run_dir, png))
                    if not os.path.getsize(png):
                        raise SystemExit(f"{png} is empty after the command exited")
                    staged[name].append(staged_run(tree, run_dir))
            slowest = _slowest_imports(ROOT, run_dir, os.path.join(tmp, "imports.png"))
    c = slice(1, None) if repeats else slice(0, 1)  # the cached runs (none: the empty-cache run)
    print(f"\ncold runs: 1 with an empty cache, then {repeats} with it filled (median of those)")
    print(f"  python -c pass: {statistics.median(starts[c]):6.2f} s")
    for name, rs in cli.items():
        beyond = [r["beyond sampling"] for r in rs]
        print(f"  {name}: diffswarm generate --n 1 beyond sampling {statistics.median(beyond[c]):.2f} s (target "
              f"< 5 s; runs: {', '.join(f'{b:.2f}' for b in beyond[c])}; empty cache: {beyond[0]:.2f} s), wall "
              f"{statistics.median(r['wall'] for r in rs[c]):.2f} s")
    _table("`diffswarm generate --n 1`, split at its output lines", cli,
           ["wall", *(name for _, name in CLI_MARKS), "sampling (as printed)", "beyond sampling"], c)
    keys = [k for k in staged["this"][0] if k != "uncovered"]
    _table("the same path in stages", staged, keys, c)
    print(f"  (uncovered clusters at the start of sampling: {staged['this'][-1]['uncovered']})")
    print("\nslowest imports of `diffswarm generate` (this tree; cumulative s, python -X importtime):")
    for s, name in slowest:
        print(f"  {s:6.2f} {name}")
    footer()


if __name__ == "__main__":
    main()
