"""A validator: watches the swarm for checkpoints, scores each on held-out data and announces signed attestations.

Run by a founding peer with ``--validate PARTITION`` (signing with the owner key, the swarm's default validator)
or alone by ``diffswarm validate`` (signing with ``--validator-key``, which the owner names in its manifest with
``--validators``). Each round (every ``period`` seconds) it

1. reads the owner's newest manifest (``names.choose_manifest``) and its admission rule; a validator whose key
   the rule does not name, or whose partition is not the manifest's, says so once and attests nothing;
2. for each online expert record of the manifest's partition, image shape and classes whose (checkpoint,
   cluster) it has not scored yet, fetches the checkpoint by its sha256 from the announcing peer
   (``rpc_checkpoint``, at most ``MAX_CHECKPOINT_BYTES``, under a deadline), loads it (the weights must hash to
   the announced sha256), scores it on the cluster's validation set (``admission.score``, in a worker thread) and
   signs the attestation; at most ``PER_ROUND`` checkpoints per round, least recently announced first;
3. (re-)announces what it signed, each attestation for ``MAX_RECORD_AGE`` (an attestation is a fact about
   immutable bytes: it may outlive a slow round or a validator's restart);
4. checks the cluster statistics peers announce for the manifest's partition against its own recomputation
   from the partition's train split (``admission.stats_check``) and attests those that match
   (``subject = "stats"``: the statistics router may use them like owner-signed ones);
5. re-announces every attestation it holds (they expire ``MAX_RECORD_AGE`` after the validator goes away).

A checkpoint that cannot be fetched or loaded is tried again after ``RETRY_S``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.timed_storage import get_dht_time

from diffswarm.admission.rule import AdmissionRule
from diffswarm.admission.score import ValidationSet, score_expert, validation_set
from diffswarm.dht.attestations import sign_attestation
from diffswarm.dht.names import SwarmName, choose_manifest, key_fingerprint, public_key_der
from diffswarm.dht.node import SwarmDHT
from diffswarm.dht.records import RECORD_VERSION, AttestationRecord, ClusterStatsRecord, ExpertRecord, SwarmManifest
from diffswarm.dht.schema import MAX_RECORD_AGE
from diffswarm.protocol.wire import MAX_CHECKPOINT_BYTES, handle_name

logger = logging.getLogger(__name__)

PER_ROUND = 4  # checkpoints scored per round at most
RETRY_S = 60.0  # a checkpoint that could not be fetched or loaded is tried again after this long
FETCH_TIMEOUT = 60.0  # seconds to fetch one checkpoint


class Validator:
    """Scores the swarm's checkpoints for clusters of ``partition`` and announces what it signed with ``key``."""

    def __init__(self, dht: SwarmDHT, swarm: SwarmName, key, partition: str, *, period: float = 5.0,
                 expiration: float = MAX_RECORD_AGE, own_manifest=None, log=logger.info):
        self.dht, self.swarm, self.key, self.partition_path = dht, swarm, key, partition
        self.period, self.expiration, self.log = period, expiration, log
        self.own_manifest = own_manifest  # callable -> the manifest this peer signed (owner), or None
        self.fingerprint = key_fingerprint(public_key_der(key))
        self.part = None
        self.vsets: dict[int, ValidationSet] = {}
        self.test = None
        self.done: dict[tuple[str, int], AttestationRecord] = {}  # (sha256, cluster) -> what it signed
        self.done_stats: dict[tuple[str, int], AttestationRecord | None] = {}  # (blob sha256, cluster) -> signed or
        #                                                                        None (does not match the data)
        self.train = None  # the partition's train split (loaded once statistics are to be checked)
        self.failed: dict[tuple[str, int], float] = {}  # (sha256, cluster) -> monotonic time to retry after
        self.seconds: list[float] = []  # seconds spent per scored checkpoint (fetch + load + score)
        self._said: set[str] = set()

    def say_once(self, msg: str) -> None:
        if msg not in self._said:
            self._said.add(msg)
            self.log(msg)

    def load_data(self) -> None:
        from diffswarm.data.partition import Partition
        from diffswarm.training.jobs import dataset_for_partition

        self.part = Partition.load(self.partition_path)
        self.test = dataset_for_partition(self.part, "test")

    def vset(self, k: int) -> ValidationSet:
        if k not in self.vsets:
            self.vsets[k] = validation_set(self.part, self.test, k)
        return self.vsets[k]

    async def manifest(self) -> SwarmManifest | None:
        found, _ = await self.dht.get_manifests()
        own = self.own_manifest() if self.own_manifest else None
        return choose_manifest(found + ([own] if own else []), self.swarm)[0]

    def rule_for(self, m: SwarmManifest | None) -> AdmissionRule | None:
        """The manifest's rule if this validator may attest under it (says once why not)."""
        if m is None:
            self.say_once(f"validator: waiting for the owner's manifest of {self.swarm}")
            return None
        rule = m.admission
        if rule is None:
            self.say_once("validator: the owner's manifest has no admission rule; nothing to attest")
        elif self.fingerprint not in rule.validators:
            self.say_once(f"validator: key {self.fingerprint} is not one the owner's manifest names "
                          f"({', '.join(rule.validators)}); the owner adds it with `--validators {self.fingerprint}`")
        elif m.partition_hash != self.part.partition_hash:
            self.say_once(f"validator: partition {self.part.partition_hash[:12]} is not the swarm's "
                          f"{m.partition_hash[:12]}; nothing to attest")
        else:
            return rule
        return None

    def candidates(self, recs: list[ExpertRecord], m: SwarmManifest) -> list[ExpertRecord]:
        now = time.monotonic()
        out, seen = [], set()
        for r in sorted(recs, key=lambda r: r.updated):
            key = (r.checkpoint_sha256, r.cluster)
            if (r.state != "online" or r.cluster is None or not 0 <= r.cluster < m.num_clusters
                    or r.partition_hash != m.partition_hash or list(r.image_shape) != list(m.image_shape)
                    or r.num_classes != m.num_classes or key in self.done or key in seen
                    or self.failed.get(key, -1.0) > now):
                continue
            seen.add(key)
            out.append(r)
        return out[:PER_ROUND]

    async def fetch(self, rec: ExpertRecord) -> bytes:
        """The checkpoint file ``rec`` announces, from its peer, at most ``MAX_CHECKPOINT_BYTES``."""
        pid = PeerID.from_base58(rec.peer_id)
        maddrs = []
        for a in rec.addrs:
            try:
                m = Multiaddr(a)
                maddrs.append(m.decapsulate(Multiaddr(f"/p2p/{rec.peer_id}")) if f"/p2p/{rec.peer_id}" in a else m)
            except Exception:  # a malformed address in someone's record
                continue
        if maddrs:
            try:
                await self.dht.p2p._client.connect(pid, maddrs)  # as client.transport does (no public API)
            except Exception as e:
                logger.debug(f"validator: connect to {rec.peer_id[:12]}: {e!r}")
        stream = await self.dht.p2p.iterate_protobuf_handler(
            pid, handle_name("rpc_checkpoint"), runtime_pb2.ExpertUID(uid=rec.checkpoint_sha256),
            runtime_pb2.ExpertInfo)
        chunks, size = [], 0
        async for msg in stream:
            size += len(msg.serialized_info)
            if size > MAX_CHECKPOINT_BYTES:
                raise ValueError(f"checkpoint is larger than {MAX_CHECKPOINT_BYTES >> 20} MiB")
            chunks.append(msg.serialized_info)
        return b"".join(chunks)

    def score(self, data: bytes, rec: ExpertRecord, seed: int):
        """(ScoreReport) of the checkpoint bytes ``data`` for ``rec``'s cluster (a worker thread)."""
        from diffswarm.experts.expert import Expert

        with tempfile.TemporaryDirectory(prefix="diffswarm-validate-") as d:
            path = Path(d) / "expert.safetensors"
            path.write_bytes(data)
            expert = Expert.from_checkpoint(path, "cpu")  # checks the weights against the recorded sha256
        if expert.weights_sha256 != rec.checkpoint_sha256:
            raise ValueError(f"its weights hash to {expert.weights_sha256[:12]}, not the announced "
                             f"{rec.checkpoint_sha256[:12]}")
        return score_expert(expert, self.vset(rec.cluster), seed)

    async def validate(self, rec: ExpertRecord, rule: AdmissionRule) -> AttestationRecord | None:
        key = (rec.checkpoint_sha256, rec.cluster)
        t0 = time.perf_counter()
        try:
            data = await asyncio.wait_for(self.fetch(rec), FETCH_TIMEOUT)
            rep = await asyncio.get_running_loop().run_in_executor(None, self.score, data, rec, rule.seed)
        except Exception as e:  # anything a stranger's checkpoint or peer does wrong
            self.failed[key] = time.monotonic() + RETRY_S
            self.log(f"validator: could not score {rec.expert_id} {rec.checkpoint_sha256[:12]} from "
                     f"{rec.peer_id[:12]}: {e!r}"[:300])
            return None
        self.seconds.append(time.perf_counter() - t0)

        def opt(v: float) -> float | None:
            return None if v != v else float(v)

        att = self.sign("checkpoint", rec.checkpoint_sha256, rec.cluster, rule, score=float(rep.score),
                        baseline=float(rep.baseline), in_classes=opt(rep.in_classes),
                        out_classes=opt(rep.out_classes), triples=rep.triples)
        self.done[key] = att
        self.log(f"validator: {rec.expert_id} {rec.checkpoint_sha256[:12]} from {rec.peer_id[:12]} for cluster "
                 f"{rec.cluster}: {rep.describe()} ({self.seconds[-1]:.1f} s)")
        return att

    def sign(self, subject: str, sha256: str, cluster: int, rule: AdmissionRule, **scores) -> AttestationRecord:
        now = float(get_dht_time())
        return sign_attestation(self.key, dict(
            version=RECORD_VERSION, subject=subject, swarm=self.swarm.name, checkpoint_sha256=sha256, cluster=cluster,
            num_clusters=self.part.k, partition_hash=self.part.partition_hash, seed=rule.seed, issued=now,
            peer_id=self.dht.peer_id.to_base58(), updated=now, **scores))

    def check_stats(self, rec: ClusterStatsRecord) -> tuple[str | None, int]:
        """(why the announced statistics do not match the data, or None; images recomputed from) (worker thread)."""
        from diffswarm.admission.stats_check import recompute_stats, stats_disagree
        from diffswarm.router.stats.blob import ClusterStats, StatsFormatError
        from diffswarm.training.jobs import dataset_for_partition

        try:
            announced = ClusterStats.from_bytes(rec.blob)
        except StatsFormatError as e:
            return f"not a statistics blob: {e}", 0
        if self.train is None:
            self.train = dataset_for_partition(self.part, "train")
        mine = recompute_stats(self.part, self.train, rec.cluster, announced)
        return stats_disagree(announced, mine), mine.count

    async def validate_stats(self, m: SwarmManifest, rule: AdmissionRule) -> None:
        """Attest the announced cluster statistics that match the data (issue 18, item 5; ``admission.stats_check``)."""
        recs, _ = await self.dht.get_stats(range(m.num_clusters))
        todo = [r for r in sorted(recs, key=lambda r: r.updated)
                if r.partition_hash == m.partition_hash and r.num_clusters == m.num_clusters
                and (r.stats_sha256, r.cluster) not in self.done_stats][:PER_ROUND]
        for r in todo:
            key = (r.stats_sha256, r.cluster)
            why, n = await asyncio.get_running_loop().run_in_executor(None, self.check_stats, r)
            if why is not None:
                self.done_stats[key] = None
                self.log(f"validator: statistics {r.stats_sha256[:12]} of cluster {r.cluster} from {r.peer_id[:12]} "
                         f"do not match the data: {why}"[:300])
                continue
            self.done_stats[key] = self.sign("stats", r.stats_sha256, r.cluster, rule, score=0.0, baseline=0.0,
                                             in_classes=None, out_classes=None, triples=max(n, 1))
            self.log(f"validator: statistics {r.stats_sha256[:12]} of cluster {r.cluster} match the data ({n} images)")

    async def round(self) -> None:
        if self.part is None:
            await asyncio.get_running_loop().run_in_executor(None, self.load_data)
        m = await self.manifest()
        rule = self.rule_for(m)
        if rule is None:
            return
        await self.announce_held(rule)  # first: scoring newcomers may take longer than a period
        recs, _ = await self.dht.get_experts(range(m.num_clusters))
        for rec in self.candidates(recs, m):
            if await self.validate(rec, rule) is not None:
                await self.announce_held(rule)
        await self.validate_stats(m, rule)
        await self.announce_held(rule)

    async def announce_held(self, rule: AdmissionRule) -> None:
        """Re-announce every attestation this validator signed under ``rule``'s seed."""
        now = float(get_dht_time())
        held = [*self.done.values(), *(a for a in self.done_stats.values() if a is not None)]
        for att in [a for a in held if a.seed == rule.seed]:
            await self.dht.announce_attestation(dataclasses.replace(att, updated=now), self.expiration)

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds every ``period`` seconds until ``stop``; a failed round is logged and the next one runs."""
        self.log(f"validating the swarm's checkpoints with key {self.fingerprint} on {self.partition_path}")
        while not stop.is_set():
            try:
                await self.round()
            except Exception as e:
                logger.warning(f"validator round failed: {e!r}")
            try:
                await asyncio.wait_for(stop.wait(), self.period)
            except TimeoutError:
                pass
