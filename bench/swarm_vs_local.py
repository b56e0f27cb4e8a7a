"""Local vs swarm sampling time on the same experts and seeds, in one run, with the per-step overhead broken down.

For each network (``--nets``: the default UNet 16x3 and the DiT 96x3, both at 28x28 with 10 classes; weights
from two training steps on random data, which cost the same to evaluate as trained ones) it builds K experts
(default K=8) and a router, then times ``generate`` at each batch size

- locally: ``load_local_ensemble`` in this process (best of 1 thread and all threads),
- over the swarm: a bootstrap node + K peer processes on 127.0.0.1 (``local_swarm``, one torch thread per peer)
  and ``SwarmEnsemble`` clients in this process: with the default answer checks (what a user gets), the same with
  the client's own check evaluations run after the remote calls instead of during them ("serial": how the client
  worked before they overlapped), with every check off (the difference is the checks' cost), and with float16
  transport (``--compression float16``),

with top-2 routing, CFG 2, Euler. Runs alternate (the peers sit idle during local runs), so all see the same
background load; each time is the best of ``--repeats``. Then one more instrumented run of the default client
splits a swarm step into: router pass, serialisation on the client (encode + decode), peer compute and queueing
(from each answer's metadata), transport (the rest of the slowest call's round trip: both daemons, the peer's
own decoding and encoding), the client's event-loop hop, the answer checks in the steps (local cross-check
evaluations and comparisons), the end-of-trajectory audit and mixing + bookkeeping (the rest).

``--split-cores`` models the user's machine and the volunteers' machines as two halves of this one: the bench
process (the client, its daemon and the local runs) is pinned to the first half of the CPUs, the bootstrap and
every peer (with their daemons) to the other half. Local and swarm then have the same compute, and the client's own
check evaluations no longer compete with the peers for a core, as on separate machines. Without it, everything
shares every core (the client's checks steal the peers' CPU).

Prints local / swarm per batch size (>= 1: the swarm is as fast as local; targets >= 0.85 at batch 16 and
>= 0.95 at batch 64), the largest difference between swarm and local samples, and the same for float16.

    python bench/swarm_vs_local.py                 # K=8, batches 1 16 64, UNet and DiT
    python bench/swarm_vs_local.py --quick         # K=4, batches 1 16, DiT, 6 steps
    python bench/swarm_vs_local.py --split-cores   # client and peers on separate halves of the CPUs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import NET_SIZES, descendants, footer, header, pin, swarm_net, tiny  # noqa: E402

import diffswarm.client.transport as transport_mod  # noqa: E402
from diffswarm.client.answer_checks import TrustConfig  # noqa: E402
from diffswarm.client.config import ClientConfig  # noqa: E402
from diffswarm.client.sources import LocalSource  # noqa: E402
from diffswarm.dht.node import NetworkConfig  # noqa: E402
from diffswarm.router.local import generate, load_local_ensemble  # noqa: E402
from diffswarm.router.routing import RoutingConfig  # noqa: E402
from diffswarm.sampling.config import SamplingConfig  # noqa: E402
from diffswarm.swarm.local import local_swarm  # noqa: E402
from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm  # noqa: E402

NO_CHECKS = TrustConfig(verify_share=0.0, verify_first=False, new_peer_rate=0.0, local_check_share=0.0,
                        audit_samples=0, fetch_checkpoints=False, local_fallback=False)


class _Later:
    def __init__(self, fn):
        self.fn = fn

    def result(self):
        return self.fn()


class SerialLocal:
    """Stands in for ``Sources``' local-answer pool: runs the client's own evaluations only when their results
    are asked for, after the remote calls returned (the order before they overlapped)."""

    def submit(self, fn):
        return _Later(fn)


class Probe:
    """Wraps the client's seams to time each part of a step (installed for the instrumented run only)."""

    def __init__(self, model):
        self.model, self.t = model, defaultdict(float)
        self.rounds: list[list[tuple[float, float, float, float]]] = []  # per answer_all: (rtt, compute, queue, ser)
        self.evals = 0
        self.ser = 0.0
        self.in_check = 0
        self._saved = []

    def _wrap(self, obj, name, make):
        orig = getattr(obj, name)
        self._saved.append((obj, name, vars(obj).get(name)))  # None: a method of the class, shadowed here
        setattr(obj, name, make(orig))

    def timed(self, key, count_eval=False, check=False):
        """Time ``key``; ``check``: a check's own span (local evaluations inside it are not counted again)."""
        def make(orig):
            def f(*a, **kw):
                if key == "local_checks" and self.in_check:
                    return orig(*a, **kw)
                self.in_check += check
                t0 = time.perf_counter()
                try:
                    return orig(*a, **kw)
                finally:
                    self.t[key] += time.perf_counter() - t0
                    self.evals += count_eval
                    self.in_check -= check
            return f
        return make

    def serdes(self, orig):
        def f(*a, **kw):
            t0 = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                self.ser += time.perf_counter() - t0
        return f

    def calls(self, orig):
        async def f(rep, *a, **kw):
            ser0, t0 = self.ser, time.perf_counter()
            v, meta = await orig(rep, *a, **kw)
            rtt = time.perf_counter() - t0
            if not self.in_check and self.rounds:  # remote cross-checks of an audit are counted with the checks
                self.rounds[-1].append((rtt, meta.get("compute_ms", 0.0) / 1000, meta.get("queue_ms", 0.0) / 1000,
                                    self.ser - ser0))
            return v, meta
        return f

    def answer_all(self, orig):
        def f(*a, **kw):
            if self.in_check:  # a check's own calls (judge's arbiter, the audit): timed with the checks already
                return orig(*a, **kw)
            self.rounds.append([])
            t0 = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                self.t["answer_all"] += time.perf_counter() - t0
        return f

    def __enter__(self):
        m = self.model
        self._wrap(m, "route_probs", self.timed("router", count_eval=True))
        self._wrap(m.sources, "answer_all", self.answer_all)
        self._wrap(m.client, "call_velocity", self.calls)
        self._wrap(transport_mod, "encode_request", self.serdes)
        self._wrap(transport_mod, "decode_response", self.serdes)
        self._wrap(LocalSource, "velocity", self.timed("local_checks"))
        self._wrap(m.verifier, "judge", self.timed("judge", check=True))
        self._wrap(m, "end_trajectory", self.timed("audit", check=True))
        return self

    def __exit__(self, *exc):
        for obj, name, own in reversed(self._saved):
            if own is None:
                delattr(obj, name)
            else:
                setattr(obj, name, own)

    def breakdown(self, total: float) -> dict[str, float]:
        """Milliseconds per evaluation (one velocity call of the sampler) of each part."""
        crit = [max(r) for r in self.rounds if r]  # the slowest call of each round is the step's critical path
        rtt, comp, queue, ser = (sum(c[i] for c in crit) for i in range(4))
        remote = self.t["answer_all"] - self.t["local_checks"]
        parts = {"router pass": self.t["router"], "peer compute": comp, "peer queueing": queue,
                 "client serialisation": ser, "transport (daemons, peer decode/encode)": rtt - comp - queue - ser,
                 "client loop hop": remote - rtt,
                 "answer checks in the steps": self.t["local_checks"] + self.t["judge"],
                 "end-of-trajectory audit": self.t["audit"]}
        parts["mixing + bookkeeping"] = total - sum(parts.values())
        return {k: 1000 * v / max(self.evals, 1) for k, v in parts.items()}


