"""Hidden liars (issue 19): catch rates and cost of the checks against liars that hide, with real processes.

Two loopback swarms of three toy experts (bootstrap + peers as processes on 127.0.0.1, ``diffswarm.testing.hostile``
for the liars), each generation by a **fresh client** (no verified history: the worst case for a liar, and for
the cost):

- ``picky``: cluster 1 is served only by a liar that lies (x1.5) only at noise levels of its choosing,
  t in (0.45, 0.7): 4 of the 11 evaluations of a 6-step Heun trajectory, never the first nor the last. The client
  checks it against its own copy of the weights, fetched from the liar and hash-checked.
- ``colluders``: cluster 1 is served only by two Sybils with the same real checkpoint returning the same lie
  (x1.5 on every call): they agree with each other whenever one is the other's partner.
- ``honest``: the picky swarm with the liar honest, one client for all generations: checks per image as the
  peers' verified answers accumulate (the cost at each point of the decay of ``check_rate``); then the same
  warm client (its rates at the floor) against the liar picking its noise levels again, until it is caught.

Prints, per scenario, the share of generations in which the liar(s) were caught, the share of images equal to a
clean local run, and the extra calls per image (cross-checks, audits and re-checks) next to the main calls, with
the stated escape probabilities of ``client/answer_checks.py`` for comparison.

    .venv/bin/python bench/hidden_liars.py --generations 20
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from diffswarm.client.answer_checks import TrustConfig, check_rate, collusion_escape, escape_probability
from diffswarm.client.config import ClientConfig
from diffswarm.dht.node import NetworkConfig
from diffswarm.router.local import generate, load_local_ensemble
from diffswarm.router.routing import RoutingConfig
from diffswarm.sampling.config import SamplingConfig
from diffswarm.swarm.local import PeerSpec, start_local_swarm
from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm

SHAPE = (1, 8, 8)
LABELS = torch.tensor([0, 1, 2, 3, -1, 0, 1, 2])
SAMPLING = SamplingConfig(steps=6, guidance=2.0, seed=11)
ROUTING = RoutingConfig("top-k", 2)
HOSTILE = "diffswarm.testing.hostile"


def run_one(sw, d: Path, tag: str, liars: list[str], model=None):
    """One generation; returns (x, caught liar names, checks, main calls, events)."""
    cfg = ClientConfig(swarm=sw.swarm, net=NetworkConfig.loopback(client_mode=True), cache_dir=str(d / f"cache-{tag}"),
                       call_timeout=3.0, connect_timeout=30.0, trust=TrustConfig())
    own = model is None
    model = model or sw.client(ROUTING, seed=1, config=cfg)
    try:
        checks0, main0 = model.checks, model.main_calls
        events: list[str] = []
        x = generate(model, LABELS, SHAPE, SAMPLING, callback=lambda i: events.extend(i.events))
        ids = {n: sw.info(n)["peer_id"] for n in liars}
        caught = [n for n, p in ids.items() if p in model.liars]
        return x, caught, model.checks - checks0, model.main_calls - main0, events
    finally:
        if own:
            model.close()


def start(d: Path, experts, router, cluster1: list[PeerSpec]):
    specs = [PeerSpec("peer0", str(experts[0])), *cluster1, PeerSpec("peer2", str(experts[2]))]
    return start_local_swarm(specs, str(router), d / "run", threads=1, timeout=150, announce_period=2.0)


def scenario(name: str, sw, d: Path, liars: list[str], gens: int, want) -> dict:
    caught_all = equal = 0
    checks = mains = 0
    for g in range(gens):
        x, caught, c, m, _ = run_one(sw, d, f"{name}-{g}", liars)
        caught_all += len(caught) == len(liars)
        equal += bool(torch.allclose(x, want, atol=1e-5))
        checks, mains = checks + c, mains + m
        print(f"  {name} generation {g + 1}: caught {caught or 'none'}, {c} checks for {m} main calls", flush=True)
    return {"caught": caught_all / gens, "equal": equal / gens, "checks": checks / gens, "main": mains / gens}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generations", type=int, default=20, help="generations per scenario (a fresh client each)")
    ap.add_argument("--honest-generations", type=int, default=8, help="generations of one client, honest swarm")
    args = ap.parse_args(argv)
    cfg = TrustConfig()
    with tempfile.TemporaryDirectory(prefix="hidden-liars-") as tmp:
        d = Path(tmp)
        experts, router = make_toy_swarm(d, ToySwarmSpec(["ddpm", "fm", "ddpm"], size=8, width=32, depth=1, steps=10))
        want = generate(load_local_ensemble(experts, router, ROUTING, seed=1), LABELS, SHAPE, SAMPLING)
        mode = d / "picky-mode"
        mode.write_text("scale:1.5")
        t0 = time.monotonic()
        sw = start(d / "a", experts, router, [PeerSpec("picky", str(experts[1]), program=[
            HOSTILE, "--mode-file", str(mode), "--lie-t", "0.45:0.7", "--"])])
        try:
            picky = scenario("picky", sw, d, ["picky"], args.generations, want)
            mode.write_text("honest")
            model = sw.client(ROUTING, seed=1, config=ClientConfig(
                swarm=sw.swarm, net=NetworkConfig.loopback(client_mode=True), cache_dir=str(d / "cache-honest"),
                call_timeout=3.0, connect_timeout=30.0))
            with model:
                for g in range(args.honest_generations):
                    _, _, c, m, _ = run_one(sw, d, "honest", [], model)
                    n = sorted(model.verifier.verified.values())
                    print(f"  honest image {g + 1}: {c} checks for {m} main calls (+{c / max(m, 1):.0%}); verified "
                          f"answers per peer {n}, check rates {[round(check_rate(cfg, v), 3) for v in n]}", flush=True)
                mode.write_text("scale:1.5")  # the same client, now with a history: the liar starts picking
                picky_id, warm = sw.info("picky")["peer_id"], None
                for g in range(args.generations):
                    _, caught, c, m, _ = run_one(sw, d, "honest", ["picky"], model)
                    print(f"  warm picky generation {g + 1}: caught {caught or 'none'}, {c} checks for {m} main calls",
                          flush=True)
                    if picky_id in model.liars:
                        warm = g + 1
                        break
        finally:
            sw.stop(timeout=15)
        sw = start(d / "b", experts, router, [
            PeerSpec(f"sybil{s}", str(experts[1]), program=[HOSTILE, "--mode", "scale:1.5", "--"]) for s in "ab"])
        try:
            colluders = scenario("colluders", sw, d, ["sybila", "sybilb"], args.generations, want)
        finally:
            sw.stop(timeout=15)
        print(f"\n{args.generations} generations per scenario, a fresh client each; {time.monotonic() - t0:.0f} s")
        for name, r, stated in (("picky", picky, 1 - escape_probability(cfg, 4, 10, verified=3)),
                                ("colluders", colluders, 1 - collusion_escape(cfg, 2))):  # 2: first answer, audit
            print(f"{name:10s} caught in {r['caught']:.0%} of generations (stated >= {stated:.0%} per generation), "
                  f"images equal to a clean run {r['equal']:.0%}, {r['checks']:.1f} extra calls per image for "
                  f"{r['main']:.1f} main calls")
    print(f"warm client (rates at the floor after {args.honest_generations} honest images): the picky liar caught "
          f"in generation {warm} (stated >= {1 - escape_probability(cfg, 4, 10):.0%} per generation)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
