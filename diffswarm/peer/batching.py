"""Bounded batching of concurrent velocity requests into one forward pass.

Requests from several clients queue up; the batcher takes the oldest request plus whatever else
is queued, up to ``max_rows`` rows, runs one forward pass per distinct guidance value (CFG is a
scalar per pass), and splits the answer back. It waits up to ``max_wait`` for more requests only
when another client was active within ``window`` seconds, and only until every such client has a
request queued: a lone client (the common case) never pays the wait, several clients get merged
passes, and a pass starts as soon as the clients it expects are all in. Forward passes run one at
a time on a worker thread, so the event loop keeps receiving requests while the expert computes,
and requests that arrive during a pass form the next batch on their own. The queue is bounded: at
most ``max_queue_rows`` rows wait or compute at once; ``submit`` answers ``PeerBusy`` above that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from diffswarm.protocol.wire import MAX_REQUEST_ROWS, PeerBusy, VelocityRequest

logger = logging.getLogger(__name__)
MAX_CLIENTS_SEEN = 1024  # clients remembered for the wait policy (the most recent are kept)


@dataclass
class BatchPolicy:
    max_rows: int = 256  # request rows in one forward pass (CFG doubles them inside the expert)
    max_wait: float = 0.002  # seconds to wait for more requests when other clients are active
    window: float = 1.0  # a client counts as active this long after its last request
    inline_s: float = 0.0  # passes expected to take less than this run on the event loop thread
    max_queue_rows: int = 2 * MAX_REQUEST_ROWS  # rows queued or computing at once; PeerBusy above (a request
    #                                             always gets in when the queue is empty)


def active_clients(now: float, last_seen: dict[str, float], window: float) -> set[str]:
    """The clients that sent a request within ``window``: the batcher stops waiting once each has one queued."""
    return {c for c, ts in last_seen.items() if now - ts <= window}


def should_wait(now: float, last_seen: dict[str, float], requester: str, window: float) -> bool:
    """Wait for more requests only if a client other than ``requester`` sent one recently."""
    return bool(active_clients(now, last_seen, window) - {requester})


def take_batch(queued_rows: Sequence[int], max_rows: int) -> int:
    """How many queued requests (oldest first) make the next batch: at least one (a request larger
    than ``max_rows`` runs alone), then more while the rows stay within ``max_rows``."""
    n, rows = 0, 0
    for r in queued_rows:
        if n and rows + r > max_rows:
            break
        n, rows = n + 1, rows + r
    return n


def compute_batch(velocity: Callable, reqs: Sequence[VelocityRequest]) -> list[torch.Tensor]:
    """One ``velocity`` call per guidance value over the concatenated rows; answers split per request."""
    out: list[torch.Tensor | None] = [None] * len(reqs)
    groups: dict[float, list[int]] = {}
    for i, r in enumerate(reqs):
        groups.setdefault(r.guidance, []).append(i)
    for g, idx in groups.items():
        x = torch.cat([reqs[i].x for i in idx])  # (sum b, C, H, W)
        t = torch.cat([reqs[i].t for i in idx])
        labels = torch.cat([reqs[i].labels for i in idx])
        v = velocity(x, t, labels, g)
        for i, part in zip(idx, v.split([reqs[i].rows for i in idx]), strict=True):
            out[i] = part
    return out  # type: ignore[return-value]


@dataclass
class _Item:
    req: VelocityRequest
    client: str
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """Per-request timing returned to the caller (and into response metadata)."""

    queue_ms: float
    compute_ms: float
    batch_rows: int


class Batcher:
    """Queue + one worker task; ``submit`` returns (v, BatchStats)."""

    def __init__(self, velocity: Callable, policy: BatchPolicy, throughput: float = 0.0):
        self.velocity, self.policy = velocity, policy
        self.queue: list[_Item] = []
        self.wakeup = asyncio.Event()
        self.last_seen: dict[str, float] = {}
        self.pending_rows = 0  # queued + computing
        self.throughput = throughput  # rows / s, EMA over passes
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def admit(self, rows: int) -> None:
        """Raise ``PeerBusy`` if ``rows`` more rows would overfill the queue (retry_after: the time the backlog
        takes to drain at the measured throughput)."""
        over = self.pending_rows + rows - self.policy.max_queue_rows
        if over > 0 and self.pending_rows > 0:
            retry = over / self.throughput if self.throughput > 0 else 1.0
            raise PeerBusy(f"the expert's queue is full ({self.pending_rows} rows waiting, limit "
                           f"{self.policy.max_queue_rows})", max(retry, 0.05))

    async def submit(self, req: VelocityRequest, client: str) -> tuple[torch.Tensor, BatchStats]:
        self.admit(req.rows)
        fut = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        self.last_seen.pop(client, None)
        self.last_seen[client] = now  # most recent last
        if len(self.last_seen) > MAX_CLIENTS_SEEN:  # forget long-gone clients, then the least recent
            recent = [(c, ts) for c, ts in self.last_seen.items() if now - ts <= self.policy.window]
            self.last_seen = dict(recent[-MAX_CLIENTS_SEEN // 2:])
        self.queue.append(_Item(req, client, fut))
        self.pending_rows += req.rows
        self.wakeup.set()
        return await fut

    async def _run(self) -> None:
        while True:
            if not self.queue:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            try:
                await self._one_batch()
            except Exception as e:  # a bug here must not stop the worker (every later request would hang)
                logger.exception("batcher: a batch failed outside the forward pass")
                if self.queue:  # fail the oldest request, so the worker moves on
                    item = self.queue.pop(0)
                    self.pending_rows -= item.req.rows
                    if not item.future.done():
                        item.future.set_exception(e)

    async def _one_batch(self) -> None:
        loop = asyncio.get_running_loop()
        first = self.queue[0]
        now = time.monotonic()
        if self.policy.max_wait > 0 and should_wait(now, self.last_seen, first.client, self.policy.window):
            deadline = now + self.policy.max_wait
            expected = active_clients(now, self.last_seen, self.policy.window)  # the clients the pass waits for
            while (sum(i.req.rows for i in self.queue) < self.policy.max_rows
                   and not expected <= {i.client for i in self.queue}):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), left)
                except TimeoutError:
                    break
        n = take_batch([i.req.rows for i in self.queue], self.policy.max_rows)
        taken, self.queue = self.queue[:n], self.queue[n:]
        taken_rows = sum(i.req.rows for i in taken)
        try:
            batch = [i for i in taken if not i.future.done()]  # skip callers that gave up
            if not batch:
                return
            rows = sum(i.req.rows for i in batch)
            t0 = time.perf_counter()
            if self.throughput > 0 and rows / self.throughput <= self.policy.inline_s:
                # short pass: run it on the loop thread (no thread hop, no GIL ping-pong)
                outs = compute_batch(self.velocity, [i.req for i in batch])
            else:  # long pass: a worker thread, so the loop keeps serving the DHT and new requests
                outs = await loop.run_in_executor(self.executor, compute_batch, self.velocity,
                                                  [i.req for i in batch])
            dt = time.perf_counter() - t0
            rate = rows / max(dt, 1e-6)
            self.throughput = rate if self.throughput <= 0 else 0.8 * self.throughput + 0.2 * rate
            for i, v in zip(batch, outs, strict=True):
                if not i.future.done():
                    stats = BatchStats(queue_ms=1000 * (t0 - i.enqueued), compute_ms=1000 * dt, batch_rows=rows)
                    i.future.set_result((v, stats))
        except Exception as e:  # a failing forward pass fails its requests, never the peer
            for i in taken:
                if not i.future.done():
                    i.future.set_exception(e)
        finally:
            self.pending_rows -= taken_rows

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for i in self.queue:
            if not i.future.done():
                i.future.set_exception(RuntimeError("peer is shutting down"))
        self.queue.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)
