"""Prometheus metrics of one peer (``diffswarm peer --metrics-port``), served with ``prometheus_client``.

Two sources, so the serving path changes by one hook:

- ``answered`` is called by the servicer for every velocity request it answers (``ExpertServicer.observer``):
  rows and requests served per expert, the request latency histogram (check, queue and forward pass, as the
  peer sees it), and the distinct callers served;
- everything else is read from the peer when Prometheus scrapes (``PeerCollector``): the state and training
  progress while joining, each expert's queue and throughput, the servicer's error answers, memory held and
  open streams.

The metrics live in a registry of their own (several peers in one process do not share counters), served by
prometheus_client's HTTP server thread on 127.0.0.1 unless told otherwise. ``prometheus_client`` is imported
only here, and this module only when a metrics port is given. docs/volunteer.md ("Metrics") lists the names.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger(__name__)

PREFIX = "diffswarm_peer"
# request latency buckets, seconds: a small expert answers in ~1 ms, a big batch on a CPU in seconds
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MAX_CLIENTS_COUNTED = 65_536  # distinct callers remembered for clients_served (its count stops growing beyond)
ERROR_CODES = ("busy", "refused", "internal")  # wire.ERROR_CODES: the error answers the servicer counts
DROPPED = ("cancelled", "closed", "stuck")  # calls that ended without an answer reaching the caller


def _copy(counter) -> dict:
    """A copy of a dict another thread may be writing to (the peer's loop), for a scrape."""
    for _ in range(5):
        try:
            return dict(counter)
        except RuntimeError:  # changed size during the copy: try again
            continue
    return {}


class PeerMetrics:
    """The peer's metrics and their HTTP server; ``start`` / ``stop`` around the peer's life."""

    def __init__(self, peer, host: str = "127.0.0.1", port: int = 0):
        self.peer, self.host, self.port = peer, host, port
        self.registry = CollectorRegistry(auto_describe=True)
        self.rows = Counter(f"{PREFIX}_rows", "request rows answered (images x steps)", ["expert"],
                            registry=self.registry)
        self.requests = Counter(f"{PREFIX}_requests", "velocity requests answered", ["expert"],
                                registry=self.registry)
        self.latency = Histogram(f"{PREFIX}_request_seconds",
                                 "seconds from a velocity request's arrival to its answer (check, queue, forward pass)",
                                 ["expert"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.clients: set[str] = set()  # distinct callers answered (at most MAX_CLIENTS_COUNTED)
        self.registry.register(PeerCollector(peer, self))
        self._server = None

    def answered(self, expert: str, caller: str, rows: int, seconds: float) -> None:
        """One velocity request answered (called on the peer's loop by the servicer)."""
        self.rows.labels(expert).inc(rows)
        self.requests.labels(expert).inc()
        self.latency.labels(expert).observe(seconds)
        if len(self.clients) < MAX_CLIENTS_COUNTED:
            self.clients.add(caller)

    def start(self) -> str:
        """Serve ``/metrics``; returns its URL (``port`` 0: a free port, the one chosen)."""
        self._server, _ = start_http_server(self.port, addr=self.host, registry=self.registry)
        self.port = self._server.server_address[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class PeerCollector:
    """What a scrape reads from the peer as it is now (prometheus_client's custom-collector protocol)."""

    def __init__(self, peer, metrics: PeerMetrics):
        self.peer, self.metrics = peer, metrics

    def describe(self) -> list:
        return []  # collected afresh at every scrape; nothing to register up front

    def collect(self):
        peer = self.peer
        if peer.dht is not None:
            from diffswarm import __version__

            info = GaugeMetricFamily(f"{PREFIX}_info", "1, labelled with the peer's id, swarm and software version",
                                     labels=["peer_id", "swarm", "version"])
            info.add_metric([peer.peer_id, str(peer.swarm or ""), __version__], 1.0)
            yield info
        state = GaugeMetricFamily(f"{PREFIX}_state", "1 for the peer's current state (joining, online, offline)",
                                  labels=["state"])
        for s in ("joining", "online", "offline"):
            state.add_metric([s], 1.0 if peer.state == s else 0.0)
        yield state
        yield GaugeMetricFamily(f"{PREFIX}_training_progress",
                                "training progress of the expert while joining (0..1; 1 once serving)",
                                value=float(peer.progress))
        if peer.train_step is not None:
            yield GaugeMetricFamily(f"{PREFIX}_training_step", "current training step while joining",
                                    value=float(peer.train_step))
        if peer.train_loss is not None:
            yield GaugeMetricFamily(f"{PREFIX}_training_loss", "latest training loss while joining",
                                    value=float(peer.train_loss))
        queue = GaugeMetricFamily(f"{PREFIX}_queue_rows", "request rows queued or computing", labels=["expert"])
        waiting = GaugeMetricFamily(f"{PREFIX}_queue_requests", "requests waiting for a forward pass",
                                    labels=["expert"])
        speed = GaugeMetricFamily(f"{PREFIX}_throughput_rows_per_second",
                                  "measured rows per second (moving average over forward passes)", labels=["expert"])
        active = GaugeMetricFamily(f"{PREFIX}_active_clients",
                                   "callers that sent a request within the batching window (about 1 s)",
                                   labels=["expert"])
        now = time.monotonic()
        for uid, served in list(peer.served.items()):
            b = served.batcher
            queue.add_metric([uid], float(b.pending_rows))
            waiting.add_metric([uid], float(len(b.queue)))
            speed.add_metric([uid], float(b.throughput))
            seen = _copy(b.last_seen)
            active.add_metric([uid], float(sum(1 for ts in seen.values() if now - ts <= b.policy.window)))
        yield from (queue, waiting, speed, active)
        yield CounterMetricFamily(f"{PREFIX}_clients_served", "distinct callers answered since the peer started "
                                  f"(counted up to {MAX_CLIENTS_COUNTED})", value=len(self.metrics.clients))
        servicer = peer.servicer
        stats = _copy(servicer.stats) if servicer is not None else {}
        errors = CounterMetricFamily(f"{PREFIX}_error_answers",
                                     "error answers to any RPC: busy (load), refused (a bad request), internal",
                                     labels=["code"])
        for code in ERROR_CODES:
            errors.add_metric([code], float(stats.get(code, 0)))
        yield errors
        dropped = CounterMetricFamily(f"{PREFIX}_dropped_calls", "calls that ended without an answer reaching the "
                                      "caller: cancelled (its deadline), closed (it went away), stuck (it did not "
                                      "read)", labels=["reason"])
        for reason in DROPPED:
            dropped.add_metric([reason], float(stats.get(reason, 0)))
        yield dropped
        if servicer is not None:
            yield GaugeMetricFamily(f"{PREFIX}_held_bytes", "request bytes the peer holds for callers now",
                                    value=float(servicer.budget.used))
            yield GaugeMetricFamily(f"{PREFIX}_open_streams", "open stream RPCs",
                                    value=float(servicer.slots.open_total))
