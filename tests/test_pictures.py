"""Pictures: the loss-by-t plot beside a trained checkpoint, the coverage chart of `swarm status --chart`, and the
per-peer throughput history behind the dashboard's sparkline."""

from __future__ import annotations

import json

import pytest

from diffswarm.tui.charts import EIGHTHS, EMPTY, ClusterCoverage, bar, coverage, coverage_chart
from diffswarm.tui.model import PeerHistory, peer_throughput
from diffswarm.tui.source import FakeRecord, demo_records


def test_coverage_counts_online_replicas_and_joining_progress():
    recs = demo_records(now=100.0) + [FakeRecord("12D3KooWpeerBBBB0002", "c1-fm", 1, "fm", throughput=1.0,
                                                 updated=50.0)]  # an older record of the same peer: ignored
    rows = coverage(recs, num_clusters=4)
    assert [(r.cluster, r.online, r.rows_per_s, r.joining) for r in rows] == [
        (0, 1, 850.0, ()), (1, 2, 1600.0, ()), (2, 0, 0.0, (0.4,)), (3, 0, 0.0, ())]
    assert len(coverage(recs)) == 3  # no manifest: the clusters the records name
    assert coverage([]) == []


def test_coverage_chart_lines():
    lines = coverage_chart([ClusterCoverage(0, 1, 850.0), ClusterCoverage(1, 2, 1700.0),
                            ClusterCoverage(2, 0, 0.0, (0.4,))], width=10)
    assert lines[0].startswith("coverage by cluster (2/3 covered") and "longest = 1700" in lines[0]
    assert EIGHTHS[8] * 5 in lines[1] and EIGHTHS[8] * 6 not in lines[1] and "1 online" in lines[1]
    assert EIGHTHS[8] * 10 in lines[2] and "1700 rows/s" in lines[2]
    assert EMPTY * 10 in lines[3] and "UNCOVERED  joining 40%" in lines[3]
    assert coverage_chart([]) == ["coverage: the swarm announces no clusters"]


def test_bar_in_eighths():
    assert bar(1.0, 1.0, 4) == EIGHTHS[8] * 4
    assert bar(0.5, 1.0, 3) == EIGHTHS[8] + EIGHTHS[4]
    assert bar(1e-9, 1.0, 3) == EIGHTHS[1]  # a nonzero value never vanishes
    assert bar(0.0, 1.0, 3) == "" and bar(1.0, 0.0, 3) == ""


def test_peer_throughput_history():
    recs = demo_records(now=100.0) + [FakeRecord("12D3KooWpeerAAAA0001", "c3-fm", 3, "fm", throughput=150)]
    tp = peer_throughput(recs)
    assert tp["12D3KooWpeerAAAA0001"] == 1000.0  # its two experts summed
    assert "12D3KooWpeerDDDD0004" not in tp  # joining: serves nothing yet
    h = PeerHistory(2)
    for _ in range(3):
        h.add(tp)
    assert h.get("12D3KooWpeerBBBB0002") == (900.0, 900.0)


def write_log(path, lines):
    path.write_text("".join(json.dumps(rec) + "\n" for rec in lines) + '{"step": 9')  # and a torn last line


def test_loss_curves_and_plot(tmp_path):
    from diffswarm.training.loss_plot import CURVES_FILE, PLOT_FILE, loss_curves, read_log, write_loss_plot

    lines = [{"step": 100 * (i + 1), "loss": 1.0, "loss_by_t": [1.0 / (i + 1), None, 2.0 / (i + 1), 0.5]}
             for i in range(8)]
    write_log(tmp_path / "train_log.jsonl", lines)
    assert len(read_log(tmp_path / "train_log.jsonl")) == 8
    c = loss_curves(lines, parts=4)
    assert c["t"] == [0.125, 0.375, 0.625, 0.875]
    assert [x["steps"] for x in c["curves"]] == [[0, 200], [200, 400], [400, 600], [600, 800]]
    assert c["curves"][0]["loss"] == pytest.approx([(1 + 1 / 2) / 2, None, (2 + 1) / 2, 0.5])
    assert c["curves"][0]["loss"][1] is None  # no sample in that bin
    out = write_loss_plot(tmp_path, "toy")
    assert out == tmp_path / PLOT_FILE and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / CURVES_FILE).read_text()) == json.loads(json.dumps(c))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train_log.jsonl").write_text("")
    assert write_loss_plot(empty) is None and not (empty / PLOT_FILE).exists()
