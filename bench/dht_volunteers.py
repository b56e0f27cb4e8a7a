"""The swarm's DHT keys at many volunteers (issue 21, item 7): ``V`` volunteers' expert and statistics entries,
K clusters, stored into the in-process DHT of ``bench/dht_scale.py`` in both layouts, then read by a fresh client.

- old layout (version 5): every entry of a kind under ONE key per swarm (here ``{swarm}_v5_experts`` /
  ``{swarm}_v5_stats``, extra keys the nodes store without a schema, as a version-5 node stored them);
- new layout (version 6): one key per cluster (``{swarm}_experts_{k}``, ``{swarm}_stats_{k}``).

Entries are real: an ``ExpertRecord`` and a ``ClusterStatsRecord`` with a 28x28, 10-class statistics blob per
volunteer, each signed by its DHT node's key (a few publishing nodes sign for all volunteers; each entry has its own
subkey, so sizes are those of 1,000 distinct peers' entries). Printed: the bytes of a client's start-up lookups
(every cluster's experts and statistics), of one full refresh (every cluster's experts, the merge of every storing
node's answer) and of one first-answer refresh (what a sampling client runs between full ones), and the largest
single DHT message, against p2pd's 4 MiB cap. Used by ``bench/dht_scale.py --volunteers V``.
"""

from __future__ import annotations

import time

from hivemind.utils.timed_storage import get_dht_time

from diffswarm.dht.entries import experts_key, stats_key
from diffswarm.dht.node import CACHE_NEAREST, NetworkConfig, SwarmDHT
from diffswarm.dht.records import RECORD_VERSION, ClusterStatsRecord, ExpertRecord
from diffswarm.protocol.wire import PROTOCOL_VERSION

CAP = 4 << 20  # p2pd's message cap (hivemind's DEFAULT_MAX_MSG_SIZE), bytes
BATCH = 40  # entries per store_many call (one RPC per storing node): well under the cap in either layout


def stats_blob() -> bytes:
    """A statistics blob of the CPU demo's shape (28x28, 10 classes)."""
    import torch

    from diffswarm.router.stats.basis import DCTBasis
    from diffswarm.router.stats.publish import cluster_stats

    g = torch.Generator().manual_seed(0)
    st = cluster_stats(torch.rand(64, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 10, (64,), generator=g), 10,
                       DCTBasis((1, 28, 28)), cluster=0, partition_hash="a" * 64, dataset_id="fashion-mnist")
    return st.to_bytes()


def entries(pub: SwarmDHT, maddrs: list[str], i: int, k: int, num_clusters: int, blob: bytes, sha: str):
    """(expert subkey, expert record, stats subkey, stats record) of volunteer ``i`` serving cluster ``k``."""
    now, pid = float(get_dht_time()), pub.peer_id.to_base58()
    rec = ExpertRecord(version=RECORD_VERSION, expert_id=f"c{k}-v{i}", cluster=k, num_clusters=num_clusters,
                       partition_hash="p" * 64, objective="fm", schedule="flow", image_shape=[1, 28, 28],
                       num_classes=10, checkpoint_sha256=f"{i:064x}", software="0.1.0", protocol=PROTOCOL_VERSION,
                       state="online", progress=1.0, throughput=500.0, load=0.0, max_batch=256, peer_id=pid,
                       addrs=maddrs[:1], updated=now)
    st = ClusterStatsRecord(version=RECORD_VERSION, cluster=k, num_clusters=num_clusters, partition_hash="p" * 64,
                            stats_sha256=sha, blob=blob, software="0.1.0", peer_id=pid, updated=now)
    return (pub.owner + rec.subkey_suffix, rec.to_dict(), pub.owner + f"/stats{k}/{i}".encode(),
            st.to_dict())


