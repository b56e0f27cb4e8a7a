"""Contribution, visible: a peer counts what it served, announces it (bounded ExpertRecord v5 fields, claims), and
`swarm status` / the dashboard show it per peer and per cluster."""

import asyncio
import time

import pytest
import torch
from peer_harness import InprocPeer, RawCaller, quiet_hivemind, valid_request
from test_records import expert_record, schema_accepts

from diffswarm.client.contributors import contributor_lines, contributors
from diffswarm.dht.records import RECORD_VERSION, ExpertRecord
from diffswarm.dht.schema import MAX_SERVED_COUNT, RecordError
from diffswarm.peer.contribution import Contribution, first_step_rows
from diffswarm.protocol.wire import encode_request, request_metadata
from diffswarm.utils.log import format_duration


def test_counters_rows_images_clients_and_uptime():
    c = Contribution(max_clients=2)
    assert c.record_fields("c0-fm", 5.0) == {"served_rows": 0, "served_images": 0, "served_clients": 0, "uptime": 0.0}
    c.start(10.0)
    c.start(20.0)  # started once: a second start does not reset the uptime
    c.record("c0-fm", "A", rows=4, images=4)
    c.record("c0-fm", "A", rows=4, images=0)
    c.record("c0-fm", "B", rows=2, images=1)
    c.record("c0-fm", "C", rows=1, images=0)  # a third id past max_clients: not remembered
    c.record("c1-ddpm", "D", rows=3, images=3)
    assert c.record_fields("c0-fm", 70.0) == {"served_rows": 11, "served_images": 5, "served_clients": 2,
                                              "uptime": 60.0}
    assert c.totals() == (14, 8, 5, 3)
    assert "served 14 rows (8 images" in c.summary(70.0) and "3 client(s)" in c.summary(70.0)
    assert "online 1m00s" in c.summary(70.0)


def test_first_step_rows_counts_t_equal_one():
    assert first_step_rows(torch.tensor([1.0, 0.999, 0.5, 1.0])) == 2
    assert [format_duration(s) for s in (-3, 42, 185, 3720)] == ["0s", "42s", "3m05s", "1h02m"]


def test_record_fields_round_trip_and_are_optional():
    rec = expert_record(version=RECORD_VERSION, relayed=True, served_rows=10, served_images=2, served_clients=1,
                        uptime=12.5)
    d = rec.to_dict()
    assert ExpertRecord.from_dict(d) == rec and schema_accepts(d)
    old = expert_record(version=4).to_dict()  # a version-4 peer: none of the new fields
    assert not {"relayed", "served_rows", "served_images", "served_clients", "uptime"} & set(old)
    r = ExpertRecord.from_dict(old)
    assert r.relayed is None and r.served_rows is None and r.uptime is None and schema_accepts(old)


@pytest.mark.parametrize("change, message", [
    ({"served_rows": -1}, "served_rows -1 outside"),
    ({"served_images": MAX_SERVED_COUNT + 1}, "served_images"),
    ({"served_clients": 1.0}, "wrong field types"),
    ({"served_rows": True}, "wrong field types"),
    ({"uptime": float("inf")}, "uptime"),
    ({"uptime": -1.0}, "uptime"),
    ({"uptime": 1}, "wrong field types"),
    ({"relayed": 1}, "wrong field types"),
])
def test_out_of_bounds_claims_are_rejected(change, message):
    d = {**expert_record(version=RECORD_VERSION).to_dict(), **change}
    with pytest.raises(RecordError, match=message):
        ExpertRecord.from_dict(d)


def test_contributors_view_per_peer_and_per_cluster():
    recs = [expert_record(peer_id="P1", expert_id="c0-fm", cluster=0, served_rows=100, served_images=10,
                          served_clients=3, uptime=60.0, relayed=False, updated=2.0),
            expert_record(peer_id="P1", expert_id="c0-fm", cluster=0, served_rows=5, updated=1.0),  # older: ignored
            expert_record(peer_id="P1", expert_id="c1-fm", cluster=1, served_rows=50, served_images=5,
                          served_clients=1, uptime=60.0),
            expert_record(peer_id="P2", expert_id="c1-fm", cluster=1, served_rows=500, served_images=50,
                          served_clients=7, uptime=3600.0, relayed=True),
            expert_record(peer_id="P3", expert_id="c2-fm", cluster=2, state="joining", progress=0.5)]  # a v4 peer
    by_peer, by_cluster = contributors(recs)
    assert [p.peer_id for p in by_peer] == ["P2", "P1", "P3"]  # most rows first
    p1 = by_peer[1]
    assert (p1.rows, p1.images, p1.clients, p1.clusters, p1.relayed) == (150, 15, 3, (0, 1), False)
    assert by_peer[0].relayed is True and by_peer[2].uptime is None and by_peer[2].state == "joining"
    assert [(c.cluster, c.peers, c.online, c.rows) for c in by_cluster] == [(0, 1, 1, 100), (1, 2, 2, 550),
                                                                          (2, 1, 0, 0)]
    text = "\n".join(contributor_lines(recs))
    assert "claims, not checked" in text and "relayed" in text and "1h00m" in text
    assert "cluster 1: 2/2 peer(s) online, 550 rows, 55 images served" in text
    assert contributor_lines([]) == []


def test_a_serving_peer_counts_and_announces_what_it_served(tmp_path):
    """Real requests over hivemind: rows, first-step images and distinct callers reach the peer's record."""
    quiet_hivemind()
    peer = InprocPeer(tmp_path)
    callers = []
    try:
        assert peer.peer.state == "online"
        for _ in range(2):
            callers.append(RawCaller(peer))
        msg, x, t, labels = valid_request(rows=3, seed=1)
        t1 = torch.ones(2)  # two images at their first step (t = 1)
        first = encode_request(peer.uid, torch.randn(2, 1, 8, 8), t1, torch.zeros(2, dtype=torch.long), 1.0)
        from hivemind.proto import runtime_pb2

        msg1 = runtime_pb2.ExpertRequest(uid=peer.uid, tensors=first, metadata=request_metadata(1.0))
        callers[0].run(callers[0].unary("rpc_velocity", msg))
        callers[0].run(callers[0].unary("rpc_velocity", msg1))
        callers[1].run(callers[1].unary("rpc_velocity", msg))
        expected_images = 2 + 2 * first_step_rows(t)
        fields = peer.on_loop(lambda: peer.peer.contribution.record_fields(peer.uid, time.monotonic()))
        assert fields["served_rows"] == 3 + 2 + 3
        assert fields["served_images"] == expected_images
        assert fields["served_clients"] == 2
        [rec] = peer.on_loop(peer.peer.records)
        assert rec.served_rows == 8 and rec.served_clients == 2 and rec.uptime >= 0.0
        assert ExpertRecord.from_dict(rec.to_dict()) == rec
        line = peer.on_loop(lambda: peer.peer.contribution.summary(time.monotonic()))
        assert "served 8 rows" in line and "2 client(s)" in line
        # the periodic log line comes with a heartbeat once contribution_log_period has passed
        said = []
        peer.on_loop(lambda: setattr(peer.peer, "log", said.append))
        peer.peer.cfg.contribution_log_period = 1e-6
        asyncio.run_coroutine_threadsafe(peer.peer.announce(), peer.loop).result(30)
        assert any(s.startswith("contribution: served 8 rows") for s in said), said
    finally:
        for c in callers:
            c.close()
        peer.stop()
