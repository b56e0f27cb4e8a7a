"""diffswarm against the peer a hivemind user would pick: the same experts behind hivemind.moe's ``Server``
(``ModuleBackend`` + ``TaskPool`` batching, one ``Runtime``) called through ``RemoteExpert``, side by side in one run.

Both serve the same K experts (default UNet 16x3 at 28x28, 10 classes; two training steps on random data), on
127.0.0.1, one torch thread per serving process:

- diffswarm: a bootstrap + K peer processes (``local_swarm``), a ``SwarmEnsemble`` client with its default
  answer checks;
- hivemind.moe: one ``Server`` process hosting the K experts (its usual deployment: one server, many experts, one
  runtime batching them), each wrapped as a module ``(x, t, labels) -> Expert.velocity(x, t, labels, 2.0)``; the
  client is a ``RoutedEnsemble`` with the same router, routing (top-2), seeds and mixing whose chosen experts are
  ``RemoteExpert`` calls, issued concurrently as ``RemoteMixtureOfExperts`` does (its own gating cannot take
  diffswarm's router, so the routing is diffswarm's on both sides).

Per-step time at each batch size (best of ``--repeats``, the two alternate), then throughput: ``--clients``
client processes calling one expert back to back (1 row, CFG 2) for ``--seconds``, diffswarm's peer then
hivemind's server. Ratios > 1: diffswarm is faster. Samples of both are compared (they should be equal).

    python bench/vs_hivemind.py                   # K=8, batches 1 16 64, 8 clients
    python bench/vs_hivemind.py --quick           # K=4, batches 1 16, 4 clients
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    NET_SIZES,
    call_loop,
    dead_sockets_removed,
    footer,
    header,
    readline_within,
    swarm_net,
    tiny,
)

SERVE, WORKER = "--hivemind-serve", "--hivemind-worker"
START_S = 180.0  # a hivemind server or client process that has not said it is ready by then is reported, not awaited
CALL_S = 60.0  # the same for one RemoteExpert call (hivemind.moe's calls have no timeout of their own)
LOOPBACK = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_relay=False, use_auto_relay=False, auto_nat=False,
                nat_port_map=False)


class VelocityModule(torch.nn.Module):
    """An expert as hivemind.moe serves modules: forward(x, t, labels) -> v with CFG ``guidance``."""

    def __init__(self, expert, guidance: float):
        super().__init__()
        self.expert, self.guidance = expert, guidance

    def forward(self, x, t, labels):
        return self.expert.velocity(x, t, labels.long(), self.guidance)


def serve() -> None:
    """Server process: hivemind.moe ``Server`` with the experts given as JSON; prints {peer_id, maddrs, uids}."""
    from hivemind.dht import DHT
    from hivemind.moe.server import ModuleBackend, Server
    from hivemind.utils.tensor_descr import BatchTensorDescriptor

    from diffswarm.experts.expert import Expert

    torch.set_num_threads(1)
    paths = json.loads(sys.argv[sys.argv.index(SERVE) + 1])
    backends = {}
    for i, p in enumerate(paths):
        module = VelocityModule(Expert.from_checkpoint(p), 2.0)
        backends[f"expert.{i}"] = ModuleBackend(
            f"expert.{i}", module, args_schema=(BatchTensorDescriptor(1, 28, 28), BatchTensorDescriptor(),
                                                BatchTensorDescriptor(dtype=torch.int64)),
            outputs_schema=BatchTensorDescriptor(1, 28, 28), max_batch_size=256)
    dht = DHT(start=True, **LOOPBACK)
    server = Server(dht, backends, num_connection_handlers=1, start=True)
    maddrs = [str(a) for a in dht.get_visible_maddrs()]
    print(json.dumps({"peer_id": dht.peer_id.to_base58(), "maddrs": maddrs, "uids": list(backends)}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.shutdown()


class HivemindServer:
    def __init__(self, paths):
        env = dict(os.environ, GOMAXPROCS="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), SERVE, json.dumps([str(p) for p in
                                      paths])], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        try:
            self.info = json.loads(readline_within(self.proc, START_S, "the hivemind server's start"))
        except BaseException:
            self.close()
            raise

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            # a stuck server: its runtime, pools and connection handlers are forked children in its process group
            # (start_new_session), which a kill of the server alone would orphan
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def remote_experts(info: dict):
    """(RemoteExpert per uid, a function that closes the client's P2P and DHT) connected to the hivemind server."""
    from hivemind.dht import DHT
    from hivemind.moe.client.expert import RemoteExpert
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from hivemind.moe.expert_uid import ExpertInfo
    from hivemind.p2p import PeerID

    dht = DHT(start=True, client_mode=True, initial_peers=info["maddrs"], **LOOPBACK)
    p2p = RemoteExpertWorker.run_coroutine(dht.replicate_p2p())
    pid = PeerID.from_base58(info["peer_id"])

    def close():
        RemoteExpertWorker.run_coroutine(p2p.shutdown())
        dht.shutdown()

    remotes = [RemoteExpert(ExpertInfo(uid, pid), p2p) for uid in info["uids"]]
    # fetch each expert's info here, one at a time: the first calls would otherwise come from the ensemble's
    # threads at once, and hivemind builds its stub class lazily without a lock (``ServicerBase.
    # _collect_rpc_handlers``), so a thread that comes second can find ``_stub_type`` still None
    for remote in remotes:
        remote.info  # noqa: B018 (a property that calls rpc_info and caches the answer)
    return remotes, close


def hivemind_ensemble(remotes, router, routing, seed: int):
    """A ``RoutedEnsemble`` whose chosen experts are ``RemoteExpert`` calls, issued concurrently."""
    from diffswarm.router.ensemble import RoutedEnsemble, mix

    pool = ThreadPoolExecutor(len(remotes))

    class HivemindEnsemble(RoutedEnsemble):
        def evaluate(self, x, t, labels, guidance, weights, probs):
            futs = {}
            for k in range(weights.shape[1]):
                rows = (weights[:, k] > 0).nonzero(as_tuple=True)[0]
                if rows.numel():
                    futs[k] = pool.submit(remotes[k], x[rows], t[rows], labels[rows])
            try:
                answers = {k: f.result(timeout=CALL_S).detach() for k, f in futs.items()}
            except TimeoutError:
                raise RuntimeError(f"a hivemind.moe RemoteExpert call did not return within {CALL_S:.0f} s") from None
            # mix asks expert k for exactly the rows that chose it: the rows its call was given
            return mix(x, weights, lambda k, rows: answers[k], self.calls), weights, []

    return HivemindEnsemble(remotes, router, routing, seed=seed), pool


def worker() -> None:
    """A hivemind client process: same command protocol as serving_throughput's workers."""
    torch.set_num_threads(1)
    info = json.loads(sys.argv[sys.argv.index(WORKER) + 1])
    remotes, close = remote_experts(info)
    expert = remotes[0]
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("stop"):
            break
        rows = cmd["rows"]
        x, t, labels = torch.randn(rows, 1, 28, 28), torch.rand(rows), torch.randint(0, 10, (rows,))
        expert(x, t, labels)
        lat, _, errors = call_loop(lambda x=x, t=t, y=labels: expert(x, t, y), cmd["start"], cmd["seconds"])
        n = rows * len(lat)
        print(json.dumps({"lat": lat, "rows": n, "errors": errors}), flush=True)
    close()


class HivemindClients:
    """Client processes for the hivemind server (the ``serving_throughput.Clients`` protocol)."""

    def __init__(self, n: int, info: dict):
        from serving_throughput import Clients

        env = dict(os.environ, GOMAXPROCS="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.inner = Clients.__new__(Clients)
        self.inner.procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), WORKER, json.dumps(info)],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
                            for _ in range(n)]
        try:
            for p in self.inner.procs:
                readline_within(p, START_S, f"hivemind client process {p.pid}'s start")
        except BaseException:
            self.inner.close()
            raise

    def run(self, n, seconds, rows):
        return self.inner.run(n, {}, seconds, rows)

    def close(self):
        self.inner.close()


