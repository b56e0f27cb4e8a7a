"""Who decides what a swarm is: owner keys, fingerprints, swarm names and signed manifests (pure).

A swarm has an **owner**: whoever holds its owner key (an RSA key file, the libp2p identity format;
``swarm up`` makes one in its run dir, a founding ``diffswarm peer --router`` uses ``--owner-key`` or its
own identity key). Users name a swarm ``NAME@FINGERPRINT``, e.g. ``fashion@3f9a0c...`` (32 hex digits),
where the fingerprint is that of the owner's public key. The name is also the prefix of the swarm's
DHT keys.

The owner signs a **manifest** (``records.SwarmManifest``: partition hash, router file and weights
hashes, router size, dataset id, K, image shape, classes, protocol, issue time); the manifest carries the
owner's public key and the signature, so any peer can re-announce it unchanged under its own DHT
subkey and the swarm outlives its founder. A client accepts a manifest only if

1. the public key's fingerprint is the one in the swarm's name,
2. the manifest names the same NAME,
3. the signature verifies over ``canonical_bytes`` of every other field (unknown fields included, so
   an older reader verifies a newer owner's manifest and then ignores what it does not know),

and among the valid ones it takes the newest by issue time (``choose_manifest``). A crowd of fresh
peer ids (a Sybil attack) can announce as many other manifests as it likes: none carries a key with
the owner's fingerprint and a valid signature, so none is chosen. Router bytes may come from anyone;
the client checks them against the manifest's sha256.

Fingerprint: the first 32 hex digits (128 bits) of sha256 over the public key's DER
(SubjectPublicKeyInfo). Taking over a swarm means finding *another* key whose fingerprint matches
the name: a second preimage of a 128-bit truncated sha256, about 2**128 hash evaluations whatever
the attacker's key-generation tricks (varying the public exponent is refused anyway: owner keys must
use e = 65537, 2048 to 4096 bits). The birthday bound (2**64) does not apply: it only lets someone
make two keys of their own with one fingerprint, i.e. attack a swarm they already own. 96 bits
(24 digits) would already cost ~2**96 (years of today's whole Bitcoin network); 128 leaves a margin
for the name's lifetime at the price of 8 more characters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from diffswarm.dht.records import SwarmManifest
from diffswarm.dht.schema import MAX_MANIFEST_BYTES, RecordError

DEFAULT_SWARM_NAME = "diffswarm"  # NAME of a swarm founded without one
FINGERPRINT_HEX = 32  # hex digits of sha256(owner public key DER) in a swarm's name (128 bits)
OWNER_KEY_BITS = (2048, 4096)  # accepted RSA modulus sizes of an owner key
OWNER_KEY_EXPONENT = 65537
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FP_RE = re.compile(r"^[0-9a-fA-F]+$")
HOW_TO_NAME = ("a swarm is named NAME@FINGERPRINT (its owner key's fingerprint, 32 hex digits), as printed by "
               "`diffswarm swarm up` and by the founding `diffswarm peer --router`; a local swarm's full name is "
               "in RUN_DIR/swarm.json")


class SwarmNameError(ValueError):
    """A swarm name that is not ``NAME@FINGERPRINT``; the message says how to get the full name."""


@dataclass(frozen=True)
class SwarmName:
    """``NAME@FINGERPRINT``: what the user types, and the prefix of the swarm's DHT keys."""

    name: str  # [A-Za-z0-9][A-Za-z0-9_.-]{0,63}
    fingerprint: str  # FINGERPRINT_HEX lowercase hex digits

    def __str__(self) -> str:
        return f"{self.name}@{self.fingerprint}"


def check_bare_name(name: str) -> str:
    """``name`` if it is a valid NAME (the part before ``@``), else ``SwarmNameError``."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SwarmNameError(f"swarm name {name!r} must be 1-64 characters of letters, digits, '_', '.', '-' "
                             "(starting with a letter or digit)")
    return name


def parse_swarm_name(text: str) -> SwarmName:
    """``NAME@FINGERPRINT`` -> ``SwarmName``; anything else raises ``SwarmNameError`` saying how to get the
    full name. The fingerprint is case-insensitive (stored lowercase)."""
    if not isinstance(text, str) or "@" not in text:
        raise SwarmNameError(f"swarm {text!r} has no owner fingerprint: {HOW_TO_NAME}")
    name, _, fp = text.partition("@")
    check_bare_name(name)
    if not _FP_RE.match(fp) or len(fp) != FINGERPRINT_HEX:
        raise SwarmNameError(f"swarm {text!r}: the fingerprint after '@' must be {FINGERPRINT_HEX} hex digits "
                             f"(got {len(fp)} characters); {HOW_TO_NAME}")
    return SwarmName(name, fp.lower())


def is_full_name(text: str | None) -> bool:
    try:
        parse_swarm_name(text)
    except SwarmNameError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# owner keys


def public_key_der(private_key) -> bytes:
    """DER (SubjectPublicKeyInfo) of a ``hivemind.utils.crypto.RSAPrivateKey``'s public key."""
    from cryptography.hazmat.primitives import serialization

    pub = serialization.load_ssh_public_key(private_key.get_public_key().to_bytes())
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_fingerprint(der: bytes) -> str:
    """The fingerprint of an owner public key: the first ``FINGERPRINT_HEX`` hex digits of sha256(DER)."""
    return hashlib.sha256(der).hexdigest()[:FINGERPRINT_HEX]


