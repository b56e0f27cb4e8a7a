"""Every benchmark's ``--quick`` mode still runs end to end (so none rots). No timing is asserted: a benchmark
prints what it measured; the test checks that it ran, printed the machine and the command, and said nothing
is wrong. DIFFSWARM_BENCH_TINY=1 asks each for its smallest size.

The scripts run three at a time: most of a tiny run is process start, imports and daemon start-up, which
overlap well; what they print under that load is not what this test checks. In a tiny run the benchmarks that
start a swarm serve MLP experts, whose peers and clients do not import diffusers (``bench/benchlib.swarm_net``):
the whole test took 146 s alone on the 2-core machine with UNet peers, 102-116 s with MLP ones."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARALLEL = 3

# (script, extra arguments): one line per benchmark, so that merges are a union of lines; the longest first
# (CPU-s of a tiny run here, 2026-12-03), so that no long one starts last while the others have finished
QUICK = [
    ("vs_hivemind.py", []),  # 35
    ("first_image.py", []),  # 34
    ("serving_throughput.py", []),  # 27
    ("cpu_kinds.py", []),  # 23
    ("training.py", []),  # 20
    ("memory.py", []),  # 17
    ("dht_scale.py", []),  # 17
    ("swarm_vs_local.py", []),  # 14
    ("colocated_peers.py", []),  # 9
    ("sparse_cost.py", []),  # 8
    ("inference_layout.py", []),  # 8
    ("fp16_transport.py", []),  # 5
    ("check_precision.py", []),  # 3
]


def run_quick(script: str, extra: list[str], tmp: Path) -> str | None:
    """None if ``script --quick`` ran cleanly, else what went wrong with the end of its output."""
    tmp.mkdir(parents=True, exist_ok=True)
    # each benchmark cleans up its own temporary directory and processes; TMPDIR keeps any leftover in tmp
    env = dict(os.environ, DIFFSWARM_BENCH_TINY="1", PYTHONPATH=str(ROOT), TMPDIR=str(tmp))
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick", *extra], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        return f"{script}: no result within 600 s:\n{(e.stdout or '')[-2000:]}"
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return f"{script} exited {proc.returncode}:\n{out[-4000:]}"
    if "machine:" not in out or "command:" not in out:
        return f"{script} did not print its machine and command:\n{out[-2000:]}"
    if "Traceback" in out:
        return f"{script} printed a traceback:\n{out[-4000:]}"
    return None


def test_every_bench_quick_mode_runs():
    # short TMPDIRs: daemons and torch's shared-memory manager put unix sockets there (at most 107 bytes of path)
    with tempfile.TemporaryDirectory(prefix="bq") as tmp, ThreadPoolExecutor(PARALLEL) as pool:
        found = list(pool.map(lambda se: run_quick(se[0], se[1], Path(tmp) / se[0][:6]), QUICK))
    failed = [f for f in found if f is not None]
    assert not failed, "\n\n".join(failed)


def test_a_failing_bench_is_reported(tmp_path):
    """The check above can fail: a script that does not exist is reported with its exit status."""
    assert "exited" in run_quick("no_such_bench.py", [], tmp_path / "x")
