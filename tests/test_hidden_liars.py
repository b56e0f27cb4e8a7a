"""Liars that hide (issue 19): colluding replicas, and liars that pick their moments (no network).

The pure policy (``check_rate``, ``escape_probability``, ``collusion_escape``, ``Sources.partner``'s draw) is
checked against its stated probabilities; the simulated swarm of ``test_answer_trust`` then shows each adversary
caught, its steps recomputed and the image equal to a clean run. Real processes: ``test_hostile_peers.py`` and
``bench/hidden_liars.py``.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import test_answer_trust
import torch
from peer_harness import FakeSwarmClient
from test_answer_trust import Liar, honest_bans, run, swarm

from diffswarm.client.answer_checks import (
    TrustConfig,
    check_rate,
    collusion_escape,
    escape_probability,
    should_verify,
)
from diffswarm.client.selection import Replica
from diffswarm.client.sources import LocalSource, Sources, address_blocks, independent

three, clean = test_answer_trust.three, test_answer_trust.clean  # the simulated swarm's module fixtures


class Picky:
    """A peer that lies (x1.5) only at noise levels of its choosing: flow time t in (lo, hi), never at the first
    (t = 1) nor the last (t = 1/6) evaluation of the 6-step Heun trajectory of ``test_answer_trust``."""

    def __init__(self, expert, lo: float = 0.45, hi: float = 0.7):
        self.expert, self.lo, self.hi, self.calls, self.lies = expert, lo, hi, 0, 0

    def velocity(self, x, t, labels, guidance=1.0):
        v = self.expert.velocity(x, t, labels, guidance)
        self.calls += 1
        if self.lo < float(t[0]) < self.hi:
            self.lies += 1
            return v * 1.5
        return v


# -- the pure policy -----------------------------------------------------------------------------------------


def test_the_check_rate_starts_high_and_decays_to_the_floor():
    cfg = TrustConfig()
    rates = [check_rate(cfg, n) for n in range(20)]
    assert rates[0] == cfg.new_peer_rate and rates[1] == pytest.approx(cfg.new_peer_rate * cfg.rate_decay)
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False)) and rates[-1] == cfg.verify_share
    rng = random.Random(1)
    for n in (0, 3):  # should_verify draws at that rate for a peer with n verified answers
        share = sum(should_verify(cfg, rng, False, 0.0, verified=n) for _ in range(20000)) / 20000
        assert share == pytest.approx(check_rate(cfg, n), abs=0.015)
    assert should_verify(TrustConfig(verify_share=0.0, new_peer_rate=0.0), rng, False, 0.0, verified=0) is False


def test_escape_probabilities_as_stated():
    cfg = TrustConfig()
    # a liar lying in 4 of its 10 unchecked calls, rate floored (long history): (1 - .05)^4 (1 - .4)^1
    assert escape_probability(cfg, 4, 10) == pytest.approx(0.95 ** 4 * 0.6)
    # a new identity pays: its rate is new_peer_rate at its first lie
    assert escape_probability(cfg, 4, 10, verified=0) == pytest.approx(0.5 ** 4 * 0.6)
    assert escape_probability(cfg, 0, 10) == 1.0 and escape_probability(cfg, 10, 10) == 0.0
    # colluders: each check misses with (1 - l)(1 - h); a local share of 1 always catches
    assert collusion_escape(replace(cfg, local_check_share=1.0), 1) == 0.0
    assert collusion_escape(cfg, 10) == pytest.approx(0.75 ** 10)
    assert collusion_escape(cfg, 10, honest_share=0.5) == pytest.approx(0.375 ** 10)
    # Monte Carlo of the escape bound: a liar in 4 of 10 unchecked calls with one random audit
    rng, n, escaped = random.Random(2), 20000, 0
    for _ in range(n):
        lies = [i in (2, 4, 5, 7) for i in range(10)]
        caught = any(lie and rng.random() < check_rate(cfg, 100) for lie in lies) or lies[rng.randrange(10)]
        escaped += not caught
    assert escaped / n == pytest.approx(escape_probability(cfg, 4, 10), abs=0.015)


def _replica(peer: str, addr: str, sha: str = "s" * 64) -> Replica:
    return Replica(peer, "e", sha, 1, 100.0, 0.0, (f"/ip4/{addr}/tcp/1",))


def test_partners_are_drawn_at_random_preferring_independent_peers_and_the_local_copy_for_its_share():
    assert address_blocks(["/ip4/10.1.2.3/tcp/5", "/ip6/::1/tcp/5"]) == {"10.1"}
    a, same, other = _replica("a", "10.1.0.1"), _replica("b", "10.1.9.9"), _replica("c", "172.16.0.1")
    assert independent(a, other) and not independent(a, same) and not independent(a, _replica("d", "10.1.0.2"))
    loop = [_replica(p, "127.0.0.1") for p in ("a", "b", "c")]
    assert not independent(loop[0], loop[1])

    class View:
        def __init__(self, reps):
            self.reps = reps

        def replicas(self, k):
            return self.reps

    def draws(reps, trust, n=4000, seen=None):
        client = FakeSwarmClient({}, trust, local={"s" * 64: SimpleNamespace(expert_id="e")})
        client.view = View(reps)
        src, rng = Sources(client, trust), random.Random(3)
        src.first_seen.update(seen or {})
        return [src.partner(1, reps[0], 0.0, set(), lambda p, now: 0.0, rng).peer_id for _ in range(n)]

    trust = TrustConfig(local_check_share=0.25)
    picks = draws([a, same, other], trust)
    assert picks.count(LocalSource.name("s" * 64)) / len(picks) == pytest.approx(0.25, abs=0.03)
    assert set(picks) == {"c", LocalSource.name("s" * 64)}  # the independent replica, never its /16 neighbour
    picks = draws(loop, replace(trust, local_check_share=0.0))  # loopback: no block differs, all are drawn
    assert picks.count("b") / len(picks) == pytest.approx(0.5, abs=0.04) and "a" not in picks
    # one address block, but "c" appeared long after "a" and "b" (which showed up together): it is preferred
    picks = draws(loop, replace(trust, local_check_share=0.0), seen={"a": 0.0, "b": 5.0, "c": 500.0})
    assert set(picks) == {"c"}


# -- the simulated swarm -----------------------------------------------------------------------------------


def test_colluding_replicas_are_both_caught_with_a_local_share_of_one(three, clean):
    """Two Sybils serve cluster 1's real checkpoint and return the same lie (they would agree with each other):
    with every check going to the client's own copy both are caught, banned and their steps recomputed."""
    experts = three[0]
    peers = {"h0": (0, experts[0]), "h2": (2, experts[2]),
             "liar1a": (1, Liar(experts[1], "scale")), "liar1b": (1, Liar(experts[1], "scale"))}
    ens, client = swarm(three, peers, trust=TrustConfig(local_check_share=1.0),
                        local={experts[1].weights_sha256: experts[1]})
    x, events = run(ens)
    assert torch.allclose(x, clean, atol=1e-5)
    assert {"liar1a", "liar1b"} <= ens.liars and honest_bans(client) == []
    # a failed check resets the count of verified answers (the check rate starts high again)
    assert ens.verifier.verified == {"liar1a": 0, "liar1b": 0}  # h0, h2: no second source, nothing verified


