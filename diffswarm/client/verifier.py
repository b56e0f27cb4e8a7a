"""``Verifier``: the state of a ``SwarmEnsemble``'s checks on peers' answers (suspicion, liars, cross-checks,
disputes, the end-of-trajectory audit and the rollback it can order). The decisions themselves are the pure
functions of ``answer_checks``."""

from __future__ import annotations

import os
import random
import time
from typing import NamedTuple

import torch

from diffswarm.client.answer_checks import (
    CAUGHT_LYING,
    DISPUTED,
    INVALID_ANSWER,
    PRECISIONS,
    Suspicion,
    TrustConfig,
    agree,
    arbitrate,
    check_answer,
    relative_difference,
    should_verify,
    tolerance,
)
from diffswarm.client.config import PeerCallError
from diffswarm.client.selection import Replica
from diffswarm.client.sources import LocalSource, Sources
from diffswarm.protocol.wire import classify_error


class Job(NamedTuple):
    """Cluster k's ``rows`` of one evaluation sent to ``src`` (and to ``partner`` for a cross-check)."""

    k: int
    rows: torch.Tensor  # (n,) row indices into the batch
    src: Replica | LocalSource
    partner: Replica | LocalSource | None
    call: tuple  # (x, t, labels) of those rows
    i: int  # index of src's answer among the round's answers (the partner's is i + 1)


