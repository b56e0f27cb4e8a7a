"""``Ledger``: which answers of each peer went into the current trajectory, unchecked or vouched for, so that
the end-of-trajectory audit can recompute some of them and a caught liar's steps can be rolled back to the first
of its answers that the client's own copy of the weights did not verify."""

from __future__ import annotations

import random
from typing import NamedTuple

import torch

from diffswarm.client.selection import Replica
from diffswarm.client.sources import LocalSource


class Job(NamedTuple):
    """Cluster k's ``rows`` of one evaluation sent to ``src`` (and to ``partner`` for a cross-check)."""

    k: int
    rows: torch.Tensor  # (n,) row indices into the batch
    src: Replica | LocalSource
    partner: Replica | LocalSource | None
    call: tuple  # (x, t, labels) of those rows
    i: int  # index of src's answer among the round's answers (the partner's is i + 1)


class Used(NamedTuple):
    """An answer of a peer that went into x unchecked (audited later) or checked by a partner (a vouch)."""

    k: int
    rows: torch.Tensor  # (n,)
    call: tuple  # (x, t, labels)
    guidance: float
    v: torch.Tensor  # the peer's answer
    src: Replica
    step: int
    evaluation: int


class Ledger:
    """One trajectory's record of the answers used (``reset`` at its start; ``begin_step`` forgets what a
    recomputed step replaces).

    The audit's ``audit_samples`` = a random answers per peer, uniform among its m unchecked answers of the
    trajectory: with the trajectory's number of evaluations M known (``reset(horizon=M)``), a uniform a-subset S of
    positions 1..M is drawn with ``rng`` when a peer is first used, and its unchecked answers at those positions
    are its picks as they arrive (``new_picks``: verified while the peers compute). If the trajectory ends with
    fewer than a picks (m < max S), the rest are drawn at the audit, uniformly among its other unchecked answers,
    from a reservoir of size a kept over them (``spare``). The union is a uniform min(a, m)-subset of the m
    answers (S restricted to 1..m is a uniform subset of its size, completed uniformly), exactly so when no step
    is recomputed. Without a horizon every pick comes from the reservoir, at the audit."""

    def __init__(self, audit_samples: int, rng: random.Random):
        self.audit_samples, self.rng = audit_samples, rng
        self.reset()

    def reset(self, horizon: int | None = None) -> None:
        """A new trajectory of ``horizon`` velocity evaluations (None: unknown)."""
        self.step, self.evaluation, self.horizon = 0, 0, horizon
        # peer -> (step, evaluation) of its first answer used in this trajectory that the client's own copy of the
        # weights did not verify: where its lies can have started once it is caught (a remote partner that agreed
        # may be an accomplice, and an intermittent liar's checked honest answer says nothing of its earlier ones)
        self.unverified_since: dict[str, tuple[int, int]] = {}
        self.last_call: dict[str, Used] = {}  # peer -> its last unverified answer used (audited at the end)
        self.samples: dict[str, tuple[int, list[Used]]] = {}  # peer -> (unchecked answers seen, its picks)
        self.positions: dict[str, set[int]] = {}  # peer -> the positions (1-based) of its picks, drawn in advance
        self.spare: dict[str, tuple[int, list[Used]]] = {}  # peer -> (seen, reservoir of its answers not picked)
        self.vouches: dict[str, dict[str, Used]] = {}  # peer -> {partner: partner's answer that agreed with it}
        self.checked: set[str] = set()  # peers cross-checked in this trajectory
        self.new_picks: list[Used] = []  # picks made since the last round (verified early when the client can)
        # id() -> pick the client's own copy verified already (the pick is kept alive: no other answer reuses its id)
        self.audited: dict[int, Used] = {}

    def begin_step(self, i: int) -> None:
        self.step = i
        for p in [p for p, (s, _) in self.unverified_since.items() if s >= i]:  # a recomputed step forgets later
            del self.unverified_since[p]
        for p in [p for p, c in self.last_call.items() if c.step >= i]:
            del self.last_call[p]
        for p, (seen, kept) in list(self.samples.items()):
            self.samples[p] = (seen, [u for u in kept if u.step < i])
        for p, (seen, kept) in list(self.spare.items()):
            self.spare[p] = (seen, [u for u in kept if u.step < i])
        for p, vs in self.vouches.items():
            self.vouches[p] = {q: u for q, u in vs.items() if u.step < i}

    def note_used(self, job: Job, guidance: float, v: torch.Tensor, used, checked: bool) -> None:
        """The answer ``v`` of the remote source ``used`` went into x: checked, or audited at the end (its last
        unchecked answer, and ``audit_samples`` drawn uniformly among all of them by reservoir sampling)."""
        p = used.peer_id
        if not (checked and isinstance(job.partner, LocalSource)):
            self.unverified_since.setdefault(p, (self.step, self.evaluation))
        if checked:
            self.last_call.pop(p, None)
            return
        u = Used(job.k, job.rows, job.call, guidance, v, used, self.step, self.evaluation)
        self.last_call[p] = u
        seen, kept = self.samples.get(p, (0, []))
        seen += 1
        self.samples[p] = (seen, kept)
        if self.horizon is not None:
            if p not in self.positions:
                m = self.horizon
                self.positions[p] = set(self.rng.sample(range(1, m + 1), min(self.audit_samples, m)))
            if seen in self.positions[p]:
                kept.append(u)
                self.new_picks.append(u)
                return
        n, spare = self.spare.get(p, (0, []))
        n += 1
        if len(spare) < self.audit_samples:
            spare.append(u)
        elif spare and self.rng.random() < self.audit_samples / n:
            spare[self.rng.randrange(len(spare))] = u
        self.spare[p] = (n, spare)

    def audit_picks(self, p: str) -> list[Used]:
        """Peer p's picks for the audit: those drawn in advance, completed from the reservoir of its other unchecked
        answers up to ``audit_samples`` (or all of them)."""
        kept = self.samples.get(p, (0, []))[1]
        spare = self.spare.get(p, (0, []))[1]
        need = max(0, self.audit_samples - len(kept))
        return kept + self.rng.sample(spare, min(need, len(spare)))

    def is_kept(self, u: Used) -> bool:
        """Whether ``u`` is still one of its peer's picks (a recomputed step drops those of its steps)."""
        return any(x is u for x in self.samples.get(u.src.peer_id, (0, []))[1])
