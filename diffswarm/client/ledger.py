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
    recomputed step replaces). ``audit_samples`` answers per peer are kept by reservoir sampling with ``rng``."""

    def __init__(self, audit_samples: int, rng: random.Random):
        self.audit_samples, self.rng = audit_samples, rng
        self.reset()

    def reset(self) -> None:
        self.step, self.evaluation = 0, 0
        # peer -> (step, evaluation) of its first answer used in this trajectory that the client's own copy of the
        # weights did not verify: where its lies can have started once it is caught (a remote partner that agreed
        # may be an accomplice, and an intermittent liar's checked honest answer says nothing of its earlier ones)
        self.unverified_since: dict[str, tuple[int, int]] = {}
        self.last_call: dict[str, Used] = {}  # peer -> its last unverified answer used (audited at the end)
        self.samples: dict[str, tuple[int, list[Used]]] = {}  # peer -> (seen, reservoir of its unchecked answers)
        self.vouches: dict[str, dict[str, Used]] = {}  # peer -> {partner: partner's answer that agreed with it}
        self.checked: set[str] = set()  # peers cross-checked in this trajectory
        self.new_picks: list[Used] = []  # answers the reservoir kept since the last round (verified early if it can)
        self.audited: set[int] = set()  # id() of kept answers the client's own copy verified already

    def begin_step(self, i: int) -> None:
        self.step = i
        for p in [p for p, (s, _) in self.unverified_since.items() if s >= i]:  # a recomputed step forgets later
            del self.unverified_since[p]
        for p in [p for p, c in self.last_call.items() if c.step >= i]:
            del self.last_call[p]
        for p, (seen, kept) in list(self.samples.items()):
            self.samples[p] = (seen, [u for u in kept if u.step < i])
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
        if len(kept) < self.audit_samples:
            kept.append(u)
            self.new_picks.append(u)
        elif kept and self.rng.random() < self.audit_samples / seen:
            kept[self.rng.randrange(len(kept))] = u
            self.new_picks.append(u)
        self.samples[p] = (seen, kept)

    def is_kept(self, u: Used) -> bool:
        """Whether ``u`` is still one of its peer's reservoir picks."""
        return any(x is u for x in self.samples.get(u.src.peer_id, (0, []))[1])
