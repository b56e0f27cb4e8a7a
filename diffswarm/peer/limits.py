"""What one caller, or all callers together, can make a serving peer hold: the limits and their bookkeeping.

Pure (no I/O; times are passed in), used by the RPC plumbing (``rpc``) and ``servicer.ExpertServicer``. Every
limit is a field of ``PeerLimits`` with its default and why; docs/protocol.md (Limits) lists them with the
wire-level bounds of ``diffswarm.protocol.wire``. A caller is a libp2p peer id. New ids are free, so per-caller
limits stop one careless or greedy client, not a Sybil crowd; the peer-wide limits (queue rows, memory budget,
open streams) are what bound the peer whatever the number of callers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffswarm.protocol.wire import MAX_REQUEST_ROWS, PeerBusy

BUSY_RETRY_S = 0.5  # retry_after of busy answers whose end cannot be predicted (memory, streams)


@dataclass(frozen=True)
class PeerLimits:
    """One commented field per limit a serving peer enforces (``PeerConfig.limits``)."""

    # rows per second one caller may send (token bucket per peer id); 0 = no rate limit. Well above what one
    # client's sampler sends to one expert; what it stops is one caller taking a peer's whole queue for itself
    rate_rows: float = 10000.0
    # bucket size: rows a caller may send at once after idling; >= the largest request (MAX_REQUEST_ROWS)
    burst_rows: int = 2 * MAX_REQUEST_ROWS
    # rows queued or computing per expert (the batcher queue); busy above, with retry_after = backlog / throughput
    max_queue_rows: int = 2 * MAX_REQUEST_ROWS
    # request bytes held at once (read but not yet answered), all callers together; busy above. A request in
    # work holds up to ~3x its wire bytes (its protobuf, the decoded tensors, the answer; answers are no larger
    # than their requests), so this bounds request memory at ~3x it
    max_inflight_bytes: int = 256 << 20
    # the same for one caller; it also caps one streamed request (the largest valid request of a 3x32x32 expert,
    # 8192 rows, is 96 MiB)
    max_caller_inflight_bytes: int = 128 << 20
    max_streams: int = 256  # open stream RPCs (sessions, streamed calls, router downloads), all callers; busy above
    max_streams_per_caller: int = 8  # the same for one caller (a client keeps one session per peer)
    # requests read but not answered on one session: the peer reads no further message until one is answered
    # (back-pressure through the stream), so the answer queue never holds more than this
    session_inflight: int = 16
    write_timeout: float = 20.0  # seconds an answer may wait for the caller to read it; then the stream is closed
    read_timeout: float = 30.0  # seconds a started message may take to arrive, and a streamed request between parts
    session_idle: float = 300.0  # a session without a new request for this long is closed (the client reopens one)
    max_callers: int = 4096  # callers whose rate buckets are kept (refilled buckets go first, then the oldest)

    def __post_init__(self):
        for name in ("burst_rows", "max_queue_rows", "max_inflight_bytes", "max_caller_inflight_bytes",
                     "max_streams", "max_streams_per_caller", "session_inflight", "max_callers"):
            if getattr(self, name) < 1:
                raise ValueError(f"PeerLimits.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("write_timeout", "read_timeout", "session_idle"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PeerLimits.{name} must be positive, got {getattr(self, name)}")
        if not (math.isfinite(self.rate_rows) and self.rate_rows >= 0):
            raise ValueError(f"PeerLimits.rate_rows must be finite and >= 0 (0 = off), got {self.rate_rows}")


class RateLimiter:
    """A token bucket of request rows per caller: ``rate`` rows per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int, max_callers: int = 4096):
        self.rate, self.burst, self.max_callers = float(rate), int(burst), int(max_callers)
        self.buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, time), least recently used first

    def take(self, caller: str, rows: int, now: float) -> float:
        """0.0 if ``caller`` may send ``rows`` now (they are taken); otherwise the seconds until it may, with
        nothing taken (``inf`` for more rows than the burst: such a request never fits)."""
        if self.rate <= 0:
            return 0.0
        if rows > self.burst:
            return math.inf
        tokens, last = self.buckets.pop(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(now - last, 0.0) * self.rate)
        wait = 0.0 if rows <= tokens else (rows - tokens) / self.rate
        self.buckets[caller] = (tokens - rows if wait == 0.0 else tokens, now)
        if len(self.buckets) > self.max_callers:
            self._trim(now)
        return wait

    def _trim(self, now: float) -> None:
        """Forget refilled buckets (a new bucket is full: nothing lost), then the least recently used."""
        full = [c for c, (tok, ts) in self.buckets.items() if tok + (now - ts) * self.rate >= self.burst]
        for c in full:
            del self.buckets[c]
        while len(self.buckets) > self.max_callers:
            del self.buckets[next(iter(self.buckets))]


