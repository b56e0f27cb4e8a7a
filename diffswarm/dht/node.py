"""The DHT shell: one hivemind ``P2P`` daemon and one ``DHTNode`` in the caller's asyncio loop.

Design choice (documented in docs/protocol.md): peers and clients run hivemind's ``DHTNode``
directly in their own event loop on a ``P2P`` they create, instead of the forked ``hivemind.DHT``
process. One loop and one p2pd per peer: the same daemon carries the DHT and the expert RPCs, so
the peer id in a record is the peer id serving the calls, and no pipes or forked processes sit
between the sampler and the network.

Identity: the libp2p identity file is an RSA key (``P2P.generate_identity``); the same key signs
the peer's DHT records (``RSASignatureValidator``), which is what lets readers check that a
record's ``peer_id`` belongs to its signer (``entries.parse_entries``). Without ``identity_path``
an ephemeral identity is written to a temporary file and removed at shutdown. A swarm's owner key
(``names``) is a key file of the same format, read with ``load_identity``.

The ``swarm`` of a node is the prefix of its DHT keys: a swarm's full name ``NAME@FINGERPRINT``, or
None for a plain DHT node (it runs no schema validator, only signature checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.dht.validation import CompositeValidator
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from diffswarm.dht.entries import (
    attest_key,
    experts_key,
    make_validators,
    manifest_key,
    parse_entries,
    parse_manifests,
    routers_key,
    stats_key,
)
from diffswarm.dht.records import AttestationRecord, ClusterStatsRecord, ExpertRecord, RouterProvider, SwarmManifest
from diffswarm.utils.signals import disown_sockets, exited, new_sockets_owned, own_sockets, remove_dead_sockets

logger = logging.getLogger(__name__)
K_TTL = 60.0  # seconds a SwarmDHT remembers K of the owner's manifest (``num_clusters``)
CACHE_NEAREST = 0  # nodes a found value is copied to after a lookup (hivemind's default is 1; see SwarmDHT.create)
SOCKETS = "/tmp/hivemind-p2p*.sock"  # where p2pd and its clients put their unix sockets


class SwarmNetworkError(RuntimeError):
    """The p2p daemon could not start or could not reach the initial peers."""


@dataclass
class NetworkConfig:
    """How a node joins the swarm's network (one field per p2pd/DHT knob we expose)."""

    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of running nodes; empty: new swarm
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])  # where to listen
    announce_maddrs: list[str] = field(default_factory=list)  # public addresses to tell others (NAT, docker)
    identity_path: str | None = None  # RSA identity file (created if missing); None: ephemeral
    client_mode: bool = False  # cannot be reached by others: DHT client only, serves nothing
    use_relay: bool = True  # allow libp2p circuit relays (reach / be reached through NAT)
    use_auto_relay: bool = False  # look for relays to become reachable when behind NAT
    auto_nat: bool = True  # AutoNAT reachability probing
    nat_port_map: bool = True  # UPnP / NAT-PMP port mapping
    check_identity: bool = True  # refuse an identity already online (one extra daemon start)
    wait_timeout: float = 3.0  # DHT RPC timeout, seconds

    @classmethod
    def loopback(cls, initial_peers=(), **kw) -> NetworkConfig:
        """127.0.0.1 only, no NAT traversal, no relays: local swarms and tests."""
        base = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_relay=False, auto_nat=False, nat_port_map=False,
                    check_identity=False)
        base.update(kw)
        return cls(initial_peers=list(initial_peers), **base)


def load_identity(path: str | os.PathLike) -> RSAPrivateKey:
    """The RSA private key inside a libp2p identity file (as written by ``P2P.generate_identity``)."""
    with open(path, "rb") as f:
        pb = crypto_pb2.PrivateKey.FromString(f.read())
    if pb.key_type != crypto_pb2.KeyType.RSA:
        raise ValueError(f"identity {path} holds a {crypto_pb2.KeyType.Name(pb.key_type)} key; diffswarm needs "
                         "an RSA identity (delete it to let diffswarm create one)")
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": pb.data})  # RSAPrivateKey's own unpickling path (DER bytes)
    return key


def load_or_create_key(path: str | os.PathLike) -> tuple[RSAPrivateKey, bool]:
    """(key, created): the RSA key of identity file ``path``, written first (mode 0400) if missing."""
    created = not os.path.isfile(path)
    if created:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))
    return load_identity(path), created


@dataclass
class Identity:
    """A node's libp2p identity file and key (``open_identity``)."""

    path: str
    key: RSAPrivateKey
    existed: bool  # the file was there before (then an online check may apply)
    ephemeral: bool  # a temporary file, removed at shutdown


