"""``Session``: a routed ensemble to generate from, over a swarm (``connect``) or from local checkpoints
(``load_local``, ``load_run``), with the options of ``diffswarm generate``.

A session over a swarm runs a swarm client (a hivemind DHT node with its p2pd daemon); ``close()`` (or leaving
its ``with`` block) stops it. Local sessions hold only tensors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffswarm.api.result import Generation, RoutingStep
from diffswarm.router.routing import RoutingConfig
from diffswarm.sampling.config import SamplingConfig
from diffswarm.sampling.loop import StepInfo

if TYPE_CHECKING:
    from diffswarm.client.config import ClientConfig
    from diffswarm.router.ensemble import RoutedEnsemble

logger = logging.getLogger(__name__)

Classes = int | str | Sequence[int | str] | None
DEFAULT_N = 16  # images when no class is given (the CLI's --n default)


def class_names(dataset_id: str, num_classes: int) -> list[str]:
    """Names of the class ids 0..num_classes-1: Fashion-MNIST's names for ``fashion:*`` data, else the ids."""
    from diffswarm.data.datasets import FASHION_CLASSES

    if dataset_id.split(":", 1)[0] == "fashion" and num_classes == len(FASHION_CLASSES):
        return list(FASHION_CLASSES)
    return [str(i) for i in range(num_classes)]


def parse_classes(classes: Classes, names: Sequence[str]) -> list[int] | None:
    """Class ids from ids, names (case-insensitive), numeric strings and ``"all"`` (every class in turn);
    None or empty: unconditional. Ids are checked against ``names`` when the images are made."""
    if classes is None:
        return None
    if isinstance(classes, (int, str)):
        classes = [classes]
    lower = [n.lower() for n in names]
    out: list[int] = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, (int, str)):
            raise ValueError(f"class {c!r}: use an int id, a name or 'all'")
        if isinstance(c, int):
            out.append(c)
        elif c == "all":
            out.extend(range(len(names)))
        elif c.strip().lstrip("-").isdigit():
            out.append(int(c))
        elif c.lower() in lower:
            out.append(lower.index(c.lower()))
        else:
            raise ValueError(f"unknown class {c!r}; use an id, 'all' or one of {list(names)}")
    return out or None


def routing_config(routing: str | RoutingConfig = "top-k", k: int | None = None, threshold: float | None = None,
                   full_above: float | None = None) -> RoutingConfig:
    """A ``RoutingConfig`` from the CLI's routing options (None: the default), or ``routing`` itself."""
    if isinstance(routing, RoutingConfig):
        if (k, threshold, full_above) != (None, None, None):
            raise ValueError("pass k, threshold and full_above inside the RoutingConfig, not beside it")
        return routing
    d = RoutingConfig()
    return RoutingConfig(routing, d.k if k is None else k, d.threshold if threshold is None else threshold,
                         full_above)