def test_a_colluder_that_vouched_for_a_caught_liar_is_unmasked(three, clean):
    """With the default local share, one colluder's check sometimes goes to its accomplice (they agree); once it
    is caught by the client's own copy, the accomplice's agreed answer is re-checked and it is banned too."""
    experts = three[0]
    peers = {"h0": (0, experts[0]), "h2": (2, experts[2]),
             "liar1a": (1, Liar(experts[1], "scale")), "liar1b": (1, Liar(experts[1], "scale"))}
    colluding = 0
    for seed in range(6):
        ens, client = swarm(three, peers, trust=TrustConfig(local_check_share=0.5),
                            local={experts[1].weights_sha256: experts[1]})
        ens.verifier.rng.seed(seed)
        x, events = run(ens)
        assert torch.allclose(x, clean, atol=1e-5) and honest_bans(client) == []
        assert "liar1a" in ens.liars or "liar1b" in ens.liars
        colluding += any("caught colluding" in e for e in events)
    assert colluding >= 1


def test_a_liar_lying_at_noise_levels_of_its_choosing_is_caught_within_the_bound(three, clean):
    """Lying on >= 1/4 of its calls (t in (0.45, 0.7): 4 of 11 evaluations), never on the first or last one,
    with a fresh client each generation: each generation catches it with probability >= 1 - escape_probability,
    so it survives 15 generations with probability < 1e-4 (a run that needs more fails this test)."""
    experts = three[0]
    cfg = TrustConfig()
    bound = escape_probability(cfg, 2, 4)  # >= 2 lies among its ~7 unchecked answers of a trajectory: loose
    assert bound ** 15 < 1e-4
    for _ in range(15):
        liar = Picky(experts[1])
        peers = {"h0": (0, experts[0]), "h1": (1, experts[1]), "h2": (2, experts[2]), "liar1": (1, liar)}
        ens, client = swarm(three, peers, trust=cfg, local={experts[1].weights_sha256: experts[1]})
        x, events = run(ens)
        if "liar1" in ens.liars:  # caught: its lies were recomputed
            assert torch.allclose(x, clean, atol=1e-5), events
            assert honest_bans(client, time.monotonic()) == [] and liar.lies * 4 >= liar.calls
            return
    pytest.fail("the picky liar escaped 15 generations")


def test_hostile_peers_pick_their_noise_levels_and_their_share_of_lies():
    """``python -m diffswarm.testing.hostile --lie-t LO:HI --lie-share F`` (what the real-process tests run)."""
    from diffswarm.testing.hostile import Corruptor

    x = torch.ones(2, 1, 2, 2)

    def honest(x, t, labels, guidance):
        return x

    picky = Corruptor(honest, "scale:2", lie_t=(0.45, 0.7))
    assert torch.equal(picky(x, torch.full((2,), 0.5), None, 1.0), 2 * x)
    assert torch.equal(picky(x, torch.full((2,), 1.0), None, 1.0), x)
    assert torch.equal(picky(x, torch.tensor([0.5, 0.9]), None, 1.0), x)  # a row outside the band: honest
    never = Corruptor(honest, "scale:2", lie_share=0.0)
    assert torch.equal(never(x, torch.full((2,), 0.5), None, 1.0), x)
    some = Corruptor(honest, "scale:2", lie_share=0.25)
    share = sum(not torch.equal(some(x, torch.full((2,), 0.5), None, 1.0), x) for _ in range(4000)) / 4000
    assert share == pytest.approx(0.25, abs=0.03)