def main() -> None:
    # hivemind forks its DHT, runtime and connection handlers from processes that already run threads; the first
    # tempfile.gettempdir() takes a lock, and a fork while another thread holds it leaves the child waiting on it
    # forever (a connection handler stuck there kept the server from ever being ready): settle it before any fork
    tempfile.gettempdir()
    if SERVE in sys.argv:
        return serve()
    if WORKER in sys.argv:
        return worker()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="K=4, batches 1 16, 4 clients for 2 s")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--steps", type=int, default=10, help="Euler steps per generation")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--net", choices=["unet", "dit"], default="unet")
    args = ap.parse_args()
    if args.quick:
        args.k, args.batches, args.clients, args.seconds, args.steps, args.repeats = 4, [1, 16], 4, 2.0, 4, 1
        if tiny():
            args.k, args.batches, args.clients, args.seconds, args.steps = 2, [4], 1, 1.0, 2
        args.net = swarm_net(args.net)
    header(f"diffswarm vs hivemind.moe: top-2 of K={args.k}, batches {args.batches}, {args.clients} clients")
    with tempfile.TemporaryDirectory(prefix="vs-hivemind-") as tmp, dead_sockets_removed():
        res = compare(args, tmp)
    report(args, res)
    footer()


def compare(args, tmp: str) -> dict:
    from serving_throughput import Clients, summarise

    from diffswarm.client.config import ClientConfig
    from diffswarm.dht.node import NetworkConfig
    from diffswarm.router.local import generate
    from diffswarm.router.model import Router
    from diffswarm.router.routing import RoutingConfig
    from diffswarm.sampling.config import SamplingConfig
    from diffswarm.swarm.local import local_swarm
    from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm

    width, depth = NET_SIZES[args.net]
    objectives = ["ddpm" if k % 2 == 0 else "fm" for k in range(args.k)]
    experts, router_path = make_toy_swarm(os.path.join(tmp, "experts"), ToySwarmSpec(
        objectives, size=28, num_classes=10, net=args.net, width=width, depth=depth, steps=2, router_width=256))
    routing = RoutingConfig("top-k", 2)
    sampling = SamplingConfig(steps=args.steps, sampler="euler", guidance=2.0)
    warm = SamplingConfig(steps=1, sampler="euler", guidance=2.0)
    torch.set_num_threads(1)
    res = {"net": f"{args.net} {width}x{depth}", "steps": {}, "diff": {}}
    hm = HivemindServer(experts)
    try:
        remotes, close_remotes = remote_experts(hm.info)
        hens, pool = hivemind_ensemble(remotes, Router.load(router_path), routing, 0)
        with local_swarm(experts, router_path, run_dir=os.path.join(tmp, "swarm"), threads=1,
                         announce_period=30.0) as sw:
            cfg = ClientConfig(swarm=sw.swarm, net=NetworkConfig.loopback(client_mode=True), refresh=30.0,
                               cache_dir=os.path.join(tmp, "cache"))
            with sw.client(routing, config=cfg) as ds:
                for b in args.batches:
                    labels = torch.arange(b) % 10
                    best = {"diffswarm": float("inf"), "hivemind": float("inf")}
                    out = {}
                    for m in (ds, hens):
                        generate(m, labels, (1, 28, 28), warm)
                    for _ in range(args.repeats):
                        for name, m in (("diffswarm", ds), ("hivemind", hens)):
                            t0 = time.perf_counter()
                            out[name] = generate(m, labels, (1, 28, 28), sampling)
                            best[name] = min(best[name], (time.perf_counter() - t0) / sampling.evaluations)
                    res["steps"][b] = best
                    res["diff"][b] = float((out["diffswarm"] - out["hivemind"]).abs().max())
                    print(f"  batch {b}: {1000 * best['diffswarm']:.1f} vs {1000 * best['hivemind']:.1f} ms/step",
                          flush=True)
            pool.shutdown()
            close_remotes()
            with Clients(args.clients, sw.initial_peers) as clients:
                res["ds_tp"] = summarise(clients.run(args.clients, sw.info("peer0"), args.seconds, 1), args.seconds)
        hc = HivemindClients(args.clients, hm.info)
        try:
            res["hm_tp"] = summarise(hc.run(args.clients, args.seconds, 1), args.seconds)
        finally:
            hc.close()
    finally:
        hm.close()
    return res


