"""What a peer announces, and how: its records (``ExpertStatus``, ``make_expert_record``, statistics, router
provider entry, the manifest fields its owner signs), the owner's manifest it follows, the swarm it belongs to
(``resolve_swarm``) and the heartbeat that re-announces all of it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from hivemind.utils.timed_storage import get_dht_time

from diffswarm import __version__
from diffswarm.dht.names import (
    DEFAULT_SWARM_NAME,
    SwarmName,
    choose_manifest,
    is_full_name,
    key_fingerprint,
    parse_swarm_name,
    public_key_der,
    sign_manifest,
    swarm_name_of,
)
from diffswarm.dht.node import Identity, SwarmDHT, load_or_create_key
from diffswarm.dht.records import (
    RECORD_VERSION,
    STATS_HASHES_FIELD,
    ClusterStatsRecord,
    ExpertRecord,
    RouterProvider,
    SwarmManifest,
)
from diffswarm.peer.hosted import RouterBlob, ServedExpert
from diffswarm.protocol.wire import PROTOCOL_VERSION

logger = logging.getLogger(__name__)


def schedule_name(expert_cfg) -> str:
    if expert_cfg.objective == "fm":
        return "flow"
    return f"vp-{expert_cfg.schedule.kind}-{expert_cfg.schedule.steps}"


@dataclass(frozen=True)
class ExpertStatus:
    """What a peer announces about an expert beyond its ``ExpertConfig``: its state and serving figures."""

    state: str  # joining | online | offline
    sha256: str = ""  # checkpoint weights sha256 ("" while joining)
    progress: float = 1.0  # training progress in [0, 1]
    throughput: float = 0.0  # measured rows per second
    load: float = 0.0  # rows queued or computing
    max_batch: int = 256  # rows per forward pass
    train_steps: int | None = None  # training steps done
    final_loss: float | None = None  # last training loss (non-finite: announced as None)
    eta_s: float | None = None  # seconds of training left while joining (None: unknown)

    @classmethod
    def serving(cls, state: str, sha256: str, summary: dict, throughput: float, load: float,
                max_batch: int) -> ExpertStatus:
        """The status of a loaded checkpoint; ``summary`` is its training summary (keys ``steps``, ``final_loss``)."""
        steps, loss = summary.get("steps"), summary.get("final_loss")
        return cls(state, sha256, 1.0, float(throughput), float(load), int(max_batch),
                   int(steps) if steps is not None else None, float(loss) if loss is not None else None)


def make_expert_record(cfg, status: ExpertStatus, peer_id: str, addrs: list[str],
                       extra: dict | None = None) -> ExpertRecord:
    """The record announcing an expert of ``ExpertConfig`` cfg in ``status``. A non-finite ``final_loss``
    (no step done yet, or a diverged run) is announced as None: readers reject non-finite losses. ``extra``: the
    optional version-5 fields (``relayed``, the contribution counters)."""
    loss = status.final_loss
    if loss is not None and not math.isfinite(float(loss)):
        loss = None
    return ExpertRecord(
        version=RECORD_VERSION, expert_id=cfg.expert_id, cluster=cfg.cluster, num_clusters=cfg.num_clusters or 1,
        partition_hash=cfg.partition_hash or "", objective=cfg.objective, schedule=schedule_name(cfg),
        image_shape=[cfg.net.channels, cfg.net.size, cfg.net.size], num_classes=cfg.net.num_classes,
        checkpoint_sha256=status.sha256, software=__version__, protocol=PROTOCOL_VERSION, state=status.state,
        progress=float(status.progress), throughput=float(status.throughput), load=float(status.load),
        max_batch=int(status.max_batch), peer_id=peer_id, addrs=list(addrs), updated=float(get_dht_time()),
        train_steps=int(status.train_steps) if status.train_steps is not None else None,
        final_loss=float(loss) if loss is not None else None,
        eta_s=float(status.eta_s) if status.eta_s is not None and math.isfinite(status.eta_s) else None,
        **(extra or {}))


def resolve_swarm(swarm: str | None, owner_key: str | None, identity: Identity,
                  serves_router: bool) -> tuple[SwarmName | None, object, str]:
    """(full swarm name or None, the RSA key this peer signs the manifest with or None, what that key is).

    - ``swarm`` NAME@FINGERPRINT: join it; this peer signs only if its owner key (``owner_key``, else its
      identity when it serves a router) has that fingerprint. An explicit ``owner_key`` of another
      fingerprint is an error; an identity of another one makes a mirror (serves router bytes only).
    - ``swarm`` a bare NAME or None, with a router: found swarm NAME (default ``diffswarm``) owned by the
      owner key.
    - None and no router: a plain DHT node (no swarm)."""
    key, what = None, ""
    if owner_key:
        key, created = load_or_create_key(owner_key)
        what = f"owner key {owner_key}" + (" (new)" if created else "")
    elif serves_router:
        key, what = identity.key, "this peer's identity key" + (" (throw-away: pass --identity or --owner-key to keep "
                                                                "the swarm's name)" if identity.ephemeral else "")
    if swarm is not None and is_full_name(swarm):
        name = parse_swarm_name(swarm)
        if key is not None and swarm_name_of(name.name, key) == name:
            return name, key, what
        if owner_key:
            raise ValueError(f"--owner-key {owner_key} has fingerprint {swarm_name_of(name.name, key).fingerprint}, "
                             f"not the one of swarm {name}")
        return name, None, ""
    if key is None:
        if swarm is None:
            return None, None, ""
        parse_swarm_name(swarm)  # raises SwarmNameError with how to get the full name
    return swarm_name_of(swarm or DEFAULT_SWARM_NAME, key), key, what


def swarm_greeting(swarm: SwarmName | None, owner: str | None, peer_id: str, maddrs: list[str], joined: bool) -> str:
    """What a starting peer says about its swarm: its name and how others join it. ``owner``: what the owner key
    this peer signs with is (None: it holds no owner key); ``joined``: it was given peers to join."""
    where = " ".join(maddrs)
    if swarm is None:
        return f"running a plain DHT node (no swarm) as {peer_id}; others join with:\n  --initial-peers " + where
    if owner is not None:
        return (f"swarm {swarm} (owned by {owner}; this peer signs its manifest). Others join with:\n"
                f"  --swarm {swarm} --initial-peers {where}")
    if joined:
        return f"joined swarm {swarm} as {peer_id}"
    return (f"started swarm {swarm} as {peer_id} (its owner must announce the manifest); others "
            f"join with:\n  --swarm {swarm} --initial-peers {where}")


# -- records -----------------------------------------------------------------------------------


def served_record(s: ServedExpert, state: str, peer_id: str, addrs: list[str],
                  extra: dict | None = None) -> ExpertRecord:
    """The record of a loaded expert in ``state``: its checkpoint's summary, its batcher's throughput and load
    (``extra``: as in ``make_expert_record``)."""
    status = ExpertStatus.serving(state, s.expert.weights_sha256, s.expert.summary, s.batcher.throughput,
                                  s.batcher.pending_rows, s.batcher.policy.max_rows)
    return make_expert_record(s.expert.config, status, peer_id, addrs, extra)


def stats_records(served: Iterable[ServedExpert], peer_id: str) -> list[ClusterStatsRecord]:
    """The cluster statistics published beside the served experts (those whose ``load_stats`` found a file)."""
    out = []
    for s in served:
        c = s.expert.config
        if s.stats_blob is not None:
            out.append(ClusterStatsRecord(version=RECORD_VERSION, cluster=c.cluster, num_clusters=c.num_clusters,
                                          partition_hash=c.partition_hash or "",
                                          stats_sha256=hashlib.sha256(s.stats_blob).hexdigest(),
                                          blob=s.stats_blob, software=__version__, peer_id=peer_id,
                                          updated=float(get_dht_time())))
    return out


MAX_SIGNED_STATS_CLUSTERS = 200  # K whose statistics hashes fit the manifest's size bound (schema.MAX_MANIFEST_BYTES)


def owner_stats_hashes(paths: Iterable[str], served: Iterable[ServedExpert], num_clusters: int,
                       partition_hash: str) -> tuple[list[str], list[str]]:
    """(per cluster 0..K-1, the sha256 of the statistics the owner signs, "" for none; one line per file not signed).

    From the served experts' own statistics (``ServedExpert.load_stats``) and the files ``paths``
    (``cluster_stats.bin`` files, or checkpoints with one beside them). A missing file is skipped silently (a peer
    still training writes it later: the owner signs again when it appears); a file that does not parse within
    bounds, is of another partition or names another cluster's hash than one already taken is not signed."""
    from diffswarm.router.stats.blob import ClusterStats, StatsFormatError
    from diffswarm.router.stats.publish import STATS_FILE, stats_path

    hashes, notes = [""] * num_clusters, []
    if num_clusters > MAX_SIGNED_STATS_CLUSTERS:
        return hashes, [f"K={num_clusters}: too many clusters to sign their statistics in the manifest "
                        f"(at most {MAX_SIGNED_STATS_CLUSTERS})"]
    blobs = [(f"the statistics of {s.expert.expert_id}", s.stats_blob) for s in served if s.stats_blob is not None]
    for p in paths:
        f = Path(p) if Path(p).name == STATS_FILE or Path(p).suffix == ".bin" else stats_path(p)
        with contextlib.suppress(FileNotFoundError):
            blobs.append((str(f), f.read_bytes()))
    for what, blob in blobs:
        try:
            st = ClusterStats.from_bytes(blob)
        except StatsFormatError as e:
            notes.append(f"not signing {what}: {e}")
            continue
        sha = hashlib.sha256(blob).hexdigest()
        k = st.cluster
        if k is None or not 0 <= k < num_clusters or (st.partition_hash or "") != partition_hash:
            notes.append(f"not signing {what}: cluster {k} of partition {(st.partition_hash or '')[:12]}, not one "
                         f"of the swarm's {num_clusters} of partition {partition_hash[:12]}")
        elif hashes[k] and hashes[k] != sha:
            notes.append(f"not signing {what}: cluster {k}'s statistics {hashes[k][:12]} are signed already")
        else:
            hashes[k] = sha
    return hashes, notes


