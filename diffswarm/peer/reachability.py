"""Reachability before online: a peer asks other peers to dial it back at the addresses it means to announce.

Petals' ``check_direct_reachability`` habit (ask up to 5 peers, reachable when at least half of those that
answer could dial it), with the asked peer dialling the given addresses itself on a fresh connection:

- The asking side (``check_reachability``): before announcing ``online`` a peer sends its direct multiaddrs to
  up to ``MAX_ASKED_PEERS`` DHT peers (``rpc_dial_back``) and judges the answers (``reachability_verdict``, pure):
  ``direct`` (announce the addresses the others reached), ``unreachable`` (say what to do, ``advice``; announce
  relay addresses if it has them, else do not go online), ``alone`` (the first peer of a swarm: nobody to ask)
  or ``unknown`` (nobody answered: go online as before, and say so).
- The asked side (``DialBack``, behind ``ExpertServicer.rpc_dial_back``): checks the request
  (``dialback_targets``: at most ``MAX_DIALBACK_ADDRS`` TCP multiaddrs, only of the caller's own peer id, no
  relay circuits, loopback only within a loopback swarm), limits it (one request per caller per
  ``CALLER_PERIOD`` seconds, ``GLOBAL_RATE`` per second in all, ``MAX_CONCURRENT`` at once: busy otherwise)
  and dials them from a probe daemon started for that request and stopped after it (a ``P2P`` that listens
  nowhere, uses no relay and knows no other peer, so nothing of an earlier dial is reused), under
  ``DIAL_TIMEOUT``. libp2p's secure handshake checks the dialled peer's identity, so the
  answer is "the caller's own key answered there", and an address of another host only ever gets one
  connection attempt that fails. The answer is ``{"reachable": bool, "via": the address used or ""}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import time
from dataclasses import dataclass

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.multiaddr import Multiaddr

from diffswarm.dht.schema import MAX_ADDR_CHARS
from diffswarm.peer.limits import RateLimiter
from diffswarm.protocol.wire import PeerBusy, RequestError, dump_metadata, handle_name, load_metadata

logger = logging.getLogger(__name__)

MAX_DIALBACK_ADDRS = 4  # multiaddrs one request may name
DIAL_TIMEOUT = 5.0  # seconds the asked peer spends dialling one request's addresses
ASK_TIMEOUT = DIAL_TIMEOUT + 10.0  # seconds the asking peer waits for an answer (the probe may need to start)
MAX_ASKED_PEERS = 5  # peers asked (Petals: 5)
REACHABLE_SHARE = 0.5  # reachable when at least this share of the peers that answered could dial it (Petals: 0.5)
RELAY_WAIT = 60.0  # seconds an unreachable peer with --use-auto-relay waits for a relay address before giving up
CALLER_PERIOD = 30.0  # seconds between the dial-back requests of one caller (burst of 2)
GLOBAL_RATE = 0.5  # dial-back requests per second, all callers together (burst of 8)
MAX_CONCURRENT = 2  # dial-back requests in progress at once; busy above
_TRANSPORTS = ("ip4", "ip6", "dns", "dns4", "dns6")


def is_loopback(addr: str) -> bool:
    """Whether multiaddr ``addr`` names a loopback host (127.0.0.0/8, ::1, localhost) in its first component."""
    parts = addr.split("/")
    if len(parts) < 3 or parts[0]:
        return False
    if parts[1] in ("ip4", "ip6"):
        try:
            return ipaddress.ip_address(parts[2]).is_loopback
        except ValueError:
            return False
    return parts[1].startswith("dns") and parts[2] == "localhost"


def direct_addrs(addrs: list[str]) -> list[str]:
    """The addresses worth a dial-back check (at most ``MAX_DIALBACK_ADDRS``): TCP, not through a relay circuit,
    and not loopback unless the peer has only loopback addresses (a local swarm): others reach a loopback
    address on their own machine, and refuse to dial it."""
    out = [a for a in addrs if "/tcp/" in a and "/p2p-circuit" not in a]
    if any(not is_loopback(a) for a in out):
        out = [a for a in out if not is_loopback(a)]
    return out[:MAX_DIALBACK_ADDRS]


def dialback_targets(addrs, caller: str, allow_loopback: bool) -> list[str]:
    """The multiaddrs a dial-back request may make this peer dial, without ``/p2p``; ``RequestError`` on anything
    else: more than ``MAX_DIALBACK_ADDRS``, not ``/ip4|ip6|dns*/<host>/tcp/<port>[/p2p/<caller>]``, another peer's
    id, a relay circuit, port 0, or a loopback host when this peer is not itself on loopback only."""
    if not isinstance(addrs, list) or not addrs:
        raise RequestError("a dial-back request names a non-empty list of multiaddrs")
    if len(addrs) > MAX_DIALBACK_ADDRS:
        raise RequestError(f"a dial-back request names at most {MAX_DIALBACK_ADDRS} multiaddrs, got {len(addrs)}")
    out = []
    for a in addrs:
        if not isinstance(a, str) or len(a) > MAX_ADDR_CHARS:
            raise RequestError(f"a dial-back address is a multiaddr string of at most {MAX_ADDR_CHARS} characters")
        try:
            parts = list(Multiaddr(a).items())
        except Exception:
            raise RequestError(f"not a multiaddr: {a[:80]!r}") from None
        names = [p.name for p, _ in parts]
        if names not in (["ip4", "tcp"], ["ip6", "tcp"], ["ip4", "tcp", "p2p"], ["ip6", "tcp", "p2p"]) and not (
                names[:1] and names[0].startswith("dns") and names[1:] in (["tcp"], ["tcp", "p2p"])):
            raise RequestError(f"dial-back addresses are /ip4|ip6|dns/<host>/tcp/<port>[/p2p/<your id>]: {a[:80]!r}")
        if len(parts) == 3 and parts[2][1] != caller:
            raise RequestError("a dial-back address must carry the asking peer's own id")
        if int(parts[1][1]) == 0:
            raise RequestError(f"port 0 cannot be dialled: {a[:80]!r}")
        if is_loopback(a) and not allow_loopback:
            raise RequestError("this peer does not dial loopback addresses for others")
        out.append(str(Multiaddr("/".join(["", *[f"{p.name}/{v}" for p, v in parts[:2]]]))))
    return out


@dataclass(frozen=True)
class Verdict:
    """What the dial-back answers say about a peer's addresses."""

    kind: str  # direct | unreachable | alone | unknown
    reachable: tuple[str, ...]  # the peer's own addresses others reached (direct only)
    asked: int  # peers asked
    answered: int  # peers that answered
    yes: int  # peers that reached it


