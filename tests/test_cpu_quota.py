"""A CPU quota counts: ``available_cpus`` reads the tightest cgroup quota on the process (v1 and v2 layouts,
faked in a folder), and bench/slowcpu.py runs a command in a quota cgroup and removes it afterwards (root only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffswarm.utils.cpus import _quota, available_cpus

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, **files: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name.replace("__", ".")).write_text(text)


def test_quota_of_a_v1_cgroup_and_its_parents(tmp_path):
    root = tmp_path / "fs"
    _write(root / "cpu,cpuacct", cpu__cfs_quota_us="-1\n", cpu__cfs_period_us="100000\n")
    _write(root / "cpu,cpuacct" / "outer", cpu__cfs_quota_us="150000\n", cpu__cfs_period_us="100000\n")
    _write(root / "cpu,cpuacct" / "outer" / "inner", cpu__cfs_quota_us="-1\n", cpu__cfs_period_us="100000\n")
    text = "4:memory:/x\n3:cpu,cpuacct:/outer/inner\n0::/\n"
    assert _quota(text, root) == pytest.approx(1.5)  # the parent's quota binds the child without one
    _write(root / "cpu,cpuacct" / "outer" / "inner", cpu__cfs_quota_us="50000\n")
    assert _quota(text, root) == pytest.approx(0.5)  # the tightest wins
    assert _quota("3:cpu,cpuacct:/\n", root) is None  # no quota: none


def test_quota_of_a_v2_cgroup(tmp_path):
    _write(tmp_path / "a", cpu__max="max 100000\n")
    _write(tmp_path / "a" / "b", cpu__max="25000 50000\n")
    assert _quota("0::/a/b\n", tmp_path) == pytest.approx(0.5)
    assert _quota("0::/a\n", tmp_path) is None
    assert _quota("garbage\n0::/missing\n", tmp_path) is None  # unreadable: no quota, no error


def test_available_cpus_is_at_most_the_cores():
    assert 0 < available_cpus() <= (os.cpu_count() or 1)


def test_slowcpu_runs_a_command_under_its_quota_and_cleans_up():
    sys.path.insert(0, str(ROOT / "bench"))
    import slowcpu

    why = slowcpu.reason_unavailable()
    if why:
        pytest.skip(why)
    code = ("import os; from diffswarm.utils.cpus import available_cpus; "
            "print(available_cpus(), os.environ['ONEDNN_MAX_CPU_ISA'], open('/proc/self/cgroup').read())")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = slowcpu.run([sys.executable, "-c", code], 0.5, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.split()
    assert float(first[0]) == pytest.approx(0.5) and first[1] == "AVX2"
    group = next(ln.split(":", 2)[2] for ln in proc.stdout.splitlines() if "slowcpu" in ln)
    root, _ = slowcpu._root()
    assert not (root / group.lstrip("/")).exists()  # removed after the command
    with pytest.raises(ValueError):
        with slowcpu.quota_cgroup(0.0):
            pass
    assert subprocess.run([sys.executable, str(ROOT / "bench" / "slowcpu.py"), "--cpus", "1"],
                          capture_output=True, text=True, timeout=60).returncode != 0  # no command: an error
