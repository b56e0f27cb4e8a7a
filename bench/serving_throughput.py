"""How many clients one peer serves: rows x evaluations per second, p50/p99 latency, batched vs one request at a
time, with 1 to 16 concurrent client processes, in one run.

Starts a bootstrap and two peers serving the same expert (the default UNet 16x3 at 28x28, one torch thread each;
``--threads 0``: torch's default, all cores, as ``diffswarm serve`` without ``--threads``) on 127.0.0.1: one with
the default batching (``--batch-wait-ms 2``, up to 256 rows per forward pass) and one that runs every request on
its own (``--max-batch 1``). Then ``--clients`` client processes start (each its own
``SwarmClient`` and p2pd) and, for each level n in ``--levels``, the first n call one peer back to back for
``--seconds`` (each request ``--rows`` rows with CFG 2: what one image's sampling step sends), then the other peer.
Only one peer is loaded at a time. Prints per level and peer: rows evaluated per second, p50 and p99 round trip,
and batched / one-at-a-time throughput; then how many clients the batched peer serves before its p99 is more than
twice the single-client p99. Target: >= 3x at 8 clients.

The physical limit is measured in the same run, before the peers start: the expert's forward pass in this process
(one torch thread, the peer's code path) in passes of one request's rows and of n requests' rows. Their ratio is
the most batching can gain from compute alone on this CPU; each peer's throughput is printed as a fraction of its
limit, with the p50 compute time of a request and the rest of its round trip (transport, checks, daemons, client).

On a 2-core machine the client processes share the cores with the peer (and its p2pd), so the absolute figures
are pessimistic; both peers see the same conditions, so the ratio is fair.

    python bench/serving_throughput.py                    # levels 1 2 4 8 16, 5 s each
    python bench/serving_throughput.py --quick            # levels 1 4 8, 2 s each
    python bench/serving_throughput.py --threads 0        # the peers (and the limit) on every core
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    NET_SIZES,
    call_loop,
    footer,
    header,
    percentile,
    readline_within,
    rss_mb,
    swarm_net,
    tiny,
)

WORKER_FLAG = "--worker"
START_S = 180.0  # a client process that has not said it is ready by then is reported, not awaited
RESULT_GRACE_S = 120.0  # beyond its run's length, how long a client's results may take to come back


def worker() -> None:
    """A client process: reads ``{"peer": info, "seconds": s, "rows": r}`` lines on stdin, calls that peer back to
    back for s seconds, writes ``{"lat": [ms...], "rows": n, "rss_mb": ...}``; ``{"stop": true}`` ends it."""
    import torch

    from diffswarm.client.client import SwarmClient
    from diffswarm.client.config import ClientConfig
    from diffswarm.client.selection import Replica
    from diffswarm.dht.node import NetworkConfig

    torch.set_num_threads(1)
    initial = json.loads(sys.argv[sys.argv.index(WORKER_FLAG) + 1])
    # no discovery (peers are given); a patient DHT timeout: many clients start at once on a loaded machine
    cfg = ClientConfig(swarm="", net=NetworkConfig.loopback(client_mode=True, wait_timeout=30.0))
    with SwarmClient(initial, cfg) as client:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd.get("stop"):
                break
            info = cmd["peer"]
            rep = Replica(info["peer_id"], info["experts"][0], "", 0, 100.0, 0.0, tuple(info["maddrs"]))
            rows = cmd["rows"]
            x, t = torch.randn(rows, 1, 28, 28), torch.rand(rows)
            labels = torch.randint(0, 10, (rows,))
            client.run(client.transport.connect(rep.peer_id, rep.addrs))
            client.run(client.call_velocity(rep, x, t, labels, 2.0, 30.0))  # warm: the session is open

            def call(r=rep, x=x, t=t, y=labels) -> dict:  # the answer's metadata (queue and compute ms, batch rows)
                return client.run(client.call_velocity(r, x, t, y, 2.0, 30.0))[1]

            lat, metas, errors = call_loop(call, cmd["start"], cmd["seconds"])
            batch = [meta.get("batch_rows", rows) for meta in metas]
            over = [ms - meta.get("queue_ms", 0.0) - meta.get("compute_ms", 0.0)
                    for ms, meta in zip(lat, metas, strict=True)]
            comp = [meta.get("compute_ms", 0.0) for meta in metas]
            queue = [meta.get("queue_ms", 0.0) for meta in metas]
            n = rows * len(lat)
            print(json.dumps({"lat": lat, "batch": batch, "over": over, "comp": comp, "queue": queue, "rows": n,
                              "errors": errors,
                              "rss_mb": rss_mb(os.getpid()), "hwm_mb": rss_mb(os.getpid(), "VmHWM")}), flush=True)


class Clients:
    """``n`` client processes (this script in worker mode) talking to a local swarm."""

    def __init__(self, n: int, initial_peers: list[str]):
        env = dict(os.environ, GOMAXPROCS="1", PYTHONUNBUFFERED="1")
        self.procs = []
        try:
            for start in range(0, n, 4):  # in waves of 4: 16 daemons bootstrapping at once time out on 2 cores
                wave = [subprocess.Popen([sys.executable, os.path.abspath(__file__), WORKER_FLAG,
                                          json.dumps(initial_peers)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True, env=env) for _ in range(min(4, n - start))]
                self.procs += wave
                for p in wave:
                    if not json.loads(readline_within(p, START_S, f"client process {p.pid}'s start")).get("ready"):
                        raise RuntimeError(f"client process {p.pid} failed to start")
        except BaseException:
            self.close()
            raise

    def run(self, n: int, peer: dict, seconds: float, rows: int) -> list[dict]:
        """The first ``n`` clients call ``peer`` for ``seconds``, starting together; their results."""
        start = time.time() + 1.0 + 0.05 * n  # time to open their sessions first
        for p in self.procs[:n]:
            p.stdin.write(json.dumps({"peer": peer, "seconds": seconds, "rows": rows, "start": start}) + "\n")
            p.stdin.flush()
        # a client stuck on a peer that stopped answering is reported, not awaited (each call has its own deadline;
        # this bounds the whole run)
        return [json.loads(readline_within(p, max(1.0, start - time.time() + seconds + RESULT_GRACE_S),
                                           f"client process {p.pid}'s results")) for p in self.procs[:n]]

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.write(json.dumps({"stop": True}) + "\n")
                p.stdin.flush()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def summarise(results: list[dict], seconds: float) -> dict:
    lat = [v for r in results for v in r["lat"]]
    batch = [v for r in results for v in r.get("batch", [])]
    over = [v for r in results for v in r.get("over", [])]
    comp = [v for r in results for v in r.get("comp", [])]
    queue = [v for r in results for v in r.get("queue", [])]
    return {"rows_per_s": sum(r["rows"] for r in results) / seconds, "p50": percentile(lat, 50),
            "p99": percentile(lat, 99), "calls": len(lat), "errors": sum(r["errors"] for r in results),
            # rows of the forward pass each request rode in (mean over requests), the peer's compute time per request
            # and the rest of the round trip (transport, decoding and checks, encoding, both daemons, the client)
            "batch_rows": sum(batch) / max(len(batch), 1), "compute_p50": percentile(comp, 50),
            "rest_p50": percentile(over, 50),
            # the tail's parts: waiting in the peer's queue (for the pass before and the batching wait), the pass itself
            "queue_p99": percentile(queue, 99), "compute_p99": percentile(comp, 99), "rest_p99": percentile(over, 99)}


def make_expert(tmp: str, net: str) -> tuple[str, str]:
    """The bench's toy expert (UNet 16x3 or DiT 96x3 at 28x28, 10 classes, two training steps); (path, name)."""
    from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm

    width, depth = NET_SIZES[net]
    experts, _ = make_toy_swarm(os.path.join(tmp, "experts"), ToySwarmSpec(["fm"], size=28, num_classes=10,
                                                                          net=net, width=width, depth=depth, steps=2))
    return str(experts[0]), f"{net} {width}x{depth}"