class Verifier:
    """Checks on the answers one ``SwarmEnsemble`` uses, and what they found (``client`` bans the culprits)."""

    def __init__(self, client, sources: Sources, trust: TrustConfig):
        self.client, self.sources, self.trust = client, sources, trust
        self.suspicion = Suspicion(trust.half_life)
        self.rng = random.Random(int.from_bytes(os.urandom(8), "little"))  # peers must not predict the checks
        self.liars: set[str] = set()  # peers caught lying or sending invalid answers (banned for lie_ban)
        self.checks = 0  # cross-checked calls (the cost of checking: each is one more call)
        self.unverified = 0  # rows whose replicas disagreed with no arbiter
        self.precision_of: dict[str, str] = {}  # source -> precision of its last answer (fp32 | bf16)
        self.rollback_to: int | None = None  # the step to recompute from, once a liar's answers are found in x
        self.reset()

    # -- trajectory bookkeeping (for cross-check policy and rollbacks) ----------------------------

    def reset(self) -> None:
        self.step, self.evaluation = 0, 0
        # peer -> (step, evaluation) of its first answer used since its last cross-checked one: where a lie found
        # later can have started (a liar is assumed to keep lying once it starts; see client/answer_checks.py)
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

    def begin_evaluation(self) -> None:
        self.rollback_to = None
        self.evaluation += 1

    def note_used(self, job: Job, guidance: float, v: torch.Tensor, used, checked: bool) -> None:
        """The answer ``v`` of the remote source ``used`` went into x: checked, or audited at the end unless a
        later check of that peer comes first."""
        if checked:
            self.unverified_since.pop(used.peer_id, None)
            self.last_call.pop(used.peer_id, None)
        else:
            self.unverified_since.setdefault(used.peer_id, (self.step, self.evaluation))
            self.last_call[used.peer_id] = (job.k, job.rows, job.call, guidance, v, used, self.step)

    def audit(self) -> list[str]:
        """Before the sampler returns: each peer's last unverified answer used in this trajectory is recomputed by
        a second source; a peer caught lying there is punished and ``rollback_to`` names the first step since its
        last checked answer. Returns the events."""
        events, failed = [], set()
        self.begin_evaluation()  # every answer audited here is in x already
        for p, (k, rows, call, guidance, v, src, _) in sorted(self.last_call.items()):
            now = time.monotonic()
            partner = self.sources.partner(k, src, now, failed, self.suspicion.score)
            if partner is None:
                continue
            out = self.sources.answer_all([(partner, *call)], guidance)[0]
            vb = self.valid(partner, out, call[0], call[1], guidance, events, failed)
            self.checks += 1
            if vb is None:
                continue
            self.precision_of[partner.peer_id] = self.precision(out)
            tol = tolerance(self.trust, self.precision_of.get(p, "fp32"), self.precision_of[partner.peer_id])
            if agree(v, vb, tol):
                self.unverified_since.pop(p, None)
            else:
                self.dispute(k, rows, src, v, partner, vb, call, guidance, events, failed)
        self.last_call.clear()
        return events

    # -- one answer ------------------------------------------------------------------------------

    def partner_for(self, k: int, src, now: float, failed: set[str]):
        """A second source to cross-check this call of ``src`` with (``should_verify``), or None."""
        if isinstance(src, LocalSource):
            return None
        if not should_verify(self.trust, self.rng, src.peer_id not in self.checked,
                             self.suspicion.score(src.peer_id, now)):
            return None
        return self.sources.partner(k, src, now, failed, self.suspicion.score)

    def judge(self, job: Job, outs: list, guidance: float, t_now: float, events: list[str], failed: set[str]):
        """(v, source it came from, cross-checked) for the job's rows from the round's answers ``outs``; v is None
        when no valid answer is left (the rows are recomputed by another source)."""
        k, rows, src, partner, call, i = job
        xk, tk, _ = call
        va = self.valid(src, outs[i], xk, tk, guidance, events, failed)
        self.precision_of[src.peer_id] = self.precision(outs[i])
        vb = None
        if partner is not None:
            vb = self.valid(partner, outs[i + 1], xk, tk, guidance, events, failed)
            self.precision_of[partner.peer_id] = self.precision(outs[i + 1])
            self.checks += 1
            self.checked.add(src.peer_id)
            if vb is not None:
                self.checked.add(partner.peer_id)
        if va is not None and vb is not None:
            tol = tolerance(self.trust, self.precision_of[src.peer_id], self.precision_of[partner.peer_id])
            if not agree(va, vb, tol):
                return self.dispute(k, rows, src, va, partner, vb, call, guidance, events, failed)
            return va, src, True
        if va is None and vb is not None and (self.trust.local_fallback or not isinstance(partner, LocalSource)):
            # the main source failed or lied; its partner's answer passed the checks (the client's own
            # copy of the weights stands in for a peer only with local_fallback)
            events.append(f"t={t_now:.3f}: using the answer of {partner.peer_id[:12]} for cluster {k}")
            return vb, partner, False
        return va, src, False

    def valid(self, src, out, xk, tk, guidance, events: list[str], failed: set[str]):
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
        self.punish(src.peer_id, f"sent an invalid answer: {why}", INVALID_ANSWER, now)
        failed.add(src.peer_id)
        events.append(f"t={float(tk[0]):.3f}: {src.expert_id} at {src.peer_id[:12]} sent an invalid answer ({why}); "
                      f"banned {self.trust.lie_ban:.0f}s")
        return None

    def punish(self, peer: str, reason: str, amount: float, now: float) -> None:
        self.suspicion.add(peer, amount, now)
        self.client.bans.ban_for(peer, self.trust.lie_ban, now)
        self.client.last_error[peer] = reason
        self.liars.add(peer)

    @staticmethod
    def precision(out) -> str:
        meta = out[1] if isinstance(out, tuple) and isinstance(out[1], dict) else {}
        p = meta.get("precision")
        return p if p in PRECISIONS else "fp32"

    # -- disputes --------------------------------------------------------------------------------

    def dispute(self, k, rows, a, va, b, vb, call, guidance, events, failed):
        """Sources a and b disagree on cluster k's rows: ask an arbiter (the client's own copy of the weights,
        else a third replica), punish whoever deviates from it. Returns (answer, source it came from, resolved):
        an honest side's, else the arbiter's (resolved); if nobody can be named, the less suspected side's
        (unverified, not resolved)."""
        tk = call[1]
        now = time.monotonic()
        answers = {a.peer_id: va, b.peer_id: vb}
        sources = {a.peer_id: a, b.peer_id: b}
        tol = tolerance(self.trust, self.precision_of[a.peer_id], self.precision_of[b.peer_id])
        reference, arbiter = self._arbiter(k, a, va, b, vb, call, guidance, answers, sources, events, failed, now)
        liars, honest = arbitrate(answers, reference, tol)
        truth = reference if reference is not None else (answers[min(honest)] if honest else None)
        judge = "the verified weights" if reference is not None else "the other replicas"
        for p in liars:
            if p.startswith(LocalSource.PREFIX):
                continue  # cannot happen with a reference (the client's own copy is the reference)
            diff = float(relative_difference(answers[p], truth).max())
            self.punish(p, f"caught lying: its answer differs from {judge} by {diff:.3g}", CAUGHT_LYING, now)
            failed.add(p)
            events.append(f"t={float(tk[0]):.3f}: cluster {k} peer {p[:12]} caught lying on {rows.numel()} row(s) "
                          f"(relative difference {diff:.3g} from {judge}); banned {self.trust.lie_ban:.0f}s")
            since = self.unverified_since.get(p)
            if since is not None and since[1] < self.evaluation:  # earlier unchecked answers of it are in x already
                self.rollback_to = since[0] if self.rollback_to is None else min(self.rollback_to, since[0])
        if honest:
            best = min(honest, key=lambda p: (p.startswith(LocalSource.PREFIX), p))  # prefer a remote honest side
            return answers[best], sources[best], True
        if reference is not None:
            return reference, arbiter, True
        for p in answers:  # nobody can be named: both stay usable but are cross-checked from now on
            self.suspicion.add(p, DISPUTED, now)
        self.unverified += rows.numel()
        events.append(f"t={float(tk[0]):.3f}: replicas {a.peer_id[:12]} and {b.peer_id[:12]} of cluster {k} "
                      "disagree and no third source can arbitrate; using the less suspected answer (unverified)")
        best = min(answers, key=lambda p: (self.suspicion.score(p, now), p))
        return answers[best], sources[best], False

    def _arbiter(self, k, a, va, b, vb, call, guidance, answers, sources, events, failed, now):
        """(reference answer, arbiter) for a dispute between a and b: the answer of the client's own copy of the
        weights when one side is that copy or it can be had, else (None, None) after adding a third replica's
        answer to ``answers`` and ``sources`` as a vote (when there is a third replica)."""
        xk, tk, lk = call
        if isinstance(a, LocalSource) or isinstance(b, LocalSource):
            return (va if isinstance(a, LocalSource) else vb), None
        arbiter = self.sources.local(k, failed, a.checkpoint_sha256)
        if arbiter is not None:
            return arbiter.velocity(xk, tk, lk, guidance), arbiter
        third = [r for r in self.sources.usable(k, now) if r.checkpoint_sha256 == a.checkpoint_sha256
                 and r.peer_id not in answers and r.peer_id not in failed]
        if third:
            c = min(third, key=lambda r: self.suspicion.score(r.peer_id, now))
            out = self.sources.answer_all([(c, xk, tk, lk)], guidance)[0]
            vc = self.valid(c, out, xk, tk, guidance, events, failed)
            if vc is not None:
                answers[c.peer_id], sources[c.peer_id] = vc, c
                self.precision_of[c.peer_id] = self.precision(out)
        return None, None
