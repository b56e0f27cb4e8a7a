"""Reachability before online: the dial-back RPC's checks and limits, the verdict, and peers on loopback that are
reached (announced as direct), alone (the first peer), or unreachable (say what to do and stay offline)."""

import asyncio
import hashlib
import logging
import socket
from types import SimpleNamespace

import pytest
from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr
from peer_harness import InprocPeer, quiet_hivemind

from diffswarm.client.selection import RELAY_PENALTY, Blacklist, Replica, pick_replica
from diffswarm.dht.node import NetworkConfig
from diffswarm.peer.reachability import (
    CALLER_PERIOD,
    MAX_CONCURRENT,
    MAX_DIALBACK_ADDRS,
    DialBack,
    Verdict,
    advice,
    dialback_targets,
    direct_addrs,
    reachability_verdict,
)
from diffswarm.protocol.wire import PeerBusy, RequestError, dump_metadata, load_metadata


@pytest.fixture(scope="module")
def ids():
    """Well-formed base58 peer ids (sha256 multihashes of fixed bytes; no key needed)."""
    return [PeerID(b"\x12\x20" + hashlib.sha256(bytes([i])).digest()).to_base58() for i in range(12)]


def test_dialback_targets_only_the_callers_own_tcp_addresses(ids):
    me, other = ids[:2]
    assert dialback_targets([f"/ip4/10.0.0.2/tcp/31337/p2p/{me}", "/ip6/::2/tcp/5", "/dns4/x.org/tcp/7"], me,
                            allow_loopback=False) == ["/ip4/10.0.0.2/tcp/31337", "/ip6/::2/tcp/5", "/dns4/x.org/tcp/7"]
    bad = [
        ([f"/ip4/10.0.0.2/tcp/1/p2p/{other}"], "asking peer's own id"),
        ([f"/ip4/10.0.0.3/tcp/1/p2p/{other}/p2p-circuit/p2p/{me}"], "dial-back addresses are"),
        (["/ip4/10.0.0.2/udp/1/quic"], "dial-back addresses are"),
        (["/ip4/10.0.0.2/tcp/0"], "port 0"),
        (["/ip4/127.0.0.1/tcp/5"], "loopback"),
        (["not a multiaddr"], "not a multiaddr"),
        ([f"/ip4/10.0.0.{i}/tcp/1" for i in range(MAX_DIALBACK_ADDRS + 1)], "at most"),
        ([], "non-empty list"),
        ("/ip4/10.0.0.2/tcp/1", "non-empty list"),
        ([b"/ip4/10.0.0.2/tcp/1"], "multiaddr string"),
        (["/ip4/10.0.0.2/tcp/1" + "/" * 300], "multiaddr string"),
    ]
    for addrs, message in bad:
        with pytest.raises(RequestError, match=message):
            dialback_targets(addrs, me, allow_loopback=False)
    assert dialback_targets(["/ip4/127.0.0.1/tcp/5"], me, allow_loopback=True) == ["/ip4/127.0.0.1/tcp/5"]


def test_verdict_from_answers():
    addrs = ["/ip4/10.0.0.2/tcp/1/p2p/X", "/ip4/127.0.0.1/tcp/1/p2p/X"]
    yes = {"reachable": True, "via": "/ip4/10.0.0.2/tcp/1"}
    no = {"reachable": False, "via": ""}
    assert reachability_verdict(addrs, []) == Verdict("alone", (), 0, 0, 0)
    assert reachability_verdict(addrs, [None, None]).kind == "unknown"
    v = reachability_verdict(addrs, [yes, no, None])  # 1 of the 2 that answered: half is enough (Petals)
    assert v.kind == "direct" and v.reachable == (addrs[0],) and (v.asked, v.answered, v.yes) == (3, 2, 1)
    assert reachability_verdict(addrs, [yes, no, no]).kind == "unreachable"
    # a "yes" that does not say which address worked keeps every address
    assert reachability_verdict(addrs, [{"reachable": True, "via": ""}]).reachable == tuple(addrs)
    text = advice(["/ip4/10.0.0.2/tcp/1"], Verdict("unreachable", (), 3, 3, 0), relay=False)
    assert "3 of 3 peers" in text and "--announce-maddrs" in text and "--use-auto-relay" in text
    assert "Not going online" in text
    circuit = "/ip4/1.2.3.4/tcp/1/p2p/R/p2p-circuit/p2p/X"
    assert direct_addrs([circuit, *addrs, "/ip4/1.2.3.4/udp/1/quic"]) == addrs[:1]  # loopback: not for others
    assert direct_addrs(addrs[1:]) == addrs[1:]  # a loopback-only peer (a local swarm) asks about loopback


