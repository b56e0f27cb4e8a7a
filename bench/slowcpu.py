"""Run a command on an emulated slower CPU: a CPU-quota cgroup plus torch and oneDNN without AVX-512.

The AVX2 switches alone (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``) do not reproduce an
AVX2-only machine's speed on a Zen 4 host (issue 21: 1.07-1.49x on the UNet step where a 2-core EPYC
is 3.34x slower). A CFS bandwidth quota does the rest: the command and all its children share
``cpus`` CPUs' worth of time (``cpu.cfs_quota_us / cpu.cfs_period_us``), so with ``cpus = cores / f``
a machine running one process per core is ``f`` times slower, for every kind of kernel alike. What a
quota does not emulate: one thread running alone still gets ``min(1, cpus)`` of a core (a real slow
core is slow alone too), and ``time.process_time`` does not see the throttling (the demo reads the
quota, ``diffswarm.utils.cpus``).

    python bench/slowcpu.py --cpus 0.7 -- python -m diffswarm demo --out /tmp/x

needs root and a cgroup v1 ``cpu`` hierarchy (``/sys/fs/cgroup/cpu``) or cgroup v2 (``cpu.max``);
``reason_unavailable()`` says why not. The cgroup is removed when the command ends; processes it left
behind (a daemon) are moved back to the parent group and named.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
V1 = Path("/sys/fs/cgroup/cpu")
V2 = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


def _root() -> tuple[Path, str] | None:
    """(the cpu hierarchy's root, "v1" | "v2"), or None."""
    if (V1 / "cpu.cfs_quota_us").exists():
        return V1, "v1"
    if (V2 / "cgroup.controllers").exists() and "cpu" in (V2 / "cgroup.controllers").read_text().split():
        return V2, "v2"
    return None


def reason_unavailable() -> str | None:
    """Why a quota cgroup cannot be made here (None: it can)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "making a CPU-quota cgroup needs root"
    root = _root()
    if root is None:
        return "no cgroup cpu controller (/sys/fs/cgroup/cpu or cgroup v2 with cpu)"
    if not os.access(root[0], os.W_OK):
        return f"{root[0]} is not writable"
    return None


@contextlib.contextmanager
def quota_cgroup(cpus: float | None, name: str | None = None, shares: int | None = None) -> Iterator[Path]:
    """A fresh cgroup limited to ``cpus`` CPUs' worth of time (None: no limit); yields its folder (write a pid
    to its ``cgroup.procs`` to put a process in it). Removed on exit, leftovers moved to the parent.

    ``shares``: its weight against other work when the cores are contended (cgroup v1 ``cpu.shares``; a
    nice-0 process weighs 1024): on a shared machine, so that the command gets the time its quota allows."""
    why = reason_unavailable()
    if why:
        raise RuntimeError(why)
    if cpus is not None and not cpus > 0:
        raise ValueError(f"cpus must be > 0, got {cpus}")
    root, kind = _root()
    path = root / (name or f"diffswarm-slowcpu-{os.getpid()}")
    path.mkdir()
    try:
        quota = max(1000, int(cpus * PERIOD_US)) if cpus else -1
        if kind == "v1":
            (path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (path / "cpu.cfs_quota_us").write_text(str(quota))
            if shares:
                (path / "cpu.shares").write_text(str(shares))
        else:
            (path / "cpu.max").write_text(f"{quota if cpus else 'max'} {PERIOD_US}")
            if shares:  # v2 weight 1-10000, 100 for a default group (v1 shares 1024)
                (path / "cpu.weight").write_text(str(max(1, min(10000, shares * 100 // 1024))))
        yield path
    finally:
        left = [p for p in (path / "cgroup.procs").read_text().split() if p]
        for pid in left:  # a daemon that outlived the command: keep it running, unthrottled, and say so
            with contextlib.suppress(OSError):
                (root / "cgroup.procs").write_text(pid)
        if left:
            print(f"slowcpu: moved {len(left)} leftover process(es) out of {path}: {' '.join(left)}", file=sys.stderr)
        path.rmdir()


def prefix(cgroup: Path) -> list[str]:
    """A command prefix that moves the shell into ``cgroup`` and then execs the rest of the line."""
    return ["sh", "-c", f'echo $$ > {shlex.quote(str(cgroup / "cgroup.procs"))} && exec "$@"', "slowcpu"]


def run(cmd: list[str], cpus: float | None, avx2: bool = True, shares: int | None = None,
        **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a ``cpus`` quota cgroup (with the AVX2 switches when ``avx2``); kw go to subprocess.run.
    Prints the wall time, the CPU time of the command and its children, and the time the quota throttled it."""
    env = dict(kw.pop("env", None) or os.environ, **(AVX2_ENV if avx2 else {}))
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with quota_cgroup(cpus, shares=shares) as cg:
        proc = subprocess.run([*prefix(cg), *cmd], env=env, **kw)
        stat = dict(ln.split() for ln in (cg / "cpu.stat").read_text().splitlines() if len(ln.split()) == 2)
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    throttled = int(stat.get("throttled_time", 0)) / 1e9 or int(stat.get("throttled_usec", 0)) / 1e6
    print(f"slowcpu: {wall:.0f} s wall, {cpu:.0f} CPU-s of the command and its children (waited for): "
          f"{cpu / max(wall, 1e-9):.2f} CPUs on average; throttled {throttled:.0f} s", flush=True)
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpus", type=float, default=None,
                    help="CPUs' worth of time for the command and its children (default: no quota)")
    ap.add_argument("--shares", type=int, default=None,
                    help="cpu.shares of the cgroup against other work (a nice-0 process: 1024)")
    ap.add_argument("--no-avx2", action="store_true", help="the quota alone, without the AVX2 switches")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the command after --")
    why = reason_unavailable()
    if why:
        raise SystemExit(f"slowcpu: {why}")
    env_s = "" if args.no_avx2 else " ".join(f"{k}={v}" for k, v in AVX2_ENV.items()) + " "
    quota = (f"quota {args.cpus:g} CPUs of {os.cpu_count()} (cfs_quota_us {max(1000, int(args.cpus * PERIOD_US))}"
             f" / cfs_period_us {PERIOD_US})") if args.cpus else f"no quota ({os.cpu_count()} cores)"
    print(f"slowcpu: {env_s}{quota}, cpu.shares {args.shares or 'default'}; load {os.getloadavg()[0]:.2f}: "
          f"{shlex.join(cmd)}", flush=True)
    raise SystemExit(run(cmd, args.cpus, avx2=not args.no_avx2, shares=args.shares).returncode)


if __name__ == "__main__":
    main()
