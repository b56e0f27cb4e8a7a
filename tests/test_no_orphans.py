"""No orphans: a command stopped by SIGTERM, SIGHUP or SIGINT takes its peers, p2pd daemons and workers with it.

Each test starts a real ``python -m diffswarm ...`` in a session of its own (like a job of a shell), waits for
the moment it names (a state of the run dir or a line of the command's output, never a guess of the machine's
speed), sends one signal to the command's pid alone (the hard case: ``timeout`` and a closing terminal also
signal the command's process group), and then counts what is left of that run: every process ever seen below
the command or recorded in its ``swarm.json`` (and below those), and every p2pd socket named on their command
lines or in the peers' info files. Zero must be left. The waits are hang guards, not expectations.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from diffswarm.swarm.local import _alive
from diffswarm.utils.signals import _children, _cmdline, _sockets

pytestmark = pytest.mark.slow

HANG = 240.0  # seconds: a bound on a hang only


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        for c in _children(todo.pop()):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


class Run:
    """One ``diffswarm`` command under observation: its process tree and its run dir's recorded processes."""

    def __init__(self, argv: list[str], tmp: Path, run_dir: Path | None = None, tty: bool = False):
        self.log = tmp / "command.log"
        self.run_dir = run_dir
        env = dict(os.environ, DIFFSWARM_CACHE=str(tmp / "cache"), PYTHONUNBUFFERED="1")
        self.master = None
        with open(self.log, "wb") as f:
            if tty:  # a terminal of its own (the dashboard): what the test reads is the command's stderr only
                import pty

                self.master, slave = pty.openpty()
                io = dict(stdin=slave, stdout=slave, stderr=f)
            else:
                io = dict(stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
            self.pop = subprocess.Popen([sys.executable, "-m", "diffswarm", *argv], start_new_session=True, env=env,
                                        **io)
            if tty:
                os.close(slave)
                threading.Thread(target=self._drain, daemon=True).start()  # a full terminal would block the app
        self.seen: dict[int, list[str]] = {}  # pid -> command line, of every process seen in this run
        self.sockets: set[str] = set()

    def _drain(self) -> None:
        while True:
            try:
                if not os.read(self.master, 65536):
                    return
            except (OSError, TypeError):  # closed (the test closed its end, or the command exited)
                return

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def state(self) -> dict:
        try:
            return json.loads((self.run_dir / "swarm.json").read_text())
        except (OSError, ValueError, TypeError):
            return {}

    def observe(self) -> None:
        roots = {self.pop.pid} | {p["pid"] for p in self.state().get("procs", [])}
        for r in roots:
            for pid in {r} | _descendants(r):
                cmd = _cmdline(pid)
                if cmd:  # the latest: a child seen between its fork and its exec had its parent's command line
                    self.seen[pid] = cmd
                    self.sockets.update(_sockets(cmd))
        for p in self.state().get("procs", []):
            try:
                self.sockets.update(json.loads(Path(p["info"]).read_text()).get("sockets", []))
            except (OSError, ValueError):
                pass

    def wait_for(self, what: str, cond) -> None:
        deadline = time.monotonic() + HANG
        while not cond():
            self.observe()
            assert self.pop.poll() is None, f"exited ({self.pop.returncode}) before {what}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} in {HANG:.0f}s:\n{self.text()[-3000:]}"
            time.sleep(0.1)
        self.observe()

    def stop(self, sig: int, group: bool = False) -> int:
        """Send ``sig`` to the command (``group``: to its process group, as a closing terminal or `timeout` do)."""
        if group:
            os.killpg(self.pop.pid, sig)
        else:
            os.kill(self.pop.pid, sig)
        if self.master is not None:  # the terminal goes away too
            master, self.master = self.master, None
            os.close(master)
        try:
            rc = self.pop.wait(HANG)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"still running {HANG:.0f}s after {signal.Signals(sig).name}:\n"
                                 f"{self.text()[-3000:]}") from None
        return rc

    def leftovers(self, grace: float = 10.0) -> tuple[list[str], list[str]]:
        """(processes of this run still running, p2pd sockets still there), after up to ``grace`` seconds for
        processes that exit by themselves once the command is gone (multiprocessing's resource tracker reads
        the end of its pipe)."""
        deadline = time.monotonic() + grace
        while True:
            procs = [f"{pid} {' '.join(cmd[:4])}" for pid, cmd in self.seen.items()
                     if pid != self.pop.pid and _alive(pid) and _cmdline(pid) == cmd]
            if not procs or time.monotonic() > deadline:
                return procs, sorted(s for s in self.sockets if os.path.exists(s))
            time.sleep(0.2)

    def kill_all(self) -> None:
        for pid, cmd in self.seen.items():
            if _alive(pid) and _cmdline(pid) == cmd:
                os.kill(pid, signal.SIGKILL)

    def assert_clean(self, sig: int, rc: int) -> None:
        procs, socks = self.leftovers()
        self.kill_all()
        left = f"left after {signal.Signals(sig).name}: {procs} {socks}"
        assert (procs, socks) == ([], []), f"{left}\n{self.text()[-3000:]}"
        assert rc == 128 + sig, f"exit code {rc}:\n{self.text()[-3000:]}"
        assert self.run_dir is None or not (self.run_dir / "swarm.json").exists()


