"""``--verify-attestations``: the client recomputes each attested score with its own copy of the dataset.

For every attestation that verifies (a validator the owner names, a good signature) and that this client has not
checked yet, it fetches the checkpoint by its sha256 (``LocalExperts``: any peer serving it, hash-checked), scores
it on its own validation set of that cluster (``admission.score``, the manifest's seed) and compares. A validator
whose signed score disagrees beyond ``score.TOLERANCE`` is reported (an event and a warning) and every attestation
it signed is ignored by this client from then on (``admission.rule.decide``'s ``ignored``). At most ``PER_ROUND``
checkpoints are scored per refresh, in a worker thread; one that cannot be fetched is tried again later.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from diffswarm.admission.score import ValidationSet, agrees, score_expert, validation_set
from diffswarm.dht.attestations import verify_attestation
from diffswarm.dht.records import AttestationRecord, ExpertRecord, SwarmManifest
from diffswarm.dht.schema import RecordError

logger = logging.getLogger(__name__)

PER_ROUND = 2


class AttestationCheck:
    """Recomputes attested scores on ``partition``'s test split; ``fetch(sha256, records)``: the client's own copy
    of those weights (an ``Expert``) or None (blocking; runs in a worker thread)."""

    def __init__(self, partition: str, fetch: Callable[[str, list[ExpertRecord]], object]):
        self.partition_path, self.fetch = partition, fetch
        self.part = self.test = None
        self.vsets: dict[int, ValidationSet] = {}
        self.checked: dict[tuple[str, int, str], float] = {}  # (sha256, cluster, validator) -> recomputed score
        self.records: list[ExpertRecord] = []  # the latest expert records (where to fetch checkpoints from)

    def _load(self) -> None:
        from diffswarm.data.partition import Partition
        from diffswarm.training.jobs import dataset_for_partition

        self.part = Partition.load(self.partition_path)
        self.test = dataset_for_partition(self.part, "test")

    def _score(self, a: AttestationRecord, seed: int) -> float | None:
        if self.part is None:
            self._load()
        expert = self.fetch(a.checkpoint_sha256, [r for r in self.records if r.checkpoint_sha256 ==
                                                  a.checkpoint_sha256])
        if expert is None:
            return None
        if a.cluster not in self.vsets:
            self.vsets[a.cluster] = validation_set(self.part, self.test, a.cluster)
        return score_expert(expert, self.vsets[a.cluster], seed).score

    async def check(self, attestations: list[AttestationRecord], manifest: SwarmManifest, liars: dict[str, str],
                    events: deque[str]) -> None:
        """Recompute up to ``PER_ROUND`` unchecked attestations; add validators caught lying to ``liars``."""
        rule = manifest.admission
        todo = 0
        for a in attestations:
            try:
                got = verify_attestation(a, manifest, rule)
            except RecordError:
                continue
            key = (a.checkpoint_sha256, a.cluster, got.validator)
            if key in self.checked or got.validator in liars or todo >= PER_ROUND:
                continue
            todo += 1
            try:
                mine = await asyncio.get_running_loop().run_in_executor(None, self._score, a, rule.seed)
            except Exception as e:  # a checkpoint this client cannot load is the validator's problem, not ours
                logger.info(f"could not recompute the score of {a.checkpoint_sha256[:12]}: {e!r}")
                continue
            if mine is None:
                continue
            self.checked[key] = mine
            if not agrees(a.score, mine):
                why = (f"signed score {a.score:.6g} for checkpoint {a.checkpoint_sha256[:12]} of cluster {a.cluster}, "
                       f"this client recomputes {mine:.6g}")
                liars[got.validator] = why
                msg = f"validator {got.validator} lied ({why}): its attestations are ignored"
                logger.warning(msg)
                events.append(msg)