class _FakeProbe:
    """A probe daemon with no network: ``open_addrs`` maps an address to the peer id listening there (a dial
    reaches ``peer`` only where its own id answers, as libp2p's secure handshake checks)."""

    def __init__(self, open_addrs: dict, gate: asyncio.Event | None = None):
        self.open_addrs, self.gate, self.dialled, self.used = dict(open_addrs), gate, [], None
        self._client = self

    async def connect(self, peer, maddrs):
        self.dialled.append([str(m) for m in maddrs])
        if self.gate is not None:
            await self.gate.wait()
        hits = [str(m) for m in maddrs if self.open_addrs.get(str(m)) == peer.to_base58()]
        if not hits:
            raise ConnectionError("connection refused")
        self.used, self.peer = hits[0], peer

    async def list_peers(self):
        return [SimpleNamespace(peer_id=self.peer, addrs=[Multiaddr(self.used)])] if self.used else []

    async def shutdown(self):
        self.used = None
        self.shutdowns = getattr(self, "shutdowns", 0) + 1


def _ask(db, caller, addrs, now):
    return load_metadata(asyncio.run(db.answer(dump_metadata({"addrs": addrs}), caller, now)))


def test_dial_back_answers_and_limits(ids):
    me, other = ids[:2]
    probe = _FakeProbe({"/ip4/10.0.0.2/tcp/1": me, "/ip4/127.0.0.1/tcp/9": me})

    async def factory():
        return probe

    db = DialBack(allow_loopback=False, probe_factory=factory)
    assert _ask(db, me, ["/ip4/10.0.0.9/tcp/1", f"/ip4/10.0.0.2/tcp/1/p2p/{me}"], 0.0) == {
        "reachable": True, "via": "/ip4/10.0.0.2/tcp/1"}
    assert _ask(db, me, ["/ip4/10.0.0.9/tcp/1"], 0.1) == {"reachable": False, "via": ""}  # burst of 2
    with pytest.raises(PeerBusy, match="per caller"):  # the third within CALLER_PERIOD
        _ask(db, me, ["/ip4/10.0.0.2/tcp/1"], 0.2)
    assert _ask(db, me, ["/ip4/10.0.0.2/tcp/1"], 0.2 + CALLER_PERIOD)["reachable"]
    assert _ask(db, other, ["/ip4/10.0.0.2/tcp/1"], 0.3)["reachable"] is False  # another peer id: not reached
    with pytest.raises(RequestError, match="own id"):
        _ask(db, other, [f"/ip4/10.0.0.2/tcp/1/p2p/{me}"], 0.4)
    assert len(probe.dialled) == 4 and all(len(d) <= MAX_DIALBACK_ADDRS for d in probe.dialled)
    assert probe.shutdowns == 4  # a probe per check, stopped after it
    # the overall rate bounds what many ids together can make it dial: a burst of 8, then 0.5 per second
    many = DialBack(allow_loopback=True, probe_factory=factory)
    n = len(probe.dialled)
    answers = []
    for caller in ids:
        try:
            answers.append(_ask(many, caller, ["/ip4/127.0.0.1/tcp/9"], 1000.0)["reachable"])
        except PeerBusy as e:
            assert "too many dial-back checks" in str(e)
    assert answers == [True] + [False] * 7 and len(probe.dialled) == n + 8


def test_dial_back_refuses_past_its_concurrency(ids):
    me, other = ids[:2]
    gate = asyncio.Event()

    async def main():
        probe = _FakeProbe({}, gate)

        async def factory():
            return probe

        db = DialBack(allow_loopback=True, probe_factory=factory)
        req = dump_metadata({"addrs": ["/ip4/127.0.0.1/tcp/9"]})
        running = [asyncio.create_task(db.answer(req, c, 0.0)) for c in (me, other)][:MAX_CONCURRENT]
        await asyncio.sleep(0.05)
        with pytest.raises(PeerBusy, match="in progress"):
            await db.answer(req, me, 100.0)
        gate.set()
        return [load_metadata(a) for a in await asyncio.gather(*running)]

    assert [a["reachable"] for a in asyncio.run(main())] == [False, False]