def best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_net(args, net: str, tmp: str) -> dict:
    width, depth = NET_SIZES[net]
    routing = RoutingConfig("top-k", 2)
    shape = (1, 28, 28)
    objectives = ["ddpm" if k % 2 == 0 else "fm" for k in range(args.k)]
    cores = len(os.sched_getaffinity(0))
    t0 = time.perf_counter()
    spec = ToySwarmSpec(objectives, size=28, num_classes=10, net=net, width=width, depth=depth, steps=2,
                        router_width=256, seed=args.seed)
    where = os.path.join(args.reuse or tmp, f"{net}-k{args.k}-s{args.seed}")
    if args.reuse and os.path.exists(os.path.join(where, "router.safetensors")):
        experts = [os.path.join(where, f"c{c}-{o}", "expert.safetensors") for c, o in enumerate(objectives)]
        router = os.path.join(where, "router.safetensors")
    else:
        experts, router = make_toy_swarm(where, spec)
    print(f"\n-- {net} {width}x{depth}: K={args.k} experts ready in {time.perf_counter() - t0:.0f}s", flush=True)
    local = load_local_ensemble(experts, router, routing, seed=args.seed)
    sampling = SamplingConfig(steps=args.steps, sampler="euler", guidance=2.0, seed=args.seed)
    warm = SamplingConfig(steps=2, sampler="euler", guidance=2.0, seed=args.seed)
    t0 = time.perf_counter()
    with local_swarm(experts, router, run_dir=os.path.join(tmp, f"swarm-{net}"), threads=1,
                     announce_period=30.0) as sw:
        print(f"swarm up: bootstrap + {args.k} peers in {time.perf_counter() - t0:.0f}s", flush=True)
        if args.swarm_cpus:  # the clients' daemons start below, from this process: they stay on its CPUs
            swarm_pids = descendants(os.getpid())
            for pid in swarm_pids:
                pin(pid, set(args.swarm_cpus))
            print(f"pinned {len(swarm_pids)} swarm processes to CPUs {args.swarm_cpus}", flush=True)
        net_cfg = NetworkConfig.loopback(client_mode=True)
        cfg = ClientConfig(swarm=sw.swarm, net=net_cfg, refresh=30.0, cache_dir=os.path.join(tmp, "cache"))
        cfg_off = ClientConfig(swarm=sw.swarm, net=net_cfg, refresh=30.0, cache_dir=os.path.join(tmp, "cache0"),
                               trust=NO_CHECKS)
        with sw.client(routing, seed=args.seed, config=cfg) as model, \
                sw.client(routing, seed=args.seed, config=cfg_off) as bare:
            rows = [measure_batch(args, b, local, model, bare, shape, sampling, warm, cores) for b in args.batches]
    return {"net": f"{net} {width}x{depth}", "rows": rows}