class Session:
    """A routed ensemble of experts to generate from: local checkpoints or a swarm's peers.

    Make one with ``connect``, ``load_local`` or ``load_run``; use it as a context manager (or call ``close``).
    """

    def __init__(self, model: RoutedEnsemble, image_shape: tuple[int, int, int], num_classes: int,
                 device: str | torch.device = "cpu", dataset_id: str = "", where: str = "locally"):
        self.model = model  # the RoutedEnsemble (SwarmEnsemble over a swarm): the library's own object
        self.image_shape, self.num_classes = tuple(image_shape), num_classes
        self.device, self.dataset_id, self.where = device, dataset_id, where
        self.closed = False

    # -- what it is --------------------------------------------------------------------------------

    @property
    def is_swarm(self) -> bool:
        return hasattr(self.model, "client")

    @property
    def expert_ids(self) -> list[str]:
        """The experts, cluster order (over a swarm: named after the replica in use or last seen)."""
        return list(self.model.expert_ids)

    @property
    def class_names(self) -> list[str]:
        return class_names(self.dataset_id, self.num_classes)

    def coverage(self) -> list[int] | None:
        """Over a swarm: usable replicas per cluster (from the last refresh); None for a local session."""
        return self.model.client.view.coverage() if self.is_swarm else None

    def __repr__(self) -> str:
        return (f"Session({self.where}, experts={self.expert_ids}, image_shape={self.image_shape}, "
                f"num_classes={self.num_classes}{', closed' if self.closed else ''})")

    # -- generating --------------------------------------------------------------------------------

    def generate(self, classes: Classes = None, n: int | None = None, *, steps: int | None = None,
                 sampler: str | None = None, guidance: float | None = None, seed: int = 0,
                 routing: str | RoutingConfig = "top-k", k: int | None = None, threshold: float | None = None,
                 full_above: float | None = None, batch: int | None = None,
                 callback: Callable[[StepInfo], None] | None = None, progress: bool = False) -> Generation:
        """Generate ``n`` images cycling through ``classes`` (ids, names or "all"; None: unconditional).

        ``n`` defaults to one image per class given, else 16. ``steps``, ``sampler`` (euler | heun), ``guidance``
        (classifier-free guidance scale, 1 = none) default to ``SamplingConfig``'s (the CLI's); ``routing`` is
        top-k | full | threshold | sample-k with its ``k``, ``threshold`` and ``full_above``; ``seed`` fixes the
        noise (the same images as ``diffswarm generate --seed``). ``callback(StepInfo)`` is called after every
        sampling step; ``progress`` shows a tqdm bar. Raises ValueError on bad options before any work.
        """
        from diffswarm.router.local import ProgressCallback, generate, make_labels, seeded_noise

        if self.closed:
            raise RuntimeError("this session is closed")
        d = SamplingConfig()
        sampling = SamplingConfig(steps=d.steps if steps is None else steps, sampler=sampler or d.sampler,
                                  guidance=d.guidance if guidance is None else guidance, seed=seed,
                                  batch=batch or d.batch)
        rc = routing_config(routing, k, threshold, full_above)
        ids = parse_classes(classes, self.class_names)
        n = (len(ids) if ids else DEFAULT_N) if n is None else n
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        labels = make_labels(n, ids, self.num_classes)
        self.model.routing = replace(rc, k=min(rc.k, self.model.num_experts))
        self.model.gen_seed = seed
        bar = ProgressCallback(enabled=True) if progress else None
        noise = seeded_noise(n, self.image_shape, seed)
        record: list[RoutingStep] = []
        outs = []
        t0 = time.perf_counter()
        for b, s in enumerate(range(0, n, sampling.batch)):  # one trajectory per batch, as ``generate`` integrates
            rows = (s, min(n, s + sampling.batch))
            traj: list[RoutingStep] = []

            def on_step(info: StepInfo, b=b, rows=rows, traj=traj) -> None:
                del traj[info.step:]  # a recomputed step (rollback) replaces the steps from it on
                traj.append(RoutingStep.of(info, b, rows))
                for cb in (bar, callback):
                    if cb is not None:
                        cb(info)

            outs.append(generate(self.model, labels[rows[0]:rows[1]], self.image_shape, sampling, self.device,
                                 callback=on_step, noise=noise[rows[0]:rows[1]]))
            record.extend(traj)
        wall = time.perf_counter() - t0
        x = torch.cat(outs).float().clamp(-1, 1)
        return Generation(x, labels, record, self.expert_ids, wall)

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the swarm client (its DHT node and p2pd daemon); a no-op for a local session or a second call."""
        if not self.closed:
            self.closed = True
            if self.is_swarm:
                self.model.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- making sessions ---------------------------------------------------------------------------------


def _device(device: str | torch.device) -> str | torch.device:
    from diffswarm.experts.train import pick_device

    return pick_device(device) if device == "auto" else device


def load_local(experts: str | Path | Sequence[str | Path], router: str | Path | None = None, *,
               router_kind: str = "auto", device: str | torch.device = "cpu") -> Session:
    """A session over expert checkpoints (one per cluster) and a router file (``diffswarm generate --local``).

    ``router_kind``: trained (``router``), stats (the ``cluster_stats.bin`` beside each expert) or auto (trained
    when a router is given or there is one expert, else stats)."""
    from diffswarm.router.local import load_local_ensemble

    paths = [experts] if isinstance(experts, (str, Path)) else list(experts)
    if not paths:
        raise ValueError("no expert checkpoints given")
    kind = ("trained" if router or len(paths) == 1 else "stats") if router_kind == "auto" else router_kind
    if kind == "stats" and router is not None:
        raise ValueError("router_kind 'stats' routes with cluster statistics; drop the router file")
    dev = _device(device)
    model = load_local_ensemble(paths, router, RoutingConfig(), dev, router_kind=kind)
    cfg = model.experts[0].config
    return Session(model, (cfg.net.channels, cfg.net.size, cfg.net.size), cfg.net.num_classes, dev,
                   cfg.dataset_id, where="locally")


def run_checkpoints(run_dir: str | Path) -> tuple[list[Path], Path | None]:
    """(expert checkpoints, router file or None) of a run directory: ``experts/*/expert.safetensors`` (what
    ``swarm up`` and the demo write) or ``*/expert.safetensors``, and ``router.safetensors``. Replicas of one
    cluster (``-r1``, ...) are skipped: the first checkpoint of each cluster is used."""
    from diffswarm.experts.checkpoint import read_meta

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    found = sorted(run.glob("experts/*/expert.safetensors")) or sorted(run.glob("*/expert.safetensors"))
    if not found:
        raise FileNotFoundError(f"{run} has no experts/*/expert.safetensors (nor */expert.safetensors): "
                                "train experts into it first (`diffswarm swarm up --run-dir`, `diffswarm demo`)")
    by_cluster: dict[object, Path] = {}
    for p in found:
        cluster = read_meta(p).get("config", {}).get("cluster")
        if cluster in by_cluster:
            logger.info(f"{p}: another checkpoint of cluster {cluster} ({by_cluster[cluster]}) is used")
            continue
        by_cluster[cluster] = p
    router = run / "router.safetensors"
    return list(by_cluster.values()), router if router.exists() else None


def load_run(run_dir: str | Path, *, router_kind: str = "auto", device: str | torch.device = "cpu") -> Session:
    """A session over the experts and router a run directory holds (``run_checkpoints``); without a
    ``router.safetensors`` it routes with the experts' cluster statistics."""
    experts, router = run_checkpoints(run_dir)
    if router_kind == "stats":
        router = None
    return load_local(experts, router, router_kind=router_kind, device=device)


