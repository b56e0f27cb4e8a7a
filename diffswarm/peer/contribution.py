"""What a serving peer contributed: rows and images served, distinct clients, uptime (``Contribution``).

Fed by the servicer after each answered velocity request (``ExpertServicer._answer``), read by the peer for its
records (``ExpertRecord.served_*`` and ``uptime``, claims that clients and ``swarm status`` show but never
trust) and for the totals its log prints every ``PeerConfig.contribution_log_period``. Pure bookkeeping: times
are passed in (``time.monotonic()`` by the callers).

- rows: request rows answered (a CFG row counts once: it is one image at one step).
- images: rows at the sampler's first step (``t == 1``, ``sampling.steps.time_grid``): the trajectories this
  expert took part in from their start. An image routed to k experts at its first step counts at each of them.
- clients: distinct caller peer ids. New ids are free, so this counts ids, not people; past
  ``MAX_TRACKED_CLIENTS`` per expert the count stops growing (a crowd of fresh ids cannot make the set grow
  without bound) and reads as a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffswarm.utils.log import format_duration

MAX_TRACKED_CLIENTS = 10_000  # caller ids remembered per expert (~1 MiB); past it, served_clients stops growing
START_T = 1.0 - 1e-6  # rows with t at or above this are an image's first sampler step


def first_step_rows(t: torch.Tensor) -> int:
    """Rows of a request's ``t`` (B,) at the sampler's first step (``t == 1``)."""
    return int((t >= START_T).sum())


@dataclass
class ExpertContribution:
    """One served expert's counters."""

    rows: int = 0
    images: int = 0
    requests: int = 0
    clients: set[str] = field(default_factory=set)

    @property
    def client_count(self) -> int:
        return len(self.clients)


class Contribution:
    """The counters of every expert a peer serves, and the time it went online (``start``)."""

    def __init__(self, max_clients: int = MAX_TRACKED_CLIENTS):
        self.max_clients = int(max_clients)
        self.by_expert: dict[str, ExpertContribution] = {}
        self.online_since: float | None = None

    def start(self, now: float) -> None:
        """The peer went online at ``now``: uptime counts from here."""
        if self.online_since is None:
            self.online_since = now

    def uptime(self, now: float) -> float:
        return 0.0 if self.online_since is None else max(0.0, now - self.online_since)

    def record(self, expert_id: str, caller: str, rows: int, images: int) -> None:
        """One answered request of ``rows`` rows (``images`` of them at the first step) from ``caller``."""
        c = self.by_expert.setdefault(expert_id, ExpertContribution())
        c.rows += int(rows)
        c.images += int(images)
        c.requests += 1
        if len(c.clients) < self.max_clients:
            c.clients.add(caller)

    def record_fields(self, expert_id: str, now: float) -> dict:
        """The ``ExpertRecord`` contribution fields of ``expert_id`` (zeros before its first request)."""
        c = self.by_expert.get(expert_id, ExpertContribution())
        return {"served_rows": c.rows, "served_images": c.images, "served_clients": c.client_count,
                "uptime": float(self.uptime(now))}

    def totals(self) -> tuple[int, int, int, int]:
        """(rows, images, requests, distinct clients) over all served experts."""
        clients: set[str] = set()
        for c in self.by_expert.values():
            clients |= c.clients
        return (sum(c.rows for c in self.by_expert.values()), sum(c.images for c in self.by_expert.values()),
                sum(c.requests for c in self.by_expert.values()), len(clients))

    def summary(self, now: float) -> str:
        """The line the peer's log prints periodically."""
        rows, images, requests, clients = self.totals()
        return (f"contribution: served {rows} rows ({images} images from their first step) in {requests} requests "
                f"to {clients} client(s); online {format_duration(self.uptime(now))}")

