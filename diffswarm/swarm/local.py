"""A local swarm on 127.0.0.1: a bootstrap node and peers as separate processes.

Used by ``swarm up``, the demo, the end-to-end tests and the benchmarks. Every process runs ``python -m
diffswarm peer --loopback ...`` in its own session (so ``swarm down`` can stop its p2pd with it) and writes an
info file (peer id, multiaddrs, pid, p2pd sockets). A running swarm's state is ``RUN_DIR/swarm.json``:

    {"swarm": "NAME@FINGERPRINT", "initial_peers": [...], "procs": [{"name", "pid", "log", "info"}...]}

The owner key is ``RUN_DIR/owner.key`` (made by the first ``swarm up`` there and kept: a restarted swarm keeps
its name); the bootstrap node (with no router: the first expert peer) signs the manifest with it, naming the
sha256 of every peer's cluster_stats.bin (clients route by no others). Stopping: SIGTERM to each peer (it
announces offline, stops its daemon), SIGKILL to its group after ``timeout``, then leftover p2pd sockets go.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffswarm.training.jobs import TrainJob
from diffswarm.utils.fileio import atomic_write
from diffswarm.utils.signals import raise_if_stopped

logger = logging.getLogger(__name__)

STATE_FILE = "swarm.json"
OWNER_KEY_FILE = "owner.key"


class SwarmLaunchError(RuntimeError):
    """A local peer failed to start or come online; the message carries the tail of its log."""


@dataclass
class PeerProc:
    name: str
    pid: int
    log: str
    info: str
    args: list[str] = field(default_factory=list)


@dataclass
class PeerSpec:
    """One peer of a local swarm: serve ``checkpoint``, or run the training job ``train`` first (written to
    RUN_DIR/jobs/NAME.json and passed as ``--train-job``)."""

    name: str
    checkpoint: str | None = None
    train: TrainJob | None = None
    extra_args: list[str] = field(default_factory=list)  # more `diffswarm peer` options
    program: list[str] = field(default_factory=lambda: ["diffswarm", "peer"])  # `python -m` module and its
    #   leading arguments: e.g. ["diffswarm.testing.hostile", "--mode", "nan", "--"] for a lying peer (tests)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def _is_ours(pid: int) -> bool:
    """Guard against pid reuse: only signal processes that run diffswarm."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"diffswarm" in f.read()
    except OSError:
        return False


