"""Validators' signed scores (``records.AttestationRecord``): signing, verifying, and reading them from the DHT.

Attestations live under ``{swarm}_attest``, subkey ``[owner:<announcing peer key>]/<sha256 prefix>/<cluster>/
<validator fingerprint>``, announced by the validator's peer (its signature is what counts, not the announcer).
A client counts an attestation only if (``verify_attestation``) its validator key's fingerprint is one the owner's
manifest names (``AdmissionRule.validators``), it is for this swarm and the manifest's partition and seed, and the
key's RSA-PSS signature verifies over ``AttestationRecord.signed_bytes``. Size: ~1 KB each with an RSA-2048 key
(the key's DER is 294 bytes, the signature's base64 344).
"""

from __future__ import annotations

import dataclasses

from diffswarm.admission.rule import AdmissionRule, Attested
from diffswarm.dht.entries import parse_entries
from diffswarm.dht.names import key_fingerprint, load_owner_key, public_key_der
from diffswarm.dht.records import AttestationRecord, SwarmManifest
from diffswarm.dht.schema import RecordError


def sign_attestation(private_key, fields: dict) -> AttestationRecord:
    """The attestation of ``fields`` (every field but ``validator_key`` and ``signature``) signed by a validator's
    ``hivemind.utils.crypto.RSAPrivateKey``."""
    draft = AttestationRecord.from_dict({**fields, "validator_key": public_key_der(private_key), "signature": b"-"})
    return dataclasses.replace(draft, signature=private_key.sign(draft.signed_bytes()))


def verify_attestation(a: AttestationRecord, manifest: SwarmManifest, rule: AdmissionRule) -> Attested:
    """The ``Attested`` score of ``a``, or ``RecordError`` unless it is signed by one of the rule's validators for
    this swarm, partition, K and seed."""
    fp = key_fingerprint(a.validator_key)
    if fp not in rule.validators:
        raise RecordError(f"attestation by key {fp[:12]}, not a validator the owner names")
    if (a.swarm, a.partition_hash, a.num_clusters, a.seed) != (manifest.swarm, manifest.partition_hash,
                                                               manifest.num_clusters, rule.seed):
        raise RecordError(f"attestation by {fp[:12]} is for another swarm, partition, K or seed")
    if not load_owner_key(a.validator_key).verify(a.signed_bytes(), a.signature):
        raise RecordError(f"attestation by {fp[:12]} of {a.checkpoint_sha256[:12]} has a bad signature")
    return Attested(a.checkpoint_sha256, a.cluster, a.score, a.baseline, fp)


def parse_attestations(entries: dict, now: float | None = None) -> tuple[list[AttestationRecord], list[str]]:
    """Well-formed attestations from the ``{swarm}_attest`` dictionary whose ``peer_id`` is the announcing key's
    (signatures are checked by ``verify_attestation``); those from the future are rejected. (records, errors)."""
    return parse_entries(entries, AttestationRecord, now, what="attestation", time_of=lambda r: r.issued,
                         max_age=None)


def verified_scores(records: list[AttestationRecord], manifest: SwarmManifest, rule: AdmissionRule,
                    subject: str = "checkpoint") -> tuple[list[Attested], list[str]]:
    """The attestations among ``records`` that verify (``verify_attestation``), each distinct signed content checked
    once (copies re-announced by several peers count once; a forgery reusing a genuine signature is its own entry,
    so it cannot shadow the genuine one), and one line per refused one."""
    out, notes, seen = [], [], set()
    for a in records:
        if a.subject != subject:
            continue
        key = (a.signed_bytes(), a.signature)
        if key in seen:
            continue
        seen.add(key)
        try:
            out.append(verify_attestation(a, manifest, rule))
        except RecordError as e:
            notes.append(str(e))
    return out, notes


def attested_stats(records: list[AttestationRecord], manifest: SwarmManifest) -> list[set[str]]:
    """Per cluster of ``manifest``, the sha256 of the statistics blobs at least ``quorum`` of its rule's validators
    attested (``subject = "stats"``: they recomputed them from the data); all empty without a rule."""
    rule = manifest.admission
    out: list[set[str]] = [set() for _ in range(manifest.num_clusters)]
    if rule is None:
        return out
    scores, _ = verified_scores(records, manifest, rule, subject="stats")
    by: dict[tuple[str, int], set[str]] = {}
    for a in scores:
        by.setdefault((a.checkpoint_sha256, a.cluster), set()).add(a.validator)
    for (sha, k), validators in by.items():
        if len(validators) >= rule.quorum and 0 <= k < manifest.num_clusters:
            out[k].add(sha)
    return out


class AttestationMemory:
    """The attestations a reader has seen, by signed content: a DHT lookup may miss some (a slow node, a value
    between re-announcements), and a verdict made without a cluster's best checkpoint would admit worse ones. An
    attestation is a signed fact about immutable bytes, so remembering it is safe; at most ``cap`` are kept (the
    oldest seen go first)."""

    def __init__(self, cap: int = 4096):
        self.cap = cap
        self.known: dict[tuple[bytes, bytes], AttestationRecord] = {}

    def update(self, records: list[AttestationRecord]) -> list[AttestationRecord]:
        """Add ``records``; returns every remembered attestation."""
        for a in records:
            key = (a.signed_bytes(), a.signature)
            self.known.pop(key, None)
            self.known[key] = a  # most recently seen last
        while len(self.known) > self.cap:
            del self.known[next(iter(self.known))]
        return list(self.known.values())
