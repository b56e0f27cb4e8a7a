"""Where a cluster's rows are computed: a peer's replica or the client's own verified copy of the weights
(``LocalSource``), picked and paired for cross-checks by ``Sources``; ``RemoteSlot`` is one cluster of the
swarm usable alone as a velocity model."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from diffswarm.client.answer_checks import TrustConfig
from diffswarm.client.selection import Replica, pick_replica
from diffswarm.router.ensemble import RoutedEnsemble

_IPV4 = re.compile(r"/ip4/(\d+)\.(\d+)\.\d+\.\d+")


def address_blocks(addrs) -> frozenset[str]:
    """The /16 blocks ("a.b") of the IPv4 addresses in a peer's announced multiaddrs (empty if none)."""
    return frozenset(f"{m.group(1)}.{m.group(2)}" for a in addrs for m in [_IPV4.search(str(a))] if m)


def independent(a, b) -> bool:
    """Whether sources a and b look run by different people: both announce IPv4 addresses and share no /16 block.
    Unknown or shared blocks (loopback, one NAT) count as not independent."""
    ba, bb = address_blocks(getattr(a, "addrs", ())), address_blocks(getattr(b, "addrs", ()))
    return bool(ba and bb and not ba & bb)


SAME_HISTORY = 60.0  # seconds: peers this client first saw within this of each other may have been started together


class RemoteSlot:
    """Cluster k of the swarm, usable alone as a velocity model (with failover among its replicas)."""

    def __init__(self, ensemble: RoutedEnsemble, cluster: int):
        self.ensemble, self.cluster = ensemble, cluster

    @property
    def expert_id(self) -> str:
        return self.ensemble.expert_ids[self.cluster]

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        k, b = self.cluster, x.shape[0]
        w = torch.zeros(b, self.ensemble.num_experts, device=x.device)
        w[:, k] = 1.0
        v, _, _ = self.ensemble.evaluate(x, t, labels, guidance, w, None)
        return v


class LocalSource:
    """The client's own copy of an expert's weights (sha256-verified), used as a source like a replica."""

    PREFIX = "local:"

    def __init__(self, expert, sha256: str, cluster: int):
        self.expert, self.checkpoint_sha256, self.cluster = expert, sha256, cluster
        self.peer_id = self.name(sha256)
        self.expert_id = expert.expert_id

    @classmethod
    def name(cls, sha256: str) -> str:
        return cls.PREFIX + sha256[:12]

    def velocity(self, x, t, labels, guidance):
        dev = next(self.expert.parameters()).device
        return self.expert.velocity(x.to(dev), t.to(dev), labels.to(dev), guidance).to(x.device)


def local_velocities(calls, guidance: float) -> dict[int, torch.Tensor]:
    """{index: velocity} of the calls [(source, x, t, labels)] whose source is a ``LocalSource``: the calls of one
    checkpoint (an end-of-trajectory audit recomputes several answers of an expert) in one forward pass, split
    back."""
    by_src: dict[str, list[int]] = {}
    for i, c in enumerate(calls):
        if isinstance(c[0], LocalSource):
            by_src.setdefault(c[0].peer_id, []).append(i)  # local:<sha256 prefix>: one set of weights
    out = {}
    for idx in by_src.values():
        xs = [calls[i][1] for i in idx]
        ts = [t.expand(len(x)) if t.dim() == 0 else t for t, x in zip((calls[i][2] for i in idx), xs, strict=True)]
        v = calls[idx[0]][0].velocity(torch.cat(xs), torch.cat(ts), torch.cat([calls[i][3] for i in idx]), guidance)
        out.update(zip(idx, v.split([len(x) for x in xs]), strict=True))
    return out


