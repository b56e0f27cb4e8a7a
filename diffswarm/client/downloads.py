"""Files the client fetches from peers and keeps in its cache: routers, expert checkpoints (its own verified
copies of experts' weights) and the manifest floor (the newest manifest it accepted, a rollback guard); and the
partition manifest file a joining volunteer fetches (``fetch_partition``, checked against the owner's signature)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from diffswarm.client.config import ClientConfig, SwarmClientError
from diffswarm.client.selection import Replica
from diffswarm.dht.names import SwarmName
from diffswarm.dht.records import SwarmManifest
from diffswarm.utils.fileio import atomic_write

logger = logging.getLogger(__name__)

MIN_DOWNLOAD_RATE = 1e6  # bytes/s: a router source slower than this (after info_timeout) is given up
MAX_ROUTER_SOURCES = 16  # router providers (and checkpoint sources) tried per lookup round
FETCH_RETRY_S = 60.0  # an expert whose checkpoint could not be fetched is not tried again for this long


def cache_root(cfg: ClientConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("DIFFSWARM_CACHE") or Path.home() / ".cache" / "diffswarm")


def cached_router(cfg: ClientConfig, manifest: SwarmManifest, fetch: Callable[[], bytes]) -> Path:
    """The cached file of the manifest's router; ``fetch()`` (its bytes, checked against the manifest's sha256)
    fills the cache when the file is missing or does not hash to the manifest's sha256."""
    from diffswarm.experts.checkpoint import file_sha256

    path = cache_root(cfg) / "routers" / f"{manifest.router_sha256}.safetensors"
    if not (path.exists() and file_sha256(path) == manifest.router_sha256):
        data = fetch()
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return path


def _floor_path(cfg: ClientConfig, name: SwarmName) -> Path:
    return cache_root(cfg) / "manifests" / f"{name}.json"


