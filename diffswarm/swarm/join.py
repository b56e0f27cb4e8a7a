"""`diffswarm join`: from a swarm's full name and one multiaddr to the training job of the expert the swarm needs.

``survey`` asks the swarm (as a DHT client, once) for the owner's signed manifest, the expert records and the
partition manifest file (``rpc_partition`` from any peer, checked against the sha256 and size the owner signed);
``check_partition`` and ``load_volunteer_data`` check the file against the manifest and the volunteer's copy of the
dataset against the file; ``decide`` picks the cluster and objective (``peer.placement``: pure), keeping an earlier
choice (``JoinChoice``, OUT/join.json) so that a restarted volunteer resumes the same expert. The CLI
(``cli/join_plans.py``) turns the choice into the same ``PeerConfig`` as ``diffswarm peer --cluster``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from diffswarm.client.config import ClientConfig, SwarmClientError
from diffswarm.client.downloads import FileSource, fetch_partition, partition_sources
from diffswarm.client.transport import PeerTransport
from diffswarm.data import Partition
from diffswarm.dht.names import choose_manifest, parse_swarm_name
from diffswarm.dht.node import NetworkConfig, SwarmDHT
from diffswarm.dht.records import ExpertRecord, SwarmManifest
from diffswarm.dht.schema import MAX_PARTITION_BYTES
from diffswarm.experts.config import OBJECTIVES
from diffswarm.peer.placement import ClusterCover, choose_cluster, choose_objective, coverage, live_records
from diffswarm.protocol.wire import PROTOCOL_VERSION
from diffswarm.utils.fileio import atomic_write

logger = logging.getLogger(__name__)

CHOICE_FILE = "join.json"
PARTITION_FILE = "partition.json"
POLL_S = 1.0


class JoinError(ValueError):
    """Joining cannot go on; the message says what to do."""


@dataclass(frozen=True)
class JoinChoice:
    """What a volunteer chose to train (OUT/join.json): kept across restarts with the same --out / --identity."""

    swarm: str  # NAME@FINGERPRINT
    cluster: int
    objective: str
    partition_hash: str  # the partition the choice is about (a new partition means choosing again)
    reason: str = ""

    def save(self, out: Path) -> Path:
        return atomic_write(out / CHOICE_FILE, lambda tmp: Path(tmp).write_text(json.dumps(asdict(self), indent=2)))

    @classmethod
    def load(cls, out: Path) -> JoinChoice | None:
        """The saved choice, None when there is none or it cannot be read (then the volunteer chooses again)."""
        try:
            d = json.loads((out / CHOICE_FILE).read_text())
            c = cls(**{k: d[k] for k in ("swarm", "cluster", "objective", "partition_hash")}, reason=str(d["reason"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        ok = isinstance(c.cluster, int) and c.objective in OBJECTIVES and isinstance(c.partition_hash, str)
        return c if ok else None


@dataclass(frozen=True)
class Survey:
    """What the swarm said: the owner's manifest, the expert records, the checked partition (saved in OUT)."""

    manifest: SwarmManifest
    records: list[ExpertRecord]
    partition: Partition
    partition_path: Path


def _cached_partition(path: Path, manifest: SwarmManifest) -> bytes | None:
    signed = manifest.signed_partition
    try:
        data = path.read_bytes() if signed and path.stat().st_size == signed[1] else None
    except OSError:
        return None
    return data if data is not None and hashlib.sha256(data).hexdigest() == signed[0] else None


def check_partition(data: bytes, manifest: SwarmManifest, source: str) -> Partition:
    """The partition in ``data`` (bytes whose sha256 the owner signed), checked against ``manifest``: partition hash,
    K, dataset id, image shape, classes. ``JoinError`` on a mismatch (the owner signed a file that does not fit)."""
    try:
        part = Partition.from_dict(json.loads(data), source=source)
    except (ValueError, UnicodeDecodeError) as e:
        raise JoinError(f"the partition file the owner signed does not parse: {e}") from None
    got = (part.partition_hash, part.k, part.dataset_id, list(part.image_shape), part.num_classes)
    want = (manifest.partition_hash, manifest.num_clusters, manifest.dataset_id or part.dataset_id,
            list(manifest.image_shape), manifest.num_classes)
    if got != want:
        raise JoinError(f"the partition file (hash, K, dataset, shape, classes) = {got} does not fit the owner's "
                        f"manifest {want}")
    src = part.source or {}
    c, h, _ = part.image_shape
    if src.get("size") not in (None, h) or src.get("channels") not in (None, c):
        raise JoinError(f"the partition file's data source {src} does not make the manifest's {c}x{h}x{h} images")
    return part


def load_volunteer_data(part: Partition, data_root: str | None):
    """This machine's copy of the partition's dataset (``data_root``: its folder, None: the default location),
    checked against the partition's dataset id and content hash; ``JoinError`` saying what to install or pass."""
    from diffswarm.training.jobs import dataset_for_partition

    name = (part.source or {}).get("name") or part.dataset_id.split(":")[0]
    how = {"fashion": "install the Debian package dataset-fashion-mnist (`sudo apt-get install "
                      "dataset-fashion-mnist`) or pass --data-root DIR with its four *-ubyte.gz files",
           "digits": "install scikit-learn (it bundles the digits)",
           "folder": "pass --data-root DIR with the same image folder the swarm's owner partitioned"}.get(
        name, "pass --data-root DIR with the dataset")
    try:
        ds = dataset_for_partition(part, root=data_root or "")
    except (OSError, ValueError, ImportError) as e:
        raise JoinError(f"this machine's copy of dataset {part.dataset_id} is not the swarm's: {e} To join, {how}."
                        ) from None
    if ds.dataset_id != part.dataset_id:
        raise JoinError(f"this machine's dataset is {ds.dataset_id}, the swarm's partition is of {part.dataset_id}: "
                        f"{how}")
    return ds