def swarm_name_of(name: str, private_key) -> SwarmName:
    """The full name of swarm ``name`` owned by ``private_key``."""
    return SwarmName(check_bare_name(name), key_fingerprint(public_key_der(private_key)))


def load_owner_key(der: bytes):
    """The ``RSAPublicKey`` in ``der``, or ``RecordError`` unless it is a canonical DER RSA key of
    ``OWNER_KEY_BITS`` with exponent 65537."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from hivemind.utils.crypto import RSAPublicKey

    try:
        key = serialization.load_der_public_key(der)
    except Exception as e:  # malformed key material from the network
        raise RecordError(f"owner key is not a DER public key: {type(e).__name__}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise RecordError(f"owner key is a {type(key).__name__}, not RSA")
    if not OWNER_KEY_BITS[0] <= key.key_size <= OWNER_KEY_BITS[1] or key.public_numbers().e != OWNER_KEY_EXPONENT:
        raise RecordError(f"owner key has {key.key_size} bits and exponent {key.public_numbers().e}; owner keys are "
                          f"RSA {OWNER_KEY_BITS[0]}-{OWNER_KEY_BITS[1]} bits with exponent {OWNER_KEY_EXPONENT}")
    if key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != der:
        raise RecordError("owner key is not in canonical DER")
    return RSAPublicKey(key)


# ---------------------------------------------------------------------------------------------
# signing


def sign_manifest(private_key, fields: dict) -> SwarmManifest:
    """The manifest of ``fields`` (every ``SwarmManifest`` field but ``owner_key`` and ``signature``; a
    newer version's extra fields are signed too), signed by the owner's ``hivemind.utils.crypto.RSAPrivateKey``."""
    draft = SwarmManifest.from_dict({**fields, "owner_key": public_key_der(private_key), "signature": b"-"})
    return dataclasses.replace(draft, signature=private_key.sign(draft.signed_bytes()))


def verify_manifest(m: SwarmManifest, name: SwarmName) -> None:
    """``RecordError`` unless ``m`` is signed by the owner key of swarm ``name`` (fingerprint, NAME and
    signature, in that order: the RSA check runs only for keys with the right fingerprint)."""
    fp = key_fingerprint(m.owner_key)
    if fp != name.fingerprint:
        raise RecordError(f"manifest for {m.swarm}@{fp} is not signed by the owner of {name} (another key)")
    if m.swarm != name.name:
        raise RecordError(f"manifest names swarm {m.swarm!r}, not {name.name!r}")
    pub = load_owner_key(m.owner_key)
    data = m.signed_bytes()
    if len(data) > MAX_MANIFEST_BYTES:
        raise RecordError(f"manifest is {len(data)} bytes, at most {MAX_MANIFEST_BYTES}")
    if not pub.verify(data, m.signature):
        raise RecordError(f"manifest of {name} issued at {m.issued:.0f} has a bad signature")


def choose_manifest(manifests: Iterable[SwarmManifest], name: SwarmName, *, pin: str | None = None,
                    floor: float | None = None) -> tuple[SwarmManifest | None, list[str]]:
    """The owner's newest valid manifest among ``manifests`` (any announcer, any number of copies).

    ``pin``: only manifests whose router file or weights sha256 starts with it (the user's choice of
    an owner-signed router; ``floor`` does not apply then). ``floor``: the newest issue time this client
    accepted before; older manifests are a rollback and are refused. Returns (manifest or None,
    one line per manifest not used, e.g. forged or badly signed ones)."""
    notes: list[str] = []
    valid: list[SwarmManifest] = []
    seen: set[tuple[bytes, bytes]] = set()
    for m in manifests:
        # the same manifest re-announced by several peers, told apart by what is signed and the signature: a forgery
        # reusing the owner's signature over other fields must not hide the genuine manifest
        key = (m.signed_bytes(), m.signature)
        if key in seen:
            continue
        seen.add(key)
        try:
            verify_manifest(m, name)
        except RecordError as e:
            notes.append(str(e))
            continue
        valid.append(m)
    if pin:
        valid = [m for m in valid if m.router_sha256.startswith(pin) or m.router_weights_sha256.startswith(pin)]
    elif floor is not None:
        older = [m for m in valid if m.issued < floor]
        valid = [m for m in valid if m.issued >= floor]
        if older and not valid:
            notes.append(f"only manifests older than the newest this client accepted (issued {floor:.0f}) are "
                         "announced: refusing a rollback")
    if not valid:
        return None, notes
    return max(valid, key=lambda m: (m.issued, m.signature)), notes
