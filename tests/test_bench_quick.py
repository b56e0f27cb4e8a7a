"""Every benchmark's ``--quick`` mode still runs end to end (so none rots). No timing is asserted: a benchmark
prints what it measured; the test checks that it ran, printed the machine and the command, and said nothing
is wrong. DIFFSWARM_BENCH_TINY=1 asks each for its smallest size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (script, extra arguments): one line per benchmark, so that merges are a union of lines
QUICK = [
    ("cpu_kinds.py", []),
    ("first_image.py", []),
    ("training.py", []),
    ("sparse_cost.py", []),
    ("swarm_vs_local.py", []),
    ("serving_throughput.py", []),
    ("vs_hivemind.py", []),
    ("dht_scale.py", []),
    ("memory.py", []),
]


@pytest.mark.parametrize("script,extra", QUICK, ids=[s for s, _ in QUICK])
def test_bench_quick(script, extra, tmp_path):
    # each benchmark cleans up its own temporary directory and processes; TMPDIR keeps any leftover in tmp_path
    env = dict(os.environ, DIFFSWARM_BENCH_TINY="1", PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "machine:" in out and "command:" in out, out[-2000:]
    assert "Traceback" not in out, out[-4000:]
