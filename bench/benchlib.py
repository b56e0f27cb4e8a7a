"""What every benchmark prints around its figures: the machine, its load, the command; and small helpers
(resident memory of a process and its children, percentiles) the benchmarks share.

Benchmarks import it as ``from benchlib import ...`` (``python bench/x.py`` puts ``bench/`` on the path).
``DIFFSWARM_BENCH_TINY=1`` asks a ``--quick`` run for its smallest size (the test that keeps every quick
mode running sets it): the benchmarks that start a swarm then serve MLP experts (``swarm_net``), whose processes
do not import diffusers (about 3 CPU-s of each peer's and client's start here); what they print is then not a
figure of the default experts, only proof that the script still runs.
"""

from __future__ import annotations

import contextlib
import os
import platform
import select
import shlex
import subprocess
import sys
import time

import torch


def tiny() -> bool:
    """True when a ``--quick`` run should shrink further (tests/test_bench_quick.py sets DIFFSWARM_BENCH_TINY=1)."""
    return os.environ.get("DIFFSWARM_BENCH_TINY", "") not in ("", "0")


# (width, depth) of the benchmarks' toy experts per network kind: the default UNet 16x3, the DiT 96x3, a small MLP
NET_SIZES = {"unet": (16, 3), "dit": (96, 3), "mlp": (64, 2)}


# a child process limited to AVX2 kernels (torch's own, oneDNN's convolutions and MKL's): what an AVX2-only CPU
# computes, e.g. its rounding (bench/slowcpu.py's emulation sets the first two and adds a CPU quota)
AVX2_KERNELS_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def beyond_avx2() -> bool:
    """Whether torch uses kernels beyond AVX2 here (AVX-512): only then does a child limited to AVX2 kernels
    compute differently."""
    return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2", "NO AVX")


def with_avx2_kernels(script: str, *args: str) -> str:
    """The stdout of ``python script *args`` run in a child limited to AVX2 kernels (``AVX2_KERNELS_ENV``; its
    stderr passes through)."""
    return subprocess.run([sys.executable, script, *args], env=dict(os.environ, **AVX2_KERNELS_ENV), check=True,
                          stdout=subprocess.PIPE, text=True).stdout


def random_expert(net: str, k: int, cluster: int, seed: int):
    """Cluster ``cluster``'s expert of K = ``k`` (DDPM for even clusters, FM for odd) of ``net`` at its benchmark
    size (``NET_SIZES``), 28x28 with 10 classes, random weights (a forward pass costs what a trained one's does),
    set up to answer as a loaded expert is (``Expert.answering``: a UNet is channels-last on the CPU)."""
    from diffswarm.experts.expert import Expert
    from diffswarm.training.jobs import ClusterData, expert_config

    width, depth = NET_SIZES[net]
    data = ClusterData((1, 28, 28), 10, k, f"random-{k}", "random")
    torch.manual_seed(seed + cluster)
    cfg = expert_config(data, "ddpm" if cluster % 2 == 0 else "fm", cluster, net=net, width=width, depth=depth)
    return Expert(cfg).answering()


def swarm_net(net: str) -> str:
    """The network a swarm benchmark serves: ``net``, or the MLP in a tiny run (see the module doc)."""
    return "mlp" if tiny() else net


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load() -> str:
    """The 1/5/15-minute load averages (os.getloadavg) against the core count."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load n/a"
    return f"load {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores"


def machine() -> str:
    """CPU model, torch's CPU capability, cores, torch version and the load right now."""
    cap = torch.backends.cpu.get_cpu_capability()
    return (f"{cpu_model()}, torch CPU capability {cap}, {os.cpu_count()} cores, torch {torch.__version__}; "
            f"{load()}")


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def header(title: str) -> None:
    """Print what is measured, where, and how to rerun it."""
    print(f"== {title}")
    print(f"machine: {machine()}")
    print(f"command: {command()}")
    print("figures under load are pessimistic: rerun the command on a quiet machine", flush=True)


@contextlib.contextmanager
def dead_sockets_removed():
    """Remove the p2pd sockets (``/tmp/hivemind-p2p*.sock``) that appeared during the block and that nobody listens on
    at its end, and say how many: hivemind's own processes (``bench/vs_hivemind.py``'s server, DHT and clients) can
    leave a client socket behind when they stop, where diffswarm's processes remove theirs. A live socket (another
    run's) stays."""
    from diffswarm.dht.node import SOCKETS
    from diffswarm.utils.signals import new_sockets_owned, remove_dead_sockets

    with new_sockets_owned(SOCKETS) as new_sockets:
        try:
            yield
        finally:
            removed = remove_dead_sockets(new_sockets())
            if removed:
                print(f"removed {len(removed)} p2pd socket(s) that stopped processes left in /tmp")


def footer() -> None:
    print(f"after the run: {load()}")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident (VmRSS) or peak resident (VmHWM) memory of ``pid`` in MB; nan if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (a peer's p2pd daemon)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their daemons, ...)."""
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` to ``cpus`` (threads it creates later inherit the mask)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # the thread ended meanwhile
            pass


def readline_within(proc: subprocess.Popen, seconds: float, what: str) -> str:
    """The next line ``proc`` prints, or RuntimeError naming ``what`` if it prints none within ``seconds``."""
    ready, _, _ = select.select([proc.stdout], [], [], seconds)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"{what}: no answer within {seconds:.0f} s" if not ready else f"{what}: it exited")
    return line


def call_loop(call, start: float, seconds: float) -> tuple[list[float], list, int]:
    """Wait until wall-clock time ``start`` (clients of one level start together), then ``call()`` back to back for
    ``seconds``: each successful call's round trip in ms, its result, and how many calls raised."""
    lat, results, errors = [], [], 0
    while time.time() < start:
        time.sleep(0.001)
    while time.time() < start + seconds:
        t0 = time.perf_counter()
        try:
            out = call()
        except Exception:
            errors += 1
            continue
        lat.append(1000 * (time.perf_counter() - t0))
        results.append(out)
    return lat, results, errors


def percentile(xs, q: float) -> float:
    """The q-th percentile (0..100) of ``xs`` by linear interpolation; nan for no values."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
