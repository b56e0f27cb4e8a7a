"""Peer metrics (``--metrics-port``): scraped over HTTP as Prometheus text and parsed, from an in-process peer that
answers real requests, from the collector over a joining peer, and from `diffswarm peer` run as a command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("prometheus_client")  # a test dependency (pyproject's [test] extra)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text page."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_of_a_serving_peer(tmp_path, capsys):
    from peer_harness import InprocPeer, RawCaller, quiet_hivemind, valid_request

    quiet_hivemind()
    peer = InprocPeer(tmp_path, router=True, metrics_port=0)  # a swarm's founder: `swarm status` finds it
    caller = None
    try:
        url = peer.peer.metrics_url
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        m = scrape(url)
        ex = (("expert", peer.uid),)
        assert m[("diffswarm_peer_state", (("state", "online"),))] == 1
        assert m[("diffswarm_peer_state", (("state", "joining"),))] == 0
        assert m[("diffswarm_peer_training_progress", ())] == 1
        assert m[("diffswarm_peer_queue_rows", ex)] == 0 and m[("diffswarm_peer_throughput_rows_per_second", ex)] > 0
        assert ("diffswarm_peer_rows_total", ex) not in m  # nothing answered yet
        info = next(k for k in m if k[0] == "diffswarm_peer_info")
        assert dict(info[1])["peer_id"] == peer.peer.peer_id

        caller = RawCaller(peer)
        for rows, seed in ((3, 0), (5, 1)):
            caller.run(caller.unary("rpc_velocity", valid_request(rows, seed)[0]))
        bad = valid_request(3)[0]
        bad.uid = "c9-nope"
        with pytest.raises(Exception, match="refused"):
            caller.run(caller.unary("rpc_velocity", bad))
        m = scrape(url)
        assert m[("diffswarm_peer_rows_total", ex)] == 8
        assert m[("diffswarm_peer_requests_total", ex)] == 2
        assert m[("diffswarm_peer_request_seconds_count", ex)] == 2
        assert m[("diffswarm_peer_request_seconds_bucket", (*ex, ("le", "+Inf")))] == 2
        assert m[("diffswarm_peer_request_seconds_sum", ex)] > 0
        assert m[("diffswarm_peer_clients_served_total", ())] == 1
        assert m[("diffswarm_peer_error_answers_total", (("code", "refused"),))] == 1
        assert m[("diffswarm_peer_error_answers_total", (("code", "busy"),))] == 0
        assert m[("diffswarm_peer_active_clients", ex)] in (0, 1)  # 1 within the ~1 s window
        assert m[("diffswarm_peer_held_bytes", ())] == 0

        from diffswarm.cli import main  # the same swarm's coverage as `swarm status --chart` draws it

        capsys.readouterr()
        assert main(["swarm", "status", "--chart", "--loopback", "--initial-peers", *peer.peer.maddrs,
                     "--swarm", str(peer.peer.swarm)]) == 0
        chart = capsys.readouterr().out.split("coverage by cluster", 1)[1].splitlines()
        assert chart[0].startswith(" (1/1 covered") and chart[1].startswith("  c0") and "1 online" in chart[1]
    finally:
        if caller is not None:
            caller.close()
        peer.stop()
    with pytest.raises(OSError):  # the metrics server stopped with the peer
        urllib.request.urlopen(url, timeout=5)


def test_a_joining_peer_reports_its_training():
    from diffswarm.peer.metrics import PeerCollector

    peer = SimpleNamespace(dht=None, state="joining", progress=0.4, train_step=480, train_loss=0.0581, served={},
                           servicer=None)
    fams = {f.name: f for f in PeerCollector(peer, SimpleNamespace(clients=set())).collect()}
    assert [s.value for s in fams["diffswarm_peer_state"].samples] == [1.0, 0.0, 0.0]
    assert fams["diffswarm_peer_training_progress"].samples[0].value == 0.4
    assert fams["diffswarm_peer_training_step"].samples[0].value == 480
    assert fams["diffswarm_peer_training_loss"].samples[0].value == pytest.approx(0.0581)


def test_peer_command_serves_metrics(tmp_path):
    """`diffswarm peer --loopback --metrics-port 0` (a plain DHT node): the URL in its info file answers."""
    info = tmp_path / "info.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "diffswarm", "peer", "--loopback", "--metrics-port", "0",
                             "--info-file", str(info)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (info.exists() and json.loads(info.read_text()).get("state") == "online"):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the peer did not come online"
            time.sleep(0.2)
        url = json.loads(info.read_text())["metrics"]
        m = scrape(url)
        assert m[("diffswarm_peer_state", (("state", "online"),))] == 1
    finally:
        proc.send_signal(signal.SIGTERM)  # the peer stops its own daemon
        try:
            out = proc.communicate(timeout=60)[0].decode()
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert f"metrics at {url}" in out
    with pytest.raises(ValueError, match="--metrics-host has no effect without --metrics-port"):
        from diffswarm.cli import dispatch
        from diffswarm.cli.parser import build_parser, given_options

        argv = ["peer", "--metrics-host", "0.0.0.0"]
        dispatch.plan(build_parser().parse_args(argv), given_options(build_parser(), "peer", argv))