def reachability_verdict(addrs: list[str], answers: list[dict | None], share: float = REACHABLE_SHARE) -> Verdict:
    """Judge dial-back ``answers`` (one per asked peer: ``{"reachable": bool, "via": addr}``, None for no answer)
    about ``addrs``: ``direct`` when at least ``share`` of the answering peers reached the peer (then
    ``reachable`` lists the addresses they reached, in ``addrs``' order, or all of ``addrs`` if none said which),
    ``unreachable`` below that, ``alone`` with nobody to ask, ``unknown`` when nobody answered."""
    if not answers:
        return Verdict("alone", (), 0, 0, 0)
    got = [a for a in answers if a is not None]
    yes = [a for a in got if a.get("reachable") is True]
    if not got:
        return Verdict("unknown", (), len(answers), 0, 0)
    if len(yes) < share * len(got):
        return Verdict("unreachable", (), len(answers), len(got), len(yes))
    via = {_strip_p2p(a.get("via")) for a in yes if isinstance(a.get("via"), str)}
    reached = tuple(a for a in addrs if _strip_p2p(a) in via) or tuple(addrs)
    return Verdict("direct", reached, len(answers), len(got), len(yes))


def _strip_p2p(addr) -> str | None:
    if not isinstance(addr, str):
        return None
    return addr.split("/p2p/")[0]


