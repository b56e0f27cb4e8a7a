"""The one worker pool that trains things side by side: the demo's volunteers and the eval's expert pool.

Workers are spawned (fresh interpreters, nothing forked from a process that already runs torch
threads); with ``workers=0`` every task runs in this process instead, in order, one at a time.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor


class WorkerPool:
    """``with WorkerPool(n) as pool``: ``submit`` and ``map`` like ``ProcessPoolExecutor`` over ``n`` spawned
    processes, or in this process when ``n`` is 0 (a submitted task then runs at once)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._ex: ProcessPoolExecutor | None = None

    def __enter__(self) -> WorkerPool:
        if self.workers > 0:
            self._ex = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"))
        return self

    def __exit__(self, *exc) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True)
            self._ex = None

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
