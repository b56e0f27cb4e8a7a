"""Joining without a hand-off, as pure decisions and checks (no network): which cluster and objective a volunteer
takes, when a serving peer moves, the owner-signed partition file (manifest fields, fetching from untrusted peers,
checking it), the volunteer's dataset, the memory it will need, and the ETA it announces."""

import asyncio
import dataclasses
import hashlib
import json
import random

import pytest

from diffswarm.client.config import SwarmClientError
from diffswarm.client.downloads import FileSource, fetch_partition, partition_sources
from diffswarm.dht.names import sign_manifest, swarm_name_of, verify_manifest
from diffswarm.dht.records import (
    PARTITION_BYTES_FIELD,
    PARTITION_SHA_FIELD,
    RECORD_VERSION,
    ExpertRecord,
    SwarmManifest,
)
from diffswarm.dht.schema import MAX_PARTITION_BYTES, RecordError
from diffswarm.peer.joining import TrainingProgress
from diffswarm.peer.placement import (
    ClusterCover,
    RebalanceConfig,
    RebalanceWatch,
    balance_quality,
    choose_cluster,
    choose_objective,
    coverage,
    live_records,
    rebalance_move,
)
from diffswarm.peer.rebalance import check_balance
from diffswarm.swarm.join import JoinChoice, JoinError, Survey, check_partition, decide, load_volunteer_data
from diffswarm.training.footprint import Footprint, fits, measure_footprint

PH = "ph"
SHA = "ab" * 32


def rec(peer: str, cluster: int, state: str = "online", objective: str = "fm", throughput: float = 100.0,
        **kw) -> ExpertRecord:
    base = dict(version=RECORD_VERSION, expert_id=f"c{cluster}-{objective}", cluster=cluster, num_clusters=3,
                partition_hash=PH, objective=objective, schedule="flow", image_shape=[1, 8, 8], num_classes=4,
                checkpoint_sha256=SHA, software="t", protocol=1, state=state, progress=1.0, throughput=throughput,
                load=0.0, max_batch=64, peer_id=peer, addrs=[f"/ip4/127.0.0.1/tcp/1/p2p/{peer}"], updated=1.0)
    base.update(kw)
    return ExpertRecord(**base)


def manifest_fields(**kw) -> dict:
    return dict(version=RECORD_VERSION, swarm="s", partition_hash=PH, num_clusters=3, dataset_id="toy:8",
                image_shape=[1, 8, 8], num_classes=4, router_sha256="", router_weights_sha256="", router_bytes=0,
                protocol=1, software="t", issued=1.0, **kw)


@pytest.fixture(scope="module")
def owner():
    from hivemind.utils.crypto import RSAPrivateKey

    return RSAPrivateKey()


@pytest.fixture(scope="module")
def manifest(owner):
    return sign_manifest(owner, manifest_fields())


# -- choosing a cluster and an objective --------------------------------------------------------------------------


def test_the_cluster_with_fewest_live_experts_per_data_share_is_chosen(manifest):
    records = [rec("A", 0), rec("B", 0), rec("C", 1), rec("D", 2, state="joining"), rec("E", 2, state="offline")]
    cover = coverage(records, manifest, [0.25, 0.25, 0.5])
    assert [c.experts for c in cover] == [2, 1, 1]  # offline does not count, joining does
    assert choose_cluster(cover) == 2  # 1 expert for half the data beats 1 for a quarter
    assert choose_cluster(coverage(records, manifest, [0.2, 0.6, 0.2])) == 1


def test_ties_go_to_least_throughput_per_share_then_spread_at_random(manifest):
    cover = coverage([rec("A", 0, throughput=50.0), rec("B", 1, throughput=10.0)], manifest, [0.5, 0.5, 0.0])
    assert choose_cluster(cover) == 1  # both have one expert; cluster 2 has no data and is never chosen
    even = [ClusterCover(k, 1 / 3, 0, 0.0) for k in range(3)]
    picks = {choose_cluster(even, random.Random(seed)) for seed in range(30)}
    assert picks == {0, 1, 2}  # volunteers joining an empty swarm together do not all take cluster 0
    with pytest.raises(ValueError, match="no cluster has any data"):
        choose_cluster([ClusterCover(0, 0.0, 0, 0.0)])


def test_records_that_do_not_fit_or_are_stale_or_ours_are_not_counted(manifest):
    records = [rec("A", 0, partition_hash="other"), rec("B", 0, protocol=99), rec("C", 0, image_shape=[3, 8, 8]),
               rec("D", 0, num_classes=10), rec("E", 1, updated=1.0), rec("E", 1, state="offline", updated=2.0),
               rec("ME", 2), rec("F", 2)]
    live = live_records(records, manifest, exclude_peer="ME")
    assert [(r.peer_id, r.cluster) for r in live] == [("F", 2)]
    assert [c.experts for c in coverage(records, manifest, [0.3, 0.3, 0.4], exclude_peer="ME")] == [0, 0, 1]
    with pytest.raises(ValueError, match="2 cluster shares for K=3"):
        coverage(records, manifest, [0.5, 0.5])