def _peers_training(run: Run, k: int):
    """swarm.json names the bootstrap and ``k`` peers and every peer's info file says it is training (joining)."""
    def cond() -> bool:
        procs = [p for p in run.state().get("procs", []) if p["name"] != "bootstrap"]
        infos = []
        for p in procs:
            try:
                infos.append(json.loads(Path(p["info"]).read_text()))
            except (OSError, ValueError):
                return False
        return len(infos) == k and all(i.get("state") == "joining" for i in infos)
    return cond


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Two toy experts and a router (checkpoints: a `swarm up --checkpoints` starts its peers at once)."""
    from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm

    d = tmp_path_factory.mktemp("toy")
    experts, router = make_toy_swarm(d, ToySwarmSpec(("ddpm", "fm"), size=8, width=32, depth=1, steps=5))
    return ["--checkpoints", *map(str, experts), "--router", str(router), "--timeout", "600"]


SWARM_UP = ["--experts", "2", "--dataset", "digits", "--net", "mlp", "--width", "16", "--depth", "1",
            "--router-steps", "20", "--train-minutes", "30", "--timeout", "600"]


ALL = pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)


def test_swarm_up_stopped_while_its_peers_train(tmp_path):
    """The issue's case: `timeout` stops `swarm up` while its peers still train."""
    run_dir = tmp_path / "run"
    run = Run(["swarm", "up", "--run-dir", str(run_dir), *SWARM_UP], tmp_path, run_dir)
    run.wait_for("peers training", _peers_training(run, 2))
    run.assert_clean(signal.SIGTERM, run.stop(signal.SIGTERM))


@ALL
def test_swarm_up_stopped_while_its_peers_start(tmp_path, toy, sig):
    """The signal lands right after the bootstrap node was spawned (it is not online yet)."""
    run_dir = tmp_path / "run"
    run = Run(["swarm", "up", "--run-dir", str(run_dir), *toy], tmp_path, run_dir)
    run.wait_for("a recorded bootstrap node", lambda: bool(run.state().get("procs")))
    run.assert_clean(sig, run.stop(sig))


DEMO = ["demo", "--preset", "tiny", "--k", "2"]


@ALL
def test_demo_stopped_while_its_workers_train(tmp_path, sig):
    run = Run([*DEMO, "--out", str(tmp_path / "demo"), "--minutes", "30"], tmp_path, tmp_path / "demo" / "swarm")
    run.wait_for("training workers", lambda: "[2/4] training" in run.text()
                 and sum("multiprocessing" in " ".join(c) for c in run.seen.values()) >= 2)
    run.assert_clean(sig, run.stop(sig))