class ByteBudget:
    """Request bytes held by the peer, in total and per caller (``PeerLimits.max_inflight_bytes`` and
    ``max_caller_inflight_bytes``). ``peak`` is the most ever held (the tests read it)."""

    def __init__(self, total: int, per_caller: int):
        self.total, self.per_caller = int(total), int(per_caller)
        self.used = 0
        self.peak = 0
        self.by_caller: dict[str, int] = {}

    def take(self, caller: str, n: int) -> str | None:
        """None if ``n`` more bytes were taken for ``caller``; otherwise why not (nothing taken)."""
        mine = self.by_caller.get(caller, 0)
        if mine + n > self.per_caller:
            return f"this caller already has {mine} request bytes in flight (limit {self.per_caller})"
        if self.used + n > self.total:
            return f"the peer holds {self.used} request bytes in flight (limit {self.total})"
        self.by_caller[caller] = mine + n
        self.used += n
        self.peak = max(self.peak, self.used)
        return None

    def give(self, caller: str, n: int) -> None:
        left = self.by_caller.get(caller, 0) - n
        if left > 0:
            self.by_caller[caller] = left
        else:
            self.by_caller.pop(caller, None)
        self.used -= n


class Lease:
    """The bytes one request or session holds in a ``ByteBudget``; ``release`` gives back whatever is left."""

    def __init__(self, budget: ByteBudget, caller: str):
        self.budget, self.caller, self.held = budget, caller, 0

    def take(self, n: int) -> None:
        """Hold ``n`` more bytes; raises ``PeerBusy`` when the budget is full."""
        why = self.budget.take(self.caller, n)
        if why is not None:
            raise PeerBusy(f"out of memory budget for requests: {why}", BUSY_RETRY_S)
        self.held += n

    def give(self, n: int) -> None:
        n = min(n, self.held)
        self.budget.give(self.caller, n)
        self.held -= n

    def release(self) -> None:
        self.give(self.held)


class StreamSlots:
    """Open stream RPCs, in total and per caller (``PeerLimits.max_streams`` and ``max_streams_per_caller``)."""

    def __init__(self, total: int, per_caller: int):
        self.total, self.per_caller = int(total), int(per_caller)
        self.open_total = 0
        self.by_caller: dict[str, int] = {}

    def open(self, caller: str) -> None:
        """Take a slot for ``caller`` or raise ``PeerBusy``."""
        mine = self.by_caller.get(caller, 0)
        if mine >= self.per_caller:
            raise PeerBusy(f"this caller already has {mine} streams open (limit {self.per_caller}); "
                           "close one first", BUSY_RETRY_S)
        if self.open_total >= self.total:
            raise PeerBusy(f"the peer has {self.open_total} streams open (limit {self.total})", BUSY_RETRY_S)
        self.by_caller[caller] = mine + 1
        self.open_total += 1

    def close(self, caller: str) -> None:
        left = self.by_caller.get(caller, 0) - 1
        if left > 0:
            self.by_caller[caller] = left
        else:
            self.by_caller.pop(caller, None)
        self.open_total -= 1