async def _survey(swarm: str, net: NetworkConfig, out: Path, wait: float) -> Survey:
    name = parse_swarm_name(swarm)
    node = await SwarmDHT.create(net, swarm)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            manifests, _ = await node.get_manifests()
            manifest, notes = choose_manifest(manifests, name)
            if manifest is not None:
                break
            if loop.time() > deadline:
                why = f" ({notes[0]})" if notes else ""
                raise JoinError(f"no manifest signed by the owner of swarm {name} is announced{why}: check the full "
                                "name and the multiaddr, and that the swarm is up")
            await asyncio.sleep(POLL_S)
        if manifest.protocol != PROTOCOL_VERSION:
            raise JoinError(f"swarm {name} speaks protocol {manifest.protocol}, this diffswarm {PROTOCOL_VERSION}: "
                            "install a matching version")
        records, _ = await node.get_experts([None, *range(manifest.num_clusters)])
        providers, _ = await node.get_providers()
        path = out / PARTITION_FILE
        data = _cached_partition(path, manifest)
        if data is None:
            data = await _download_partition(node, manifest, partition_sources(net.initial_peers,
                                                                               [*records, *providers]))
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
        return Survey(manifest, records, check_partition(data, manifest, str(path)), path)
    finally:
        await node.shutdown()


async def _download_partition(node: SwarmDHT, manifest: SwarmManifest, sources: list[FileSource]) -> bytes:
    """``fetch_partition`` over ``node``'s daemon; each source under a deadline scaled by the signed size."""
    transport = PeerTransport(node.p2p, ClientConfig())
    signed = manifest.signed_partition
    limit = min(signed[1], MAX_PARTITION_BYTES) if signed else 0
    per_source = 10.0 + limit / 1e6
    loop = asyncio.get_running_loop()

    def download(src: FileSource) -> bytes:
        fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(transport.download(
            src, "rpc_partition", signed[0], limit, f"more than the {limit} signed bytes"), per_source), loop)
        return fut.result()

    # fetch_partition is blocking (it is pure but for ``download``): run it beside the loop
    return await loop.run_in_executor(None, fetch_partition, manifest, sources, download)


def survey(swarm: str, net: NetworkConfig, out: Path, wait: float = 60.0) -> Survey:
    """Ask swarm ``swarm`` (NAME@FINGERPRINT) through ``net`` (made a DHT client here) for the manifest, the expert
    records and the partition file (cached as OUT/partition.json while it matches the owner's sha256)."""
    client = NetworkConfig(**{**asdict(net), "client_mode": True, "host_maddrs": net.host_maddrs[:1],
                              "identity_path": None, "check_identity": False, "announce_maddrs": []})
    client.host_maddrs = [m.rsplit("/tcp/", 1)[0] + "/tcp/0" for m in client.host_maddrs]
    out.mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(_survey(swarm, client, out, wait))
    except SwarmClientError as e:
        raise JoinError(str(e)) from None


def describe_cover(cover: list[ClusterCover]) -> str:
    return "\n".join(f"  cluster {c.cluster}: {c.experts} live expert(s), {c.share:.0%} of the data, "
                     f"{c.throughput:.0f} rows/s announced" for c in cover)


def decide(swarm: str, s: Survey, previous: JoinChoice | None, cluster: int | None, objective: str | None,
           own_peer_id: str | None = None, rng: random.Random | None = None) -> tuple[JoinChoice, list[ClusterCover]]:
    """The cluster and objective to train: ``cluster`` / ``objective`` when given, else the ``previous`` choice for
    the same swarm and partition, else what the swarm needs most (``choose_cluster``, ``choose_objective``; this
    volunteer's own earlier records, ``own_peer_id``, left out)."""
    m = s.manifest
    cover = coverage(s.records, m, [float(x) for x in s.partition.shares()], exclude_peer=own_peer_id)
    if cluster is not None and not 0 <= cluster < m.num_clusters:
        raise JoinError(f"--cluster {cluster}: swarm {swarm} has clusters 0..{m.num_clusters - 1}")
    same = previous if previous is not None and (previous.swarm, previous.partition_hash) == (
        swarm, m.partition_hash) and 0 <= previous.cluster < m.num_clusters else None
    if cluster is not None:
        k, why = cluster, f"--cluster {cluster}"
    elif same is not None:
        k, why = same.cluster, f"kept from {CHOICE_FILE} (resuming)"
    else:
        k = choose_cluster(cover, rng)
        why = (f"the swarm needs it most ({cover[k].experts} live expert(s) for {cover[k].share:.0%} of the data)")
    if objective is not None:
        obj = objective
    elif same is not None and same.cluster == k:
        obj = same.objective
    else:
        obj = choose_objective(live_records(s.records, m, own_peer_id))
    return JoinChoice(swarm, k, obj, m.partition_hash, why), cover
