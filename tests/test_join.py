"""`diffswarm join` end to end on 127.0.0.1: a swarm whose owner serves and signs the partition file, with only
cluster 0 served; a volunteer that is given nothing but the swarm's name and a multiaddr fetches the partition, picks
cluster 1 (the one the swarm lacks), trains for a few seconds, serves it and shows in `swarm status`; restarted with
the same identity it keeps its cluster."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffswarm.swarm.local import PeerSpec, _alive, start_local_swarm
from diffswarm.training.jobs import TrainJob

pytestmark = pytest.mark.slow

NET = ["--net", "mlp", "--width", "32", "--depth", "1"]


def env() -> dict:
    root = str(Path(__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1",
                GOMAXPROCS="1")


@pytest.fixture(scope="module")
def half_swarm(tmp_path_factory):
    """A swarm of K=2 (digits, partitioned here) in which only cluster 0 has a peer."""
    from diffswarm.data import DatasetSpec
    from diffswarm.experts.train import TrainConfig
    from diffswarm.training.jobs import run_train_job, write_partition

    d = tmp_path_factory.mktemp("join")
    spec = DatasetSpec("digits")
    part_path = d / "partition.json"
    write_partition(spec.load("train"), spec, 2, 0, part_path)
    job = TrainJob(str(part_path), 0, str(d / "c0"), objective="ddpm", net="mlp", width=32, depth=1,
                   train=TrainConfig(steps=20, batch=16, warmup=1, ckpt_every=10**9, log_every=10**9, device="cpu"))
    run_train_job(job, progress=False)
    # no router: the first peer holds the owner key, signs the manifest (with the partition file's sha256) and
    # serves the partition file, as `swarm up` has every peer do
    sw = start_local_swarm([PeerSpec("peer0", checkpoint=str(d / "c0" / "expert.safetensors"))], None, d / "run",
                           threads=1, timeout=150, announce_period=2.0, partition=part_path)
    try:
        yield d, sw
    finally:
        sw.stop(timeout=15)


def start_join(sw, d: Path, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "diffswarm", "join", "--swarm", sw.swarm, "--initial-peers", *sw.initial_peers,
           "--loopback", "--minutes", "0.25", "--start-delay", "0", *NET, "--threads", "1", "--announce-period", "2",
           "--identity", str(d / "volunteer.key"), "--info-file", str(d / "volunteer.json"), *extra]
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env())


def wait_online(pop: subprocess.Popen, info: Path, log: Path, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = json.loads(info.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("state") == "online":
            return state
        assert pop.poll() is None, f"join exited with {pop.returncode}:\n{log.read_text()}"
        time.sleep(0.5)
    raise AssertionError(f"the volunteer was not online in time:\n{log.read_text()}")


def stop(pop: subprocess.Popen) -> None:
    if pop.poll() is None:
        os.killpg(pop.pid, signal.SIGTERM)
        try:
            pop.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(pop.pid, signal.SIGKILL)
            pop.wait(10)
    assert not _alive(pop.pid)


def swarm_status(sw) -> str:
    out = subprocess.run([sys.executable, "-m", "diffswarm", "swarm", "status", "--loopback", "--swarm", sw.swarm,
                          "--initial-peers", *sw.initial_peers], capture_output=True, text=True, env=env(), timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_volunteer_joins_with_the_swarm_name_alone_and_serves_the_missing_cluster(half_swarm):
    d, sw = half_swarm
    info = d / "volunteer.json"
    log = d / "join.log"
    pop = start_join(sw, d, log)
    try:
        state = wait_online(pop, info, log)
        text = log.read_text()
        assert "sha256 signed by the owner" in text  # the partition came from the swarm, checked
        assert "cluster 1: 0 live expert(s)" in text and "joining cluster 1 with a fm expert" in text  # fm: c0 is ddpm
        assert "memory: training c1-fm on cpu takes about" in text and "time: up to 0.25 minutes" in text
        assert state["experts"] == ["c1-fm"]
        status = swarm_status(sw)
        line = next(ln for ln in status.splitlines() if ln.startswith("c1-fm"))
        assert "online" in line and state["peer_id"][:12] in line
        choice = json.loads((d / "volunteer-join" / sw.swarm.split("@")[0] / "join.json").read_text())
        assert choice["cluster"] == 1 and choice["objective"] == "fm"
    finally:
        stop(pop)
    # restarted with the same identity: the same cluster, resumed (its training budget is spent: it serves at once)
    info.unlink()
    pop = start_join(sw, d, log)
    try:
        again = wait_online(pop, info, log)
        assert again["peer_id"] == state["peer_id"] and again["experts"] == ["c1-fm"]
        assert "kept from join.json (resuming)" in log.read_text()
    finally:
        stop(pop)