def open_identity(path: str | None) -> Identity:
    """The identity at ``path`` (created if missing), or a fresh ephemeral one in a temporary file."""
    if path is None:
        fd, tmp = tempfile.mkstemp(prefix="diffswarm-identity-")
        os.close(fd)
        os.unlink(tmp)
        P2P.generate_identity(tmp)
        return Identity(tmp, load_identity(tmp), existed=False, ephemeral=True)
    key, created = load_or_create_key(path)
    return Identity(str(path), key, existed=not created, ephemeral=False)


def identity_peer_id(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return PeerID.from_identity(f.read()).to_base58()


class SwarmDHT:
    """P2P + DHTNode with diffswarm's validators, and typed announce / lookup of records."""

    def __init__(self, swarm: str | None, p2p: P2P, node: DHTNode, private_key: RSAPrivateKey, owner: bytes,
                 ephemeral_identity: str | None):
        self.swarm, self.p2p, self.node = swarm, p2p, node
        self.private_key, self.owner = private_key, owner  # owner: b"[owner:ssh-rsa ...]"
        self._ephemeral = ephemeral_identity
        self._k: tuple[int, float] | None = None  # (K of the owner's manifest, when read: time.monotonic)

    @property
    def peer_id(self) -> PeerID:
        return self.p2p.peer_id

    @classmethod
    async def create(cls, net: NetworkConfig, swarm: str | None = None, identity: Identity | None = None) -> SwarmDHT:
        """Start the daemon and the DHT node. ``swarm``: key prefix (full swarm name; None: a plain DHT node).
        ``identity``: from ``open_identity`` (default: ``open_identity(net.identity_path)``); this node owns
        it from here on (an ephemeral one is removed at shutdown or on failure)."""
        ident = identity or open_identity(net.identity_path)
        ephemeral = ident.path if ident.ephemeral else None
        identity, existed, key = ident.path, ident.existed, ident.key
        validators = make_validators(swarm, key)
        p2p = None
        with new_sockets_owned(SOCKETS) as new_sockets:  # the daemon's sockets are this process's from the start
            try:
                p2p = await P2P.create(
                    initial_peers=net.initial_peers or None,
                    host_maddrs=net.host_maddrs,
                    announce_maddrs=net.announce_maddrs or None,
                    identity_path=identity,
                    check_if_identity_free=net.check_identity and existed,
                    use_relay=net.use_relay,
                    use_auto_relay=net.use_auto_relay,
                    auto_nat=net.auto_nat,
                    nat_port_map=net.nat_port_map,
                    dht_mode="client" if net.client_mode else "server",
                )
                node = await DHTNode.create(
                    p2p=p2p,
                    initial_peers=net.initial_peers or None,
                    client_mode=net.client_mode,
                    record_validator=CompositeValidator(validators),
                    wait_timeout=net.wait_timeout,
                    # hivemind's default (1) uploads every value a lookup finds to a nearby node's cache. Every swarm
                    # lookup reads the newest entries (``_get_many``), so such copies only answer later lookups again:
                    # at 1,000 volunteers a client uploaded ~10 MB at start-up (bench/dht_volunteers.py)
                    cache_nearest=CACHE_NEAREST,
                    # a client's own cache would answer its partial lookups (``newest=False``) from an earlier
                    # lookup, never seeing a peer that joined since; servers keep it (hivemind's default)
                    cache_locally=not net.client_mode,
                )
            except BaseException as e:
                if p2p is not None:
                    await p2p.shutdown()
                if ephemeral and os.path.exists(ephemeral):
                    os.unlink(ephemeral)
                new = new_sockets()
                # a daemon still dying keeps its socket for now: registered, it is removed once dead (by
                # stop_children or the process's exit), even after this block's claim ended
                own_sockets(sorted(new - set(remove_dead_sockets(new))))
                if isinstance(e, Exception) and not isinstance(e, ValueError):
                    where = " ".join(net.initial_peers) or "(new swarm)"
                    raise SwarmNetworkError(f"could not join the swarm via {where}: {e}") from e
                raise
            signer = next(v for v in validators if isinstance(v, RSASignatureValidator))
            dht = cls(swarm, p2p, node, key, signer.local_public_key, ephemeral)
            own_sockets(dht.socket_paths())  # removed at exit if the daemon dies before this node shuts down
        return dht

    def socket_paths(self) -> list[str]:
        """The unix sockets of this node's p2pd (left in /tmp if the process is killed)."""
        out = []
        for m in (self.p2p.daemon_listen_maddr, getattr(self.p2p, "_client_listen_maddr", None)):
            with contextlib.suppress(KeyError, TypeError):
                out.append(m["unix"])
        return out

    async def visible_maddrs(self) -> list[str]:
        """Multiaddrs (with /p2p/<id>) others should pass as --initial-peers."""
        return [str(a) for a in await self.p2p.get_visible_maddrs()]

    async def announce_expert(self, rec: ExpertRecord, expiration: float) -> bool:
        """Store ``rec`` under this peer's subkey for ``expiration`` seconds from now."""
        return await self.node.store(experts_key(self.swarm, rec.cluster), rec.to_dict(), get_dht_time() + expiration,
                                     subkey=self.owner + rec.subkey_suffix)

    async def announce_provider(self, rec: RouterProvider, expiration: float) -> bool:
        """Say that this peer serves the router bytes of ``rec`` (under this peer's own subkey)."""
        return await self.node.store(routers_key(self.swarm), rec.to_dict(), get_dht_time() + expiration,
                                     subkey=self.owner)

    async def announce_stats(self, rec: ClusterStatsRecord, expiration: float) -> bool:
        """Publish this peer's cluster statistics (under this peer's subkey for that cluster)."""
        return await self.node.store(stats_key(self.swarm, rec.cluster), rec.to_dict(), get_dht_time() + expiration,
                                     subkey=self.owner + rec.subkey_suffix)

    async def announce_attestation(self, rec: AttestationRecord, expiration: float) -> bool:
        """Announce a validator's signed score (under this peer's subkey for that checkpoint, cluster and validator)."""
        return await self.node.store(attest_key(self.swarm, rec.cluster), rec.to_dict(), get_dht_time() + expiration,
                                     subkey=self.owner + rec.subkey_suffix)

    async def get_attestations(self, clusters: Iterable[int] | None = None
                               ) -> tuple[list[AttestationRecord], list[str]]:
        """Well-formed attestations announced by anyone for ``clusters`` (None: every cluster of the owner's
        manifest); signatures: ``attestations.verify_attestation``."""
        from diffswarm.dht.attestations import parse_attestations

        keys = {attest_key(self.swarm, k): k for k in await self._clusters(clusters, whole=False)}
        return _by_cluster(await self._get_many(keys), keys, lambda e: parse_attestations(e, get_dht_time()))

    async def announce_manifest(self, manifest: SwarmManifest, expiration: float) -> bool:
        """Re-announce the owner-signed ``manifest`` unchanged, under this peer's own subkey."""
        return await self.node.store(manifest_key(self.swarm), manifest.to_dict(), get_dht_time() + expiration,
                                     subkey=self.owner)

    async def _get_entries(self, key: str, expirations: dict | None = None) -> dict:
        """``{subkey: value}`` of a dictionary key; fills ``expirations`` (if given) with each subkey's DHT
        expiration time (signed with the value: a storing node cannot extend it)."""
        return (await self._get_many({key: None}, expirations))[key]

    async def _get_many(self, keys: Iterable[str], expirations: dict | None = None,
                        newest: bool = True) -> dict[str, dict]:
        """``{key: {subkey: value}}`` of several dictionary keys, looked up together (one DHT traversal; hivemind
        asks a node for up to ``chunk_size`` keys per call); ``expirations`` as in ``_get_entries``.

        ``newest``: merge the answers of every node that stores each key (each entry arrives from ~5 nodes);
        otherwise stop at the first answer holding a live entry (~1/6 of the bytes at 1,000 volunteers, measured
        in docs/performance.md section 7), which may lack an entry that node has not received."""
        if not self.swarm:
            raise ValueError("a plain DHT node (no swarm name) has no swarm records")
        keys = list(keys)
        enough = float("inf") if newest else get_dht_time()
        found = await self.node.get_many(keys, sufficient_expiration_time=enough) if keys else {}
        out: dict[str, dict] = {}
        for key in keys:
            got = found.get(key)
            if got is None or not isinstance(got.value, dict):
                out[key] = {}
                continue
            if expirations is not None:
                expirations.update({sk: float(v.expiration_time) for sk, v in got.value.items()})
            out[key] = {sk: v.value for sk, v in got.value.items()}
        return out

    async def num_clusters(self) -> int | None:
        """K of the owner's newest validly signed manifest (remembered for ``K_TTL`` seconds), or None when none is
        announced (or this node's swarm is not a full ``NAME@FINGERPRINT``)."""
        if self._k is not None and time.monotonic() - self._k[1] < K_TTL:
            return self._k[0]
        from diffswarm.dht.names import SwarmNameError, choose_manifest, parse_swarm_name

        try:
            name = parse_swarm_name(self.swarm or "")
        except SwarmNameError:
            return None
        manifest, _ = choose_manifest((await self.get_manifests())[0], name)
        if manifest is None:
            return None
        self._k = (manifest.num_clusters, time.monotonic())
        return manifest.num_clusters

    async def _clusters(self, clusters: Iterable[int | None] | None, whole: bool) -> list[int | None]:
        """``clusters``, or (None) every cluster of the owner's manifest, with None (the experts trained on all data)
        first when ``whole``; just [None] / [] while no manifest is announced."""
        if clusters is not None:
            return list(dict.fromkeys(clusters))
        k = await self.num_clusters()
        return ([None] if whole else []) + list(range(k or 0))

    async def get_experts(self, clusters: Iterable[int | None] | None = None) -> tuple[list[ExpertRecord], list[str]]:
        """Valid expert records of ``clusters`` (None: every cluster of the owner's manifest and the experts trained
        on all data), and one error line per skipped invalid record (forged, malformed, oversized, from the future,
        stale, or under another cluster's key)."""
        recs, errors, _ = await self.get_experts_expiring(clusters)
        return recs, errors

    async def get_experts_expiring(self, clusters: Iterable[int | None] | None = None, newest: bool = True
                                   ) -> tuple[list[ExpertRecord], list[str], dict[tuple[str, str], float]]:
        """``get_experts`` plus how long each record has left in the DHT: ``{(peer_id, expert_id): seconds}``;
        ``newest`` as in ``_get_many`` (False: a cheaper lookup that may miss an entry)."""
        expirations: dict = {}
        keys = {experts_key(self.swarm, k): k for k in await self._clusters(clusters, whole=True)}
        found = await self._get_many(keys, expirations, newest)
        now = get_dht_time()
        recs, errors = _by_cluster(found, keys, lambda e: parse_entries(e, ExpertRecord, now))
        left = {}
        for entries in found.values():
            for sk, value in entries.items():  # parse_entries checked each kept record's subkey owns it
                if isinstance(value, dict) and sk in expirations:
                    key = (value.get("peer_id"), value.get("expert_id"))
                    left[key] = max(left.get(key, 0.0), expirations[sk] - now)
        return recs, errors, left

    async def get_providers(self) -> tuple[list[RouterProvider], list[str]]:
        """Peers announcing router bytes (any router: the manifest says which one to use)."""
        return parse_entries(await self._get_entries(routers_key(self.swarm)), RouterProvider, get_dht_time())

    async def get_stats(self, clusters: Iterable[int] | None = None) -> tuple[list[ClusterStatsRecord], list[str]]:
        """Cluster statistics announced by peers for ``clusters`` (None: every cluster of the owner's manifest; whose
        blobs hash right); which to use is the client's choice (``client.discovery.choose_stats``)."""
        keys = {stats_key(self.swarm, k): k for k in await self._clusters(clusters, whole=False)}
        now = get_dht_time()
        return _by_cluster(await self._get_many(keys), keys, lambda e: parse_entries(e, ClusterStatsRecord, now))

    async def get_manifests(self) -> tuple[list[SwarmManifest], list[str]]:
        """Well-formed manifests announced by anyone; the owner's signature is checked by ``names.choose_manifest``."""
        return parse_manifests(await self._get_entries(manifest_key(self.swarm)), get_dht_time())

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Unregister the DHT's handlers, stop the daemon, remove its sockets. A daemon that already died is not
        asked anything (its control socket would never answer: hivemind would wait forever), nor one that does not
        answer within ``timeout``."""
        sockets = self.socket_paths()
        child = getattr(self.p2p, "_child", None)
        try:
            # a daemon that died is judged from /proc: its returncode is set only once this loop reaps it
            if child is None or (child.returncode is None and not exited(child.pid)):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.node.shutdown(), timeout)
        finally:
            await self.p2p.shutdown()
            # hivemind removes the daemon's socket only if the daemon was still running: one that died first (a
            # closed terminal's SIGHUP reaches the whole process group) leaves it in /tmp
            for path in sockets:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            disown_sockets(sockets)
            if self._ephemeral and os.path.exists(self._ephemeral):
                os.chmod(self._ephemeral, 0o600)
                os.unlink(self._ephemeral)


def _by_cluster(found: dict[str, dict], keys: dict[str, int | None], parse) -> tuple[list, list[str]]:
    """The records ``parse`` reads from each per-cluster key of ``found`` whose ``cluster`` is that key's (the DHT's
    validators already refuse others; a reader checks again), and the error lines."""
    out, errors = [], []
    for key, entries in found.items():
        recs, errs = parse(entries)
        errors += errs
        for r in recs:
            if r.cluster == keys[key]:
                out.append(r)
            else:
                errors.append(f"a record of cluster {r.cluster} under the key of cluster {keys[key]}")
    return out, errors
