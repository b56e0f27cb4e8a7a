"""An orderly stop for a command that starts processes (peers, p2pd daemons, worker pools).

``stop_on_signals()``: for the command's lifetime SIGTERM, SIGHUP and SIGINT raise :class:`Stopped` (a
``KeyboardInterrupt``) in the main thread, so every ``finally`` and ``with`` on the way out runs: a local swarm
that is starting SIGTERMs its peers (they announce ``offline``) and SIGKILLs what is left after a bounded wait,
a ``WorkerPool`` terminates its workers, a client shuts its daemon down. Only the first signal raises; later
ones are logged and ignored, so the (bounded) cleanup is not cut short by a second Ctrl-C or a second SIGTERM.
The previous handlers come back when the block ends.

``raise_if_stopped()``: the main thread's long loops (sampling steps, training steps, polls for peers) call it
once per round; inside a block that got a signal it raises :class:`Stopped` again. A handler's exception can be
lost: Python runs it wherever the main thread is, and one raised inside a finalizer or a weakref callback that
the garbage collector runs (an asyncio task's ``WeakSet`` entry, a ``__del__``) is printed as "Exception ignored"
and dropped, so the command would go on as if never signalled. Cleanup code does not call it.

``stop_children()`` is the backstop the CLI runs after every command: whatever child process the command
started in its own session and left running (the p2pd of a client that was never closed) gets SIGTERM, then
SIGKILL after a bounded wait, and its p2pd sockets are removed. Peers of a local swarm run in sessions of their
own and are not touched: a ``swarm up`` that returned keeps its swarm running.

``own_sockets()`` / ``disown_sockets()``: the unix sockets of the p2p daemons this process started (``SwarmDHT``
registers them; ``new_sockets_owned`` covers a daemon's start, before their names are known, and a start that
failed registers what its daemon, still dying, left). A daemon killed before its node shut down (a closed
terminal's SIGHUP reaches the whole process group) leaves its socket in /tmp, and hivemind removes it only while
the daemon runs; ``stop_children`` and the process's exit remove every registered socket nobody listens on.

``quick_exit(code)``: the end of a short command's process (``diffswarm generate``) once its work is done: the
exit handlers run and the output is flushed as at a normal exit, and the interpreter's teardown (freeing every
module's objects and a full garbage collection: 1-3 s once torch, hivemind and diffusers are imported) is skipped.

``die_with_parent()``: Linux ``PR_SET_PDEATHSIG`` for a process that must not outlive its parent even when the
parent is SIGKILLed (the workers of a ``WorkerPool``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


class Stopped(KeyboardInterrupt):
    """The command was asked to stop by ``signum``; the process should exit with ``exit_code``."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Turn ``signals`` into :class:`Stopped` in the main thread while the block runs (no-op in other threads)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping: list[int] = []

    def handler(signum: int, frame) -> None:
        if stopping:  # already stopping: let the cleanup finish (every wait in it is bounded)
            logger.warning(f"{signal.Signals(signum).name}: already stopping, cleaning up")
            return
        stopping.append(signum)
        raise Stopped(signum)

    old = {s: signal.signal(s, handler) for s in signals}
    _BLOCKS.append(stopping)
    try:
        yield
    finally:
        _BLOCKS.pop()
        for s, h in old.items():
            signal.signal(s, h)


_BLOCKS: list[list[int]] = []  # per open stop_on_signals block (main thread): the signal it got, once it got one


def raise_if_stopped() -> None:
    """Raise :class:`Stopped` if the innermost ``stop_on_signals`` block got a signal (its first ``Stopped`` may
    have been swallowed: module docstring). For the main thread's loops, once per round; a no-op in other
    threads and outside a block."""
    if _BLOCKS and _BLOCKS[-1] and threading.current_thread() is threading.main_thread():
        raise Stopped(_BLOCKS[-1][0])


QUICK_EXIT_WAIT = 30.0  # seconds quick_exit waits for non-daemon threads before it exits without them