def test_the_objective_the_swarm_has_fewer_of_is_chosen():
    assert choose_objective([rec("A", 0, objective="fm")]) == "ddpm"
    assert choose_objective([rec("A", 0, objective="ddpm")]) == "fm"
    assert choose_objective([]) == "fm"  # a tie: the default
    assert choose_objective([], default="ddpm") == "ddpm"


# -- rebalancing --------------------------------------------------------------------------------------------------


def test_balance_quality():
    assert balance_quality([1, 1], [0.5, 0.5]) == 1.0
    assert balance_quality([2, 0], [0.5, 0.5]) == 0.5  # half the data has no expert
    assert balance_quality([2, 1], [0.5, 0.5]) == pytest.approx(0.5 + 0.5 / 1.5)
    assert balance_quality([3, 0, 0], [1 / 3] * 3) == pytest.approx(1 / 3)
    assert balance_quality([0, 0], [0.5, 0.5]) == 1.0  # no experts at all: nothing to balance
    assert balance_quality([3, 0], [1.0, 0.0]) == 1.0  # a cluster without data needs nobody


def cover_of(counts, shares):
    return [ClusterCover(k, s, c, 0.0) for k, (c, s) in enumerate(zip(counts, shares, strict=True))]


def test_a_peer_moves_only_from_a_well_covered_cluster_and_only_when_it_helps_by_the_margin():
    move = rebalance_move(cover_of([2, 0], [0.5, 0.5]), mine=0)
    assert (move.src, move.dst, move.before, move.after) == (0, 1, 0.5, 1.0)
    assert rebalance_move(cover_of([2, 0], [0.5, 0.5]), mine=1) is None  # the one that is alone stays
    assert rebalance_move(cover_of([1, 0], [0.5, 0.5]), mine=0) is None  # leaving would open another hole
    assert rebalance_move(cover_of([2, 1], [0.5, 0.5]), mine=0) is None  # quality 0.83 >= 0.75: balanced enough
    assert rebalance_move(cover_of([4, 1], [0.5, 0.5]), mine=0).dst == 1  # 0.7 -> 0.9
    assert rebalance_move(cover_of([4, 1], [0.5, 0.5]), mine=0, margin=0.3) is None  # not by the margin
    # 0.8 -> 0.7: moving the second expert of the big cluster to the small one would serve less of the data
    assert rebalance_move(cover_of([2, 0], [0.8, 0.2]), mine=0, threshold=1.0) is None
    three = rebalance_move(cover_of([3, 0, 0], [1 / 3] * 3), mine=0)  # the first hole filled counts already
    assert (three.dst, three.before, three.after) == (1, pytest.approx(1 / 3), pytest.approx(2 / 3))


def test_a_move_is_confirmed_only_by_consecutive_checks_that_agree():
    watch = RebalanceWatch(3)
    a = rebalance_move(cover_of([3, 0, 0], [0.4, 0.3, 0.3]), mine=0)
    b = dataclasses.replace(a, dst=2)
    assert [watch.observe(m) for m in (a, a, None, a, b, b)] == [None] * 6
    assert watch.observe(b) == b
    with pytest.raises(ValueError):
        RebalanceConfig((0.5, 0.5), interval=0)


class FakeDHT:
    def __init__(self, records):
        self.records, self.asked = records, []

    async def get_experts(self, clusters):
        self.asked.append(list(clusters))
        return [r for r in self.records if r.cluster in self.asked[-1]], []


def test_balance_checks_say_what_they_see_and_confirm_before_moving(manifest):
    records = [rec("ME", 0), rec("B", 0), rec("C", 1)]  # cluster 2 has nobody
    cfg = RebalanceConfig((0.3, 0.3, 0.4), interval=1.0, confirmations=2, move=True)
    watch, lines = RebalanceWatch(2), []
    dht = FakeDHT(records)
    check = lambda: asyncio.run(check_balance(dht, manifest, cfg, 0, watch, lines.append))  # noqa: E731
    assert check() is None and "check 1 of 2 before moving" in lines[-1]
    assert dht.asked == [[0, 1, 2]]  # every cluster's key (version 6: one key per cluster)
    move = check()
    assert (move.src, move.dst) == (0, 2)
    quiet = RebalanceConfig((0.3, 0.3, 0.4), interval=1.0, confirmations=1, move=False)
    assert asyncio.run(check_balance(FakeDHT(records), manifest, quiet, 0, RebalanceWatch(1), lines.append)) is None
    assert "restart with --rebalance (or --cluster 2)" in lines[-1]