def manifest_fields_for(swarm: SwarmName, router: RouterBlob | None, served: dict[str, ServedExpert],
                        training_cfg=None, stats_paths: Iterable[str] = ()) -> tuple[dict, list[str]]:
    """What the owner signs (``SwarmManifest`` fields but the key and signature): about this peer's router,
    or, with no router, about its expert's partition (a swarm routed by its peers' published statistics); with
    the sha256 of every cluster's statistics it can read (``owner_stats_hashes``: its own and ``stats_paths``).
    ``training_cfg``: the ``ExpertConfig`` in training, if any. Returns (fields, why some statistics are not signed)."""
    fields = _router_fields(swarm, router, served, training_cfg)
    hashes, notes = owner_stats_hashes(stats_paths, served.values(), fields["num_clusters"], fields["partition_hash"])
    if any(hashes):
        fields[STATS_HASHES_FIELD] = hashes
    return fields, notes


def _router_fields(swarm: SwarmName, router: RouterBlob | None, served: dict[str, ServedExpert],
                   training_cfg=None) -> dict:
    if router is None:
        c = next(s.expert.config for s in served.values())
        return dict(version=RECORD_VERSION, swarm=swarm.name, partition_hash=c.partition_hash or "",
                    num_clusters=c.num_clusters or 1, dataset_id=c.dataset_id,
                    image_shape=[c.net.channels, c.net.size, c.net.size], num_classes=c.net.num_classes,
                    router_sha256="", router_weights_sha256="", router_bytes=0, protocol=PROTOCOL_VERSION,
                    software=__version__, issued=float(get_dht_time()))
    rc = router.cfg
    # the router's own (routers trained before it was recorded: a served or trained expert's; else "")
    configs = [s.expert.config for s in served.values()] + [c for c in [training_cfg] if c is not None]
    dataset_id = rc.dataset_id or next((c.dataset_id for c in configs if c.dataset_id), "")
    return dict(version=RECORD_VERSION, swarm=swarm.name, partition_hash=rc.partition_hash or "",
                num_clusters=rc.num_clusters, dataset_id=dataset_id, image_shape=[rc.channels, rc.size, rc.size],
                num_classes=rc.num_classes, router_sha256=router.sha256,
                router_weights_sha256=router.weights_sha256, router_bytes=len(router.data),
                protocol=PROTOCOL_VERSION, software=__version__, issued=float(get_dht_time()))