def quick_exit(code: int, wait: float = QUICK_EXIT_WAIT) -> None:
    """End the process with ``code`` now, as a normal exit would but without the interpreter's teardown: wait for
    the non-daemon threads and run their exit hooks (``threading._shutdown``: thread pools finish their queued
    work), run the ``atexit`` handlers (log handlers flushed and closed, ``weakref.finalize`` hooks), flush stdout
    and stderr, then ``os._exit``. For the main thread of a command whose files are written and closed and whose
    child processes are stopped: an object still holding unwritten data in a buffer of its own (a file left open)
    loses it. Elsewhere (another thread, an interpreter without these hooks) it returns and the caller exits
    normally.

    The wait is bounded: a thread still running ``wait`` seconds later (one blocked for good would hang a normal
    exit forever) is named on stderr with every thread's stack, and the process ends with ``code`` without it."""
    import atexit

    shutdown, run_exitfuncs = getattr(threading, "_shutdown", None), getattr(atexit, "_run_exitfuncs", None)
    if threading.current_thread() is not threading.main_thread() or shutdown is None or run_exitfuncs is None:
        return
    threading.Thread(target=_exit_anyway, args=(code, wait), name="quick-exit-watchdog", daemon=True).start()
    shutdown()
    run_exitfuncs()
    _flush_std()
    os._exit(code)


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _exit_anyway(code: int, wait: float) -> None:
    """``quick_exit``'s bound: after ``wait`` seconds, report the threads it still waits for and end the process."""
    import faulthandler

    time.sleep(wait)
    me = threading.current_thread()
    left = [t.name for t in threading.enumerate() if not t.daemon and t is not me and t is not threading.main_thread()]
    _flush_std()
    with contextlib.suppress(Exception):
        sys.stderr.write(f"exit: still waiting after {wait:g}s for thread(s) {', '.join(left) or '?'}; exiting without "
                         "them. Stacks of every thread:\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    _flush_std()
    os._exit(code)


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies; if the parent (pid ``parent``) is
    already gone, exit now. A no-op where prctl is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        return
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    return sorted(set(out))


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _gone(pid: int) -> bool:
    """True if ``pid`` exited (reaped here if it is our zombie)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:  # not our child (or already reaped): look at /proc
        return exited(pid)


def _sockets(cmdline: list[str]) -> list[str]:
    """The unix sockets of a p2pd command line: the daemon's (``-listen=/unix/tmp/hivemind-p2pd-UID.sock``) and
    its client's (``hivemind-p2pclient-UID.sock``, same UID: hivemind names them so)."""
    out = []
    for a in cmdline:
        m = re.search(r"/unix(/\S+\.sock)", a)
        if m:
            out += [m.group(1), m.group(1).replace("-p2pd-", "-p2pclient-")]
    return out


_OWNED_SOCKETS: set[str] = set()
_AT_EXIT: list[bool] = []  # remove_dead_sockets is registered with atexit (once)


def _remove_at_exit() -> None:
    if not _AT_EXIT:
        atexit.register(remove_dead_sockets)
        _AT_EXIT.append(True)


def own_sockets(paths: list[str]) -> None:
    """Register the sockets of a p2p daemon this process started (removed once the daemon is dead)."""
    _remove_at_exit()
    _OWNED_SOCKETS.update(paths)


def disown_sockets(paths: list[str]) -> None:
    """The daemon's owner removed them itself."""
    _OWNED_SOCKETS.difference_update(paths)


def listening(path: str) -> bool:
    """True if a process accepts connections on the unix socket ``path`` (a dead daemon's file refuses them)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:  # not ours to judge (permissions, a full backlog): keep it
        return True
    finally:
        s.close()


_CLAIMS: list[tuple[str, frozenset[str]]] = []  # open new_sockets_owned blocks: (glob pattern, files before)


@contextlib.contextmanager
def new_sockets_owned(pattern: str) -> Iterator[Callable[[], set[str]]]:
    """While the block runs, the files matching ``pattern`` (a glob) that were not there when it began count as
    this process's: a daemon being started makes its sockets before its starter learns their names, and a process
    that ends inside the block (a closed terminal's SIGHUP kills the daemon and the command, and the thread that was
    starting it never resumes) must still remove them. ``remove_dead_sockets()`` and the process's exit remove
    those nobody listens on. The block registers the exact sockets (``own_sockets``) once it knows them. Yields a
    function that returns those new files."""
    _remove_at_exit()
    claim = (pattern, frozenset(glob.glob(pattern)))
    _CLAIMS.append(claim)
    try:
        yield lambda: _new_files(*claim)
    finally:
        _CLAIMS.remove(claim)


def _new_files(pattern: str, before: frozenset[str]) -> set[str]:
    return set(glob.glob(pattern)) - before


def _claimed() -> set[str]:
    return set().union(*(_new_files(*c) for c in list(_CLAIMS)))


def remove_dead_sockets(paths: set[str] | None = None) -> list[str]:
    """Remove those of ``paths`` (default: the registered ones and the new ones of open ``new_sockets_owned``
    blocks) that exist and that nobody listens on; a registered socket stays registered while its daemon
    listens."""
    removed, gone = [], []
    for path in sorted((_OWNED_SOCKETS | _claimed()) if paths is None else paths):
        if not os.path.exists(path):
            gone.append(path)
        elif not listening(path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
            gone.append(path)
    _OWNED_SOCKETS.difference_update(gone)
    return removed


def exited(pid: int) -> bool:
    """True if ``pid`` is gone or a zombie (read from /proc: nothing is reaped, its owner's watcher still is)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] == "Z"
    except OSError:
        return True


def stop_children(before: set[int] = frozenset(), timeout: float = 5.0) -> list[int]:
    """SIGTERM this process's children that are not in ``before``, run in this session and are not
    multiprocessing's resource tracker (it exits by itself); SIGKILL those left after ``timeout``; remove the
    p2pd sockets named on their command lines and the registered ones (``own_sockets``) whose daemon is dead.
    Returns the pids it stopped."""
    sid = os.getsid(0)
    victims = {}
    for pid in _children(os.getpid()):
        cmd = _cmdline(pid)
        with contextlib.suppress(OSError):
            if pid in before or os.getsid(pid) != sid or any("resource_tracker" in a for a in cmd):
                continue
            victims[pid] = cmd
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    left = set(victims)
    while left and time.monotonic() < deadline:
        left = {p for p in left if not _gone(p)}
        if left:
            time.sleep(0.05)
    for pid in left:
        logger.warning(f"pid {pid} ({' '.join(victims[pid][:1])}) did not stop in {timeout:.0f}s: killing it")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    for cmd in victims.values():
        for s in _sockets(cmd):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(s)
    remove_dead_sockets()
    return sorted(victims)


def children() -> set[int]:
    """This process's current children (what ``stop_children`` should leave alone)."""
    return set(_children(os.getpid()))
