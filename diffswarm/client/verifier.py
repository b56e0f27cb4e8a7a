"""``Verifier``: the state of a ``SwarmEnsemble``'s checks on peers' answers (suspicion, verified counts, liars,
cross-checks, disputes, accomplices, the end-of-trajectory audit and the rollback it can order). The decisions
themselves are the pure functions of ``answer_checks``; escape probabilities are stated there."""

from __future__ import annotations

import os
import random
import time

import torch

from diffswarm.client.answer_checks import (
    CAUGHT_LYING,
    DISPUTED,
    INVALID_ANSWER,
    Suspicion,
    TrustConfig,
    agree,
    arbitrate,
    check_answer,
    relative_difference,
    row_tolerance,
    should_verify,
)
from diffswarm.client.config import PeerCallError
from diffswarm.client.ledger import Job, Ledger, Used
from diffswarm.client.sources import LocalSource, Sources
from diffswarm.protocol.wire import classify_error


class Verifier:
    """Checks on the answers one ``SwarmEnsemble`` uses, and what they found (``client`` bans the culprits)."""

    def __init__(self, client, sources: Sources, trust: TrustConfig):
        self.client, self.sources, self.trust = client, sources, trust
        self.suspicion = Suspicion(trust.half_life)
        self.rng = random.Random(int.from_bytes(os.urandom(8), "little"))  # peers must not predict the checks
        self.liars: set[str] = set()  # peers caught lying or sending invalid answers (banned for lie_ban)
        self.checks = 0  # cross-checked calls (the cost of checking: each is one more call)
        self.unverified = 0  # rows whose replicas disagreed with no arbiter
        self.rollback_to: int | None = None  # the step to recompute from, once a liar's answers are found in x
        self.verified: dict[str, int] = {}  # peer -> answers verified since its last failed check (check_rate)
        self.ledger = Ledger(trust.audit_samples, self.rng)
        self.final_step = False  # the trajectory's last step: every answer cross-checked (each peer's last answer)

    # -- trajectory bookkeeping (client/ledger.py) ------------------------------------------------

    def begin_evaluation(self) -> None:
        self.rollback_to = None
        self.ledger.evaluation += 1

    def audit(self) -> list[str]:
        """Before the sampler returns: each peer's last unverified answer used in this trajectory, and
        ``audit_samples`` random earlier ones, are recomputed by a second source; a peer caught lying there is
        punished and ``rollback_to`` names the step of its first answer in x that the client's own copy did not
        verify. Returns the events.

        The recomputations go out together (``Sources.answer_all``: remote partners concurrently, the client's own
        copies of the weights in one forward pass per expert) and are judged in the order they were listed; an
        answer whose partner failed is recomputed by another partner in a further round."""
        events, failed = [], set()
        self.begin_evaluation()  # every answer audited here is in x already
        todo = {}
        for p in sorted(set(self.ledger.last_call) | set(self.ledger.samples) | set(self.ledger.spare)):
            for u in [self.ledger.last_call.get(p), *self.ledger.audit_picks(p)]:
                if u is not None and id(u) not in self.ledger.audited:
                    todo[(p, u.step, id(u.v))] = u
        pending = list(todo.values())
        while pending:
            pending = self._audit_round(pending, events, failed)
        self.ledger.last_call.clear()
        self.ledger.samples.clear()
        self.ledger.spare.clear()
        return events

    def _audit_round(self, pending: list[Used], events: list[str], failed: set[str]) -> list[Used]:
        """Recompute ``pending`` answers by a partner each (one ``answer_all`` per guidance scale) and judge them;
        returns those to recompute again (their partner failed, another may be usable)."""
        now = time.monotonic()
        picked = []
        for u in pending:
            if u.src.peer_id in failed:  # caught (or failed) on an earlier answer of this audit
                continue
            partner = self.sources.partner(u.k, u.src, now, failed, self.suspicion.score, self.rng)
            if partner is not None:
                picked.append((u, partner))
        outs = {}
        for g in dict.fromkeys(u.guidance for u, _ in picked):
            idx = [i for i, (u, _) in enumerate(picked) if u.guidance == g]
            outs.update(zip(idx, self.sources.answer_all([(picked[i][1], *picked[i][0].call) for i in idx], g),
                            strict=True))
        again = []
        for i, (u, partner) in enumerate(picked):
            p = u.src.peer_id
            if p in failed:  # caught on an earlier answer of this round
                continue
            vb = self.valid(partner, outs[i], u.call[0], u.call[1], u.guidance, events, failed)
            self.checks += 1
            if vb is None:
                again.append(u)
                continue
            self._judge_audited(u, partner, vb, events, failed)
        return again

    def _judge_audited(self, u: Used, partner, vb: torch.Tensor, events: list[str], failed: set[str]) -> bool:
        """An audited answer ``u`` against its partner's ``vb``: vouched for if they agree, else disputed (the
        peer's unverified answers start no later than u). Returns whether they agreed."""
        p = u.src.peer_id
        if agree(u.v, vb, row_tolerance(self.trust, u.call[1])):
            self.vouch(u, partner, vb)
            return True
        self.ledger.unverified_since[p] = min(self.ledger.unverified_since.get(p, (u.step, u.evaluation)),
                                       (u.step, u.evaluation))
        self.dispute(u.k, u.rows, u.src, u.v, partner, vb, u.call, u.guidance, events, failed)
        return False

    def pick_checks(self, failed: set[str], guidance: float) -> list[tuple[Used, LocalSource]]:
        """The audit's picks made since the last round (``Ledger.new_picks``: drawn in advance, so never replaced),
        each with the client's own copy of its weights when the client holds one: the caller computes them in its
        next round, while the peers compute (``settle_pick_checks``), so that the end-of-trajectory audit has less
        left to do after the last step. Which answers the audit checks is unchanged."""
        picks, self.ledger.new_picks = self.ledger.new_picks, []
        out = []
        for u in picks:
            if u.src.peer_id in failed or u.guidance != guidance or not self.ledger.is_kept(u):
                continue
            own = self.sources.local(u.k, failed, u.src.checkpoint_sha256)
            if own is not None:
                out.append((u, own))
        return out

    def settle_pick_checks(self, picks: list[tuple[Used, LocalSource]], outs: list, events: list[str],
                           failed: set[str]) -> None:
        """Judge the answers of ``pick_checks`` (``outs``, in order) as the audit would: agreed ones are not audited
        again; a peer caught lying is punished and ``rollback_to`` set."""
        for (u, own), out in zip(picks, outs, strict=True):
            p = u.src.peer_id
            if p in failed or not self.ledger.is_kept(u):  # caught in this round, or its step is being recomputed
                continue
            vb = self.valid(own, out, u.call[0], u.call[1], u.guidance, events, failed)
            self.checks += 1
            if self._judge_audited(u, own, vb, events, failed):
                self.ledger.audited[id(u)] = u

    def history(self, peer: str) -> int:
        return self.verified.get(peer, 0)

    def vouch(self, u: Used, partner, vb: torch.Tensor) -> None:
        """``u``'s answer agreed with ``partner``'s ``vb``: one more verified answer of u's peer; a remote partner's
        answer is kept, so that if either is caught lying later the other's agreement is re-checked."""
        p = u.src.peer_id
        self.verified[p] = self.verified.get(p, 0) + 1
        if isinstance(partner, LocalSource):
            return
        self.ledger.vouches.setdefault(p, {})[partner.peer_id] = u._replace(v=vb, src=partner)
        self.ledger.vouches.setdefault(partner.peer_id, {})[p] = u

    # -- one answer ------------------------------------------------------------------------------

    def partner_for(self, k: int, src, now: float, failed: set[str]):
        """A second source to cross-check this call of ``src`` with (``should_verify``), or None."""
        if isinstance(src, LocalSource):
            return None
        if not self.final_step and not should_verify(self.trust, self.rng, src.peer_id not in self.ledger.checked,
                             self.suspicion.score(src.peer_id, now), self.history(src.peer_id)):
            return None
        return self.sources.partner(k, src, now, failed, self.suspicion.score, self.rng)

    def judge(self, job: Job, outs: list, guidance: float, t_now: float, events: list[str], failed: set[str]):
        """(v, source it came from, cross-checked) for the job's rows from the round's answers ``outs``; v is None
        when no valid answer is left (the rows are recomputed by another source)."""
        k, rows, src, partner, call, i = job
        xk, tk, _ = call
        va = self.valid(src, outs[i], xk, tk, guidance, events, failed)
        vb = None
        if partner is not None:
            vb = self.valid(partner, outs[i + 1], xk, tk, guidance, events, failed)
            self.checks += 1
            self.ledger.checked.add(src.peer_id)
            if vb is not None:
                self.ledger.checked.add(partner.peer_id)
        if va is not None and vb is not None:
            if not agree(va, vb, row_tolerance(self.trust, tk)):
                return self.dispute(k, rows, src, va, partner, vb, call, guidance, events, failed)
            if not isinstance(src, LocalSource):
                led = self.ledger
                self.vouch(Used(k, rows, call, guidance, va, src, led.step, led.evaluation), partner, vb)
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
        reference, arbiter = self._arbiter(k, a, va, b, vb, call, guidance, answers, sources, events, failed, now)
        liars, honest = arbitrate(answers, reference, row_tolerance(self.trust, tk))
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
            self.roll_back(p)
        for p in sorted(liars):
            self.verified[p] = 0  # a failed check: the peer's check rate starts high again
            self.unmask_accomplices(p, events, failed)
        if honest:
            best = min(honest, key=lambda p: (p.startswith(LocalSource.PREFIX), p))  # prefer a remote honest side
            return answers[best], sources[best], True
        if reference is not None:
            return reference, arbiter, True
        for p in answers:  # nobody can be named: both stay usable but are cross-checked from now on
            self.suspicion.add(p, DISPUTED, now)
            self.verified[p] = 0
        self.unverified += rows.numel()
        events.append(f"t={float(tk[0]):.3f}: replicas {a.peer_id[:12]} and {b.peer_id[:12]} of cluster {k} "
                      "disagree and no third source can arbitrate; using the less suspected answer (unverified)")
        best = min(answers, key=lambda p: (self.suspicion.score(p, now), p))
        return answers[best], sources[best], False

    def roll_back(self, p: str) -> None:
        """Peer p was caught lying: recompute from its first answer in x that the client's own copy did not verify
        (nothing if the client's copy verified all its answers in x)."""
        since = self.ledger.unverified_since.get(p)
        if since is not None and since[1] < self.ledger.evaluation:  # earlier unchecked answers of it are in x already
            self.rollback_to = since[0] if self.rollback_to is None else min(self.rollback_to, since[0])

    def unmask_accomplices(self, p: str, events: list[str], failed: set[str]) -> None:
        """Peer p was caught lying: every remote peer whose answer agreed with p's in this trajectory is re-checked
        on that answer against the client's own copy of the weights (colluding replicas vouch for each other);
        one that deviates is punished as a liar, and the steps since its first unverified answer recomputed."""
        for q, u in sorted(self.ledger.vouches.pop(p, {}).items()):
            if q in self.liars and self.client.bans.is_banned(q, time.monotonic()):
                continue
            own = self.sources.local(u.k, failed, u.src.checkpoint_sha256)
            if own is None:
                events.append(f"cluster {u.k}: {q[:12]} agreed with the liar {p[:12]}, and no verified copy of the "
                              "weights can tell whether it lied too")
                self.suspicion.add(q, DISPUTED, time.monotonic())
                continue
            self.checks += 1
            xk, tk, lk = u.call
            ref = own.velocity(xk, tk, lk, u.guidance)
            if agree(u.v, ref, row_tolerance(self.trust, tk)):
                continue
            diff = float(relative_difference(u.v, ref).max())
            self.punish(q, f"caught colluding: it agreed with the liar {p[:12]} on an answer that differs from the "
                           f"verified weights by {diff:.3g}", CAUGHT_LYING, time.monotonic())
            self.verified[q] = 0
            failed.add(q)
            events.append(f"t={float(tk[0]):.3f}: cluster {u.k} peer {q[:12]} caught colluding with {p[:12]} "
                          f"(their agreed answer differs from the verified weights by {diff:.3g}); "
                          f"banned {self.trust.lie_ban:.0f}s")
            self.ledger.unverified_since[q] = min(self.ledger.unverified_since.get(q, (u.step, u.evaluation)),
                                           (u.step, u.evaluation))
            self.roll_back(q)
            self.unmask_accomplices(q, events, failed)

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
        return None, None
