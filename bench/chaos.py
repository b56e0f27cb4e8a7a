"""Chaos: concurrent generations over a loopback swarm while peers are killed, restarted, slowed and corrupted.

A bootstrap and K experts x R replicas run as processes on 127.0.0.1 (every peer is a
``diffswarm.testing.hostile`` process, honest until the chaos loop writes a mode into its mode file). G clients
(threads of this process, one SwarmEnsemble and p2p daemon each) generate at once, each under a
deadline, with re-routing off (``ClientConfig.reroute=False``): a generation must either **equal a clean
local run** of the same experts within tolerance, or **fail fast** with a ``NoExpertsError`` naming the
uncovered cluster. Meanwhile, every ``--period`` seconds the chaos loop picks a random peer and kills it
(SIGKILL), restarts a killed one, slows it (answers after the client's deadline), corrupts it (a random
lying mode: nan, scale, negate, zero, random, other expert, row0, noise) or heals a slowed one. A corrupted
peer keeps lying until it is killed (a restarted peer is honest): peers that lie only now and then can
escape the client's sampled cross-checks, which docs/security.md states as a limit. At the end every
process is stopped and the bench checks that no process or p2pd socket is left.

Prints the counts (generations equal / failed naming a cluster / differing / hung, peers killed,
restarted, slowed, corrupted, liars caught, honest peers wrongly banned, cross-checks per image) and
exits non-zero if any generation differed or hung, an honest peer was banned as a liar, or anything
leaked.

    .venv/bin/python bench/chaos.py            # 8 experts x 2 replicas, 20 concurrent generations
    .venv/bin/python bench/chaos.py --quick    # 4 x 2, 4 generations: what CI runs (tests/test_chaos.py)
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from diffswarm.client.config import ClientConfig
from diffswarm.dht.node import NetworkConfig
from diffswarm.router.local import generate, load_local_ensemble
from diffswarm.router.routing import NoExpertsError, RoutingConfig
from diffswarm.sampling.config import SamplingConfig
from diffswarm.swarm.local import PeerSpec, _alive, start_local_swarm
from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm

LIES = ["nan", "scale:1.5", "negate", "zero", "random", "row0", "noise:0.3", "other"]
SOCKETS = "/tmp/hivemind-p2p*.sock"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 experts x 2 replicas, 4 generations (CI)")
    ap.add_argument("--experts", type=int, default=None)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--generations", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps per generation")
    ap.add_argument("--period", type=float, default=None, help="seconds between chaos actions")
    ap.add_argument("--timeout", type=float, default=2.0, help="client deadline of one expert call, seconds")
    ap.add_argument("--deadline", type=float, default=None, help="wall seconds a generation may take")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    k = args.experts or (4 if args.quick else 8)
    gens = args.generations or (4 if args.quick else 20)
    steps = args.steps or (8 if args.quick else 16)
    period = args.period or (1.0 if args.quick else 0.7)
    deadline_s = args.deadline or (90.0 if args.quick else 240.0)
    rng = random.Random(args.seed)
    torch.set_num_threads(1)
    sockets_before = set(glob.glob(SOCKETS))
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        tmp = Path(tmp)
        objectives = ["ddpm" if i % 2 == 0 else "fm" for i in range(k)]
        experts, router = make_toy_swarm(tmp / "toy", ToySwarmSpec(objectives, size=8, width=32, depth=1, steps=5,
                                                                    seed=args.seed))
        modes = {}
        specs = []
        for c in range(k):
            for r in range(args.replicas):
                name = f"c{c}r{r}"
                modes[name] = tmp / "modes" / name
                modes[name].parent.mkdir(parents=True, exist_ok=True)
                modes[name].write_text("honest")
                specs.append(PeerSpec(name, str(experts[c]), program=["diffswarm.testing.hostile", "--mode-file",
                                                                      str(modes[name]), "--"]))
        print(f"starting a swarm of {k} experts x {args.replicas} replicas on 127.0.0.1 ...", flush=True)
        sw = start_local_swarm(specs, str(router), tmp / "run", threads=1, timeout=300, announce_period=1.0)
        print(f"  up in {time.perf_counter() - t_start:.0f}s: {sw.swarm}", flush=True)
        labels = torch.arange(8) % 4
        routing = RoutingConfig("top-k", 2)
        clean = {g: generate(load_local_ensemble(experts, router, routing, seed=g), labels, (1, 8, 8),
                             SamplingConfig(steps=steps, guidance=2.0, seed=g)) for g in range(gens)}
        results: dict[int, tuple] = {}
        state = {n: "honest" for n in modes}  # honest | slow | lie:<mode> | dead
        ever_lied: set[str] = set()  # peer ids that were slow or lying at some point (may rightly be banned)
        counts = {"killed": 0, "restarted": 0, "slowed": 0, "corrupted": 0, "healed": 0}
        peer_ids = {n: sw.info(n)["peer_id"] for n in modes}

        def one(g: int) -> None:
            cfg = ClientConfig(swarm=sw.swarm, net=NetworkConfig.loopback(client_mode=True), call_timeout=args.timeout,
                               connect_timeout=60.0, cache_dir=str(tmp / f"cache{g}"), reroute=False)
            t0 = time.monotonic()
            try:
                with sw.client(routing, seed=g, config=cfg) as model:
                    x = generate(model, labels, (1, 8, 8), SamplingConfig(steps=steps, guidance=2.0, seed=g))
                    diff = float((x - clean[g]).abs().max())
                    results[g] = ("equal" if diff <= 1e-4 else "differs", diff, time.monotonic() - t0,
                                  set(model.liars), model.checks, model.main_calls)
            except NoExpertsError as e:
                results[g] = ("failed", str(e)[:160], time.monotonic() - t0, set(), 0, 0)
            except Exception as e:  # anything else is a bug the bench reports
                results[g] = ("error", repr(e)[:300], time.monotonic() - t0, set(), 0, 0)

        threads = [threading.Thread(target=one, args=(g,), daemon=True) for g in range(gens)]
        for th in threads:
            th.start()
        t_chaos = time.monotonic()
        while any(th.is_alive() for th in threads) and time.monotonic() - t_chaos < deadline_s:
            time.sleep(period)
            name = rng.choice(sorted(modes))
            action = rng.choice(["kill", "restart", "slow", "corrupt", "corrupt", "heal"])
            if state[name] == "dead":
                if action in ("restart", "heal"):
                    modes[name].write_text("honest")
                    try:
                        sw.restart(name, timeout=60)
                        state[name] = "honest"
                        peer_ids[name] = sw.info(name)["peer_id"]
                        counts["restarted"] += 1
                    except Exception as e:
                        print(f"  restart of {name} failed: {e}", flush=True)
                continue
            if action == "kill":
                sw.kill(name)
                state[name] = "dead"
                counts["killed"] += 1
            elif action == "slow":
                modes[name].write_text(f"slow:{args.timeout * 3:g}")
                state[name] = "slow"
                ever_lied.add(peer_ids[name])
                counts["slowed"] += 1
            elif action == "corrupt":
                lie = rng.choice(LIES)
                lie = f"other:{experts[(int(name[1:name.index('r')]) + 1) % k]}" if lie == "other" else lie
                modes[name].write_text(lie)
                state[name] = f"lie:{lie.split(':')[0]}"
                ever_lied.add(peer_ids[name])
                counts["corrupted"] += 1
            elif action == "heal" and state[name] == "slow":  # a liar stays one until it is killed (see below)
                modes[name].write_text("honest")
                state[name] = "honest"
                counts["healed"] += 1
        hung = [g for g, th in enumerate(threads) if th.is_alive()]
        for th in threads:
            th.join(timeout=0.1)
        sw.stop(timeout=15)
        time.sleep(1.0)
        leaked_procs = [p.name for p in sw.procs if _alive(p.pid)]
        kinds = {"equal": 0, "failed": 0, "differs": 0, "error": 0}
        caught, checks, mains = set(), 0, 0
        for g, r in sorted(results.items()):
            kinds[r[0]] += 1
            caught |= r[3]
            checks += r[4]
            mains += r[5]
            if r[0] != "equal":
                print(f"  generation {g}: {r[0]} after {r[2]:.1f}s: {r[1]}", flush=True)
        wrongly = sorted(p for p in caught if p not in ever_lied)
    time.sleep(0.5)
    leaked_sockets = sorted(set(glob.glob(SOCKETS)) - sockets_before)
    total = time.perf_counter() - t_start
    print(f"\n{gens} generations over {k} experts x {args.replicas} replicas, {steps} steps each, "
          f"{total:.0f}s in all ({os.cpu_count()} CPUs)")
    print(f"  equal to a clean run: {kinds['equal']}   failed naming an uncovered cluster: {kinds['failed']}   "
          f"differed: {kinds['differs']}   other errors: {kinds['error']}   hung past {deadline_s:.0f}s: {len(hung)}")
    print(f"  chaos: killed {counts['killed']}, restarted {counts['restarted']}, slowed {counts['slowed']}, "
          f"corrupted {counts['corrupted']}, healed {counts['healed']}")
    print(f"  liars caught (peers): {len(caught)}   honest peers wrongly banned as liars: {len(wrongly)}   "
          f"cross-checks: {checks} for {mains} expert calls ({checks / max(1, mains):.0%} extra)")
    print(f"  leaked processes: {leaked_procs or 0}   leaked p2pd sockets: {len(leaked_sockets)}")
    ok = kinds["differs"] == 0 and kinds["error"] == 0 and not hung and not wrongly and not leaked_procs \
        and not leaked_sockets
    print("chaos: OK" if ok else "chaos: FAILED")
    for s in leaked_sockets:  # leave the machine clean either way
        with __import__("contextlib").suppress(OSError):
            os.unlink(s)
    return 0 if ok else 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
