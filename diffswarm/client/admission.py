"""Which announced checkpoints the client may use: the owner's admission rule over validators' attestations (pure).

``verdicts`` verifies the attestations (``dht.attestations``) and applies the rule (``admission.rule.decide``) to
the online records' checkpoints; ``None`` means the owner's manifest has no rule (admission off: every checkpoint
is used, the behaviour of swarms before record version 5). ``Preference`` orders a cluster's admitted checkpoints
best score first (``Sources.pick`` fails over in that order; replicas of one checkpoint are still ranked by latency).
"""

from __future__ import annotations

from collections.abc import Iterable

from diffswarm.admission.rule import Verdict, decide
from diffswarm.dht.attestations import verified_scores
from diffswarm.dht.records import AttestationRecord, ExpertRecord, SwarmManifest


def verdicts(manifest: SwarmManifest | None, attestations: list[AttestationRecord], records: list[ExpertRecord],
             ignored: Iterable[str] = ()) -> tuple[dict[tuple[str, int], Verdict] | None, list[str]]:
    """``{(checkpoint sha256, cluster): Verdict}`` for the online records' checkpoints under the manifest's rule
    (``ignored``: validator fingerprints this client caught lying), and one line per refused attestation; (None,
    []) when the manifest has no admission rule."""
    rule = manifest.admission if manifest is not None else None
    if rule is None:
        return None, []
    scores, notes = verified_scores(attestations, manifest, rule)
    by_cluster: dict[int, dict[str, int]] = {}
    for r in records:
        if r.state == "online" and r.cluster is not None:
            by_cluster.setdefault(r.cluster, {})[r.checkpoint_sha256] = r.cluster
    out: dict[tuple[str, int], Verdict] = {}
    for k, announced in by_cluster.items():  # one decision per cluster: a checkpoint may be announced for several
        for sha, v in decide(rule, [a for a in scores if a.cluster == k], announced, ignored).items():
            out[(sha, k)] = v
    return out, notes


def describe(v: Verdict | None) -> str:
    """``admitted (score 0.123)`` or ``probation: why`` (``swarm status``, the dashboard)."""
    if v is None:
        return "probation: no attestation yet"
    return f"admitted (score {v.score:.4g})" if v.admitted else f"probation: {v.reason.removeprefix('on probation: ')}"