def report(args, res: dict) -> None:
    print(f"\n{res['net']} experts, top-2 of K={args.k}, CFG 2, Euler {args.steps} steps, 127.0.0.1, one torch "
          f"thread per server process; best of {args.repeats}")
    print(f"{'batch':>5} {'diffswarm ms/step':>17} {'hivemind ms/step':>16} {'hivemind/diffswarm':>18} "
          f"{'max|diff| samples':>17}")
    for b, r in res["steps"].items():
        print(f"{b:5d} {1000 * r['diffswarm']:17.1f} {1000 * r['hivemind']:16.1f} "
              f"{r['hivemind'] / r['diffswarm']:18.2f} {res['diff'][b]:17.1e}")
    d, h = res["ds_tp"], res["hm_tp"]
    print(f"\n{args.clients} concurrent client processes on one expert, 1 row + CFG 2 per request, "
          f"{args.seconds:.0f} s:")
    print(f"  diffswarm peer : {d['rows_per_s']:7.0f} rows/s, p50 {d['p50']:.1f} ms, p99 {d['p99']:.1f} ms "
          f"({d['errors']} failed)")
    print(f"  hivemind server: {h['rows_per_s']:7.0f} rows/s, p50 {h['p50']:.1f} ms, p99 {h['p99']:.1f} ms "
          f"({h['errors']} failed)")
    print(f"  diffswarm / hivemind throughput: {d['rows_per_s'] / max(h['rows_per_s'], 1e-9):.2f}x")
    print("diffswarm runs its answer checks (cross-checks of first answers, audits); hivemind.moe checks nothing. "
          "Topology: diffswarm K peer processes, hivemind one server process for all K experts (its usual setup).")


if __name__ == "__main__":
    main()