# -- the partition file the owner signs ---------------------------------------------------------------------------


def test_the_owner_signs_the_partition_file_and_bad_fields_are_refused(owner):
    m = sign_manifest(owner, manifest_fields(**{PARTITION_SHA_FIELD: SHA, PARTITION_BYTES_FIELD: 1234}))
    parsed = SwarmManifest.from_dict(m.to_dict())
    verify_manifest(parsed, swarm_name_of("s", owner))
    assert parsed.signed_partition == (SHA, 1234)
    forged = SwarmManifest.from_dict({**m.to_dict(), PARTITION_SHA_FIELD: "cd" * 32})
    with pytest.raises(RecordError, match="bad signature"):
        verify_manifest(forged, swarm_name_of("s", owner))
    plain = {k: v for k, v in m.to_dict().items() if k not in (PARTITION_SHA_FIELD, PARTITION_BYTES_FIELD)}
    for bad in ({PARTITION_SHA_FIELD: "xyz", PARTITION_BYTES_FIELD: 10}, {PARTITION_SHA_FIELD: SHA},
                {PARTITION_BYTES_FIELD: 10}, {PARTITION_SHA_FIELD: SHA, PARTITION_BYTES_FIELD: MAX_PARTITION_BYTES + 1},
                {PARTITION_SHA_FIELD: SHA, PARTITION_BYTES_FIELD: 1.5}):
        with pytest.raises(RecordError, match="partition_"):
            SwarmManifest.from_dict({**plain, **bad})
    assert SwarmManifest.from_dict(sign_manifest(owner, manifest_fields()).to_dict()).signed_partition is None


def test_the_partition_comes_from_whichever_peer_serves_the_signed_bytes(owner):
    good = b'{"the": "partition"}'
    m = sign_manifest(owner, manifest_fields(**{PARTITION_SHA_FIELD: hashlib.sha256(good).hexdigest(),
                                                PARTITION_BYTES_FIELD: len(good)}))
    served = {"liar": b'{"the": "forgery!!"}', "gone": None, "honest": good}

    def download(src: FileSource) -> bytes:
        if served[src.peer_id] is None:
            raise ConnectionError("peer gone")
        return served[src.peer_id]

    sources = [FileSource(p) for p in served]
    for seed in range(5):
        assert fetch_partition(m, sources, download, random.Random(seed)) == good
    with pytest.raises(SwarmClientError, match="no peer served the partition file") as e:
        fetch_partition(m, sources[:2], download)
    assert "do not hash to the signed sha256" in str(e.value) and "peer gone" in str(e.value)
    with pytest.raises(SwarmClientError, match="signs no partition file"):
        fetch_partition(sign_manifest(owner, manifest_fields()), sources, download)
    srcs = partition_sources(["/ip4/1.2.3.4/tcp/5/p2p/QmBoot"], [rec("QmBoot", 0), rec("QmX", 1)])
    assert [s.peer_id for s in srcs] == ["QmBoot", "QmX"]


@pytest.fixture(scope="module")
def digits_partition(tmp_path_factory):
    from diffswarm.data import DatasetSpec
    from diffswarm.training.jobs import write_partition

    spec = DatasetSpec("digits")
    path = tmp_path_factory.mktemp("part") / "partition.json"
    part = write_partition(spec.load("train"), spec, 2, 0, path)
    return part, path


def swarm_manifest_of(owner, part, data: bytes):
    return sign_manifest(owner, dict(manifest_fields(), partition_hash=part.partition_hash, num_clusters=part.k,
                                     dataset_id=part.dataset_id, image_shape=list(part.image_shape),
                                     num_classes=part.num_classes, **{PARTITION_SHA_FIELD: hashlib.sha256(
                                         data).hexdigest(), PARTITION_BYTES_FIELD: len(data)}))


def test_the_partition_must_fit_the_manifest_and_the_volunteers_data_the_partition(owner, digits_partition, tmp_path):
    part, path = digits_partition
    data = path.read_bytes()
    m = swarm_manifest_of(owner, part, data)
    assert check_partition(data, m, "p").partition_hash == part.partition_hash
    other = dataclasses.replace(m, partition_hash="f" * 64)
    with pytest.raises(JoinError, match="does not fit the owner's manifest"):
        check_partition(data, other, "p")
    with pytest.raises(JoinError, match="does not parse"):
        check_partition(b"not json", m, "p")
    huge = json.loads(data)
    huge["source"] = {"name": "digits", "size": 100_000}  # would resize the volunteer's images to 100,000^2
    with pytest.raises(JoinError, match="does not make the manifest's 1x8x8 images"):
        check_partition(json.dumps(huge).encode(), m, "p")
    assert load_volunteer_data(part, None).content_hash == part.content_hash
    fashion = dataclasses.replace(part, source={"name": "fashion"}, dataset_id="fashion:28")
    with pytest.raises(JoinError) as e:
        load_volunteer_data(fashion, str(tmp_path / "nothing-here"))
    assert "dataset-fashion-mnist" in str(e.value) and "--data-root" in str(e.value)
    changed = dataclasses.replace(part, content_hash="0" * 64)
    with pytest.raises(JoinError, match="not the swarm's"):
        load_volunteer_data(changed, None)