def _tail(path: str | Path, n: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _read_info(path: str | Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class LocalSwarm:
    """Handle on a running local swarm (processes, multiaddrs, run dir)."""

    def __init__(self, run_dir: Path, swarm: str, initial_peers: list[str], procs: list[PeerProc],
                 popens: dict[int, subprocess.Popen] | None = None):
        self.run_dir, self.swarm, self.initial_peers, self.procs = run_dir, swarm, initial_peers, procs
        self._popens = popens or {}
        self.peer_args: list[str] = []  # the options every expert peer of this swarm starts with
        self.env: dict | None = None

    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    def save(self) -> None:
        state = {"swarm": self.swarm, "initial_peers": self.initial_peers, "peer_args": self.peer_args,
                 "procs": [asdict(p) for p in self.procs]}
        atomic_write(self.state_path, lambda tmp: Path(tmp).write_text(json.dumps(state, indent=2)), durable=False)

    @classmethod
    def load(cls, run_dir: str | Path) -> LocalSwarm:
        run_dir = Path(run_dir)
        path = run_dir / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"no running swarm recorded in {path}")
        state = json.loads(path.read_text())
        sw = cls(run_dir, state["swarm"], state["initial_peers"], [PeerProc(**p) for p in state["procs"]])
        sw.peer_args = list(state.get("peer_args", []))
        return sw

    @classmethod
    def find(cls, run_dir: str | Path) -> LocalSwarm:
        """``load`` for a client with no --initial-peers: ValueError telling the user what to do."""
        from diffswarm.dht.names import is_full_name

        try:
            sw = cls.load(run_dir)
        except FileNotFoundError:
            raise ValueError(f"no --initial-peers given and no local swarm in {run_dir}; start one with "
                             "`diffswarm swarm up` or pass the multiaddr a peer printed") from None
        if not is_full_name(sw.swarm):
            raise ValueError(f"the local swarm in {run_dir} was started by an older diffswarm (its name {sw.swarm!r} "
                             "has no owner fingerprint); restart it with `diffswarm swarm down` and `swarm up`")
        return sw

    def _spawn_peer(self, spec: PeerSpec) -> tuple[PeerProc, subprocess.Popen]:
        """Start ``spec`` as a process of this swarm (recorded in swarm.json); does not wait for it."""
        args = [*self.peer_args, *spec.extra_args]
        if spec.checkpoint:
            args += ["--checkpoint", str(spec.checkpoint)]
        elif spec.train is not None:
            args += ["--train-job", str(spec.train.save(self.run_dir / "jobs" / f"{spec.name}.json"))]
        proc, pop = _spawn(spec.name, args, self.run_dir, self.env or dict(os.environ), spec.program)
        self.procs = [p for p in self.procs if p.name != spec.name] + [proc]
        self._popens[proc.pid] = pop
        self.save()
        return proc, pop

    def add_peer(self, spec: PeerSpec, timeout: float = 120.0) -> dict:
        """Start one more peer of this swarm (a replica, a hostile peer in tests) and wait until it is online
        and its records can be read from the DHT; returns its info file."""
        started = self._spawn_peer(spec)
        deadline = time.monotonic() + timeout
        info = _wait_online([started], deadline)[spec.name]
        if info.get("experts"):
            _confirm_in_dht(self, [info["peer_id"]], deadline, manifest=False)
        return info

    def restart(self, name: str, timeout: float = 120.0) -> dict:
        """Start a killed peer again with the same command line (same identity only if it has one)."""
        p = next(p for p in self.procs if p.name == name)
        if _alive(p.pid):
            raise SwarmLaunchError(f"{name} (pid {p.pid}) is still running")
        with contextlib.suppress(FileNotFoundError):
            Path(p.info).unlink()
        with open(p.log, "ab") as f:
            pop = subprocess.Popen([sys.executable, *p.args], stdout=f, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, env=self.env or dict(os.environ))
        proc = PeerProc(name, pop.pid, p.log, p.info, p.args)
        self.procs = [q for q in self.procs if q.name != name] + [proc]
        self._popens[pop.pid] = pop
        self.save()
        info = _wait_online([(proc, pop)], time.monotonic() + timeout)[name]
        return info

    def info(self, name: str) -> dict | None:
        p = next(p for p in self.procs if p.name == name)
        return _read_info(p.info)

    def client(self, routing=None, seed: int = 0, config=None, **kw):
        """A ``SwarmEnsemble`` connected to this swarm (loopback network settings)."""
        from diffswarm.client.config import ClientConfig
        from diffswarm.client.ensemble import SwarmEnsemble
        from diffswarm.dht.node import NetworkConfig

        config = config or ClientConfig(swarm=self.swarm, net=NetworkConfig.loopback(client_mode=True))
        return SwarmEnsemble.connect(self.initial_peers, routing, seed=seed, config=config, **kw)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill one peer (its whole process group, p2pd included): a machine dying."""
        p = next(p for p in self.procs if p.name == name)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, sig)
        if self._reap(p.pid, 10):
            self.cleanup_sockets([p])  # a restart overwrites its info file: clean the dead daemon's sockets now

    def _reap(self, pid: int, timeout: float) -> bool:
        """Wait for ``pid`` to exit; True if it did."""
        deadline = time.monotonic() + timeout
        pop = self._popens.get(pid)
        while time.monotonic() < deadline:
            if pop is not None:
                if pop.poll() is not None:
                    return True
            elif not _alive(pid):
                return True
            time.sleep(0.1)
        return False

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every peer (experts first, the bootstrap last), SIGKILL what is left after ``timeout``."""
        order = [p for p in self.procs if p.name != "bootstrap"] + [p for p in self.procs if p.name == "bootstrap"]
        live = [p for p in order if _alive(p.pid) and _is_ours(p.pid)]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in live:
            if not self._reap(p.pid, max(0.1, deadline - time.monotonic())):
                logger.info(f"{p.name} (pid {p.pid}) did not stop in {timeout:.0f}s: killing it")
            # p2pd and any other child of the peer live in its process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            self._reap(p.pid, 5)
        self.cleanup_sockets()
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()

    def cleanup_sockets(self, procs: Sequence[PeerProc] | None = None) -> None:
        """Remove the p2pd sockets that ``procs`` (default all) recorded in their info files."""
        for p in self.procs if procs is None else procs:
            info = _read_info(p.info) or {}
            for s in info.get("sockets", []):
                if s.startswith("/tmp/hivemind-") and s.endswith(".sock"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(s)


def _spawn(name: str, args: list[str], run_dir: Path, env: dict,
           program: Sequence[str] = ("diffswarm", "peer")) -> tuple[PeerProc, subprocess.Popen]:
    log = run_dir / "logs" / f"{name}.log"
    info = run_dir / "info" / f"{name}.json"
    log.parent.mkdir(parents=True, exist_ok=True)
    info.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        info.unlink()
    cmd = [sys.executable, "-m", *program, "--loopback", "--info-file", str(info), *args]
    with open(log, "ab") as f:
        pop = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True, env=env)
    return PeerProc(name, pop.pid, str(log), str(info), cmd[1:]), pop


def _wait_online(procs: list[tuple[PeerProc, subprocess.Popen]], deadline: float) -> dict[str, dict]:
    infos: dict[str, dict] = {}
    while len(infos) < len(procs):
        raise_if_stopped()
        for p, pop in procs:
            if p.name in infos:
                continue
            info = _read_info(p.info)
            if info and info.get("state") == "online":
                infos[p.name] = info
                logger.info(f"  {p.name} online ({info['peer_id'][:12]})")
            elif pop.poll() is not None:
                raise SwarmLaunchError(f"{p.name} exited with code {pop.returncode}; its log {p.log} ends:\n"
                                       + _tail(p.log))
        if len(infos) < len(procs):
            if time.monotonic() > deadline:
                late = [p.name for p, _ in procs if p.name not in infos]
                raise SwarmLaunchError(f"{late} not online in time; last log lines of {late[0]}:\n"
                                       + _tail(next(p.log for p, _ in procs if p.name == late[0])))
            time.sleep(0.2)
    return infos


def owned_swarm_name(swarm: str, owner_key: str | Path) -> str:
    """The full name ``NAME@FINGERPRINT`` of swarm ``swarm`` (a NAME, or a full name that must match) owned
    by the key file ``owner_key`` (created if missing)."""
    from diffswarm.dht.names import is_full_name, parse_swarm_name, swarm_name_of
    from diffswarm.dht.node import load_or_create_key

    key, _ = load_or_create_key(owner_key)
    if is_full_name(swarm):
        want = parse_swarm_name(swarm)
        mine = swarm_name_of(want.name, key)
        if mine != want:
            raise ValueError(f"--swarm {swarm}: the owner key {owner_key} makes {mine}; drop the fingerprint or pass "
                             "the matching --owner-key")
        return str(want)
    return str(swarm_name_of(swarm, key))


def start_local_swarm(peers: Sequence[PeerSpec], router_path: str | None, run_dir: str | Path, *,
                      swarm: str = "diffswarm", owner_key: str | Path | None = None, threads: int = 1,
                      timeout: float = 300.0, port: int = 0, announce_period: float = 5.0,
                      extra_args: Sequence[str] = (), validate: str | Path | None = None,
                      partition: str | Path | None = None) -> LocalSwarm:
    """Start a bootstrap node (serving the router and signing the swarm's manifest with ``owner_key``,
    default RUN_DIR/owner.key, created if missing) and ``peers`` on 127.0.0.1, each as its own process;
    with ``router_path`` None there is no router peer: the first peer signs a manifest naming no router
    (clients route with the statistics the peers publish);
    return once all are online (their records checked in the DHT). ``swarm``: the NAME (or the full name,
    which must match the owner key). ``validate``: the partition manifest the signing peer validates every
    checkpoint on (admission on: it signs the admission rule, and this returns once every peer's checkpoint is
    attested). ``partition``: the partition manifest every process serves to volunteers that ``diffswarm
    join`` (the signing one signs its sha256). Writes RUN_DIR/swarm.json with the full name."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    owner_key = Path(owner_key) if owner_key else run_dir / OWNER_KEY_FILE
    swarm = owned_swarm_name(swarm, owner_key)
    refuse_beside_running(run_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("GOMAXPROCS", "1")  # K+1 daemons share this machine's cores: one Go thread each is plenty
    deadline = time.monotonic() + timeout
    common = ["--swarm", swarm, "--announce-period", str(announce_period), *extra_args,
              *(["--serve-partition", str(partition)] if partition else [])]
    started: list[tuple[PeerProc, subprocess.Popen]] = []
    sw = LocalSwarm(run_dir, swarm, [], [], {})
    stats = [str(p) for p in _stats_files(peers)]  # the owner signs their sha256 in the manifest
    sign_stats = ["--sign-stats", *stats] if stats else []
    sign_stats += ["--validate", str(validate)] if validate else []  # the owner validates (peer/validator.py)
    try:
        signs = ["--router", str(router_path), "--owner-key", str(owner_key), *sign_stats] if router_path else []
        boot_args = [*common, "--port", str(port), *signs]
        started.append(_spawn("bootstrap", boot_args, run_dir, env))
        sw.procs, sw._popens = [p for p, _ in started], {p.pid: pop for p, pop in started}
        sw.save()
        boot = _wait_online(started[:1], deadline)["bootstrap"]
        if boot.get("swarm") != swarm:
            raise SwarmLaunchError(f"the bootstrap node runs swarm {boot.get('swarm')!r}, expected {swarm!r}")
        sw.initial_peers = boot["maddrs"]
        sw.peer_args = [*common, "--threads", str(threads), "--initial-peers", *sw.initial_peers]
        sw.env = env
        for i, spec in enumerate(peers):
            if router_path is None and i == 0:  # no router peer: the first expert's peer signs the manifest
                spec = dataclasses.replace(spec, extra_args=[*spec.extra_args, "--owner-key", str(owner_key),
                                                             *sign_stats])
            started.append(sw._spawn_peer(spec))
        infos = _wait_online(started[1:], deadline)
        _confirm_in_dht(sw, [i["peer_id"] for i in infos.values() if i.get("experts")], deadline, manifest=True,
                        stats=_stats_hashes(stats) if router_path is None else set(),  # stats: what clients need
                        attested=validate is not None)
        return sw
    except BaseException:
        sw.stop(timeout=5)
        raise


def _stats_files(peers: Sequence[PeerSpec]) -> list[Path]:
    """Where each peer's cluster statistics are (or will be, once it trained): beside its checkpoint."""
    from diffswarm.router.stats.publish import STATS_FILE, stats_path

    return [stats_path(p.checkpoint) if p.checkpoint else Path(p.train.out) / STATS_FILE
            for p in peers if p.checkpoint or p.train is not None]


def _stats_hashes(paths: Sequence[str]) -> set[str]:
    """sha256 of the statistics files in ``paths`` that exist and parse (those the owner signs)."""
    import hashlib

    from diffswarm.router.stats.blob import StatsFormatError
    from diffswarm.router.stats.publish import read_cluster_stats

    out = set()
    for p in paths:
        with contextlib.suppress(OSError, StatsFormatError):
            out.add(hashlib.sha256(read_cluster_stats(p)[0]).hexdigest())
    return out


def _confirm_in_dht(sw: LocalSwarm, peer_ids: list[str], deadline: float, manifest: bool = False,
                    stats: set[str] = frozenset(), attested: bool = False) -> None:
    """Wait until every expert peer's online record (and, with ``manifest``, the owner's signed manifest, signing
    the sha256 of every statistics file in ``stats``; with ``attested``, an attestation of each peer's checkpoint)
    can be read from the DHT by a fresh client."""
    import asyncio

    from diffswarm.dht.names import choose_manifest, parse_swarm_name
    from diffswarm.dht.node import NetworkConfig, SwarmDHT

    name = parse_swarm_name(sw.swarm)

    async def check() -> None:
        node = await SwarmDHT.create(NetworkConfig.loopback(sw.initial_peers, client_mode=True), sw.swarm)
        try:
            while True:
                recs, _ = await node.get_experts()
                online = {r.peer_id for r in recs if r.state == "online"}
                m = choose_manifest((await node.get_manifests())[0], name)[0] if manifest else None
                signed = not manifest or (m is not None and stats <= set(m.signed_stats))
                ours = {(r.checkpoint_sha256, r.cluster) for r in recs if r.state == "online" and r.peer_id in peer_ids}
                if attested:
                    found = (await node.get_attestations())[0]
                    signed = signed and ours <= {(a.checkpoint_sha256, a.cluster) for a in found}
                if set(peer_ids) <= online and signed:
                    if attested:
                        _say_verdicts(m, found, [r for r in recs if r.state == "online" and r.peer_id in peer_ids])
                    return
                if time.monotonic() > deadline:
                    missing = sorted(set(peer_ids) - online)
                    raise SwarmLaunchError(f"peers {missing} are up but not online in the DHT" if missing else
                                           f"the bootstrap node is up but the manifest of {sw.swarm} (signing every "
                                           f"cluster's statistics) or the attestations of its experts are not in the "
                                           "DHT")
                await asyncio.sleep(0.5)
        finally:
            await node.shutdown()

    asyncio.run(check())


def _say_verdicts(manifest, attestations, records) -> None:
    """What the owner's admission rule says of each expert the swarm started (a refused one is never used)."""
    from diffswarm.client.admission import describe, verdicts

    found, _ = verdicts(manifest, attestations, records)
    for r in sorted(records, key=lambda r: r.expert_id):
        said = describe(None if found is None else found.get((r.checkpoint_sha256, r.cluster)))
        (logger.info if said.startswith("admitted") else logger.warning)(f"  {r.expert_id}: {said}")


def running_procs(run_dir: str | Path) -> list[PeerProc]:
    """The processes recorded in RUN_DIR/swarm.json that still run: a detached swarm, or what a command that
    was SIGKILLed while it started one left behind (empty if there is no swarm.json)."""
    try:
        sw = LocalSwarm.load(run_dir)
    except (FileNotFoundError, ValueError):
        return []
    return [p for p in sw.procs if _alive(p.pid) and _is_ours(p.pid)]


def refuse_beside_running(run_dir: str | Path) -> None:
    """SwarmLaunchError naming the processes of RUN_DIR/swarm.json that still run (a swarm, or the leftovers of
    a command that was SIGKILLed while it started one)."""
    live = running_procs(run_dir)
    if live:
        names = ", ".join(f"{p.name} (pid {p.pid})" for p in live)
        raise SwarmLaunchError(f"a swarm is already running from {run_dir} ({names}); stop it with "
                               f"`diffswarm swarm down --run-dir {run_dir}`")


def stop_local_swarm(run_dir: str | Path, timeout: float = 20.0) -> list[PeerProc]:
    """Stop the swarm recorded in RUN_DIR/swarm.json; returns the processes that were running."""
    sw = LocalSwarm.load(run_dir)
    live = [p for p in sw.procs if _alive(p.pid) and _is_ours(p.pid)]
    sw.stop(timeout)
    return live


@contextlib.contextmanager
def local_swarm(expert_paths: Sequence[str | Path], router_path: str | Path | None, *, run_dir: str | Path,
                replicas: int = 1, swarm: str = "diffswarm", threads: int = 1, timeout: float = 300.0,
                announce_period: float = 5.0, validate: str | Path | None = None) -> Iterator[LocalSwarm]:
    """Serve ``expert_paths`` (each ``replicas`` times) and the router from a local swarm for the
    duration of the ``with`` block (``validate``: a partition manifest, admission on); stops every process (and
    cleans its sockets) on exit."""
    specs = [PeerSpec(f"peer{i}-r{r}" if replicas > 1 else f"peer{i}", checkpoint=str(p))
             for i, p in enumerate(expert_paths) for r in range(replicas)]
    sw = start_local_swarm(specs, str(router_path) if router_path else None, run_dir, swarm=swarm, threads=threads,
                           timeout=timeout, announce_period=announce_period, validate=validate)
    try:
        yield sw
    finally:
        sw.stop()