def measure_batch(args, b, local, model, bare, shape, sampling, warm, cores) -> dict:
    labels = torch.arange(b) % 10
    cfg = model.client.cfg

    def run(m, threads, compression="none", serial=False):
        torch.set_num_threads(threads)
        cfg.compression = compression
        if not serial:
            return generate(m, labels, shape, sampling)
        pool, m.sources._pool = m.sources._pool, SerialLocal()
        try:
            return generate(m, labels, shape, sampling)
        finally:
            m.sources._pool = pool

    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        generate(local, labels, shape, warm)
    torch.set_num_threads(1)
    generate(model, labels, shape, warm)
    generate(bare, labels, shape, warm)
    t = defaultdict(lambda: float("inf"))
    out = {}
    checks0, calls0 = model.checks, model.main_calls
    for _ in range(args.repeats):
        for threads in sorted({1, cores}):  # local: best of one thread and all threads
            dt, x = best_time(lambda threads=threads: run(local, threads), 1)
            if dt < t["local"]:
                t["local"], out["local"], t["local_threads"] = dt, x, threads
        # the swarm client's own work (router, mixing) is small: one thread, so that no idle OpenMP worker
        # spins on a core the peers need
        for name, m, comp, serial in (("swarm", model, "none", False), ("serial", model, "none", True),
                                      ("no_checks", bare, "none", False), ("fp16", model, "float16", False)):
            dt, x = best_time(lambda m=m, comp=comp, serial=serial: run(m, 1, comp, serial), 1)
            t[name] = min(t[name], dt)
            out[name] = x
    checks = (model.checks - checks0) / (3 * args.repeats)  # the default client ran 3 times per repeat
    calls = (model.main_calls - calls0) / (3 * args.repeats)
    torch.set_num_threads(1)
    cfg.compression = "none"
    pool, model.sources._pool = model.sources._pool, SerialLocal()  # parts one after another: they add up
    with Probe(model) as probe:
        t0 = time.perf_counter()
        generate(model, labels, shape, sampling)
        total = time.perf_counter() - t0
    model.sources._pool = pool
    torch.set_num_threads(cores)
    return {"batch": b, "local_s": t["local"], "local_threads": t["local_threads"], "swarm_s": t["swarm"],
            "no_checks_s": t["no_checks"], "fp16_s": t["fp16"], "ratio": t["local"] / t["swarm"],
            "serial_s": t["serial"], "ratio_serial": t["local"] / t["serial"],
            "ratio_no_checks": t["local"] / t["no_checks"], "ratio_fp16": t["local"] / t["fp16"],
            "diff": float((out["swarm"] - out["local"]).abs().max()),
            "diff_fp16": float((out["fp16"] - out["local"]).abs().max()),
            "rel_fp16": float((out["fp16"] - out["local"]).norm() / out["local"].norm()),
            "cross_checks_per_image": checks / b, "calls_per_trajectory": calls,
            "liars": len(model.liars), "breakdown": probe.breakdown(total), "instrumented_s": total}


