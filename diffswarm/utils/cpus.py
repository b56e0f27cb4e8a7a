"""How much CPU this process may use: its cores, less what a CPU quota (a container's ``--cpus``) allows.

``os.cpu_count()`` counts the machine's cores; a cgroup CPU quota (cgroup v1 ``cpu.cfs_quota_us /
cpu.cfs_period_us``, v2 ``cpu.max``) can give the process less time than that, and ``time.process_time``
does not see it (a throttled process is simply not running). Whoever plans work by wall clock from
CPU-time measurements (the demo's recipe choice) needs the quota too.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _quota(self_cgroup: str, root: Path) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup and its ancestors, from /proc/self/cgroup's text."""
    best = math.inf
    for line in self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # cgroup v2: cpu.max = "max 100000" or "50000 100000"
            base, files = root, ("cpu.max",)
        elif "cpu" in controllers.split(","):
            base, files = root / controllers, ("cpu.cfs_quota_us", "cpu.cfs_period_us")
            if not base.exists():
                base = root / "cpu"
        else:
            continue
        path = base / rel.lstrip("/")
        while True:
            best = min(best, _read_quota(path, files))
            if path == base or base not in path.parents:
                break
            path = path.parent
    return None if math.isinf(best) else best


def _read_quota(path: Path, files: tuple[str, ...]) -> float:
    try:
        if len(files) == 1:
            quota, period = (path / files[0]).read_text().split()[:2]
        else:
            quota, period = ((path / f).read_text().strip() for f in files)
        if quota in ("max", "-1") or int(period) <= 0 or int(quota) <= 0:
            return math.inf
        return int(quota) / int(period)
    except (OSError, ValueError):
        return math.inf


def available_cpus() -> float:
    """CPUs' worth of time this process may use: its cores (affinity), or a cgroup CPU quota when tighter."""
    cores = _cores()
    try:
        quota = _quota(Path("/proc/self/cgroup").read_text(), CGROUP)
    except OSError:
        quota = None
    return float(cores) if quota is None else max(0.01, min(float(cores), quota))