def read_manifest_floor(cfg: ClientConfig, name: SwarmName) -> float | None:
    """The issue time of the newest manifest of ``name`` this client (cache) accepted; None if none."""
    try:
        issued = json.loads(_floor_path(cfg, name).read_text())["issued"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(issued) if isinstance(issued, (int, float)) else None


def write_manifest_floor(cfg: ClientConfig, name: SwarmName, m: SwarmManifest) -> None:
    path = _floor_path(cfg, name)
    old = read_manifest_floor(cfg, name)
    if old is not None and old >= m.issued:
        return
    text = json.dumps({"issued": m.issued, "router_sha256": m.router_sha256})
    with contextlib.suppress(OSError):  # a read-only cache only loses the rollback guard
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class LocalExperts:
    """The client's own copies of experts' weights, by weights sha256: the trusted checkpoints it was given,
    and checkpoints fetched from peers (``rpc_checkpoint``) into its cache, each hash-checked."""

    def __init__(self, cfg: ClientConfig, download: Callable[[Replica], bytes]):
        self.cfg = cfg
        self.download = download  # the checkpoint file a replica serves (blocking, under a deadline)
        self.experts: dict[str, object] = {}  # checkpoint sha256 -> Expert (the client's own verified copies)
        self.fetch_failed: dict[str, float] = {}  # checkpoint sha256 -> when fetching it may be tried again
        self._load_trusted()

    def _load_trusted(self) -> None:
        from diffswarm.experts.expert import Expert

        for path in self.cfg.trusted_checkpoints:
            e = Expert.from_checkpoint(path, "cpu")  # raises CheckpointError on a hash mismatch
            self.experts[e.weights_sha256] = e

    def get(self, sha256: str, replicas=(), fetch: bool = False):
        """The client's own copy of the expert with weights ``sha256`` (an Expert whose weights hash to it), or
        None. ``fetch``: download it first (``rpc_checkpoint``) from one of ``replicas`` serving it, any of them
        (the hash check makes the source irrelevant); a failed fetch is not retried for ``FETCH_RETRY_S``."""
        if sha256 in self.experts or not fetch or not sha256:
            return self.experts.get(sha256)
        if time.monotonic() < self.fetch_failed.get(sha256, float("-inf")):
            return None
        from diffswarm.experts.checkpoint import CheckpointError
        from diffswarm.experts.expert import Expert

        path = cache_root(self.cfg) / "experts" / f"{sha256}.safetensors"
        sources = [r for r in replicas if r.checkpoint_sha256 == sha256]
        random.shuffle(sources)
        errs = []
        for src in [None, *sources[:MAX_ROUTER_SOURCES]]:  # None: the cache
            try:
                if src is not None:
                    data = self.download(src)
                    atomic_write(path, lambda tmp, data=data: Path(tmp).write_bytes(data))
                elif not path.exists():
                    continue
                e = Expert.from_checkpoint(path, "cpu")  # checks the tensors against the file's recorded sha256
                if e.weights_sha256 != sha256:
                    raise CheckpointError(f"its weights hash to {e.weights_sha256[:12]}, not {sha256[:12]}")
                self.experts[sha256] = e
                return e
            except Exception as ex:
                errs.append(f"{'cache' if src is None else src.peer_id[:12]}: {ex}"[:200])
        self.fetch_failed[sha256] = time.monotonic() + FETCH_RETRY_S
        logger.info(f"could not fetch expert {sha256[:12]}: {'; '.join(errs)}")
        return None


# -- the partition manifest a joining volunteer trains on ------------------------------------------


@dataclass(frozen=True)
class FileSource:
    """A peer that may serve a file (``rpc_partition``): its id and multiaddrs."""

    peer_id: str
    addrs: tuple[str, ...] = ()


def partition_sources(initial_peers: Iterable[str], records: Iterable) -> list[FileSource]:
    """Peers to ask for the partition file: the ``initial_peers`` (their multiaddrs end in ``/p2p/<peer id>``) and
    every peer announcing an expert or router (``records``: anything with ``peer_id`` and ``addrs``), once each."""
    out: dict[str, FileSource] = {}
    for m in initial_peers:
        pid = m.rsplit("/p2p/", 1)[1] if "/p2p/" in m else ""
        if pid and pid not in out:
            out[pid] = FileSource(pid, (m,))
    for r in records:
        if r.peer_id not in out:
            out[r.peer_id] = FileSource(r.peer_id, tuple(r.addrs))
    return list(out.values())


def fetch_partition(manifest: SwarmManifest, sources: list[FileSource], download: Callable[[FileSource], bytes],
                    rng: random.Random | None = None) -> bytes:
    """The partition manifest file the owner signed in ``manifest`` (sha256 and size), from the first of ``sources``
    (in random order, at most ``MAX_ROUTER_SOURCES``) whose bytes match; ``download(src)`` returns a source's bytes
    and must stop reading past the signed size. ``SwarmClientError`` when the owner signed none or none matches."""
    signed = manifest.signed_partition
    if signed is None:
        raise SwarmClientError(f"the owner's manifest of swarm {manifest.swarm} (issued {manifest.issued:.0f}) signs "
                               "no partition file: ask the owner for partition.json and use `diffswarm peer "
                               "--partition partition.json --cluster K`, or to restart the swarm with a diffswarm that "
                               "signs it")
    sha, size = signed
    srcs = list(sources)
    (rng or random).shuffle(srcs)
    errs = []
    for src in srcs[:MAX_ROUTER_SOURCES]:
        try:
            data = download(src)
        except Exception as e:  # a peer without the file, gone, or too slow: try the next
            errs.append(f"{src.peer_id[:12]}: {e}"[:200])
            continue
        if len(data) > size or hashlib.sha256(data).hexdigest() != sha:
            errs.append(f"{src.peer_id[:12]}: {len(data)} bytes that do not hash to the signed sha256")
            continue
        return data
    raise SwarmClientError(f"no peer served the partition file {sha[:12]} the owner signed "
                           f"({len(srcs)} asked; {'; '.join(errs[-4:]) or 'none known'})")
