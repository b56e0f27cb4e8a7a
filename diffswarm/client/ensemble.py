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
import os
import random
import time
from collections.abc import Sequence

import torch

from diffswarm.client.answer_checks import (
    CAUGHT_LYING,
    DISPUTED,
    INVALID_ANSWER,
    PRECISIONS,
    Suspicion,
    agree,
    arbitrate,
    check_answer,
    relative_difference,
    should_verify,
    tolerance,
)
from diffswarm.client.client import SwarmClient
from diffswarm.client.config import ClientConfig, PeerCallError
from diffswarm.client.discovery import SwarmTarget
from diffswarm.client.selection import Replica, pick_replica
from diffswarm.protocol.wire import classify_error
from diffswarm.router.routing import NoExpertsError, RoutingConfig, choose_experts
from diffswarm.router.sampler import RoutedEnsemble, StepRollback, mix


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
        self.trust = client.cfg.trust
        self.suspicion = Suspicion(self.trust.half_life)
        self.rng = random.Random(int.from_bytes(os.urandom(8), "little"))  # peers must not predict the checks
        self.liars: set[str] = set()  # peers caught lying or sending invalid answers (banned for lie_ban)
        self.checks = 0  # cross-checked calls (the cost of checking: each is one more call)
        self.main_calls = 0  # calls whose answers were needed (cross-checks not counted)
        self.unverified = 0  # rows whose replicas disagreed with no arbiter
        self.local_rows = 0  # rows computed with the client's own copy of the weights
        self._precision_of: dict[str, str] = {}
        self.step, self.evaluation, self.rollback_to = 0, 0, None
        self.unverified_since: dict[str, tuple[int, int]] = {}
        self.last_call: dict[str, tuple] = {}
        self.checked: set[str] = set()

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def connect(cls, initial_peers: Sequence[str], routing: RoutingConfig | None = None, *, seed: int = 0,
                router_path: str | None = None, config: ClientConfig | None = None, device="cpu",
                log=None) -> SwarmEnsemble:
        """Join the swarm as a client, fetch and verify its router (or load ``router_path``), and wait
        up to ``config.connect_timeout`` for every cluster to have a verified peer."""
        from diffswarm.router.model import Router

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
        """(K,) bool: clusters with a usable replica, or (``local_fallback``) whose weights the client holds."""
        now = time.monotonic()
        return torch.tensor([bool(self._usable(k, now)) or (self.trust.local_fallback and
                                                            self._local_source(k, set()) is not None)
                             for k in range(self.num_experts)])

    def routable(self) -> torch.Tensor:
        """With ``reroute`` off the router chooses among all clusters: a step that needs a cluster with no source
        fails (``evaluate``) instead of being sent elsewhere."""
        return self.available() if self.client.cfg.reroute else torch.ones(self.num_experts, dtype=torch.bool)

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
        ks = self.uncovered()
        which = f"cluster {ks[0]} is" if len(ks) == 1 else f"clusters {', '.join(str(k) for k in ks)} are"
        return (f"{prefix}: {which} uncovered ({' | '.join(parts)}). Start peers for them "
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

    # -- sources: remote replicas, or the client's own verified copy of an expert's weights -------

    def _pick(self, k: int, rows: int, now: float, failed: set[str]):
        """The source for cluster k's rows: the best usable replica, else (``local_fallback``) the client's own
        verified copy of the cluster's weights; None if neither exists."""
        reps = self.client.with_fresh_load(self._usable(k, now))
        rep = pick_replica(reps, self.client.latency, self.client.bans, now, rows, failed, self.sticky.get(k),
                           current=self.in_use.get(k))
        if rep is None and self.trust.local_fallback:
            return self._local_source(k, failed)
        return rep

    def _local_source(self, k: int, failed: set[str], sha: str | None = None):
        """The client's own copy of cluster k's weights (``sha``, else the one in use, else any announced one)."""
        announced = sorted({r.checkpoint_sha256 for r in self.client.view.replicas(k)})
        shas = [sha] if sha else [self.sticky.get(k), *announced]
        for h in shas:
            if h and LocalSource.name(h) not in failed:
                expert = self.client.local_expert(h, self.client.view.replicas(k), fetch=self.trust.fetch_checkpoints)
                if expert is not None:
                    return LocalSource(expert, h, k)
        return None

    def _partner(self, k: int, src, now: float, failed: set[str]):
        """A second source for cross-checking ``src``: another usable replica with the same weights (the least
        suspected), else the client's own copy; None if there is none."""
        others = [r for r in self._usable(k, now) if r.checkpoint_sha256 == src.checkpoint_sha256
                  and r.peer_id != src.peer_id and r.peer_id not in failed]
        if others:
            return min(others, key=lambda r: (self.suspicion.score(r.peer_id, now), r.peer_id))
        if isinstance(src, LocalSource):
            return None
        return self._local_source(k, failed, src.checkpoint_sha256)

    def _answer_all(self, calls, guidance: float) -> list:
        """Answers (or exceptions) of [(source, x, t, labels)]: remote calls concurrently on the client loop,
        then local ones here."""
        timeout = self.client.cfg.call_timeout
        remote = [i for i, c in enumerate(calls) if not isinstance(c[0], LocalSource)]

        async def gather():
            return await asyncio.gather(*(self.client.call_velocity(calls[i][0], *calls[i][1:], guidance, timeout)
                                          for i in remote), return_exceptions=True)

        out: list = [None] * len(calls)
        for i, r in zip(remote, self.client.run(gather()) if remote else [], strict=True):
            out[i] = r
        for i, (src, xk, tk, lk) in enumerate(calls):
            if isinstance(src, LocalSource):
                out[i] = (src.velocity(xk, tk, lk, guidance), {"precision": "fp32"})
        return out

    # -- trajectory bookkeeping (for cross-check policy and rollbacks) ----------------------------

    def reset(self, batch: int, device) -> None:
        super().reset(batch, device)
        self.step, self.evaluation = 0, 0
        # peer -> (step, evaluation) of its first answer used since its last cross-checked one: where a lie found
        # later can have started (a liar is assumed to keep lying once it starts; see client/trust.py)
        self.unverified_since: dict[str, tuple[int, int]] = {}
        self.last_call: dict[str, tuple] = {}  # peer -> its last unverified answer used (audited at the end)
        self.checked: set[str] = set()  # peers cross-checked in this trajectory

    def begin_step(self, i: int) -> None:
        self.step = i
        for p in [p for p, (s, _) in self.unverified_since.items() if s >= i]:  # a recomputed step forgets later
            del self.unverified_since[p]
            self.last_call.pop(p, None)
        for p in [p for p, c in self.last_call.items() if c[-1] >= i]:
            del self.last_call[p]

    def end_trajectory(self) -> None:
        """Audit before the sampler returns: each peer's last unverified answer used in this trajectory is
        recomputed by a second source; a peer caught lying there is punished and the steps since its last
        checked answer are recomputed (``StepRollback``). With every peer's first answer checked too, a liar
        that lies from some call on and keeps lying is always caught (``client/trust.py``)."""
        events, failed = [], set()
        self.rollback_to = None
        self.evaluation += 1  # every answer audited here is in x already
        for p, (k, rows, call, guidance, v, src, _) in sorted(self.last_call.items()):
            now = time.monotonic()
            partner = self._partner(k, src, now, failed)
            if partner is None:
                continue
            out = self._answer_all([(partner, *call)], guidance)[0]
            vb = self._valid(partner, out, call[0], call[1], guidance, events, failed)
            self.checks += 1
            if vb is None:
                continue
            self._precision_of[partner.peer_id] = self._precision(out)
            tol = tolerance(self.trust, self._precision_of.get(p, "fp32"), self._precision_of[partner.peer_id])
            if agree(v, vb, tol):
                self.unverified_since.pop(p, None)
            else:
                self._dispute(k, rows, src, v, partner, vb, call, guidance, events, failed)
        self.last_call.clear()
        self.client.events.extend(events)
        if self.rollback_to is not None:
            raise StepRollback(self.rollback_to, "the end-of-trajectory audit caught a peer lying")

    # -- one evaluation --------------------------------------------------------------------------

    def _valid(self, src, out, xk, tk, guidance, events: list[str], failed: set[str]):
        """The answer of ``out`` if it is a valid answer, else None (the source is banned: backoff for a failed
        call, ``lie_ban`` for an invalid answer)."""
        now = time.monotonic()
        if isinstance(src, LocalSource):
            return out[0]
        if isinstance(out, BaseException):
            reason = str(out) if isinstance(out, PeerCallError) else repr(out)
            code, retry_after = classify_error(reason)
            failed.add(src.peer_id)
            if code == "busy":  # load, not a failure: no strike, no suspicion; skip it until it says to retry
                self.client.bans.ban_for(src.peer_id, retry_after or 1.0, now)
                events.append(f"t={float(tk[0]):.3f}: {src.expert_id} at {src.peer_id[:12]} is busy "
                              f"(retry after {retry_after or 1.0:.2f}s)")
                return None
            length = self.client.bans.ban(src.peer_id, now)
            self.client.last_error[src.peer_id] = reason
            events.append(f"t={float(tk[0]):.3f}: {src.expert_id} at {src.peer_id[:12]} failed ({reason[:160]}); "
                          f"banned {length:.0f}s")
            return None
        v, _ = out
        why = check_answer(v, xk, tk, guidance)
        if why is None:
            return v
        self._punish(src.peer_id, f"sent an invalid answer: {why}", INVALID_ANSWER, now)
        failed.add(src.peer_id)
        events.append(f"t={float(tk[0]):.3f}: {src.expert_id} at {src.peer_id[:12]} sent an invalid answer ({why}); "
                      f"banned {self.trust.lie_ban:.0f}s")
        return None

    def _punish(self, peer: str, reason: str, amount: float, now: float) -> None:
        self.suspicion.add(peer, amount, now)
        self.client.bans.ban_for(peer, self.trust.lie_ban, now)
        self.client.last_error[peer] = reason
        self.liars.add(peer)

    def _precision(self, out) -> str:
        meta = out[1] if isinstance(out, tuple) and isinstance(out[1], dict) else {}
        p = meta.get("precision")
        return p if p in PRECISIONS else "fp32"

    def _dispute(self, k, rows, a, va, b, vb, call, guidance, events, failed):
        """Sources a and b disagree on cluster k's rows: ask an arbiter (the client's own copy of the weights,
        else a third replica), punish whoever deviates from it. Returns (answer, source it came from): an
        honest side's, else the arbiter's; if nobody can be named, the less suspected side's (unverified)."""
        xk, tk, lk = call
        now = time.monotonic()
        answers = {a.peer_id: va, b.peer_id: vb}
        sources = {a.peer_id: a, b.peer_id: b}
        tol = tolerance(self.trust, self._precision_of[a.peer_id], self._precision_of[b.peer_id])
        arbiter = None if isinstance(a, LocalSource) or isinstance(b, LocalSource) else \
            self._local_source(k, failed, a.checkpoint_sha256)
        reference = None
        if isinstance(a, LocalSource) or isinstance(b, LocalSource):
            reference = va if isinstance(a, LocalSource) else vb
        elif arbiter is not None:
            reference = arbiter.velocity(xk, tk, lk, guidance)
        else:  # a third replica's answer as a vote
            third = [r for r in self._usable(k, now) if r.checkpoint_sha256 == a.checkpoint_sha256
                     and r.peer_id not in answers and r.peer_id not in failed]
            if third:
                c = min(third, key=lambda r: self.suspicion.score(r.peer_id, now))
                out = self._answer_all([(c, xk, tk, lk)], guidance)[0]
                vc = self._valid(c, out, xk, tk, guidance, events, failed)
                if vc is not None:
                    answers[c.peer_id], sources[c.peer_id] = vc, c
                    self._precision_of[c.peer_id] = self._precision(out)
        liars, honest = arbitrate(answers, reference, tol)
        self._resolved = bool(honest) or reference is not None
        truth = reference if reference is not None else (answers[min(honest)] if honest else None)
        judge = "the verified weights" if reference is not None else "the other replicas"
        for p in liars:
            if p.startswith(LocalSource.PREFIX):
                continue  # cannot happen with a reference (the client's own copy is the reference)
            diff = float(relative_difference(answers[p], truth).max())
            self._punish(p, f"caught lying: its answer differs from {judge} by {diff:.3g}", CAUGHT_LYING, now)
            failed.add(p)
            events.append(f"t={float(tk[0]):.3f}: cluster {k} peer {p[:12]} caught lying on {rows.numel()} row(s) "
                          f"(relative difference {diff:.3g} from {judge}); banned {self.trust.lie_ban:.0f}s")
            since = self.unverified_since.get(p)
            if since is not None and since[1] < self.evaluation:  # earlier unchecked answers of it are in x already
                self.rollback_to = since[0] if self.rollback_to is None else min(self.rollback_to, since[0])
        if honest:
            best = min(honest, key=lambda p: (p.startswith(LocalSource.PREFIX), p))  # prefer a remote honest side
            return answers[best], sources[best]
        if reference is not None:
            return reference, arbiter
        for p in answers:  # nobody can be named: both stay usable but are cross-checked from now on
            self.suspicion.add(p, DISPUTED, now)
        self.unverified += rows.numel()
        events.append(f"t={float(tk[0]):.3f}: replicas {a.peer_id[:12]} and {b.peer_id[:12]} of cluster {k} "
                      "disagree and no third source can arbitrate; using the less suspected answer (unverified)")
        best = min(answers, key=lambda p: (self.suspicion.score(p, now), p))
        return answers[best], sources[best]

    def evaluate(self, x, t, labels, guidance, weights, probs):
        """Remote calls with failover and cross-checks. Returns (v, weights actually used, events)."""
        client, kk, b = self.client, self.num_experts, x.shape[0]
        events = client.drain_events()
        if not torch.isfinite(x).all():  # never blame peers for the client's own state
            raise RuntimeError("the sampler's state contains NaN or inf; no answer that passed the checks can cause "
                               "this (a bug in the client)")
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
        self.rollback_to = None
        self.evaluation += 1
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
            calls, jobs = [], []
            lost = False
            for k, rows in todo:
                src = self._pick(k, rows.numel(), now, failed)
                if src is None:
                    if not self.client.cfg.reroute:
                        raise NoExpertsError(f"t={t_now:.3f}: cluster {k} has no usable source left for the "
                                             f"{rows.numel()} row(s) routed to it (reroute is off): "
                                             + self.uncovered_message(prefix="uncovered"))
                    avail[k], lost = False, True
                    events.append(f"t={t_now:.3f}: no replica left for cluster {k}: re-routing its rows to the "
                                  "next-ranked experts")
                    continue
                rd = rows.to(x.device)
                call = (x[rd], t[rd], labels[rd])
                first = src.peer_id not in self.checked
                partner = None
                if not isinstance(src, LocalSource) and should_verify(
                        self.trust, self.rng, first, self.suspicion.score(src.peer_id, now)):
                    partner = self._partner(k, src, now, failed)
                jobs.append((k, rows, src, partner, call, len(calls)))
                self.main_calls += 1
                calls.append((src, *call))
                if partner is not None:
                    calls.append((partner, *call))
            outs = self._answer_all(calls, guidance) if calls else []
            for k, rows, src, partner, call, i in jobs:
                xk, tk, _ = call
                va = self._valid(src, outs[i], xk, tk, guidance, events, failed)
                self._precision_of[src.peer_id] = self._precision(outs[i])
                vb = None
                if partner is not None:
                    vb = self._valid(partner, outs[i + 1], xk, tk, guidance, events, failed)
                    self._precision_of[partner.peer_id] = self._precision(outs[i + 1])
                    self.checks += 1
                    self.checked.add(src.peer_id)
                    if vb is not None:
                        self.checked.add(partner.peer_id)
                v, used, checked = va, src, False
                if va is not None and vb is not None:
                    tol = tolerance(self.trust, self._precision_of[src.peer_id], self._precision_of[partner.peer_id])
                    checked = True
                    if not agree(va, vb, tol):
                        v, used = self._dispute(k, rows, src, va, partner, vb, call, guidance, events, failed)
                        checked = self._resolved
                elif va is None and vb is not None and (self.trust.local_fallback
                                                        or not isinstance(partner, LocalSource)):
                    # the main source failed or lied; its partner's answer passed the checks (the client's own
                    # copy of the weights stands in for a peer only with local_fallback)
                    v, used = vb, partner
                    events.append(f"t={t_now:.3f}: using the answer of {partner.peer_id[:12]} for cluster {k}")
                if v is None:  # recomputed by another source in the next round
                    nxt = self._pick(k, rows.numel(), time.monotonic(), failed)
                    if nxt is not None:
                        events.append(f"t={t_now:.3f}: retrying {rows.numel()} row(s) of cluster {k} on "
                                      f"{'its verified weights' if isinstance(nxt, LocalSource) else 'replica'} "
                                      f"{nxt.peer_id[:12]}")
                    continue
                if vk_full[k] is None:
                    vk_full[k] = torch.zeros_like(x)
                vk_full[k][rows.to(x.device)] = v.to(device=x.device, dtype=x.dtype)
                have[k, rows] = True
                if not isinstance(used, LocalSource):
                    client.bans.success(used.peer_id)
                    if checked:
                        self.unverified_since.pop(used.peer_id, None)
                        self.last_call.pop(used.peer_id, None)
                    else:
                        self.unverified_since.setdefault(used.peer_id, (self.step, self.evaluation))
                        self.last_call[used.peer_id] = (k, rows, call, guidance, v, used, self.step)
                else:
                    self.local_rows += rows.numel()
                self.in_use[k], self.sticky[k] = used.peer_id, used.checkpoint_sha256
                self.expert_ids[k] = used.expert_id
            if self.rollback_to is not None:
                raise StepRollback(self.rollback_to, "a peer whose answers went into it was caught lying")
            if lost:
                if probs is None or not avail.any():
                    raise NoExpertsError("no expert left for this step")
                weights = choose_experts(probs, avail, self.routing, t_now, self.gumbel)
        return mix(x, weights, lambda k, rows: vk_full[k][rows], self.calls), weights, events


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
