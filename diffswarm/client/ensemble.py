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

The sources of each cluster (replicas, the client's own verified weights) are ``sources.Sources``; the
checks on their answers (cross-checks, disputes, the end-of-trajectory audit) are ``verifier.Verifier``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from diffswarm.client.answer_checks import Suspicion
from diffswarm.client.client import SwarmClient
from diffswarm.client.config import ClientConfig
from diffswarm.client.discovery import SwarmTarget
from diffswarm.client.ledger import Job
from diffswarm.client.sources import LocalSource, RemoteSlot, Sources
from diffswarm.client.verifier import Verifier
from diffswarm.protocol.wire import as_sent
from diffswarm.router.ensemble import RoutedEnsemble, mix
from diffswarm.router.routing import NoExpertsError, RoutingConfig
from diffswarm.sampling.hooks import StepRollback
from diffswarm.utils.signals import raise_if_stopped

logger = logging.getLogger(__name__)

ADMISSION_LOOKUP_S = 10.0  # seconds a client with a local router waits for the owner's manifest (its admission rule)


@dataclass
class _Evaluation:
    """One call of ``SwarmEnsemble.evaluate``: its request, the answers gathered so far, and what happened."""

    x: torch.Tensor  # (B, C, H, W)
    t: torch.Tensor  # (B,)
    labels: torch.Tensor  # (B,)
    guidance: float
    avail: torch.Tensor  # (K,) bool: clusters with a source left (rows of the others are re-routed)
    events: list[str]
    failed: set[str] = field(default_factory=set)  # sources that failed in this evaluation
    have: torch.Tensor = field(init=False)  # (K, B) bool: rows of cluster k answered
    answers: list[torch.Tensor | None] = field(init=False)  # per cluster, (B, C, H, W) with its answered rows

    def __post_init__(self) -> None:
        self.have = torch.zeros(len(self.avail), self.x.shape[0], dtype=torch.bool)
        self.answers = [None] * len(self.avail)

    @property
    def t_now(self) -> float:
        return float(self.t[0])

    def todo(self, weights: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """[(k, row indices)]: the rows routed to cluster k by ``weights`` (B, K) that have no answer yet."""
        todo = []
        for k in range(len(self.answers)):
            need = (weights[:, k] > 0).cpu() & ~self.have[k]
            if need.any():
                todo.append((k, need.nonzero(as_tuple=True)[0]))
        return todo

    def store(self, k: int, rows: torch.Tensor, v: torch.Tensor) -> None:
        """Cluster k's answer v (n, C, H, W) for ``rows`` (n,)."""
        if self.answers[k] is None:
            self.answers[k] = torch.zeros_like(self.x)
        self.answers[k][rows.to(self.x.device)] = v.to(device=self.x.device, dtype=self.x.dtype)
        self.have[k, rows] = True


class SwarmEnsemble(RoutedEnsemble):
    """A mixture of the swarm's experts, weighted by a (fetched and verified) router."""

    def __init__(self, client: SwarmClient, router, routing: RoutingConfig, seed: int = 0, swarm_record=None):
        rc = router.cfg
        self.client = client
        self.swarm_record = swarm_record
        if getattr(client, "discovery", None) is not None:  # its admission rule decides which checkpoints are used
            client.discovery.manifest = swarm_record
        self.image_shape = (rc.channels, rc.size, rc.size)
        self.num_classes = rc.num_classes
        client.set_target(SwarmTarget(rc.num_clusters, rc.partition_hash or "", self.image_shape, rc.num_classes))
        slots = [RemoteSlot(self, k) for k in range(rc.num_clusters)]
        super().__init__(slots, router, routing, expert_ids=[f"c{k}" for k in range(rc.num_clusters)], seed=seed)
        self._reported_uncovered: tuple[int, ...] = ()
        self.trust = client.cfg.trust
        self.sources = Sources(client, self.trust)
        self.verifier = Verifier(client, self.sources, self.trust)
        self.main_calls = 0  # calls whose answers were needed (cross-checks not counted)
        self.local_rows = 0  # rows computed with the client's own copy of the weights

    # -- what the checks found (``Verifier``) and which source serves each cluster (``Sources``) ---

    @property
    def liars(self) -> set[str]:  # peers caught lying or sending invalid answers (banned for lie_ban)
        return self.verifier.liars

    @property
    def suspicion(self) -> Suspicion:
        return self.verifier.suspicion

    @property
    def checks(self) -> int:  # cross-checked calls (the cost of checking: each is one more call)
        return self.verifier.checks

    @property
    def unverified(self) -> int:  # rows whose replicas disagreed with no arbiter
        return self.verifier.unverified

    @property
    def in_use(self) -> dict[int, str]:  # cluster -> peer id that answered last
        return self.sources.in_use

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def connect(cls, initial_peers: Sequence[str], routing: RoutingConfig | None = None, *, seed: int = 0,
                router_path: str | None = None, config: ClientConfig | None = None, device="cpu") -> SwarmEnsemble:
        """Join the swarm as a client, fetch and verify its router (or load ``router_path``), and wait
        up to ``config.connect_timeout`` for every cluster to have a verified peer."""
        from diffswarm.router.model import Router

        client = SwarmClient(list(initial_peers), config)
        try:
            if router_path is not None:
                router, rec = Router.load(router_path, device), cls._admission_manifest(client)
            else:
                router, rec = client.fetch_router(device)
            ens = cls(client, router, routing or RoutingConfig(), seed=seed, swarm_record=rec)
            if ens.wait_for_experts():
                logger.info(f"warning: {ens.uncovered_message(prefix='starting with partial coverage')}")
            client.start_refresh()
            return ens
        except BaseException:
            client.close()
            raise

    @staticmethod
    def _admission_manifest(client: SwarmClient):
        """With a local router file, the owner's manifest is still what says which experts are admitted: looked up
        for up to ``ADMISSION_LOOKUP_S`` (None, with a warning, if there is none: every expert is then used)."""
        from diffswarm.client.config import SwarmClientError

        if not client.cfg.swarm:
            return None
        try:
            return client.find_manifest(wait=min(ADMISSION_LOOKUP_S, client.cfg.connect_timeout))
        except SwarmClientError as e:
            logger.warning(f"no owner-signed manifest found ({e}): admission cannot be applied, every announced "
                           "expert is used")
            return None

    def wait_for_experts(self, timeout: float | None = None) -> list[int]:
        """Refresh until every cluster has a usable replica or ``timeout``; returns the uncovered clusters.
        Raises ``NoExpertsError`` if no cluster at all is covered by then."""
        timeout = self.client.cfg.connect_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            raise_if_stopped()
            self.client.refresh()
            self.update_expert_ids()
            uncovered = self.uncovered()
            if not uncovered:
                return []
            if time.monotonic() > deadline:
                if len(uncovered) == self.num_experts:
                    raise NoExpertsError(self.uncovered_message())
                return uncovered
            time.sleep(0.5)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> SwarmEnsemble:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- availability --------------------------------------------------------------------------

    def available(self) -> torch.Tensor:
        """(K,) bool: clusters with a usable replica, or (``local_fallback``) whose weights the client holds."""
        now = time.monotonic()
        return torch.tensor([bool(self.sources.usable(k, now)) or (self.trust.local_fallback and
                                                                   self.sources.local(k, set()) is not None)
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
            reps = self.sources.usable(k, now)
            if reps and k not in self.sources.in_use:
                self.expert_ids[k] = reps[0].expert_id

    def uncovered_message(self, prefix: str = "no expert can serve this step") -> str:
        return self.sources.uncovered_message(self.uncovered(), prefix)

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

    # -- trajectory bookkeeping (for cross-check policy and rollbacks) ----------------------------

    def reset(self, batch: int, device, evaluations: int | None = None) -> None:
        super().reset(batch, device, evaluations)
        self.verifier.ledger.reset(evaluations)

    def begin_step(self, i: int, steps: int) -> None:
        self.verifier.ledger.begin_step(i)
        self.verifier.final_step = i == steps - 1  # its answers are cross-checked in the step, not audited after

    def end_trajectory(self) -> None:
        """Audit before the sampler returns: each peer's last unverified answer used in this trajectory, and random
        earlier ones, are recomputed by a second source; a peer caught lying there is punished and the steps since
        its first answer the client's own copy did not verify are recomputed (``StepRollback``). With every peer's
        first answer checked too, a liar that lies from some call on and keeps lying is always caught; one that
        picks its calls escapes with the probability stated in ``client/answer_checks.py``."""
        self.client.events.extend(self.verifier.audit())
        if self.verifier.rollback_to is not None:
            raise StepRollback(self.verifier.rollback_to, "the end-of-trajectory audit caught a peer lying")

    # -- one evaluation --------------------------------------------------------------------------

    def evaluate(self, x, t, labels, guidance, weights, probs):
        """Remote calls with failover and cross-checks. Returns (v, weights actually used, events)."""
        self.client.mark_used()
        events = self.client.drain_events()
        if not torch.isfinite(x).all():  # never blame peers for the client's own state
            raise RuntimeError("the sampler's state contains NaN or inf; no answer that passed the checks can cause "
                               "this (a bug in the client)")
        self._report_coverage(probs, events)
        ev = _Evaluation(x, t, labels, guidance, self.available(), events)
        self.verifier.begin_evaluation()
        picks = self.verifier.pick_checks(ev.failed, guidance)  # audit picks, verified while the peers compute
        while todo := ev.todo(weights):  # rounds of calls: the rows of every cluster at once, then the retries
            calls, jobs, lost = self._plan(ev, todo)
            n = len(calls)
            calls += [(own, *u.call) for u, own in picks]
            outs = self.sources.answer_all(calls, guidance) if calls else []
            for job in jobs:
                self._settle(ev, job, outs)
            self.verifier.settle_pick_checks(picks, outs[n:], ev.events, ev.failed)
            picks = []
            if self.verifier.rollback_to is not None:
                self.client.events.extend(ev.events)  # who was caught, and why: shown with the recomputed step
                raise StepRollback(self.verifier.rollback_to, "a peer whose answers went into it was caught lying")
            if lost:
                if probs is None or not ev.avail.any():
                    raise NoExpertsError("no expert left for this step")
                weights = self.choose(probs, ev.avail, ev.t_now)
        return mix(x, weights, lambda k, rows: ev.answers[k][rows], self.calls), weights, events

    def _report_coverage(self, probs, events: list[str]) -> None:
        """An event when the set of uncovered clusters changed since the last routed evaluation."""
        uncovered = tuple(self.uncovered())
        if uncovered != self._reported_uncovered and probs is not None:
            if uncovered:
                events.append(f"clusters {list(uncovered)} have no usable peer: "
                              "their rows go to the next-ranked experts")
            else:
                events.append("all clusters are covered again")
            self._reported_uncovered = uncovered

    def _plan(self, ev: _Evaluation, todo: list[tuple[int, torch.Tensor]]) -> tuple[list, list[Job], bool]:
        """(calls [(source, x, t, labels)], jobs, lost) for a round; a cluster with no source left is marked
        unavailable (its rows are re-routed), or fails the step with ``reroute`` off."""
        now = time.monotonic()
        calls, jobs = [], []
        lost = False
        for k, rows in todo:
            src = self.sources.pick(k, rows.numel(), now, ev.failed)
            if src is None:
                if not self.client.cfg.reroute:
                    raise NoExpertsError(f"t={ev.t_now:.3f}: cluster {k} has no usable source left for the "
                                         f"{rows.numel()} row(s) routed to it (reroute is off): "
                                         + self.uncovered_message(prefix="uncovered"))
                ev.avail[k], lost = False, True
                ev.events.append(f"t={ev.t_now:.3f}: no replica left for cluster {k}: re-routing its rows to the "
                                 "next-ranked experts")
                continue
            rd = rows.to(ev.x.device)
            call = (as_sent(ev.x[rd], self.client.cfg.compression), ev.t[rd], ev.labels[rd])
            partner = self.verifier.partner_for(k, src, now, ev.failed)
            jobs.append(Job(k, rows, src, partner, call, len(calls)))
            self.main_calls += 1
            calls.append((src, *call))
            if partner is not None:
                calls.append((partner, *call))
        return calls, jobs, lost

    def _settle(self, ev: _Evaluation, job: Job, outs: list) -> None:
        """Store the job's answer if one passed the checks (else say where its rows are retried next round)."""
        k, rows = job.k, job.rows
        v, used, checked = self.verifier.judge(job, outs, ev.guidance, ev.t_now, ev.events, ev.failed)
        if v is None:  # recomputed by another source in the next round
            nxt = self.sources.pick(k, rows.numel(), time.monotonic(), ev.failed)
            if nxt is not None:
                ev.events.append(f"t={ev.t_now:.3f}: retrying {rows.numel()} row(s) of cluster {k} on "
                                 f"{'its verified weights' if isinstance(nxt, LocalSource) else 'replica'} "
                                 f"{nxt.peer_id[:12]}")
            return
        ev.store(k, rows, v)
        if not isinstance(used, LocalSource):
            self.client.bans.success(used.peer_id)
            self.verifier.ledger.note_used(job, ev.guidance, v, used, checked)
        else:
            self.local_rows += rows.numel()
        self.sources.in_use[k], self.sources.sticky[k] = used.peer_id, used.checkpoint_sha256
        self.expert_ids[k] = used.expert_id