async def publish(pubs: list[SwarmDHT], addrs: list[list[str]], swarm: str, volunteers: int, k: int,
                  old: bool) -> tuple[int, int]:
    """Store every volunteer's two entries in one layout; returns (stored, refused)."""
    import hashlib

    blob = stats_blob()
    sha = hashlib.sha256(blob).hexdigest()
    per_pub: dict[int, list] = {}
    for i in range(volunteers):
        j, c = i % len(pubs), i % k
        esk, erec, ssk, srec = entries(pubs[j], addrs[j], i, c, k, blob, sha)
        ekey, skey = (f"{swarm}_v5_experts", f"{swarm}_v5_stats") if old else (experts_key(swarm, c),
                                                                               stats_key(swarm, c))
        per_pub.setdefault(j, []).extend([(ekey, esk, erec), (skey, ssk, srec)])
    ok = bad = 0
    expiration = get_dht_time() + 600
    for j, items in per_pub.items():
        for b in range(0, len(items), BATCH):
            chunk = items[b:b + BATCH]
            got = await pubs[j].node.store_many([c[0] for c in chunk], [c[2] for c in chunk], expiration,
                                                subkeys=[c[1] for c in chunk])
            ok += sum(bool(v) for v in got.values())
            bad += sum(not v for v in got.values())
    return ok, bad


class Sizes:
    """A client's DHT RPC stub wrapper: bytes both ways and the largest single response."""

    def __init__(self, client: SwarmDHT):
        self.bytes = self.largest = self.rpcs = 0
        proto = client.node.protocol
        get_stub = proto.get_stub
        proto.get_stub = lambda peer: _Counting(get_stub(peer), self)

    def reset(self) -> dict:
        out = {"bytes": self.bytes, "largest": self.largest, "rpcs": self.rpcs}
        self.bytes = self.largest = self.rpcs = 0
        return out


class _Counting:
    def __init__(self, stub, tally: Sizes):
        self._stub, self._tally = stub, tally

    def __getattr__(self, name):
        fn = getattr(self._stub, name)
        if not name.startswith("rpc_"):
            return fn

        async def call(request, *a, **kw):
            t = self._tally
            t.rpcs += 1
            t.bytes += request.ByteSize()
            resp = await fn(request, *a, **kw)
            size = resp.ByteSize() if hasattr(resp, "ByteSize") else 0
            t.bytes, t.largest = t.bytes + size, max(t.largest, size)
            return resp
        return call


def say_unsent(loop) -> None:
    """One line instead of a traceback for each error of hivemind's handler when a node's answer cannot be sent (p2pd
    refuses a message over its cap, and hivemind's error path then fails with "no callUnaryResponse field")."""

    def handler(loop, ctx):
        if "callUnaryResponse" in str(ctx.get("exception", "")):
            print("  a DHT node failed to send an answer (over p2pd's message cap; hivemind: no callUnaryResponse "
                  "field)", flush=True)
        else:
            loop.default_exception_handler(ctx)
    loop.set_exception_handler(handler)