def test_demo_stopped_while_it_samples_over_its_swarm(tmp_path):
    # 150 steps (as tests/test_demo.py): the demo's swarm admits its experts by their validation score, and
    # experts of a handful of steps are refused (docs/security.md), leaving nothing to sample with
    run = Run([*DEMO, "--out", str(tmp_path / "demo"), "--steps", "150"], tmp_path, tmp_path / "demo" / "swarm")
    run.wait_for("sampling over the swarm", lambda: "[3/4] sampling " in run.text())
    assert any("p2pd" in " ".join(c) for c in run.seen.values())  # the client's daemon and the peers' were seen
    run.assert_clean(signal.SIGHUP, run.stop(signal.SIGHUP))


def test_eval_stopped_while_its_pool_trains(tmp_path):
    run = Run(["eval", "--quick", "--out", str(tmp_path / "ev"), "--jobs", "2", "--budget", "100000"], tmp_path)
    run.wait_for("training workers", lambda: sum("multiprocessing" in " ".join(c) for c in run.seen.values()) >= 2)
    run.assert_clean(signal.SIGTERM, run.stop(signal.SIGTERM))


@pytest.fixture(scope="module")
def toy_swarm(toy, tmp_path_factory):
    """A running local swarm of the two toy experts for the clients' tests."""
    from diffswarm.swarm.local import PeerSpec, start_local_swarm

    experts, router = toy[1:3], toy[4]
    sw = start_local_swarm([PeerSpec(f"peer{i}", e) for i, e in enumerate(experts)], router,
                           tmp_path_factory.mktemp("swarm"), threads=1, timeout=HANG)
    try:
        yield sw
    finally:
        sw.stop(timeout=15)


def test_generate_stopped_while_it_samples(toy_swarm, tmp_path):
    run = Run(["generate", "--run-dir", str(toy_swarm.run_dir), "--n", "64", "--steps", "100000",
               "--output", str(tmp_path / "grid.png")], tmp_path)
    run.wait_for("sampling", lambda: "experts:" in run.text() and any("p2pd" in c[0] for c in run.seen.values()))
    run.assert_clean(signal.SIGTERM, run.stop(signal.SIGTERM))


def test_dashboard_in_a_closed_terminal(toy_swarm, tmp_path):
    """A closed terminal (tmux pane): SIGHUP to the dashboard's process group, and its terminal gone."""
    run = Run(["dashboard", "--run-dir", str(toy_swarm.run_dir), "--out", str(tmp_path / "out")], tmp_path, tty=True)
    run.wait_for("the dashboard's daemon", lambda: any("p2pd" in c[0] for c in run.seen.values()))
    rc = run.stop(signal.SIGHUP, group=True)
    procs, socks = run.leftovers()
    run.kill_all()
    assert (procs, socks) == ([], []), f"left: {procs} {socks}\n{run.text()[-3000:]}"
    assert rc != 0


def test_sigkilled_swarm_up_leaves_what_the_next_command_names(tmp_path, toy, capsys):
    """SIGKILL cannot be handled: the leftovers are named by `swarm status`, refused by `swarm up` (before it
    trains anything), stopped by `swarm down`. (These three run in this process: a CLI start is seconds here.)"""
    from diffswarm.cli import main

    run_dir = tmp_path / "run"
    run = Run(["swarm", "up", "--run-dir", str(run_dir), *toy], tmp_path, run_dir)
    boot = run_dir / "info" / "bootstrap.json"  # online: `swarm status` gets its answer at once
    run.wait_for("the bootstrap node online", lambda: boot.exists() and '"online"' in boot.read_text())
    run.pop.kill()
    run.pop.wait(HANG)
    names = [f"{p['name']} (pid {p['pid']})" for p in run.state()["procs"]]
    try:
        assert main(["swarm", "up", "--run-dir", str(run_dir), *SWARM_UP]) == 2
        err = capsys.readouterr().err
        assert "already running" in err and all(n in err for n in names), err
        main(["swarm", "status", "--run-dir", str(run_dir)])  # the DHT part may fail: the bootstrap may be starting
        out = capsys.readouterr().out
        assert all(n in out for n in names), out
        assert main(["swarm", "down", "--run-dir", str(run_dir)]) == 0
        out = capsys.readouterr().out
        assert all(n in out for n in names), out
    finally:
        procs, socks = run.leftovers()
        run.kill_all()
    assert (procs, socks) == ([], [])