class Sources:
    """The sources of each cluster for one ``SwarmEnsemble``: remote replicas, or the client's own verified copy
    of an expert's weights. ``failed``: names of sources that failed in the current evaluation (skipped)."""

    def __init__(self, client, trust: TrustConfig):
        self.client, self.trust = client, trust  # client: a SwarmClient (or its surface, tests/peer_harness.py)
        self.sticky: dict[int, str] = {}  # cluster -> checkpoint sha256 in use (stay on one expert's weights)
        self.in_use: dict[int, str] = {}  # cluster -> peer id that answered last
        self.first_seen: dict[str, float] = {}  # peer id -> when this client first saw it announced (monotonic)
        self._pool: ThreadPoolExecutor | None = None  # computes local answers while remote calls are in flight

    def usable(self, k: int, now: float) -> list[Replica]:
        reps = [r for r in self.client.view.replicas(k) if self.client.usable(r, now)]
        for r in reps:
            self.first_seen.setdefault(r.peer_id, now)
        return reps

    def other_history(self, a, b) -> bool:
        """Whether this client first saw a and b announced more than ``SAME_HISTORY`` apart (Sybils started together
        show up together; peers present when the client joined all share its join time)."""
        fa, fb = self.first_seen.get(a.peer_id), self.first_seen.get(b.peer_id)
        return fa is not None and fb is not None and abs(fa - fb) > SAME_HISTORY

    def pick(self, k: int, rows: int, now: float, failed: set[str]):
        """The source for cluster k's rows: the best usable replica, else (``local_fallback``) the client's own
        verified copy of the cluster's weights; None if neither exists."""
        reps = self.client.with_fresh_load(self.usable(k, now))
        if self.client.view.admission is None:  # admission off: any checkpoint, the one in use first
            rep = pick_replica(reps, self.client.latency, self.client.bans, now, rows, failed, self.sticky.get(k),
                               current=self.in_use.get(k))
        else:  # the checkpoint in use, else the best-scored one first; its replicas by latency
            rep = None
            for sha in self.checkpoint_order(k, reps):
                rep = pick_replica([r for r in reps if r.checkpoint_sha256 == sha], self.client.latency,
                                   self.client.bans, now, rows, failed, current=self.in_use.get(k))
                if rep is not None:
                    break
        if rep is None and self.trust.local_fallback:
            return self.local(k, failed)
        return rep

    def checkpoint_order(self, k: int, reps: list[Replica]) -> list[str]:
        """The checkpoints of cluster k's replicas in the order they are tried: the one this trajectory uses
        (``sticky``), then by admitted score (best first; ties by sha256)."""
        view, sticky = self.client.view, self.sticky.get(k)
        shas = sorted({r.checkpoint_sha256 for r in reps}, key=lambda h: (h != sticky, view.score(h, k), h))
        return shas

    def local(self, k: int, failed: set[str], sha: str | None = None):
        """The client's own copy of cluster k's weights (``sha``, else the one in use, else any announced one)."""
        announced = sorted({r.checkpoint_sha256 for r in self.client.view.replicas(k)})
        shas = [sha] if sha else [self.sticky.get(k), *announced]
        for h in shas:
            if h and LocalSource.name(h) not in failed:
                expert = self.client.local_expert(h, self.client.view.replicas(k), fetch=self.trust.fetch_checkpoints)
                if expert is not None:
                    return LocalSource(expert, h, k)
        return None

    def partner(self, k: int, src, now: float, failed: set[str], suspicion: Callable[[str, float], float],
                rng: random.Random):
        """A second source for cross-checking ``src``, drawn with the client's own generator ``rng`` (so a Sybil
        cannot choose its checker by grinding peer ids): for a ``local_check_share`` of checks (and whenever no
        other replica is left) the client's own copy of the weights, if it can get it; else a random usable
        replica with the same sha256, preferring (in turn) unsuspected ones, ones independent of ``src``
        (``independent``: another /16 block) and ones with another identity history (``other_history``).
        None if there is no second source."""
        others = [r for r in self.usable(k, now) if r.checkpoint_sha256 == src.checkpoint_sha256
                  and r.peer_id != src.peer_id and r.peer_id not in failed]
        if isinstance(src, LocalSource):
            return min(others, key=lambda r: (suspicion(r.peer_id, now), r.peer_id)) if others else None
        if not others or rng.random() < self.trust.local_check_share:
            own = self.local(k, failed, src.checkpoint_sha256)
            if own is not None or not others:
                return own
        for keep in (lambda r: suspicion(r.peer_id, now) < self.trust.suspect_score,
                     lambda r: independent(src, r),
                     lambda r: self.other_history(src, r)):
            preferred = [r for r in others if keep(r)]
            others = preferred or others  # a preference nobody meets (all on loopback) is dropped
        return rng.choice(sorted(others, key=lambda r: r.peer_id))

    def answer_all(self, calls, guidance: float) -> list:
        """Answers (or exceptions) of [(source, x, t, labels)]: remote calls concurrently on the client loop,
        then local ones here."""
        timeout = self.client.cfg.call_timeout
        remote = [i for i, c in enumerate(calls) if not isinstance(c[0], LocalSource)]

        async def gather():
            return await asyncio.gather(*(self.client.call_velocity(calls[i][0], *calls[i][1:], guidance, timeout)
                                          for i in remote), return_exceptions=True)

        def local_answers() -> dict:
            return {i: (v, {"precision": "fp32"}) for i, v in local_velocities(calls, guidance).items()}

        out: list = [None] * len(calls)
        # the client's own evaluations (cross-checks, fallback) overlap the remote calls: a worker thread computes
        # them while this thread waits for the peers (bench/swarm_vs_local.py measured the checks' share of a step)
        overlap = remote and len(remote) < len(calls)
        pending = self._local_pool().submit(local_answers) if overlap else None
        for i, r in zip(remote, self.client.run(gather()) if remote else [], strict=True):
            out[i] = r
        for i, r in (pending.result() if pending is not None else local_answers()).items():
            out[i] = r
        return out

    def _local_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="local-answers")
        return self._pool

    def uncovered_message(self, clusters: list[int], prefix: str) -> str:
        """Why each of ``clusters`` (the uncovered ones) has no usable source, and what to do about it."""
        now = time.monotonic()
        parts = []
        for k in clusters:
            reps = self.client.view.replicas(k)
            if not reps:
                view = self.client.view
                clusters_of = getattr(view, "probation_clusters", {})
                held = [f"{key.split('/')[1]} at {key[:12]} {why}"
                        for key, why in sorted(getattr(view, "probation", {}).items()) if clusters_of.get(key) == k]
                parts.append(f"cluster {k}: " + ("; ".join(held) + " (not admitted under the owner's admission rule)"
                                                  if held else "no online peer announces it"))
                continue
            why = []
            for r in reps:
                if self.client.bans.is_banned(r.peer_id, now):
                    left = self.client.bans.until[r.peer_id] - now
                    last = self.client.last_error.get(r.peer_id, "?")
                    why.append(f"{r.peer_id[:12]} banned {left:.0f}s more ({last})")
                else:
                    why.append(f"{r.peer_id[:12]} not verified yet")
            parts.append(f"cluster {k}: {len(reps)} replica(s), none usable: " + "; ".join(why))
        which = (f"cluster {clusters[0]} is" if len(clusters) == 1
                 else f"clusters {', '.join(str(k) for k in clusters)} are")
        return (f"{prefix}: {which} uncovered ({' | '.join(parts)}). Start peers for them "
                f"(`diffswarm join ...` or `diffswarm peer --cluster K ...`), wait for banned peers to recover, or for "
                f"experts on probation to be admitted (train them longer if their score is refused).")
