"""Where the dashboard's data comes from: the live swarm (``LiveSource``) or fixed data (``FakeSource``).

A source is blocking (the app calls it from thread workers): ``snapshot()`` returns the expert
records, measured latencies and K; ``generate(req, callback)`` returns (N, C, H, W) in [-1, 1]
and reports every step through ``callback(StepInfo)``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from diffswarm.tui.model import GenRequest, labels_for


@dataclass
class Snapshot:
    records: list  # ExpertRecord-like (peer_id, expert_id, cluster, objective, state, throughput, load, updated, ...)
    latency: dict[str, float] = field(default_factory=dict)  # peer -> seconds
    num_clusters: int = 0
    num_classes: int = 0
    now: float = 0.0  # clock of ``records[*].updated`` (DHT time)
    health: dict[str, str] = field(default_factory=dict)  # peer -> this client's verdict (ok, banned 12s, ...)
    note: str = ""  # what the source cannot do yet, shown after the summary
    dataset_id: str = ""  # e.g. "fashion:28" (the swarm record's), for class names


def client_health(client, now: float) -> dict[str, str]:
    """Per peer, the swarm client's verdict (``SwarmClient.health``) as the health column shows it: ``banned Ns``
    (failed calls or probe, with the seconds left), ``ok``, ``skipped`` (announces another partition or
    protocol) or ``unverified`` (not probed yet)."""
    return {p: f"banned {h.banned_for:.0f}s" if h.verdict == "banned" else h.verdict
            for p, h in client.health(now).items()}


class LiveSource:
    """The live swarm, in two stages so a swarm that is still training can be watched:

    - a ``SwarmClient`` (a DHT node reading the expert records in the background), joined on the
      first poll, in a worker, not at start-up;
    - a ``SwarmEnsemble`` on that client, built once a peer announces the router (looked up once
      per poll, without waiting): it verifies peers (the health column) and serves generations."""

    def __init__(self, initial_peers: Sequence[str], config=None, device="cpu"):
        self.initial_peers, self.config, self.device = list(initial_peers), config, device
        self.client = None
        self.ens = None
        self.closed = False
        self._lock = threading.Lock()

    def _client(self):
        with self._lock:
            if self.client is None:
                from diffswarm.client.client import SwarmClient

                if self.closed:
                    raise RuntimeError("the dashboard is closing")
                self.client = SwarmClient(self.initial_peers, self.config)
                self.client.refresh()
                self.client.start_refresh()
            return self.client

    def _ensemble(self, wait: float | None = None):
        client = self._client()
        with self._lock:
            if self.ens is None:
                from diffswarm.client.ensemble import SwarmEnsemble
                from diffswarm.router.routing import RoutingConfig

                router, rec = client.fetch_router(self.device, wait=wait)
                self.ens = SwarmEnsemble(client, router, RoutingConfig(), swarm_record=rec)
            return self.ens

    def snapshot(self) -> Snapshot:
        from hivemind.utils.timed_storage import get_dht_time

        client = self._client()
        if self.ens is None:
            with contextlib.suppress(Exception):  # no router yet (peers still training): watch the records
                self._ensemble(wait=0).wait_for_experts(timeout=0)  # probe the peers under the router's view now
        recs = list(client.records)
        dataset = ""
        if self.ens is not None:
            k, classes, note = self.ens.num_experts, self.ens.num_classes, ""
            dataset = self.ens.swarm_record.dataset_id if self.ens.swarm_record is not None else ""  # the manifest's
        else:
            k = max((r.num_clusters for r in recs), default=0)
            classes = max((r.num_classes for r in recs), default=0)
            note = "no manifest signed by the swarm's owner yet: its founding peer announces it"
        latency = {**client.probe_latency, **client.latency}  # measured calls, else the first-contact probe
        return Snapshot(recs, latency, k, classes, get_dht_time(), client_health(client, time.monotonic()), note,
                        dataset)

    def generate(self, req: GenRequest, callback: Callable | None = None) -> torch.Tensor:
        """Through the Python API (``diffswarm.api.Session``), as ``diffswarm generate`` does."""
        from diffswarm.api import Session

        ens = self._ensemble()
        ens.update_expert_ids()  # names from the records the background refresh keeps fresh (no lookup here)
        session = Session(ens, ens.image_shape, ens.num_classes, self.device, where="over the swarm")
        labels = labels_for(req, ens.num_classes)
        s = req.sampling()
        return session.generate(labels.tolist(), len(labels), steps=s.steps, sampler=s.sampler, guidance=s.guidance,
                                seed=s.seed, routing=req.routing(ens.num_experts), callback=callback).samples

    def close(self) -> None:
        """Shut the client's DHT node down; waits for a connect in progress in a worker, so no daemon is
        left behind by a quit during start-up."""
        self.closed = True
        with self._lock:
            if self.client is not None:
                self.client.close()


@dataclass(frozen=True)
class FakeRecord:
    peer_id: str
    expert_id: str
    cluster: int | None
    objective: str
    state: str = "online"
    throughput: float = 100.0
    load: float = 0.0
    updated: float = 0.0
    # the rest of an ExpertRecord, so the detail panel shows what a live peer announces
    version: int = 1
    num_clusters: int = 3
    partition_hash: str = ""
    schedule: str = "flow"
    image_shape: tuple = (1, 8, 8)
    num_classes: int = 4
    checkpoint_sha256: str = ""
    software: str = "0.1.0"
    protocol: int = 1
    progress: float = 1.0
    max_batch: int = 64
    addrs: tuple = ()
    train_steps: int | None = None  # training summary, where the peer announces it (record version 2)
    final_loss: float | None = None
    relayed: bool | None = None  # reachability and contribution claims (record version 5)
    served_rows: int | None = None
    served_images: int | None = None
    served_clients: int | None = None
    uptime: float | None = None


class _FakeExpert:
    def __init__(self, expert_id: str, scale: float):
        self.expert_id, self.scale = expert_id, scale

    def velocity(self, x, t, labels, guidance=1.0):
        return x * self.scale


class _FakeRouter:
    """Routes by the mean pixel of x: expert k prefers means near a k-dependent level (readable strips)."""

    def __init__(self, num_clusters: int):
        self.cfg = type("Cfg", (), {"num_clusters": num_clusters})()

    def probs(self, x, t, labels):
        levels = torch.linspace(-0.6, 0.6, self.cfg.num_clusters, dtype=torch.float32)
        m = x.float().flatten(1).mean(1, keepdim=True) * 4
        return torch.softmax(-((m - levels) ** 2) / 0.2, dim=1)


class FakeSource:
    """Fixed records and a deterministic local ensemble of toy velocity models: no network."""

    def __init__(self, records: Sequence, num_clusters: int, latency: dict[str, float] | None = None,
                 num_classes: int = 4, shape=(1, 8, 8), now: float = 100.0, fail: str | None = None,
                 health: dict[str, str] | None = None, step_delay: float = 0.0, dataset_id: str = ""):
        self.records, self.num_clusters, self.latency = list(records), num_clusters, dict(latency or {})
        self.num_classes, self.shape, self.now, self.fail = num_classes, tuple(shape), now, fail
        self.health, self.step_delay = dict(health or {}), step_delay  # step_delay: a slow swarm, seconds per step
        self.dataset_id = dataset_id

    def snapshot(self) -> Snapshot:
        if self.fail == "snapshot":
            raise ConnectionError("bootstrap peer unreachable")
        return Snapshot(list(self.records), dict(self.latency), self.num_clusters, self.num_classes, self.now,
                        dict(self.health), dataset_id=self.dataset_id)

    def generate(self, req: GenRequest, callback: Callable | None = None) -> torch.Tensor:
        from diffswarm.router.ensemble import RoutedEnsemble
        from diffswarm.router.local import generate

        if self.fail == "generate":
            raise RuntimeError("no expert can serve this step")
        experts = [_FakeExpert(f"c{k}", 0.5 + 0.1 * k) for k in range(self.num_clusters)]
        ens = RoutedEnsemble(experts, _FakeRouter(self.num_clusters), req.routing(self.num_clusters), seed=req.seed)

        def slow_callback(info) -> None:
            time.sleep(self.step_delay)
            if callback is not None:
                callback(info)

        return generate(ens, labels_for(req, self.num_classes), self.shape, req.sampling(),
                        callback=slow_callback if self.step_delay else callback).clamp(-1, 1)

    def close(self) -> None:
        pass


def demo_records(now: float = 100.0) -> list[FakeRecord]:
    """A small swarm with cluster 2 uncovered (one joining peer), used by tests and snapshots."""
    return [FakeRecord("12D3KooWpeerAAAA0001", "c0-ddpm", 0, "ddpm", throughput=850, load=2, updated=now - 1,
                       schedule="vp-cosine-1000", checkpoint_sha256="9f2c" + "0" * 56 + "a1b2",
                       addrs=("/ip4/127.0.0.1/tcp/40001/p2p/12D3KooWpeerAAAA0001",),
                       train_steps=1200, final_loss=0.0312, relayed=False, served_rows=1520, served_images=64,
                       served_clients=2, uptime=3720.0),
            FakeRecord("12D3KooWpeerBBBB0002", "c1-fm", 1, "fm", throughput=900, load=0, updated=now - 3,
                       relayed=True, served_rows=300, served_images=12, served_clients=1, uptime=600.0),
            FakeRecord("12D3KooWpeerCCCC0003", "c1-fm", 1, "fm", throughput=700, load=5, updated=now - 2),
            FakeRecord("12D3KooWpeerDDDD0004", "c2-ddpm", 2, "ddpm", state="joining", throughput=0, progress=0.4,
                       updated=now - 4, train_steps=480, final_loss=0.0581)]