def test_a_restarted_volunteer_keeps_its_cluster_unless_told_otherwise(owner, digits_partition, tmp_path):
    part, path = digits_partition
    m = swarm_manifest_of(owner, part, path.read_bytes())
    records = [rec("A", 0, num_clusters=2, partition_hash=part.partition_hash, image_shape=list(part.image_shape),
                   num_classes=part.num_classes, objective="ddpm")]
    s = Survey(m, records, part, path)
    choice, cover = decide("s@x", s, None, None, None)
    assert (choice.cluster, choice.objective) == (1, "fm") and [c.experts for c in cover] == [1, 0]
    choice.save(tmp_path)
    kept = JoinChoice.load(tmp_path)
    assert kept == choice
    records.append(dataclasses.replace(records[0], peer_id="B", cluster=1))
    records.append(dataclasses.replace(records[0], peer_id="C", cluster=1))
    records.append(dataclasses.replace(records[0], peer_id="D", cluster=1))  # 3 for 73% of the data, 1 for 27%
    again, _ = decide("s@x", s, kept, None, None)
    assert again.cluster == 1 and "kept" in again.reason  # although cluster 0 now needs it more
    forced = decide("s@x", s, kept, 0, "ddpm")[0]  # --cluster, --objective
    assert (forced.cluster, forced.objective) == (0, "ddpm")
    assert decide("other@y", s, kept, None, None)[0].cluster == 0  # another swarm: choose afresh
    with pytest.raises(JoinError, match="clusters 0..1"):
        decide("s@x", s, None, 5, None)
    (tmp_path / "join.json").write_text(json.dumps({"swarm": 1}))
    assert JoinChoice.load(tmp_path) is None


# -- memory and time ----------------------------------------------------------------------------------------------


def test_the_memory_estimate_counts_parameters_and_measured_activations():
    from diffswarm.training.jobs import ClusterData, expert_config

    cfg = expert_config(ClusterData((1, 8, 8), 4, 2, PH), "fm", 0, net="mlp", width=32, depth=1)
    small, big = measure_footprint(cfg, 8, 100), measure_footprint(cfg, 64, 100)
    assert small.params > 0 and small.state_bytes == 20 * small.params
    assert big.activation_bytes == 8 * small.activation_bytes > 0  # measured at a small batch, scaled linearly
    assert small.data_bytes == 100 * (64 * 4 + 8)
    fp = Footprint(params=1, state_bytes=600, activation_bytes=300, data_bytes=100)
    assert fits(fp, 2000) and not fits(fp, 1000) and fits(fp, None)
    assert "MiB" in fp.describe()


def test_the_eta_follows_the_progress():
    p = TrainingProgress(started=100.0, every_s=10.0)
    assert p.eta(0.0, 110.0) is None
    assert p.eta(0.25, 110.0) == pytest.approx(30.0)
    assert "about 0m30s left" in p.line("c1-fm", 5, 0.5, 0.25, 110.0)
    assert p.line("c1-fm", 6, 0.5, 0.3, 112.0) is None  # shown 2 s ago
    assert "100%" in p.line("c1-fm", 20, 0.5, 1.0, 113.0)  # the end is always shown


def test_join_refuses_an_expert_the_machine_cannot_hold(digits_partition, monkeypatch, capsys):
    from diffswarm.cli.join_runs import _check_memory
    from diffswarm.experts.train import TrainConfig
    from diffswarm.training import footprint
    from diffswarm.training.jobs import TrainJob

    part, path = digits_partition
    job = TrainJob(str(path), 0, "unused", net="mlp", width=32, depth=1,
                   train=TrainConfig(steps=None, minutes=2.0, batch=16, device="cpu"))
    ds = load_volunteer_data(part, None)
    survey = Survey(None, [], part, path)
    _check_memory(job, survey, ds)  # this machine holds a tiny expert
    said = capsys.readouterr().out
    assert "memory: training c0-fm on cpu takes about" in said and "time: up to 2 minutes of training" in said
    monkeypatch.setattr(footprint, "available_memory", lambda dev: (1 << 10, "available RAM"))
    with pytest.raises(JoinError, match="this machine cannot hold expert c0-fm on cpu: it needs about"):
        _check_memory(job, survey, ds)