def wait_name(ms: float) -> str:
    return f"wait{ms:g}ms"


def start_peers(tmp: str, net: str, batched_only: bool = False, expert: str | None = None,
                waits: tuple[float, ...] = (), threads: int = 1):
    """A bootstrap + a batching peer (and one with --max-batch 1, and one batching peer with each batching wait in
    ``waits``) serving one toy expert; (swarm, expert name)."""
    from diffswarm.swarm.local import PeerSpec, start_local_swarm

    path, name = make_expert(tmp, net) if expert is None else (expert, net)
    specs = [PeerSpec("batched", checkpoint=path)]
    if not batched_only:
        specs.append(PeerSpec("single", checkpoint=path, extra_args=["--max-batch", "1"]))
    specs += [PeerSpec(wait_name(ms), checkpoint=path, extra_args=["--batch-wait-ms", f"{ms:g}"]) for ms in waits]
    sw = start_local_swarm(specs, None, os.path.join(tmp, "swarm"), threads=threads, announce_period=30.0)
    return sw, name


def compute_ceiling(path: str, batches: list[int], seconds: float, threads: int = 1) -> dict[int, float]:
    """Rows per second of the expert's forward pass (CFG 2) in this process, ``threads`` torch threads like the
    peers (0: torch's default, as a peer started without ``--threads``), on the peer's own code path
    (``ServedExpert``), for passes of each size in ``batches``: the most a peer can serve
    with no transport, decoding, checks or queueing at all. Best of three timings of ``seconds`` / 3 each."""
    import torch

    from diffswarm.experts.expert import Expert
    from diffswarm.peer.batching import BatchPolicy
    from diffswarm.peer.hosted import ServedExpert

    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        velocity = ServedExpert(Expert.from_checkpoint(path), BatchPolicy()).batcher.velocity  # what a pass runs
        out = {}
        for b in sorted(set(batches)):
            x, t, labels = torch.randn(b, 1, 28, 28), torch.rand(b), torch.randint(0, 10, (b,))
            velocity(x, t, labels, 2.0)  # warm
            best = 0.0
            for _ in range(3):
                n, t0 = 0, time.perf_counter()
                while n == 0 or time.perf_counter() - t0 < seconds / 3:
                    velocity(x, t, labels, 2.0)
                    n += b
                best = max(best, n / (time.perf_counter() - t0))
            out[b] = best
        return out
    finally:
        torch.set_num_threads(prev)


