"""Discovery as the swarm grows: how long a new client takes to find every expert record, and the DHT traffic it
costs, with N DHT nodes on 127.0.0.1 (N = 8, 32, 64, 128 by default).

All N nodes run in this process, in one asyncio loop, as diffswarm's ``SwarmDHT`` (a hivemind ``DHTNode`` on its
own ``P2P``: one p2pd daemon per node, as every peer has). Each new node bootstraps from up to 3 random earlier
nodes (hivemind's ``benchmark_dht.py`` does the same). ``--k`` of them (8 by default) announce an expert record
each under the swarm's experts key, as serving peers do. Then ``--trials`` fresh client-mode nodes, each started
from one random node, call ``get_experts`` until every record is found; the time of those lookups (the first
``get_experts`` alone, and until all K are found) and the client's DHT RPCs (count, and request + response bytes
of the protobufs) are averaged. hivemind's DHT is a Kademlia: lookups should grow like log N.

Then (``--volunteers``, default 1,000; issue 21, item 7) ``bench/dht_volunteers.py`` stores that many volunteers'
expert and statistics entries (K = ``--clusters``, 64) into the largest DHT in both key layouts (version 5: one key
per swarm; version 6: one key per cluster) and prints what a client's start-up lookups and one refresh fetch, and the
largest single DHT message against p2pd's 4 MiB cap.

    python bench/dht_scale.py                     # N = 8 32 64 128, 1,000 volunteers
    python bench/dht_scale.py --quick             # N = 8 16, 1,000 volunteers
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import footer, header, rss_mb, tiny  # noqa: E402
from dht_volunteers import Sizes, measure, report  # noqa: E402

from diffswarm.dht.names import swarm_name_of  # noqa: E402
from diffswarm.dht.node import NetworkConfig, SwarmDHT, load_or_create_key  # noqa: E402
from diffswarm.dht.records import RECORD_VERSION, ExpertRecord  # noqa: E402
from diffswarm.protocol.wire import PROTOCOL_VERSION  # noqa: E402

P2PD_MB = 60  # resident memory of one idle p2pd, about (docs/benchmarks.md: 62 MB): sizes the memory check


def record(dht: SwarmDHT, k: int, maddrs: list[str]) -> ExpertRecord:
    """An expert record as a serving peer announces it (the CPU demo's expert for cluster k)."""
    from hivemind.utils.timed_storage import get_dht_time

    return ExpertRecord(version=RECORD_VERSION, expert_id=f"c{k}-fm", cluster=k, num_clusters=64,
                        partition_hash="bench-partition", objective="fm", schedule="flow", image_shape=[1, 28, 28],
                        num_classes=10, checkpoint_sha256=f"{k:064x}", software="bench", protocol=PROTOCOL_VERSION,
                        state="online", progress=1.0, throughput=500.0, load=0.0, max_batch=256,
                        peer_id=dht.peer_id.to_base58(), addrs=maddrs, updated=float(get_dht_time()))


async def grow(nodes: list[SwarmDHT], addrs: list[list[str]], n: int, swarm: str, rng: random.Random) -> None:
    """Start nodes until there are ``n``; each bootstraps from up to 3 random earlier ones."""
    while len(nodes) < n:
        initial = [a for i in rng.sample(range(len(nodes)), min(3, len(nodes))) for a in addrs[i]] if nodes else []
        dht = await SwarmDHT.create(NetworkConfig.loopback(initial), swarm)
        nodes.append(dht)
        addrs.append(await dht.visible_maddrs())


async def discover(nodes, addrs, swarm: str, k: int, rng: random.Random, deadline: float) -> dict:
    """One fresh client: time of its first ``get_experts``, time until all ``k`` records are found, its traffic."""
    entry = rng.randrange(len(nodes))
    t0 = time.perf_counter()
    client = await SwarmDHT.create(NetworkConfig.loopback(addrs[entry], client_mode=True), swarm)
    try:
        joined = time.perf_counter() - t0
        traffic = Sizes(client)  # DHT RPCs and protobuf bytes both ways, at the client's stub
        t0 = time.perf_counter()
        first, found, lookups = None, 0, 0
        while found < k and time.perf_counter() < deadline:
            recs, _ = await client.get_experts(range(k))  # record i is cluster i's: one key per cluster, one lookup
            lookups += 1
            found = len({r.expert_id for r in recs})
            first = first if first is not None else (time.perf_counter() - t0, found)
            if found < k:
                await asyncio.sleep(0.05)
        return {"join_s": joined, "first_s": first[0], "first_found": first[1], "all_s": time.perf_counter() - t0,
                "found": found, "lookups": lookups, "rpcs": traffic.rpcs, "bytes": traffic.bytes}
    finally:
        await client.shutdown()


async def run(levels: list[int], k: int, trials: int, seed: int, volunteers: int = 0,
              clusters: int = 64) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="dht-bench-") as tmp:
        key, _ = load_or_create_key(os.path.join(tmp, "owner.key"))
    swarm = str(swarm_name_of("bench", key))
    nodes: list[SwarmDHT] = []
    addrs: list[list[str]] = []
    rows = []
    try:
        for n in levels:
            avail = _mem_available_mb()
            if (n - len(nodes) + 2) * P2PD_MB > avail * 0.5:
                print(f"N={n}: skipped, {avail:.0f} MB available is too little for {n - len(nodes)} more daemons")
                break
            t0 = time.perf_counter()
            await grow(nodes, addrs, n, swarm, rng)
            built = time.perf_counter() - t0
            announcers = nodes[-k:] if n >= k else nodes  # the newest nodes announce: records spread over the DHT
            for i, dht in enumerate(announcers):
                ok = await dht.announce_expert(record(dht, i, addrs[nodes.index(dht)]), 300.0)
                if not ok:
                    print(f"N={n}: node {i} failed to store its record")
            got = [await discover(nodes, addrs, swarm, len(announcers), rng, time.perf_counter() + 60)
                   for _ in range(trials)]
            row = {"n": n, "built_s": built, "k": len(announcers),
                   **{f: statistics.mean(g[f] for g in got) for f in got[0]}, "rss_mb": rss_mb(os.getpid())}
            rows.append(row)
            if len(rows) == 1:
                print(f"  sizes: {sizes(nodes[0], addrs[0])}")
            print(f"  N={n}: {len(nodes)} nodes up (+{built:.0f}s), all {row['k']} records in {row['all_s']:.3f}s, "
                  f"{row['rpcs']:.0f} RPCs", flush=True)
        many = await measure(nodes, addrs, swarm, volunteers, clusters) if volunteers and nodes else []
    finally:
        for dht in nodes:
            try:
                await asyncio.wait_for(dht.shutdown(), 10)
            except Exception as e:
                print(f"shutdown of a node failed: {e!r}")
    return rows, many


