"""The chaos bench's quick mode (bench/chaos.py --quick) runs in CI: every generation equals a clean run or
fails naming an uncovered cluster, none hangs, no honest peer is banned as a liar, nothing leaks."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_chaos_quick():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "chaos.py"), "--quick", "--seed", "5"],
                       capture_output=True, text=True, cwd=ROOT, timeout=560)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "chaos: OK" in r.stdout, out[-4000:]
    assert "honest peers wrongly banned as liars: 0" in r.stdout and "leaked p2pd sockets: 0" in r.stdout