def admission_rule(owner_key, more_validators, partition_hash: str) -> dict:
    """The admission rule the owner signs (``admission.rule``): its own key and ``more_validators`` validate, the
    triples' seed follows from its key's fingerprint and the partition."""
    from diffswarm.admission.rule import AdmissionRule
    from diffswarm.admission.score import seed_of

    own = key_fingerprint(public_key_der(owner_key))
    vals = tuple(dict.fromkeys([own, *(v.lower() for v in more_validators)]))
    return AdmissionRule(vals, seed_of(f"{own}/{partition_hash}")).to_field()


async def admission_verdicts(dht: SwarmDHT, manifest: SwarmManifest | None, served, memory) -> dict[str, str]:
    """Per served expert id, what the owner's admission rule makes of its checkpoint now (``admitted with score
    ...`` or ``on probation: ...``); empty when the manifest has no rule or the lookup fails. ``memory``: the
    ``AttestationMemory`` of this peer (attestations seen before count, as for clients)."""
    from diffswarm.admission.rule import decide
    from diffswarm.dht.attestations import verified_scores

    rule = manifest.admission if manifest is not None else None
    if rule is None or not served:
        return {}
    clusters = {s.expert.config.cluster for s in served} - {None}  # only these clusters' verdicts are needed
    try:
        atts, _ = await dht.get_attestations(clusters)
        recs, _ = await dht.get_experts(clusters)
    except Exception as e:  # the DHT briefly unreachable: say nothing this time
        logger.debug(f"admission lookup failed: {e!r}")
        return {}
    scores, _ = verified_scores(memory.update(atts), manifest, rule)
    out = {}
    for s in served:
        k, sha = s.expert.config.cluster, s.expert.weights_sha256
        if k is None:
            continue
        announced = {r.checkpoint_sha256: k for r in recs if r.state == "online" and r.cluster == k}
        announced[sha] = k
        v = decide(rule, [a for a in scores if a.cluster == k], announced)[sha]
        why = v.reason if v.reason.startswith("on probation") else f"on probation: {v.reason}"
        out[s.expert.expert_id] = f"admitted for cluster {k} with score {v.score:.4g}" if v.admitted else why
    return out


