"""What a peer hosts: its loaded experts (``ServedExpert``, each with its request spec and batcher) and the
router and partition manifest files it serves as bytes (``RouterBlob``, ``PartitionBlob``)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch

from diffswarm.dht.schema import MAX_PARTITION_BYTES, MAX_ROUTER_BYTES
from diffswarm.experts.expert import Expert
from diffswarm.peer.batching import Batcher, BatchPolicy
from diffswarm.protocol.wire import ExpertSpec


class ServedExpert:
    """One loaded expert with its request spec and batcher."""

    def __init__(self, expert: Expert, policy: BatchPolicy, path: str | os.PathLike | None = None):
        cfg = expert.config
        self.expert = expert
        self.path = Path(path) if path is not None else None  # the checkpoint file (served by rpc_checkpoint)
        self.precision = "fp32"  # on every device (Expert._forward): answers any other source can check
        self.spec = ExpertSpec(expert.expert_id, (cfg.net.channels, cfg.net.size, cfg.net.size), cfg.net.num_classes)
        self.device = next(expert.parameters()).device
        self.batcher = Batcher(self._velocity, policy)
        self.stats_blob: bytes | None = None  # the cluster's statistics beside the checkpoint (load_stats)

    def load_stats(self) -> str | None:
        """Read ``cluster_stats.bin`` beside the checkpoint, if there is one, for publishing; returns why it is
        not published (None: published, or no file)."""
        from diffswarm.router.stats.blob import StatsFormatError
        from diffswarm.router.stats.publish import read_cluster_stats, stats_path

        cfg = self.expert.config
        if self.path is None or cfg.cluster is None or not stats_path(self.path).exists():
            return None
        try:
            blob, st = read_cluster_stats(stats_path(self.path))
        except (OSError, StatsFormatError) as e:
            return f"not publishing {stats_path(self.path)}: {e}"
        shape = (cfg.net.channels, cfg.net.size, cfg.net.size)
        if (st.cluster, st.partition_hash or "", tuple(st.image_shape), st.num_classes) != (
                cfg.cluster, cfg.partition_hash or "", shape, cfg.net.num_classes):
            return (f"not publishing {stats_path(self.path)}: it describes cluster {st.cluster} of partition "
                    f"{(st.partition_hash or '')[:12]}, not this expert's")
        self.stats_blob = blob
        return None

    @torch.inference_mode()  # answers leave the process as bytes: no autograd bookkeeping at all
    def _velocity(self, x, t, labels, guidance):
        if self.device.type == "cpu":
            return self.expert.velocity(x, t, labels, guidance)
        v = self.expert.velocity(x.to(self.device), t.to(self.device), labels.to(self.device), guidance)
        return v.float().cpu()

    def warm_up(self, rows: int = 16) -> float:
        """One timed forward pass (CFG) to prime kernels; returns rows per second."""
        c, h, w = self.spec.image_shape
        x = torch.randn(rows, c, h, w)
        t = torch.full((rows,), 0.5)
        labels = torch.zeros(rows, dtype=torch.long) if self.spec.num_classes else torch.full((rows,), -1)
        self._velocity(x, t, labels, 2.0)
        t0 = time.perf_counter()
        self._velocity(x, t, labels, 2.0)
        return rows / max(time.perf_counter() - t0, 1e-6)


def load_served(path: str, cfg, log) -> ServedExpert:
    """The checkpoint at ``path`` ready to serve under ``cfg`` (a ``PeerConfig``): on its device, batched by its
    policy, its throughput measured by a warm-up; warns through ``log`` about statistics it cannot publish."""
    from diffswarm.experts.train import pick_device

    expert = Expert.from_checkpoint(path, pick_device(cfg.device))
    served = ServedExpert(expert, BatchPolicy(max_rows=cfg.max_batch, max_wait=cfg.batch_wait_ms / 1000,
                                              inline_s=cfg.inline_ms / 1000), path)
    served.batcher.throughput = served.warm_up(min(16, cfg.max_batch))
    why = served.load_stats()
    if why:
        log(f"warning: {why}")
    return served


class RouterBlob:
    """The router file as served bytes, with the facts the swarm's manifest names."""

    def __init__(self, path: str | os.PathLike):
        from diffswarm.router.model import Router

        self.path = Path(path)
        size = self.path.stat().st_size
        if size > MAX_ROUTER_BYTES:
            raise ValueError(f"router {self.path} is {size / 2**20:.1f} MiB; swarm routers are at most "
                             f"{MAX_ROUTER_BYTES >> 20} MiB (clients refuse larger ones)")
        self.data = self.path.read_bytes()
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        router = Router.load(self.path)  # checks the file's own weights hash
        self.cfg = router.cfg
        self.weights_sha256 = router.weights_sha256


class PartitionBlob:
    """The partition manifest file (``partition.json``) as served bytes (``rpc_partition``), with its sha256 and
    the partition hash it declares; a joining volunteer checks the bytes against the owner-signed sha256."""

    def __init__(self, path: str | os.PathLike):
        from diffswarm.data.partition import Partition

        self.path = Path(path)
        size = self.path.stat().st_size
        if size > MAX_PARTITION_BYTES:
            raise ValueError(f"partition manifest {self.path} is {size / 2**20:.1f} MiB; swarms serve at most "
                             f"{MAX_PARTITION_BYTES >> 20} MiB (joining volunteers refuse larger ones)")
        self.data = self.path.read_bytes()
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        part = Partition.load(self.path)  # checks its own partition hash
        self.partition_hash = part.partition_hash