def advice(addrs: list[str], verdict: Verdict, relay: bool) -> str:
    """What a peer nobody can dial should do, said in its log."""
    where = " ".join(addrs) or "(no address)"
    lines = [f"{verdict.answered - verdict.yes} of {verdict.answered} peers asked could not dial this peer at {where}."]
    lines.append("To serve: forward a TCP port to this machine and pass --port PORT --announce-maddrs "
                 "/ip4/PUBLIC_IP/tcp/PORT; or, behind a NAT you do not control, pass --use-auto-relay to be served "
                 "through a libp2p relay (slower: clients prefer direct peers).")
    if not relay:
        lines.append("Not going online: nobody could use these addresses.")
    return "\n  ".join(lines)


# -- the asked side ------------------------------------------------------------------------------------------


class DialBack:
    """Answers dial-back requests (``rpc_dial_back``), each from a fresh probe daemon (at most ``MAX_CONCURRENT``)."""

    def __init__(self, allow_loopback: bool, probe_factory=None):
        self.allow_loopback = allow_loopback
        self.per_caller = RateLimiter(1 / CALLER_PERIOD, 2)
        self.overall = RateLimiter(GLOBAL_RATE, 8)
        self.running = 0
        self._probes: set[P2P] = set()  # running probe daemons (closed by ``close`` if the peer stops meanwhile)
        self._probe_factory = probe_factory or (lambda: P2P.create(
            host_maddrs=[], no_listen=True, use_relay=False, auto_nat=False, nat_port_map=False,
            dht_mode="client", conn_manager=False))
        self.stats = {"asked": 0, "reached": 0}

    async def answer(self, payload: bytes, caller: str, now: float | None = None) -> bytes:
        """The answer to a dial-back request (msgpack ``{"addrs": [...]}``) from ``caller``; ``RequestError`` for
        a malformed one, ``PeerBusy`` over the limits."""
        now = time.monotonic() if now is None else now
        targets = dialback_targets(load_metadata(payload).get("addrs"), caller, self.allow_loopback)
        if self.running >= MAX_CONCURRENT:
            raise PeerBusy(f"{self.running} dial-back checks in progress; ask again later", DIAL_TIMEOUT)
        wait = self.per_caller.take(caller, 1, now)
        if wait > 0:
            raise PeerBusy(f"at most one dial-back check per {CALLER_PERIOD:.0f} s per caller", wait)
        wait = self.overall.take("*", 1, now)
        if wait > 0:
            raise PeerBusy("this peer is answering too many dial-back checks", wait)
        self.running += 1
        try:
            self.stats["asked"] += 1
            via = await self._dial(PeerID.from_base58(caller), targets)
        finally:
            self.running -= 1
        self.stats["reached"] += via is not None
        return dump_metadata({"reachable": via is not None, "via": via or ""})

    async def _dial(self, peer: PeerID, targets: list[str]) -> str | None:
        """The address a fresh probe reached ``peer`` at, None if it could not."""
        probe = await self._probe_factory()
        self._probes.add(probe)
        try:
            await asyncio.wait_for(probe._client.connect(peer, [Multiaddr(a) for a in targets]), DIAL_TIMEOUT)
            infos = await asyncio.wait_for(probe._client.list_peers(), DIAL_TIMEOUT)
            used = [str(a) for i in infos if i.peer_id == peer for a in i.addrs]
            return next((a for a in used if a in targets), targets[0])
        except Exception as e:  # refused, timed out, another identity answered: not reachable there
            logger.debug(f"dial-back to {peer.to_base58()[:12]} at {targets}: {e!r}")
            return None
        finally:
            self._probes.discard(probe)
            try:
                await probe.shutdown()
            except Exception as e:
                logger.debug(f"stopping a dial-back probe: {e!r}")

    async def close(self) -> None:
        """Stop the probes of checks still running (the peer is shutting down)."""
        for probe in list(self._probes):
            self._probes.discard(probe)
            await probe.shutdown()


# -- the asking side -----------------------------------------------------------------------------------------


