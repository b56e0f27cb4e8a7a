"""Runners of what serves: `peer`, `swarm up`, `swarm down` (the I/O halves of ``peer_plans`` and ``swarm_plans``)."""

from __future__ import annotations

from pathlib import Path

from diffswarm.cli.peer_plans import PeerPlan
from diffswarm.cli.swarm_plans import SwarmDownPlan
from diffswarm.swarm.up import SwarmUpConfig, swarm_up


def run_peer(p: PeerPlan) -> int:
    from diffswarm.peer.server import run_peer as serve

    return serve(p.config)  # a peer with nothing to serve says it is a DHT node


def run_swarm_up(p: SwarmUpConfig) -> int:
    sw = swarm_up(p)
    run_dir = Path(p.run_dir)
    print(f"generate with: diffswarm generate --run-dir {run_dir} --class all   (or --loopback --swarm {sw.swarm} "
          f"--initial-peers {sw.initial_peers[0]})")
    print(f"stop with:     diffswarm swarm down --run-dir {run_dir}")
    return 0


def run_swarm_down(p: SwarmDownPlan) -> int:
    from diffswarm.swarm.local import stop_local_swarm

    live = stop_local_swarm(p.run_dir, p.timeout)
    names = ", ".join(f"{q.name} (pid {q.pid})" for q in live)
    print(f"stopped {len(live)} process(es) of the swarm in {p.run_dir}" + (f": {names}" if names else ""))
    return 0