def report(res: dict, args) -> None:
    print(f"\n{res['net']}: {args.steps} Euler steps, top-2 over K={args.k}, CFG 2; best of {args.repeats}")
    print(f"{'batch':>5} {'local s':>8} {'swarm s':>8} {'local/swarm':>11} {'serial':>6} {'no checks':>9} "
          f"{'fp16':>6} {'checks cost':>11} {'x-checks/img':>12} {'max|diff|':>9} {'fp16 max|diff|':>14}")
    for r in res["rows"]:
        cost = r["swarm_s"] / r["no_checks_s"] - 1
        print(f"{r['batch']:5d} {r['local_s']:8.3f} {r['swarm_s']:8.3f} {r['ratio']:11.2f} {r['ratio_serial']:6.2f} "
              f"{r['ratio_no_checks']:9.2f} {r['ratio_fp16']:6.2f} {100 * cost:10.0f}% "
              f"{r['cross_checks_per_image']:12.2f} {r['diff']:9.1e} {r['diff_fp16']:14.1e}")
    print("ratios = local s / swarm s (>= 1: the swarm is as fast); 'serial', 'no checks' and 'fp16' are the same "
          "ratio for the default client with its own check evaluations run after the remote calls (the order "
          "before they overlapped), for the client without answer checks, and with float16 transport (checks on); "
          "checks cost = extra swarm time with the checks on")
    for r in res["rows"]:
        if r["liars"]:
            print(f"batch {r['batch']}: {r['liars']} honest peer(s) were judged liars (float16 answers against "
                  "fp32 cross-checks?)")
        print(f"batch {r['batch']}: fp16 relative L2 error of the samples {r['rel_fp16']:.1e}; per evaluation "
              f"(ms, instrumented run of {r['instrumented_s']:.2f}s, checks on, run serially so the parts add up):")
        tot = sum(r["breakdown"].values())
        print("   " + "; ".join(f"{k} {v:.2f} ({100 * v / tot:.0f}%)" for k, v in r["breakdown"].items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="K=4, batches 1 and 16, the DiT only, 6 steps, best of 1")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--steps", type=int, default=20, help="sampling steps per generation")
    ap.add_argument("--nets", nargs="+", choices=list(NET_SIZES), default=["unet", "dit"])
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timings per setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-cores", action="store_true",
                    help="client + local runs on the first half of the CPUs, the swarm's processes on the other half")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--reuse", default=None, help="build the experts here once and reuse them in later runs")
    args = ap.parse_args()
    if args.quick:
        args.k, args.batches, args.nets, args.steps, args.repeats = 4, [1, 16], ["dit"], 6, 1
        if tiny():
            args.k, args.batches, args.steps = 2, [4], 3
        args.nets = [swarm_net(n) for n in args.nets]
    args.swarm_cpus = None
    if args.split_cores:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            ap.error("--split-cores needs at least 2 CPUs")
        mine, args.swarm_cpus = set(cpus[:len(cpus) // 2]), cpus[len(cpus) // 2:]
        pin(os.getpid(), mine)
    header(f"swarm vs local sampling, top-2 of K={args.k}, batches {args.batches}, nets {args.nets}")
    if args.split_cores:
        print(f"split cores: client and local runs on CPUs {sorted(mine)}, bootstrap + peers + their daemons on "
              f"CPUs {args.swarm_cpus}")
    results = []
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as tmp:
        for net in args.nets:
            results.append(bench_net(args, net, tmp))
    for res in results:
        report(res, args)
    footer()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