def dht_neighbours(dht, own: str, limit: int = MAX_ASKED_PEERS) -> list[PeerID]:
    """Up to ``limit`` peers of the DHT routing table (servers others reached), chosen at random."""
    table = dht.node.protocol.routing_table
    peers = [p for p in table.peer_id_to_uid if p.to_base58() != own]
    random.shuffle(peers)
    return peers[:limit]


async def ask_dial_back(p2p: P2P, peer: PeerID, addrs: list[str], timeout: float = ASK_TIMEOUT) -> dict | None:
    """One peer's answer about ``addrs`` (``{"reachable", "via"}``), None if it did not answer one."""
    req = runtime_pb2.ExpertInfo(serialized_info=dump_metadata({"addrs": addrs}))
    try:
        resp = await asyncio.wait_for(p2p.call_protobuf_handler(peer, handle_name("rpc_dial_back"), req,
                                                                runtime_pb2.ExpertInfo), timeout)
        ans = load_metadata(resp.serialized_info)
    except Exception as e:  # an older peer, busy, gone: no answer
        logger.debug(f"dial-back request to {peer.to_base58()[:12]}: {e!r}")
        return None
    if not isinstance(ans.get("reachable"), bool):
        return None
    return {"reachable": ans["reachable"], "via": ans.get("via") if isinstance(ans.get("via"), str) else ""}


async def check_reachability(dht, addrs: list[str], max_peers: int = MAX_ASKED_PEERS) -> Verdict:
    """Ask up to ``max_peers`` DHT peers to dial ``addrs`` (the direct ones) back; their verdict."""
    targets = direct_addrs(addrs)
    peers = dht_neighbours(dht, dht.peer_id.to_base58(), max_peers)
    if not peers:
        return reachability_verdict(targets, [])
    if not targets:
        return Verdict("unreachable", (), len(peers), 0, 0)
    answers = await asyncio.gather(*(ask_dial_back(dht.p2p, p, targets) for p in peers))
    return reachability_verdict(targets, list(answers))


@dataclass(frozen=True)
class Settled:
    """What a peer announces after its check (``settle_addresses``)."""

    online: bool  # go online (False: nobody can dial it and it has no relay address)
    announce: list[str] | None  # the addresses to announce (None: all of ``maddrs``, unchecked)
    relayed: bool | None  # announced through relay circuits only (None: not checked)
    maddrs: list[str]  # the peer's visible multiaddrs, as last read


async def settle_addresses(dht, auto_relay: bool, stop: asyncio.Event, say) -> Settled:
    """The lifecycle's decision before ``online`` (``Peer.check_reachable``): ask (``check_reachability``), then
    announce what others reached; unreachable, announce relay circuit addresses (with ``auto_relay``, waited for
    up to ``RELAY_WAIT`` s: p2pd's autorelay reserves a relay slot in the background) or say what to do and stay
    offline. ``say``: the operator's log line."""
    maddrs = await dht.visible_maddrs()
    verdict = await check_reachability(dht, maddrs)
    if verdict.kind == "alone":
        say("reachability: no other peer to ask (the first peer of the swarm); going online at " + " ".join(maddrs))
        return Settled(True, None, None, maddrs)
    if verdict.kind == "unknown":
        say(f"reachability: none of the {verdict.asked} peers asked answered; announcing {' '.join(maddrs)} unchecked")
        return Settled(True, None, None, maddrs)
    if verdict.kind == "direct":
        say(f"reachability: {verdict.yes} of {verdict.answered} peers asked dialled this peer back at "
            + " ".join(verdict.reachable))
        return Settled(True, list(verdict.reachable), False, maddrs)
    deadline = time.monotonic() + (RELAY_WAIT if auto_relay else 0.0)
    while not (relays := [a for a in maddrs if "/p2p-circuit" in a]) and time.monotonic() < deadline \
            and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 2.0)
        maddrs = await dht.visible_maddrs()
    say(f"warning: reachability: {advice(direct_addrs(maddrs), verdict, bool(relays))}")
    if not relays:
        return Settled(False, None, None, maddrs)
    say("reachability: announcing relay addresses " + " ".join(relays))
    return Settled(True, relays, True, maddrs)