def provider_record_for(router: RouterBlob | None, peer_id: str, addrs: list[str]) -> RouterProvider | None:
    """The entry saying that this peer serves ``router``'s bytes (None: it serves no router)."""
    if router is None:
        return None
    return RouterProvider(version=RECORD_VERSION, router_sha256=router.sha256, router_bytes=len(router.data),
                          software=__version__, peer_id=peer_id, addrs=addrs, updated=float(get_dht_time()))


# -- the owner's manifest ----------------------------------------------------------------------


def sign_own_manifest(owner_key, fields: dict, swarm: SwarmName, router: RouterBlob | None) -> SwarmManifest:
    """The manifest the owner's key signs over ``fields``, said in the log."""
    manifest = sign_manifest(owner_key, fields)
    what = (f"router {router.sha256[:12]}" if router is not None
            else "no trained router (clients route with the statistics peers publish)")
    signed = sum(bool(h) for h in manifest.signed_stats)
    what += f", the statistics of {signed} of {manifest.num_clusters} cluster(s)"
    logger.info(f"signed the manifest of swarm {swarm}: {what}, partition {manifest.partition_hash[:12] or '(none)'}")
    return manifest


async def follow_manifest(dht: SwarmDHT, swarm: SwarmName, current: SwarmManifest | None,
                          own: SwarmManifest | None, look: bool = True) -> SwarmManifest | None:
    """The owner's newest valid manifest among this peer's own, the one it followed so far (``current``) and, with
    ``look``, those announced in the DHT; says so when it follows a new one."""
    found: list[SwarmManifest] = []
    try:
        found, errors = await dht.get_manifests() if look else ([], [])
        for e in errors:
            logger.debug(f"skipped an invalid manifest: {e}")
    except Exception as e:  # the DHT being briefly unreachable: keep the manifest we have
        logger.debug(f"manifest lookup failed: {e!r}")
    candidates = found + [m for m in (own, current) if m is not None]
    best, _ = choose_manifest(candidates, swarm)
    if best is None or best == current:
        return current
    if current is not None or best != own:
        logger.info(f"following the owner's manifest of {swarm} issued at {best.issued:.0f}: "
                    f"router {best.router_sha256[:12]}")
    return best


