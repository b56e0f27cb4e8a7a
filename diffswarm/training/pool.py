"""The one worker pool that trains things side by side: the demo's volunteers and the eval's expert pool.

Workers are spawned (fresh interpreters, nothing forked from a process that already runs torch
threads); with ``workers=0`` every task runs in this process instead, in order, one at a time.

No worker outlives its command: leaving the ``with`` block by an exception (``utils.signals.Stopped`` when
the command gets SIGTERM/SIGHUP/SIGINT) cancels what has not started and terminates the workers (SIGTERM,
then SIGKILL after ``stop_timeout``) instead of waiting for their tasks; and each worker asks Linux for
SIGKILL when its parent dies, so a SIGKILLed command takes its workers with it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor

from diffswarm.utils.signals import die_with_parent


class WorkerPool:
    """``with WorkerPool(n) as pool``: ``submit`` and ``map`` like ``ProcessPoolExecutor`` over ``n`` spawned
    processes, or in this process when ``n`` is 0 (a submitted task then runs at once)."""

    def __init__(self, workers: int, stop_timeout: float = 5.0):
        self.workers = workers
        self.stop_timeout = stop_timeout
        self._ex: ProcessPoolExecutor | None = None

    def __enter__(self) -> WorkerPool:
        if self.workers > 0:
            self._ex = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"),
                                           initializer=die_with_parent, initargs=(signal.SIGKILL, os.getpid()))
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._ex is None:
            return
        ex, self._ex = self._ex, None
        if exc_type is None:
            ex.shutdown(wait=True)
        else:
            self.terminate(ex)

    def terminate(self, ex: ProcessPoolExecutor) -> None:
        """Stop ``ex`` now: cancel the queued tasks, SIGTERM the workers, SIGKILL those left after ``stop_timeout``."""
        procs = list((getattr(ex, "_processes", None) or {}).values())
        ex.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            with contextlib.suppress(Exception):
                p.terminate()
        for p in procs:
            p.join(self.stop_timeout)
            if p.is_alive():
                p.kill()
                p.join(5)

    def submit(self, fn: Callable, *args) -> Future:
        if self._ex is not None:
            return self._ex.submit(fn, *args)
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except Exception as e:  # the caller gets it from .result(), as from a worker
            fut.set_exception(e)
        return fut

    def map(self, fn: Callable, items: Iterable) -> Iterator:
        """Results in the order of ``items``, each as soon as it (and those before it) are done."""
        if self._ex is not None:
            return self._ex.map(fn, items)
        return (fn(a) for a in items)