def main() -> None:
    if WORKER_FLAG in sys.argv:
        return worker()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="levels 1 4 8, 2 s each")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="concurrent clients")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each measurement")
    ap.add_argument("--rows", type=int, default=1, help="rows per request (CFG doubles them in the network)")
    ap.add_argument("--net", choices=["unet", "dit"], default="unet")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of each peer and of the limit's passes (0: torch's default, all cores, as "
                         "`diffswarm serve` without --threads)")
    ap.add_argument("--also-wait", type=float, nargs="*", default=[], metavar="MS",
                    help="more batching peers with these --batch-wait-ms (the default peer waits 2 ms), measured "
                         "side by side")
    args = ap.parse_args()
    if args.quick:
        args.levels, args.seconds = ([1, 2] if tiny() else [1, 4, 8]), (1.0 if tiny() else 2.0)
        args.net = swarm_net(args.net)
    header(f"serving throughput of one peer: {args.levels} concurrent clients, {args.rows} row(s) per request, "
           f"CFG 2, {args.seconds:.0f} s per level")
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        path, name = make_expert(tmp, args.net)
        # the physical limit, measured before any peer runs: passes of one request vs of every client's request
        ceiling = compute_ceiling(path, [args.rows] + [min(n * args.rows, 256) for n in args.levels],
                                  min(args.seconds, 3.0), args.threads)
        print("  in-process forward passes, rows/s: " + ", ".join(f"{b} rows {r:.0f}" for b, r in ceiling.items()),
              flush=True)
        variants = [wait_name(ms) for ms in args.also_wait]
        sw, _ = start_peers(tmp, args.net, expert=path, waits=tuple(args.also_wait), threads=args.threads)
        try:
            peers = {p: sw.info(p) for p in ("batched", "single", *variants)}
            with Clients(max(args.levels), sw.initial_peers) as clients:
                table = {}
                for n in args.levels:
                    table[n] = {p: summarise(clients.run(n, peers[p], args.seconds, args.rows), args.seconds)
                                for p in peers}
                    print(f"  {n} clients done: {table[n]['batched']['rows_per_s']:.0f} vs "
                          f"{table[n]['single']['rows_per_s']:.0f} rows/s", flush=True)
        finally:
            sw.stop()
    report(args, name, table, ceiling)
    if args.also_wait:
        report_waits(table, ["batched", *(wait_name(ms) for ms in args.also_wait)])
    footer()


def report_waits(table: dict, names: list[str]) -> None:
    """The batching peers side by side: rows/s, p99 and pass rows, and each over the one-at-a-time peer."""
    print("\nbatching waits side by side (the default peer is 'batched', 2 ms): rows/s (x one-at-a-time) p99 ms, "
          "pass rows")
    print(f"{'clients':>7} | " + " | ".join(f"{n:>28}" for n in names))
    for n, r in table.items():
        one = r["single"]["rows_per_s"]
        print(f"{n:7d} | " + " | ".join(f"{r[p]['rows_per_s']:5.0f} ({r[p]['rows_per_s'] / one:4.2f}x) "
                                        f"{r[p]['p99']:6.1f} {r[p]['batch_rows']:5.1f}" for p in names))