async def measure(nodes: list[SwarmDHT], addrs: list[list[str]], swarm: str, volunteers: int, k: int) -> list[dict]:
    """Publish in both layouts, then one fresh client reads each: rows of bytes, largest message, records found."""
    import asyncio

    say_unsent(asyncio.get_running_loop())
    pubs = nodes[:min(8, len(nodes))]
    rows = []
    # the new layout is read twice: first by a client with hivemind's default cache_nearest=1 (its copies stay in
    # the nodes' caches and answer the second client's lookups too: that order favours the default), then by ours
    for old, cache_nearest in ((True, CACHE_NEAREST), (False, 1), (False, CACHE_NEAREST)):
        t0 = time.perf_counter()
        reread = not old and cache_nearest == CACHE_NEAREST != 1  # the row before stored these entries
        stored, refused = (0, 0) if reread else await publish(pubs, addrs, swarm, volunteers, k, old)
        pub_s = time.perf_counter() - t0
        client = await SwarmDHT.create(NetworkConfig.loopback(addrs[-1], client_mode=True), swarm)
        try:
            client.node.cache_nearest = cache_nearest
            sizes = Sizes(client)
            t0 = time.perf_counter()
            if old:
                got = await client._get_many([f"{swarm}_v5_experts", f"{swarm}_v5_stats"])
                found = (len(got[f"{swarm}_v5_experts"]), len(got[f"{swarm}_v5_stats"]))  # raw entries
            else:
                experts, _ = await client.get_experts(range(k))
                stats, _ = await client.get_stats(range(k))
                found = (sum("-v" in r.expert_id for r in experts), len(stats))  # not dht_scale's K records
            read_s = time.perf_counter() - t0
            await asyncio.sleep(1.0)  # hivemind copies found values to nearby nodes in background tasks: count them
            start = sizes.reset()
            if old:
                await client._get_many([f"{swarm}_v5_experts"])
            else:
                await client.get_experts_expiring(range(k))
            await asyncio.sleep(1.0)
            refresh = sizes.reset()
            cheap, cheap_found = None, 0
            if not old:  # the background refresh between full ones: the first answer holding a live entry
                experts, _, _ = await client.get_experts_expiring(range(k), newest=False)
                cheap_found = sum("-v" in r.expert_id for r in experts)
                await asyncio.sleep(1.0)
                cheap = sizes.reset()
            layout = "v5: one key per swarm" if old else "v6: one key per cluster"
            if cache_nearest != CACHE_NEAREST:
                layout += f", cache_nearest={cache_nearest}"
            rows.append({"layout": layout, "stored": stored,

                         "refused": refused, "publish_s": pub_s, "experts": found[0], "stats": found[1],
                         "start": start, "refresh": refresh, "read_s": read_s, "cheap": cheap,
                         "cheap_found": cheap_found})
        finally:
            await client.shutdown()
    return rows


def report(rows: list[dict], volunteers: int, k: int) -> None:
    print(f"\n{volunteers} volunteers, K = {k} (one expert and one statistics entry each); a fresh client reads every "
          f"cluster's experts and statistics (start-up) and every cluster's experts again (refresh):")
    print(f"{'layout':<41} {'stored':>7} {'refused':>7} {'experts':>7} {'stats':>6} {'start-up KB':>11} "
          f"{'RPCs':>5} {'refresh KB':>10} {'RPCs':>5} {'first-answer KB':>15} {'RPCs':>5} {'got':>5} "
          f"{'largest msg KB':>14} {'vs 4 MiB':>8}")
    for r in rows:
        s, f, c = r["start"], r["refresh"], r["cheap"]
        big = max(s["largest"], f["largest"])
        cheap = (f"{c['bytes'] / 1024:15.0f} {c['rpcs']:5d} {r['cheap_found']:5d}" if c is not None
                 else f"{'-':>15} {'-':>5} {'-':>5}")
        print(f"{r['layout']:<41} {r['stored']:7d} {r['refused']:7d} {r['experts']:7d} {r['stats']:6d} "
              f"{s['bytes'] / 1024:11.0f} {s['rpcs']:5d} {f['bytes'] / 1024:10.0f} {f['rpcs']:5d} {cheap} "
              f"{big / 1024:14.0f} {big / CAP:8.2f}")
    print("stored/refused = entries the DHT accepted / refused; experts, stats = entries the client got; KB = the "
          "client's DHT protobuf bytes both ways; largest msg = the largest single DHT response it received (a "
          "response over the cap never arrives: its key's entries are then missing); first-answer = the cheaper "
          "refresh a client runs between full ones (each key's lookup stops at the first answer holding a live "
          "entry; got = the volunteers' expert entries it returned); cache_nearest=1: the client "
          "copies each value it finds to a nearby node, as hivemind does by default (diffswarm's nodes do not: "
          "dht.node.CACHE_NEAREST)")