def connect(swarm: str, initial_peers: str | Sequence[str], *, router: str | Path | None = None,
            device: str | torch.device = "cpu", loopback: bool = False, config: ClientConfig | None = None,
            **client_options) -> Session:
    """Join the swarm ``swarm`` (its full name NAME@FINGERPRINT) through ``initial_peers`` (multiaddrs) as a
    client: fetch and verify the router its owner's manifest names (or use the local file ``router``), and wait
    until every cluster has a verified peer (``connect_timeout``, default 60 s; partial coverage is reported).

    ``client_options`` are ``ClientConfig`` fields (``call_timeout``, ``connect_timeout``, ``router_sha256``,
    ``router_kind``, ``compression``, ``cache_dir``, ``allow_unsigned_stats``, ...); ``loopback`` keeps the
    client on 127.0.0.1 without relays or NAT probing (a swarm on this machine). ``config``: a whole
    ``ClientConfig`` instead (its ``swarm`` must be ``swarm``). Raises ValueError on a bad name or option,
    ``SwarmClientError`` / ``NoExpertsError`` when the swarm cannot be used, and leaves no daemon behind then.
    """
    from diffswarm.client.config import ClientConfig
    from diffswarm.client.ensemble import SwarmEnsemble
    from diffswarm.dht.names import parse_swarm_name
    from diffswarm.dht.node import NetworkConfig

    name = str(parse_swarm_name(swarm))  # SwarmNameError (a ValueError) says how to get the full name
    peers = [initial_peers] if isinstance(initial_peers, str) else list(initial_peers)
    if not peers:
        raise ValueError("connect needs at least one multiaddr of a peer of the swarm (initial_peers)")
    if config is not None:
        if client_options or loopback:
            raise ValueError("pass either config or client options (and loopback), not both")
        if config.swarm and str(parse_swarm_name(config.swarm)) != name:
            raise ValueError(f"config names swarm {config.swarm!r}, not {name!r}")
        config = replace(config, swarm=name)
    else:
        unknown = set(client_options) - (set(ClientConfig.__dataclass_fields__) - {"swarm", "net"})
        if unknown:
            raise ValueError(f"unknown client options {sorted(unknown)}; see diffswarm.client.config.ClientConfig")
        net = NetworkConfig.loopback(client_mode=True) if loopback else NetworkConfig(client_mode=True)
        config = ClientConfig(swarm=name, net=net, **client_options)
    dev = _device(device)
    logger.info(f"joining swarm {name!r} via {peers[0]}")
    ens = SwarmEnsemble.connect(peers, RoutingConfig(), router_path=str(router) if router else None, config=config,
                                device=dev)
    rec = ens.swarm_record
    return Session(ens, ens.image_shape, ens.num_classes, dev, rec.dataset_id if rec is not None else "",
                   where="over the swarm")


def connect_local(run_dir: str | Path = "runs/swarm", **options) -> Session:
    """``connect`` to the local swarm ``diffswarm swarm up --run-dir run_dir`` started (its ``swarm.json``), on
    127.0.0.1."""
    from diffswarm.swarm.local import LocalSwarm

    sw = LocalSwarm.find(run_dir)
    return connect(sw.swarm, sw.initial_peers, loopback=True, **options)


__all__ = ["Session", "class_names", "connect", "connect_local", "load_local", "load_run", "parse_classes",
           "routing_config", "run_checkpoints"]