def _mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def sizes(dht: SwarmDHT, maddrs: list[str]) -> str:
    """Bytes of what a peer stores per heartbeat: its expert record, the DHT's signature and subkey around each
    entry, and a cluster-statistics blob of the CPU demo's shape (28x28, 10 classes)."""
    import msgpack
    import torch

    from diffswarm.router.stats.basis import DCTBasis
    from diffswarm.router.stats.publish import cluster_stats

    rec = len(msgpack.packb(record(dht, 12, maddrs).to_dict(), use_bin_type=True))
    subkey = len(dht.owner) + 8
    signature = len(b"[signature:]") + len(dht.private_key.sign(b"record"))
    stats = cluster_stats(torch.rand(64, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (64,)), 10, DCTBasis((1, 28, 28)),
                          cluster=0, partition_hash="a" * 64, dataset_id="fashion-mnist")
    return (f"expert record {rec} B (msgpack) + subkey {subkey} B + value signature ~{signature} B per DHT entry; "
            f"cluster statistics blob (28x28, 10 classes) {len(stats.to_bytes())} B")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 8 16")
    ap.add_argument("--levels", type=int, nargs="+", default=[8, 32, 64, 128])
    ap.add_argument("--k", type=int, default=8, help="expert records announced")
    ap.add_argument("--trials", type=int, default=3, help="fresh clients per N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--volunteers", type=int, default=1000, help="volunteers stored at the largest N (0: none)")
    ap.add_argument("--clusters", type=int, default=64, help="K for --volunteers")
    args = ap.parse_args()
    if args.quick:
        args.levels, args.k, args.trials = ([4, 8], 4, 1) if tiny() else ([8, 16], 8, 2)
        args.volunteers = min(args.volunteers, 100) if tiny() else args.volunteers
    header(f"DHT discovery vs swarm size: N = {args.levels}, K = {args.k} records, {args.trials} clients per N")
    rows, many = asyncio.run(run(sorted(args.levels), args.k, args.trials, args.seed, args.volunteers,
                                 args.clusters))
    print(f"\n{'N':>5} {'log2 N':>6} {'join s':>7} {'1st get s':>9} {'found':>5} {'all K s':>8} {'gets':>5} "
          f"{'RPCs':>5} {'KB':>7} {'proc RSS MB':>11}")
    for r in rows:
        print(f"{r['n']:5d} {math.log2(r['n']):6.1f} {r['join_s']:7.3f} {r['first_s']:9.3f} {r['first_found']:5.1f} "
              f"{r['all_s']:8.3f} {r['lookups']:5.1f} {r['rpcs']:5.1f} {r['bytes'] / 1024:7.1f} {r['rss_mb']:11.0f}")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        print(f"N x{b['n'] / a['n']:.0f} (log2 N x{math.log2(b['n']) / math.log2(a['n']):.2f}): discovery time "
              f"x{b['all_s'] / a['all_s']:.2f}, RPCs x{b['rpcs'] / max(a['rpcs'], 1):.2f}, "
              f"bytes x{b['bytes'] / max(a['bytes'], 1):.2f}")
    print("join = the client's daemon start + DHT bootstrap; 1st get = its first get_experts; all K = until every "
          "record is found; RPCs / KB = the client's DHT calls and protobuf bytes (both ways) for those lookups")
    if many:
        report(many, args.volunteers, args.clusters)
    footer()


if __name__ == "__main__":
    main()