def report(args, name: str, table: dict, ceiling: dict[int, float]) -> None:
    one = ceiling[args.rows]
    threads = f"{args.threads} torch thread(s)" if args.threads else f"torch's default threads ({os.cpu_count()} CPUs)"
    print(f"\n{name}, one peer with {threads}, 127.0.0.1; rows/s = rows evaluated per second (x CFG 2 network "
          "rows); latency = round trip per request")
    print(f"{'clients':>7} | {'batched rows/s':>14} {'p50 ms':>7} {'p99 ms':>7} {'pass rows':>9} | "
          f"{'1-at-a-time rows/s':>18} {'p50 ms':>7} {'p99 ms':>7} | {'batched/1-at-a-time':>19}")
    for n, r in table.items():
        b, s = r["batched"], r["single"]
        print(f"{n:7d} | {b['rows_per_s']:14.0f} {b['p50']:7.1f} {b['p99']:7.1f} {b['batch_rows']:9.1f} | "
              f"{s['rows_per_s']:18.0f} {s['p50']:7.1f} {s['p99']:7.1f} | {b['rows_per_s'] / s['rows_per_s']:19.2f}"
              + (f"  ({b['errors'] + s['errors']} failed calls)" if b["errors"] + s["errors"] else ""))
    print(f"\nagainst the physical limit (in-process forward passes, same expert and thread count, this run): "
          f"{one:.0f} rows/s in passes of {args.rows} row(s)")
    print(f"{'clients':>7} | {'limit rows/s':>12} {'batched/limit':>13} {'1-at-a-time/limit':>17} "
          f"{'limit ratio':>11} | {'batched compute/rest p50 ms':>27} | {'1-at-a-time compute/rest p50 ms':>31}")
    for n, r in table.items():
        b, s = r["batched"], r["single"]
        lim = ceiling[min(n * args.rows, 256)]
        print(f"{n:7d} | {lim:12.0f} {b['rows_per_s'] / lim:13.2f} {s['rows_per_s'] / one:17.2f} "
              f"{lim / one:10.2f}x | {b['compute_p50']:18.1f} / {b['rest_p50']:5.1f} | "
              f"{s['compute_p50']:22.1f} / {s['rest_p50']:5.1f}")
    print("limit rows/s: passes of every client's request at once; limit ratio: the most batching can gain over "
          "one-at-a-time from compute alone on this CPU; rest = round trip - queue - compute (transport, decoding and "
          "checks, encoding, both daemons, the client)")
    base = table[args.levels[0]]["batched"]["p99"]
    served = [n for n in args.levels if table[n]["batched"]["p99"] <= 2 * base]
    print(f"clients served before the batched peer's p99 doubles (vs {args.levels[0]} client: {base:.1f} ms): "
          f"{max(served)} of the levels measured")
    report_tail(table)
    if 8 in table:
        ratio = table[8]["batched"]["rows_per_s"] / table[8]["single"]["rows_per_s"]
        verdict = "met" if ratio >= 3 else "NOT met"
        print(f"batched / one-at-a-time at 8 clients: {ratio:.2f}x (target >= 3x: {verdict}; the compute limit on "
              f"this CPU is {ceiling[min(8 * args.rows, 256)] / one:.2f}x)")


def report_tail(table: dict) -> None:
    """The batched peer's p99 against issue 21's bound "the batching window plus one forward pass": the window is
    the default peer's ``BatchPolicy.max_wait``, the pass the peer's own p50 compute time of a request at that
    level; and where the tail comes from (the 99th percentiles of queueing, compute and the rest, separately)."""
    from diffswarm.peer.batching import BatchPolicy

    wait_ms = 1000 * BatchPolicy().max_wait
    print(f"\nbatched peer's p99 against the batching window ({wait_ms:.0f} ms) plus one forward pass (the peer's p50 "
          "compute of a request at that level):")
    print(f"{'clients':>7} | {'p99 ms':>7} {'bound ms':>8} {'p99/bound':>9} | {'queue p99':>9} {'compute p99':>11} "
          f"{'rest p99':>8}")
    bounds = {n: wait_ms + r["batched"]["compute_p50"] for n, r in table.items()}
    for n, r in table.items():
        b = r["batched"]
        print(f"{n:7d} | {b['p99']:7.1f} {bounds[n]:8.1f} {b['p99'] / bounds[n]:9.2f} | {b['queue_p99']:9.1f} "
              f"{b['compute_p99']:11.1f} {b['rest_p99']:8.1f}")
    if 8 in table:
        p99 = table[8]["batched"]["p99"]
        verdict = "met" if p99 <= bounds[8] else "NOT met"
        print(f"p99 at 8 clients: {p99:.1f} ms against {bounds[8]:.1f} ms (target: {verdict}); "
              "a request that arrives while a pass runs waits for that pass first, so one worker's p99 cannot go "
              "below about two passes")


if __name__ == "__main__":
    main()
