"""The owner's admission rule and the pure decision over validators' attested scores (no network, no clock).

The rule (``AdmissionRule``) is signed in the owner's manifest (``SwarmManifest.extra["admission"]``): which
validator keys count (their fingerprints, by default the owner's own), how many distinct validators must attest
a checkpoint (``quorum``), the seed of the scored triples, and the two bounds a checkpoint's score must meet:

- at most ``ceiling`` times the loss of predicting v = 0 on the same triples (an untrained, randomly initialised
  or barely trained expert scores close to that loss);
- at most ``ratio`` times the best score among the cluster's checkpoints that meet the ceiling (an expert trained
  on another cluster's data, or truncated, scores well above the cluster's best).

``decide`` turns the attestations a client holds into one ``Verdict`` per announced checkpoint: admitted with its
score, or on probation with the reason. It does not depend on the order checkpoints arrived in: a bad checkpoint
admitted while it was its cluster's only one is dropped as soon as a much better one is attested.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

ADMISSION_FIELD = "admission"  # the manifest field holding the rule (SwarmManifest.extra)
DEFAULT_RATIO = 1.25
DEFAULT_CEILING = 0.8
MAX_VALIDATORS = 16


@dataclass(frozen=True)
class AdmissionRule:
    """Who validates and what a checkpoint's score must meet (module docstring)."""

    validators: tuple[str, ...]  # fingerprints (32 hex digits, ``dht.names.key_fingerprint``) of validator keys
    seed: int  # seed of the scored (image, t, noise) triples (``admission.score``)
    ratio: float = DEFAULT_RATIO  # score <= ratio x the cluster's best admitted score
    ceiling: float = DEFAULT_CEILING  # score <= ceiling x the v=0 loss on the same triples
    quorum: int = 1  # distinct validators that must attest a checkpoint

    def to_field(self) -> dict:
        return {"validators": list(self.validators), "seed": int(self.seed), "ratio": float(self.ratio),
                "ceiling": float(self.ceiling), "quorum": int(self.quorum)}

    @classmethod
    def from_field(cls, d) -> AdmissionRule:
        """The rule in a manifest's ``admission`` field; ``ValueError`` saying what is wrong."""
        if not isinstance(d, dict):
            raise ValueError("admission must be a dict")
        vals, seed, ratio, ceiling, quorum = (d.get(k) for k in ("validators", "seed", "ratio", "ceiling", "quorum"))
        if not (isinstance(vals, list) and 1 <= len(vals) <= MAX_VALIDATORS and all(
                isinstance(v, str) and len(v) == 32 and all(c in "0123456789abcdef" for c in v) for v in vals)):
            raise ValueError(f"admission validators must be 1..{MAX_VALIDATORS} key fingerprints (32 hex digits)")
        if not (type(seed) is int and 0 <= seed < 2**63):
            raise ValueError("admission seed must be an int in 0..2**63-1")
        if not (type(ratio) is float and math.isfinite(ratio) and ratio >= 1.0):
            raise ValueError("admission ratio must be a float >= 1")
        if not (type(ceiling) is float and 0.0 < ceiling <= 1.0):
            raise ValueError("admission ceiling must be a float in (0, 1]")
        if not (type(quorum) is int and 1 <= quorum <= len(vals)):
            raise ValueError(f"admission quorum must be an int in 1..{len(vals)} (the validators named)")
        return cls(tuple(vals), seed, ratio, ceiling, quorum)


@dataclass(frozen=True)
class Attested:
    """One attestation as the rule sees it (signature and validator already checked by the caller)."""

    checkpoint_sha256: str
    cluster: int
    score: float
    baseline: float  # loss of v = 0 on the same triples
    validator: str  # fingerprint of the validator key


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    score: float | None  # the attested score (median over validators); None: not attested yet
    reason: str  # why not admitted, or "" when admitted


def decide(rule: AdmissionRule, attested: Iterable[Attested], announced: dict[str, int],
           ignored: Iterable[str] = ()) -> dict[str, Verdict]:
    """A ``Verdict`` for each announced checkpoint (``{sha256: cluster}``) from the attestations of the rule's
    validators (``ignored``: validators this client caught lying; their attestations do not count)."""
    skip = set(ignored)
    by: dict[tuple[str, int], dict[str, Attested]] = {}
    for a in attested:
        if a.validator in rule.validators and a.validator not in skip:
            by.setdefault((a.checkpoint_sha256, a.cluster), {})[a.validator] = a
    scored: dict[str, tuple[float, float]] = {}
    out: dict[str, Verdict] = {}
    for sha, k in announced.items():
        got = by.get((sha, k), {})
        if len(got) < rule.quorum:
            out[sha] = Verdict(False, None, f"on probation: {len(got)} of {rule.quorum} validator attestation(s) "
                                            f"for cluster {k} so far")
            continue
        scored[sha] = (statistics.median(a.score for a in got.values()),
                       statistics.median(a.baseline for a in got.values()))
    best: dict[int, float] = {}
    for sha, (s, base) in scored.items():
        if s <= rule.ceiling * base:
            k = announced[sha]
            best[k] = min(best.get(k, math.inf), s)
    for sha, (s, base) in scored.items():
        k = announced[sha]
        if s > rule.ceiling * base:
            out[sha] = Verdict(False, s, f"score {s:.4g} is above the ceiling {rule.ceiling * base:.4g} "
                                         f"({rule.ceiling:g} x the loss of predicting v=0): untrained?")
        elif s > rule.ratio * best[k]:
            out[sha] = Verdict(False, s, f"score {s:.4g} vs best {best[k]:.4g} for cluster {k} (more than "
                                         f"{rule.ratio:g}x): trained on other data, or too briefly?")
        else:
            out[sha] = Verdict(True, s, "")
    return out