def test_clients_prefer_direct_replicas():
    direct = Replica("D", "c0-fm", "s", 0, throughput=100.0, load=0.0)
    relayed = Replica("R", "c0-fm", "s", 0, throughput=300.0, load=0.0, relayed=True)
    assert pick_replica([direct, relayed], {}, Blacklist(), 0.0).peer_id == "D"  # 3x faster claim: still direct
    # measured: a relayed peer must be RELAY_PENALTY times faster to win
    assert pick_replica([direct, relayed], {"D": 0.05, "R": 0.02}, Blacklist(), 0.0).peer_id == "D"
    fast = 0.05 / RELAY_PENALTY / 2
    assert pick_replica([direct, relayed], {"D": 0.05, "R": fast}, Blacklist(), 0.0).peer_id == "R"
    bans = Blacklist()
    bans.ban("D", 0.0)
    assert pick_replica([direct, relayed], {}, bans, 0.0).peer_id == "R"  # the only one left


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_peers_check_reachability_before_going_online(tmp_path, caplog):
    """First peer: alone. Second: reached by the first, announced as direct at the address it reached. Third
    announces an address nobody listens on: both others say no, it says what to do and does not go online."""
    quiet_hivemind()
    caplog.set_level(logging.INFO, logger="diffswarm")
    a = InprocPeer(tmp_path / "a")
    peers = [a]
    try:
        assert a.peer.state == "online" and a.peer.relayed is None
        assert "no other peer to ask (the first peer of the swarm)" in caplog.text
        b = InprocPeer(tmp_path / "b", net=NetworkConfig.loopback(a.peer.maddrs))
        peers.append(b)
        assert b.peer.state == "online" and b.peer.relayed is False
        assert b.peer.announced_addrs == b.peer.maddrs  # its one address, confirmed
        assert "1 of 1 peers asked dialled this peer back" in caplog.text
        assert a.on_loop(lambda: dict(a.peer.dial_back.stats)) == {"asked": 1, "reached": 1}
        [rec] = b.on_loop(b.peer.records)
        assert rec.relayed is False
        dead = f"/ip4/127.0.0.1/tcp/{_closed_port()}"
        c = InprocPeer(tmp_path / "c", net=NetworkConfig.loopback(a.peer.maddrs, announce_maddrs=[dead]))
        peers.append(c)
        assert c.peer.exit_code == 1 and c.peer.state != "online"
        assert "could not dial this peer at " + dead in caplog.text and "Not going online" in caplog.text
        asked = [p.on_loop(lambda p=p: p.peer.dial_back.stats["asked"]) for p in (a, b)]
        assert sum(asked) >= 1
    finally:
        for p in reversed(peers):
            p.stop()


def test_an_unreachable_peer_announces_relay_addresses_or_stays_offline(monkeypatch):
    """The lifecycle's decision (``Peer.check_reachable``) for each verdict, with the network stubbed out."""
    from diffswarm.peer import reachability
    from diffswarm.peer.config import PeerConfig
    from diffswarm.peer.server import Peer

    direct, circuit = "/ip4/10.0.0.2/tcp/1/p2p/X", "/ip4/1.2.3.4/tcp/1/p2p/R/p2p-circuit/p2p/X"

    class FakeDHT:
        def __init__(self, addrs, later=()):
            self.addrs, self.later = addrs, list(later)  # later: what autorelay adds after the first look

        async def visible_maddrs(self):
            out, self.addrs = list(self.addrs), list(self.addrs) + self.later
            return out

    def outcome(verdict, addrs, later=(), auto_relay=False):
        async def fake_check(dht, maddrs):
            return verdict

        monkeypatch.setattr(reachability, "check_reachability", fake_check)
        monkeypatch.setattr(reachability, "RELAY_WAIT", 0.5)
        peer = Peer(PeerConfig(net=NetworkConfig(use_auto_relay=auto_relay)))
        peer.dht, peer.log = FakeDHT(addrs, later), (lambda msg: None)
        ok = asyncio.run(peer.check_reachable())
        return ok, peer.relayed, peer.announced_addrs

    no = Verdict("unreachable", (), 2, 2, 0)
    assert outcome(no, [direct, circuit]) == (True, True, [circuit])  # relayed: announced as such
    assert outcome(no, [direct]) == (False, None, [direct])  # nobody can dial it, no relay: not online
    # --use-auto-relay: the relay address p2pd finds a moment later is waited for
    assert outcome(no, [direct], later=[circuit], auto_relay=True) == (True, True, [circuit])
    assert outcome(no, [direct], later=[circuit]) == (False, None, [direct])  # without it: not waited for
    assert outcome(Verdict("direct", (direct,), 2, 2, 2), [direct, "/ip4/127.0.0.1/tcp/1/p2p/X"]) == (
        True, False, [direct])
    assert outcome(Verdict("alone", (), 0, 0, 0), [direct]) == (True, None, [direct])
    assert outcome(Verdict("unknown", (), 2, 0, 0), [direct]) == (True, None, [direct])