def warn_misfits(served: Iterable[ServedExpert], m: SwarmManifest | None, warned: set[tuple[str, float]]) -> None:
    """Warn about served experts that do not fit manifest ``m`` (clients will skip them), once per expert and
    manifest: ``warned`` holds the (expert id, manifest issued) already warned about."""
    if m is None:
        return
    for s in served:
        c = s.expert.config
        if (c.expert_id, m.issued) in warned:
            continue
        shape = [c.net.channels, c.net.size, c.net.size]
        if ((c.partition_hash or "") != m.partition_hash or (c.num_clusters or 1) != m.num_clusters
                or shape != list(m.image_shape) or c.net.num_classes != m.num_classes):
            warned.add((c.expert_id, m.issued))
            logger.info(f"warning: expert {c.expert_id} (partition {(c.partition_hash or '')[:12]}, "
                f"K={c.num_clusters}, {shape}, {c.net.num_classes} classes) does not fit the swarm's "
                f"manifest (partition {m.partition_hash[:12]}, K={m.num_clusters}, {list(m.image_shape)}, "
                f"{m.num_classes} classes): clients will skip it")


# -- announcing --------------------------------------------------------------------------------


async def announce_records(dht: SwarmDHT, expiration: float, experts: list[ExpertRecord],
                           stats: list[ClusterStatsRecord], manifest: SwarmManifest | None,
                           provider: RouterProvider | None) -> None:
    """Store one heartbeat's records in the DHT, all at once; one that is not stored is logged."""
    tasks = [dht.announce_expert(r, expiration) for r in experts]
    tasks += [dht.announce_stats(r, expiration) for r in stats]
    if manifest is not None:
        tasks.append(dht.announce_manifest(manifest, expiration))
    if provider is not None:
        tasks.append(dht.announce_provider(provider, expiration))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for r in results:
        if r is not True:
            logger.warning(f"announcement not stored: {r!r}")


async def heartbeat(announce: Callable[[], Awaitable[None]], stop: asyncio.Event, period: float) -> None:
    """Call ``announce`` every ``period`` seconds until ``stop`` is set."""
    while not stop.is_set():
        try:
            await announce()
        except Exception as e:  # the DHT being briefly unreachable must not kill the peer
            logger.warning(f"heartbeat failed: {e!r}")
        with contextlib.suppress(TimeoutError):  # the period passed: announce again
            await asyncio.wait_for(stop.wait(), period)
