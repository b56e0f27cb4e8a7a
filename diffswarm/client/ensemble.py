"""``SwarmEnsemble``: the routed ensemble whose experts live on peers.

It is a ``RoutedEnsemble`` with two seams overridden:

- ``available()``: cluster k is available when some verified, unbanned peer serves it;
- ``evaluate()``: the chosen clusters are called concurrently (each gets only the rows that chose
  it), each call under a deadline. A failed call bans its peer (exponential backoff) and the same
  rows are retried on another replica of that cluster (the fastest, least loaded one that is
  left); with no replica left the cluster becomes unavailable and the affected rows are re-routed
  to their next-ranked experts with renormalised weights (``choose_experts`` again, so every
  routing strategy re-routes its own way). What happened is reported as ``StepInfo.events``.

With a fixed seed and the same experts, the result equals local generation up to float
tolerance: the router runs on the client, each peer runs ``Expert.velocity`` (CFG included) on the
same rows, and the mixture is accumulated in the local ensemble's order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import torch

from ..router.routing import NoExpertsError, RoutingConfig, choose_experts
from ..router.sampler import RoutedEnsemble
from .client import ClientConfig, PeerCallError, SwarmClient
from .discovery import SwarmTarget
from .selection import Replica, pick_replica


class RemoteSlot:
    """Cluster k of the swarm, usable alone as a velocity model (with failover among its replicas)."""

    def __init__(self, ensemble: SwarmEnsemble, cluster: int):
        self.ensemble, self.cluster = ensemble, cluster

    @property
    def expert_id(self) -> str:
        return self.ensemble.expert_ids[self.cluster]

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        k, b = self.cluster, x.shape[0]
        w = torch.zeros(b, self.ensemble.num_experts)
        w[:, k] = 1.0
        v, _, _ = self.ensemble.evaluate(x, t, labels, guidance, w, None)
        return v


class SwarmEnsemble(RoutedEnsemble):
    """A mixture of the swarm's experts, weighted by a (fetched and verified) router."""

    def __init__(self, client: SwarmClient, router, routing: RoutingConfig, seed: int = 0, swarm_record=None):
        rc = router.cfg
        self.client = client
        self.swarm_record = swarm_record
        self.image_shape = (rc.channels, rc.size, rc.size)
        self.num_classes = rc.num_classes
        client.set_target(SwarmTarget(rc.num_clusters, rc.partition_hash or "", self.image_shape, rc.num_classes))
        slots = [RemoteSlot(self, k) for k in range(rc.num_clusters)]
        super().__init__(slots, router, routing, expert_ids=[f"c{k}" for k in range(rc.num_clusters)], seed=seed)
        self.sticky: dict[int, str] = {}  # cluster -> checkpoint sha256 in use (stay on one expert's weights)
        self.in_use: dict[int, str] = {}  # cluster -> peer id that answered last
        self._reported_uncovered: tuple[int, ...] = ()

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def connect(cls, initial_peers: Sequence[str], routing: RoutingConfig | None = None, *, seed: int = 0,
                router_path: str | None = None, config: ClientConfig | None = None, device="cpu",
                log=None) -> SwarmEnsemble:
        """Join the swarm as a client, fetch and verify its router (or load ``router_path``), and wait
        up to ``config.connect_timeout`` for every cluster to have a verified peer."""
        from ..router.model import Router

        client = SwarmClient(list(initial_peers), config)
        try:
            if router_path is not None:
                router, rec = Router.load(router_path, device), None
            else:
                router, rec = client.fetch_router(device)
            ens = cls(client, router, routing or RoutingConfig(), seed=seed, swarm_record=rec)
            ens.wait_for_experts(log=log)
            client.start_refresh()
            return ens
        except BaseException:
            client.close()
            raise

    def wait_for_experts(self, timeout: float | None = None, log=None) -> list[int]:
        """Refresh until every cluster has a usable replica or ``timeout``; returns the uncovered clusters.
        Raises ``NoExpertsError`` if no cluster at all is covered by then."""
        timeout = self.client.cfg.connect_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            self.client.refresh()
            self.update_expert_ids()
            uncovered = self.uncovered()
            if not uncovered:
                return []
            if time.monotonic() > deadline:
                if len(uncovered) == self.num_experts:
                    raise NoExpertsError(self.uncovered_message())
                if log:
                    log(f"warning: {self.uncovered_message(prefix='starting with partial coverage')}")
                return uncovered
            time.sleep(0.5)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> SwarmEnsemble:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- availability --------------------------------------------------------------------------

    def _usable(self, k: int, now: float) -> list[Replica]:
        return [r for r in self.client.view.replicas(k) if self.client.usable(r, now)]

    def available(self) -> torch.Tensor:
        now = time.monotonic()
        return torch.tensor([bool(self._usable(k, now)) for k in range(self.num_experts)])

    def uncovered(self) -> list[int]:
        avail = self.available()
        return [k for k in range(self.num_experts) if not avail[k]]

    def update_expert_ids(self) -> None:
        """Name each cluster after the expert of its first usable replica (from the last refreshed records)."""
        now = time.monotonic()
        for k in range(self.num_experts):
            reps = self._usable(k, now)
            if reps and k not in self.in_use:
                self.expert_ids[k] = reps[0].expert_id

    def uncovered_message(self, prefix: str = "no expert can serve this step") -> str:
        now = time.monotonic()
        parts = []
        for k in self.uncovered():
            reps = self.client.view.replicas(k)
            if not reps:
                parts.append(f"cluster {k}: no online peer announces it")
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
        ks = ", ".join(str(k) for k in self.uncovered())
        return (f"{prefix}: clusters {ks} are uncovered ({' | '.join(parts)}). Start peers for them "
                f"(`diffswarm peer --cluster K ...`) or wait for banned peers to recover.")

    # -- one step ------------------------------------------------------------------------------

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
        """As ``RoutedEnsemble.velocity``; when nothing is available it waits for a ban to end (up to one
        call deadline) before failing with the uncovered clusters."""
        deadline = time.monotonic() + self.client.cfg.call_timeout
        threads, prev = self.client.cfg.threads, torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            while True:
                try:
                    return super().velocity(x, t, labels, guidance)
                except NoExpertsError:
                    now = time.monotonic()
                    peers = [r.peer_id for r in self.client.view.all_replicas()]
                    release = self.client.bans.next_release(peers, now)
                    if release is None or release > deadline:
                        raise NoExpertsError(self.uncovered_message()) from None
                    time.sleep(release - now + 0.01)
        finally:
            if threads:
                torch.set_num_threads(prev)

    def _pick(self, k: int, rows: int, now: float, failed: set[str]) -> Replica | None:
        reps = self.client.with_fresh_load(self._usable(k, now))
        return pick_replica(reps, self.client.latency, self.client.bans, now, rows, failed, self.sticky.get(k),
                            current=self.in_use.get(k))

    async def _call_all(self, calls, guidance: float):
        timeout = self.client.cfg.call_timeout
        return await asyncio.gather(*(self.client.call_velocity(rep, xk, tk, lk, guidance, timeout)
                                      for rep, xk, tk, lk in calls), return_exceptions=True)

    def evaluate(self, x, t, labels, guidance, weights, probs):
        """Remote calls with failover. Returns (v, weights actually used, events)."""
        client, kk, b = self.client, self.num_experts, x.shape[0]
        events = client.drain_events()
        uncovered = tuple(self.uncovered())
        if uncovered != self._reported_uncovered and probs is not None:
            if uncovered:
                events.append(f"clusters {list(uncovered)} have no usable peer: "
                              "their rows go to the next-ranked experts")
            else:
                events.append("all clusters are covered again")
            self._reported_uncovered = uncovered
        avail = self.available()
        have = torch.zeros(kk, b, dtype=torch.bool)
        vk_full: list[torch.Tensor | None] = [None] * kk
        failed: set[str] = set()
        t_now = float(t[0])
        while True:
            todo = []
            for k in range(kk):
                need = (weights[:, k] > 0).cpu() & ~have[k]
                if need.any():
                    todo.append((k, need.nonzero(as_tuple=True)[0]))
            if not todo:
                break
            now = time.monotonic()
            calls, meta = [], []
            lost = False
            for k, rows in todo:
                rep = self._pick(k, rows.numel(), now, failed)
                if rep is None:
                    avail[k], lost = False, True
                    continue
                rd = rows.to(x.device)
                calls.append((rep, x[rd], t[rd], labels[rd]))
                meta.append((k, rows, rep))
            outcomes = client.run(self._call_all(calls, guidance)) if calls else []
            now = time.monotonic()
            for (k, rows, rep), out in zip(meta, outcomes, strict=True):
                if isinstance(out, BaseException):
                    reason = str(out) if isinstance(out, PeerCallError) else repr(out)
                    length = client.bans.ban(rep.peer_id, now)
                    client.last_error[rep.peer_id] = reason
                    failed.add(rep.peer_id)
                    nxt = self._pick(k, rows.numel(), now, failed)
                    msg = (f"t={t_now:.3f}: {rep.expert_id} at {rep.peer_id[:12]} failed ({reason[:160]}); "
                           f"banned {length:.0f}s; ")
                    if nxt is not None:
                        msg += f"retrying {rows.numel()} row(s) on replica {nxt.peer_id[:12]}"
                    else:
                        msg += f"no replica left for cluster {k}: re-routing its rows to the next-ranked experts"
                        avail[k], lost = False, True
                    events.append(msg)
                    continue
                v_k, _ = out
                if vk_full[k] is None:
                    vk_full[k] = torch.zeros_like(x)
                vk_full[k][rows.to(x.device)] = v_k.to(device=x.device, dtype=x.dtype)
                have[k, rows] = True
                client.bans.success(rep.peer_id)
                self.in_use[k], self.sticky[k], self.expert_ids[k] = rep.peer_id, rep.checkpoint_sha256, rep.expert_id
            if lost:
                if probs is None or not avail.any():
                    raise NoExpertsError("no expert left for this step")
                weights = choose_experts(probs, avail, self.routing, t_now, self.gumbel)
        # mix in the local ensemble's order (k = 0..K-1) so swarm == local up to float tolerance
        v = torch.zeros_like(x)
        for k in range(kk):
            rows = (weights[:, k] > 0).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            w = weights[rows, k].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
            v.index_add_(0, rows, w * vk_full[k][rows])
            self.calls[k] += rows.numel()
        return v, weights, events
