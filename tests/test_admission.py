"""Admission's pure parts: the score is deterministic and recomputable, the rule admits by it whatever the order
checkpoints came in, attestations are signed, bounded and checked, and the client's choice follows the verdicts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from diffswarm.admission.rule import ADMISSION_FIELD, AdmissionRule, Attested, decide
from diffswarm.admission.score import TOLERANCE, ValidationSet, agrees, score_expert, seed_of
from diffswarm.client.admission import verdicts
from diffswarm.dht.attestations import sign_attestation, verified_scores, verify_attestation
from diffswarm.dht.names import key_fingerprint, public_key_der, sign_manifest
from diffswarm.dht.records import RECORD_VERSION, AttestationRecord, ExpertRecord, SwarmManifest
from diffswarm.dht.schema import RecordError
from diffswarm.experts.expert import Expert
from diffswarm.training.jobs import ClusterData, expert_config

SHA = ["a" * 64, "b" * 64, "c" * 64, "d" * 64]


@pytest.fixture(scope="module")
def keys():
    from hivemind.utils.crypto import RSAPrivateKey

    return RSAPrivateKey(), RSAPrivateKey()


def toy_vset(n: int = 40) -> ValidationSet:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.randint(0, 4, (n,), generator=g)
    return ValidationSet(0, images, labels, images[:8], labels[:8], (0, 1, 2), "ph", "toy:8")


def toy_expert(objective: str, seed: int) -> Expert:
    torch.manual_seed(seed)
    cfg = expert_config(ClusterData((1, 8, 8), 4, 2, "ph", "toy:8"), objective, 0, net="mlp", width=32, depth=1)
    return Expert(cfg).eval()


@pytest.mark.parametrize("objective", ["fm", "ddpm"])
def test_the_score_is_deterministic_and_agrees_across_thread_counts(objective):
    e, vs = toy_expert(objective, 1), toy_vset()
    a = score_expert(e, vs, 7)
    assert a == score_expert(e, vs, 7)  # bit for bit on one machine
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = score_expert(e, vs, 7)
    finally:
        torch.set_num_threads(threads)
    assert agrees(a.score, b.score) and agrees(b.score, a.score)
    assert a.triples == 80 and math.isfinite(a.in_classes) and math.isfinite(a.out_classes)
    c = score_expert(e, vs, 8)  # another seed: other triples, another (close) score
    assert c.score != a.score and abs(c.score - a.score) < 0.5 * a.score
    assert not agrees(a.score * (1 + 3 * TOLERANCE), a.score)


def test_an_untrained_expert_scores_about_the_v0_loss():
    vs = toy_vset()
    rep = score_expert(toy_expert("fm", 0), vs, 3)
    assert 0.5 * rep.baseline < rep.score < 2 * rep.baseline
    assert seed_of("x") == seed_of("x") != seed_of("y") and 0 <= seed_of("x") < 2**63


def rule(*validators: str, quorum: int = 1) -> AdmissionRule:
    return AdmissionRule(tuple(validators), seed=5, quorum=quorum)


def att(sha: str, score: float, validator: str = "v" * 32, cluster: int = 0, baseline: float = 1.0) -> Attested:
    return Attested(sha, cluster, score, baseline, validator)


def test_the_rule_admits_by_score_whatever_the_order():
    r = rule("v" * 32)
    scores = [att(SHA[0], 0.30), att(SHA[1], 0.50), att(SHA[2], 0.95), att(SHA[3], 0.36)]
    announced = {s: 0 for s in SHA}
    for order in (scores, scores[::-1]):
        v = decide(r, order, announced)
        assert v[SHA[0]].admitted and v[SHA[3]].admitted  # best, and within 1.25x of it
        assert not v[SHA[1]].admitted and "vs best 0.3 for cluster 0" in v[SHA[1]].reason
        assert not v[SHA[2]].admitted and "ceiling" in v[SHA[2]].reason  # above 0.8 x the v=0 loss
    alone = decide(r, [att(SHA[1], 0.5)], {SHA[1]: 0})  # the only one: admitted until a better one comes
    assert alone[SHA[1]].admitted
    waiting = decide(r, [], {SHA[0]: 0})[SHA[0]]
    assert not waiting.admitted and waiting.score is None and "0 of 1" in waiting.reason
    # an attestation for another cluster does not admit the checkpoint here; another validator does not count
    assert not decide(r, [att(SHA[0], 0.3, cluster=1)], {SHA[0]: 0})[SHA[0]].admitted
    assert not decide(r, [att(SHA[0], 0.3, validator="w" * 32)], {SHA[0]: 0})[SHA[0]].admitted
    assert not decide(r, scores, announced, ignored=["v" * 32])[SHA[0]].admitted  # a caught liar counts for nothing


def test_a_quorum_takes_the_median_of_distinct_validators():
    r = rule("a" * 32, "b" * 32, "c" * 32, quorum=2)
    one = decide(r, [att(SHA[0], 0.3, "a" * 32), att(SHA[0], 0.3, "a" * 32)], {SHA[0]: 0})[SHA[0]]
    assert not one.admitted and "1 of 2" in one.reason
    two = decide(r, [att(SHA[0], 0.3, "a" * 32), att(SHA[0], 0.9, "b" * 32), att(SHA[0], 0.31, "c" * 32)],
                 {SHA[0]: 0})[SHA[0]]
    assert two.admitted and two.score == pytest.approx(0.31)


def test_the_rule_field_is_checked():
    good = rule("a" * 32).to_field()
    assert AdmissionRule.from_field(good) == rule("a" * 32)
    for bad in ({**good, "validators": []}, {**good, "validators": ["xyz"]}, {**good, "ratio": 0.5},
                {**good, "ceiling": 1.5}, {**good, "quorum": 2}, {**good, "seed": -1}, {**good, "seed": 1.0}, []):
        with pytest.raises(ValueError):
            AdmissionRule.from_field(bad)


def manifest_fields(**kw) -> dict:
    return dict(version=RECORD_VERSION, swarm="s", partition_hash="ph", num_clusters=2, dataset_id="toy:8",
                image_shape=[1, 8, 8], num_classes=4, router_sha256="", router_weights_sha256="", router_bytes=0,
                protocol=1, software="t", issued=1.0, **kw)


def attestation_fields(**kw) -> dict:
    d = dict(version=RECORD_VERSION, subject="checkpoint", swarm="s", checkpoint_sha256=SHA[0], cluster=0,
             num_clusters=2, partition_hash="ph", score=0.3, baseline=1.0, in_classes=0.3, out_classes=None,
             triples=80, seed=5, issued=1.0, peer_id="QmPeer", updated=2.0)
    d.update(kw)
    return d


def test_attestations_are_signed_bounded_and_checked(keys):
    owner, stranger = keys
    fp = key_fingerprint(public_key_der(owner))
    m = sign_manifest(owner, manifest_fields(**{ADMISSION_FIELD: rule(fp).to_field()}))
    m = SwarmManifest.from_dict(m.to_dict())
    assert m.admission == rule(fp)
    a = sign_attestation(owner, attestation_fields())
    wire = a.to_dict()
    import msgpack

    assert len(msgpack.packb(wire, use_bin_type=True)) < 1100  # one attestation: ~1 KB with an RSA-2048 key
    back = AttestationRecord.from_dict(wire)
    assert verify_attestation(back, m, m.admission) == Attested(SHA[0], 0, 0.3, 1.0, fp)
    relayed = dataclasses.replace(back, peer_id="QmOther", updated=9.0)  # re-announced by anyone: still valid
    verify_attestation(relayed, m, m.admission)
    for forged in (dataclasses.replace(back, score=0.1), dataclasses.replace(back, cluster=1),
                   dataclasses.replace(back, checkpoint_sha256=SHA[1])):
        with pytest.raises(RecordError, match="bad signature"):
            verify_attestation(forged, m, m.admission)
    with pytest.raises(RecordError, match="not a validator"):
        verify_attestation(sign_attestation(stranger, attestation_fields()), m, m.admission)
    with pytest.raises(RecordError, match="another swarm"):
        verify_attestation(sign_attestation(owner, attestation_fields(seed=6)), m, m.admission)
    for bad in (attestation_fields(score=float("nan")), attestation_fields(score=-1.0), attestation_fields(cluster=2),
                attestation_fields(checkpoint_sha256="x"), attestation_fields(triples=0)):
        with pytest.raises(RecordError):
            sign_attestation(owner, bad)
    with pytest.raises(RecordError, match="at most"):
        AttestationRecord.from_dict({**wire, "validator_key": b"k" * 5000})
    with pytest.raises(RecordError, match="admission"):
        SwarmManifest.from_dict({**m.to_dict(), ADMISSION_FIELD: {"validators": "all"}})
    forged = dataclasses.replace(back, score=0.1)  # the genuine signature on another score, announced first
    scores, notes = verified_scores([forged, back, relayed], m, m.admission)
    assert scores == [Attested(SHA[0], 0, 0.3, 1.0, fp)] and len(notes) == 1  # it cannot shadow the genuine one


def expert_record(peer: str, sha: str, cluster: int = 0) -> ExpertRecord:
    return ExpertRecord(version=RECORD_VERSION, expert_id=f"c{cluster}-fm", cluster=cluster, num_clusters=2,
                        partition_hash="ph", objective="fm", schedule="flow", image_shape=[1, 8, 8], num_classes=4,
                        checkpoint_sha256=sha, software="t", protocol=1, state="online", progress=1.0,
                        throughput=100.0, load=0.0, max_batch=16, peer_id=peer, addrs=[], updated=1.0)


def test_the_client_view_uses_admitted_checkpoints_only_best_first(keys):
    from diffswarm.client.discovery import SwarmTarget, SwarmView
    from diffswarm.client.sources import Sources
    from diffswarm.protocol.wire import PROTOCOL_VERSION

    owner, _ = keys
    fp = key_fingerprint(public_key_der(owner))
    m = SwarmManifest.from_dict(sign_manifest(owner, manifest_fields(**{ADMISSION_FIELD: rule(fp).to_field()}))
                                .to_dict())
    recs = [dataclasses.replace(expert_record(p, s), protocol=PROTOCOL_VERSION)
            for p, s in (("good", SHA[0]), ("better", SHA[1]), ("bad", SHA[2]), ("new", SHA[3]))]
    atts = [sign_attestation(owner, attestation_fields(checkpoint_sha256=s, score=sc))
            for s, sc in ((SHA[0], 0.30), (SHA[1], 0.27), (SHA[2], 0.6))]
    v, _ = verdicts(m, atts, recs)
    view = SwarmView(SwarmTarget(2, "ph", (1, 8, 8), 4))
    view.admission = v
    view.update(recs, now=0.0)
    assert [r.peer_id for r in view.replicas(0)] == ["better", "good"]
    assert "vs best" in view.probation["bad/c0-fm"] and "0 of 1" in view.probation["new/c0-fm"]

    class Client:  # the surface Sources uses
        def __init__(self):
            from diffswarm.client.selection import Blacklist

            self.view, self.bans, self.latency = view, Blacklist(), {"good": 0.001, "better": 0.5}

        def usable(self, rep, now):
            return not self.bans.is_banned(rep.peer_id, now)

        def with_fresh_load(self, reps):
            return reps

    from diffswarm.client.answer_checks import TrustConfig

    src = Sources(Client(), TrustConfig(local_fallback=False))
    assert src.pick(0, 1, 0.0, set()).peer_id == "better"  # best score first, though slower
    assert src.pick(0, 1, 0.0, {"better"}).peer_id == "good"  # fails over to the next best
    src.sticky[0] = SHA[0]
    assert src.pick(0, 1, 0.0, set()).peer_id == "good"  # a trajectory stays on its checkpoint
    assert verdicts(SwarmManifest.from_dict(sign_manifest(owner, manifest_fields()).to_dict()), atts, recs) == \
        (None, [])  # no rule in the manifest: admission off


def test_a_client_holding_the_data_catches_a_lying_validator(keys, tmp_path):
    """--verify-attestations: the honest validator's score is recomputed exactly; the one that signed a better score
    for a bad checkpoint is reported and its attestations stop counting."""
    import asyncio
    from collections import deque

    from diffswarm.admission.score import validation_set
    from diffswarm.client.attestation_check import AttestationCheck
    from diffswarm.data import DatasetSpec, load_dataset
    from diffswarm.training.jobs import write_partition

    honest, liar = keys
    fps = [key_fingerprint(public_key_der(k)) for k in keys]
    part = write_partition(load_dataset("digits", "train"), DatasetSpec("digits"), 2, 0, tmp_path / "p.json")
    cfg = expert_config(ClusterData((1, 8, 8), 10, 2, part.partition_hash, "digits:8"), "fm", 0, net="mlp",
                        width=32, depth=1)
    torch.manual_seed(0)
    e = Expert(cfg).eval()
    e.weights_sha256 = SHA[0]
    r = AdmissionRule(tuple(fps), seed=11)
    m = SwarmManifest.from_dict(sign_manifest(honest, {**manifest_fields(**{ADMISSION_FIELD: r.to_field()}),
                                                       "partition_hash": part.partition_hash}).to_dict())
    true = score_expert(e, validation_set(part, load_dataset("digits", "test"), 0), 11)
    common = dict(partition_hash=part.partition_hash, seed=11, baseline=true.baseline)
    atts = [sign_attestation(honest, attestation_fields(score=true.score, **common)),
            sign_attestation(liar, attestation_fields(score=0.5 * true.score, **common))]
    check = AttestationCheck(str(tmp_path / "p.json"), lambda sha, recs: e if sha == SHA[0] else None)
    liars, events = {}, deque()
    asyncio.run(check.check(atts, m, liars, events))
    assert list(liars) == [fps[1]] and "lied" in events[0]
    assert check.checked[(SHA[0], 0, fps[0])] == pytest.approx(true.score, rel=TOLERANCE)
    scores, _ = verified_scores(atts, m, r)
    v = decide(r, scores, {SHA[0]: 0}, ignored=liars)[SHA[0]]
    assert v.score == pytest.approx(true.score)  # only the honest validator's score counts


def test_statistics_recomputed_from_the_data_are_attested_and_used(keys, tmp_path):
    """Item 5: a validator vouches for the cluster statistics a peer announces when they match its own recomputation
    from the partition's train split; the statistics router then takes them like owner-signed ones, and nothing
    else for that cluster."""
    import hashlib

    from diffswarm.admission.stats_check import recompute_stats, stats_disagree
    from diffswarm.client.discovery import NOT_SIGNED, choose_stats
    from diffswarm.data import DatasetSpec, load_dataset
    from diffswarm.dht.attestations import attested_stats
    from diffswarm.dht.records import ClusterStatsRecord
    from diffswarm.router.stats.blob import ClusterStats
    from diffswarm.router.stats.publish import read_cluster_stats, write_cluster_stats
    from diffswarm.training.jobs import TrainJob, write_partition

    owner, stranger = keys
    train = load_dataset("digits", "train")
    part = write_partition(train, DatasetSpec("digits"), 2, 0, tmp_path / "p.json")
    cfg, images, labels = TrainJob(str(tmp_path / "p.json"), 0, str(tmp_path / "o"), net="mlp").expert(part, train)
    blob, announced = read_cluster_stats(write_cluster_stats(cfg, images, labels, tmp_path / "s.bin"))
    mine = recompute_stats(part, train, 0, announced)
    assert stats_disagree(announced, mine) is None
    forged = ClusterStats.from_bytes(blob)
    forged.mean = forged.mean + 0.05
    assert "mean differs" in stats_disagree(forged, mine)
    forged = ClusterStats.from_bytes(blob)
    forged.count *= 10
    assert "count" in stats_disagree(forged, mine)

    fp = key_fingerprint(public_key_der(owner))
    m = SwarmManifest.from_dict(sign_manifest(owner, {**manifest_fields(**{ADMISSION_FIELD: rule(fp).to_field()}),
                                                      "partition_hash": part.partition_hash}).to_dict())
    sha = hashlib.sha256(blob).hexdigest()
    common = dict(subject="stats", checkpoint_sha256=sha, partition_hash=part.partition_hash, score=0.0, baseline=0.0,
                  in_classes=None, triples=announced.count)
    atts = [sign_attestation(owner, attestation_fields(**common)),
            sign_attestation(stranger, attestation_fields(**{**common, "checkpoint_sha256": "e" * 64}))]
    assert attested_stats(atts, m) == [{sha}, set()]  # the stranger is no validator of the rule
    assert verified_scores(atts, m, m.admission) == ([], [])  # a statistics attestation admits no checkpoint

    other = forged.to_bytes()
    recs = [ClusterStatsRecord(version=RECORD_VERSION, cluster=0, num_clusters=2, partition_hash=part.partition_hash,
                               stats_sha256=hashlib.sha256(b).hexdigest(), blob=b, software="t", peer_id=p, updated=1.0)
            for p, b in (("honest", blob), ("sybil", other))]
    cands, notes = choose_stats(recs, m, allow_unsigned=False, attested=attested_stats(atts, m))
    assert [r.peer_id for r in cands[0]] == ["honest"] and any(NOT_SIGNED in n for n in notes)
    cands, notes = choose_stats(recs, m, allow_unsigned=False)  # without the attestation: nothing for cluster 0
    assert cands[0] == []
