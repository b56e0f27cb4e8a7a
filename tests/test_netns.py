"""Across network boundaries: a swarm in Linux network namespaces joined by veth pairs, one volunteer behind a NAT.

The test builds (and removes) six namespaces; every address lives only inside them:

    lan (a bridge)  --  boot   10.77.0.1  the founding peer: manifest, partition file, a ddpm expert of cluster 0
                    --  vol1   10.77.0.2  a volunteer reachable directly (it listens on 0.0.0.0)
                    --  nat    10.77.0.3  a NAT router (nftables masquerade, forwards only outbound and replies)
                                 10.77.1.1 -- vol2 10.77.1.2  a volunteer reachable only outbound
                    --  cli    10.77.0.4  the client

The swarm is digits in one cluster, routed by its peers' statistics (no router). Both volunteers run
`diffswarm join --swarm NAME@FINGERPRINT --initial-peers MADDR` and nothing else about the swarm: each fetches the
partition file (its sha256 signed by the owner), picks cluster 0 and the objective the swarm lacks (fm), trains a
tiny expert for a few seconds and then, before serving, checks its reachability. With one cluster the client's
rows all go to cluster 0, served by vol1 (a fm expert) and the boot peer (a ddpm one): failover is onto another
live expert of the same cluster, never a draw.

The volunteers check their reachability before going online (``diffswarm.peer.reachability``): vol1 is dialled back
by the boot peer and announces only the address that was reached (not 127.0.0.1); vol2 (started once vol1 is
online), behind the NAT, cannot be dialled by anyone: it says what to do (forward a port, --announce-maddrs, a
relay) and does not go online, so no client ever waits on an address nobody can use. (hivemind 1.1.12's p2pd finds
no relay reservation within a test's time here, see docs/protocol.md, Reachability; a relayed peer is announced with
``relayed`` and clients prefer direct ones, tested in tests/test_reachability.py.) The client then generates; at
step 2 vol1's link is cut (its veth goes down) and the generation completes by failover to the boot peer.

Runs as root where ``ip netns`` and ``nft`` work (CI); skips with the reason elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HANG = 180.0  # seconds: a bound on a hang only, never an expectation of speed
STEPS, CUT_AT = 8, 2


def _unavailable() -> str | None:
    """Why this machine cannot build the namespaces (None: it can)."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "building network namespaces needs root (CI runs as root)"
    for tool, pkg in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install {pkg}; scripts/setup.sh does as root)"
    probe = f"dsprobe{os.getpid() % 100000}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` is not allowed here: {r.stderr.strip()[:200]}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


NAT_RULES = """table ip diffswarm_nat {
  chain post {
    type nat hook postrouting priority 100;
    oifname "eth0" masquerade
  }
  chain fw {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "%s" oifname "eth0" accept
  }
}
"""


class Netns:
    """The namespaces of the module docstring, named ``<prefix><role>``; ``close`` removes them all."""

    ROLES = ("lan", "boot", "vol1", "nat", "vol2", "cli")
    ADDRS = {"boot": "10.77.0.1", "vol1": "10.77.0.2", "nat": "10.77.0.3", "cli": "10.77.0.4"}

    def __init__(self):
        self.prefix = f"ds{os.getpid() % 100000}"
        self.made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def ns(self, role: str) -> str:
        return self.prefix + role

    def lan_link(self, role: str) -> str:
        """The bridge side of ``role``'s veth pair (in the lan namespace): what a cut takes down."""
        return f"{self.prefix}{role}"[:15]

    def _build(self) -> None:
        for role in self.ROLES:
            _ip("netns", "add", self.ns(role))
            self.made.append(self.ns(role))
            _ip("-n", self.ns(role), "link", "set", "lo", "up")
        lan = self.ns("lan")
        _ip("-n", lan, "link", "add", "br0", "type", "bridge")
        _ip("-n", lan, "link", "set", "br0", "up")
        for role, addr in self.ADDRS.items():
            outer = self.lan_link(role)
            _ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", self.ns(role))
            _ip("link", "set", outer, "netns", lan)
            _ip("-n", lan, "link", "set", outer, "master", "br0", "up")
            _ip("-n", self.ns(role), "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", self.ns(role), "link", "set", "eth0", "up")
        inner = f"{self.prefix}in"[:15]
        _ip("link", "add", inner, "type", "veth", "peer", "name", "eth0", "netns", self.ns("vol2"))
        _ip("link", "set", inner, "netns", self.ns("nat"))
        _ip("-n", self.ns("nat"), "addr", "add", "10.77.1.1/24", "dev", inner)
        _ip("-n", self.ns("nat"), "link", "set", inner, "up")
        _ip("-n", self.ns("vol2"), "addr", "add", "10.77.1.2/24", "dev", "eth0")
        _ip("-n", self.ns("vol2"), "link", "set", "eth0", "up")
        _ip("-n", self.ns("vol2"), "route", "add", "default", "via", "10.77.1.1")
        subprocess.run(["ip", "netns", "exec", self.ns("nat"), "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        subprocess.run(["ip", "netns", "exec", self.ns("nat"), "nft", "-f", "-"], input=NAT_RULES % inner,
                       check=True, text=True, capture_output=True)

    def cut(self, role: str) -> None:
        """Take ``role``'s link to the lan down: its packets go nowhere (a cable pulled, a machine gone)."""
        _ip("-n", self.ns("lan"), "link", "set", self.lan_link(role), "down")

    def close(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made = []


class Procs:
    """The processes this test starts (each in a session of its own), killed and reaped by ``close``."""

    def __init__(self, tmp: Path):
        self.tmp, self.popens = tmp, {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", GOMAXPROCS="1", PYTHONPATH=str(ROOT))

    def start(self, name: str, ns: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - kept open for the child's lifetime
        pop = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *argv], stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env, cwd=ROOT,
                               start_new_session=True)
        self.popens[name] = pop
        return pop

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def close(self, infos: dict) -> list[str]:
        """SIGTERM to each process alone (a peer announces offline and stops its own p2pd), SIGKILL to the whole
        group of any still running after 30 s, whose p2pd sockets (named in its info file, ``infos[name]``) are
        then removed. Returns the names that had to be killed."""
        for pop in self.popens.values():
            if pop.poll() is None:
                pop.send_signal(signal.SIGTERM)
        killed = []
        for name, pop in self.popens.items():
            try:
                pop.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(pop.pid, signal.SIGKILL)
                pop.wait(10)
                killed.append(name)
        for path in [infos[n] for n in killed if n in infos]:
            try:
                sockets = json.loads(Path(path).read_text()).get("sockets", [])
            except (OSError, ValueError):
                continue
            for sock in sockets:
                Path(sock).unlink(missing_ok=True)
        return killed


def wait_for(what: str, cond, timeout: float = HANG, procs: Procs | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    logs = "" if procs is None else "\n".join(f"--- {n}\n{procs.log(n)[-2000:]}" for n in procs.popens)
    raise AssertionError(f"hang guard: {what}\n{logs}")


def online_info(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("state") == "online" else None


JOIN_MINUTES = "0.1"  # each volunteer's training budget (wall clock: what it trains in that time, it serves)


def volunteer_command(swarm: str, initial_peers: list[str], out: Path, info: Path) -> list[str]:
    """A volunteer's start command: `diffswarm join` given the swarm's name and the boot peer's address, nothing
    else about the swarm (it fetches the owner-signed partition, picks the cluster, trains a tiny expert for
    ``JOIN_MINUTES``, checks it can be dialled and serves). The partition has one cluster, so both volunteers pick
    cluster 0, the cluster the boot peer serves: the client's failover target is decided, not drawn."""
    return ["-m", "diffswarm", "join", "--swarm", swarm, "--initial-peers", *initial_peers,
            "--minutes", JOIN_MINUTES, "--start-delay", "0", "--net", "mlp", "--width", "32", "--depth", "1",
            "--batch", "16", "--out", str(out), "--no-relay", "--no-nat", "--threads", "1",
            "--announce-period", "2", "--info-file", str(info)]


CLIENT = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_netns import client_main
client_main({args!r})
"""


def client_main(args: dict) -> None:
    """Runs in the client's namespace: generate over the swarm; at step ``CUT_AT`` ask the test (marker file) to
    cut the peer in use, wait until it did, and make the client call that peer next. Writes the outcome as JSON."""
    import torch

    from diffswarm.client.config import ClientConfig
    from diffswarm.client.ensemble import SwarmEnsemble
    from diffswarm.dht.node import NetworkConfig
    from diffswarm.router.local import generate
    from diffswarm.router.routing import RoutingConfig
    from diffswarm.sampling.config import SamplingConfig

    out, events, used = Path(args["out"]), [], []
    net = NetworkConfig(client_mode=True, host_maddrs=["/ip4/10.77.0.4/tcp/0"], use_relay=False, auto_nat=False,
                        nat_port_map=False, check_identity=False)
    cfg = ClientConfig(swarm=args["swarm"], net=net, cache_dir=args["cache"], call_timeout=3.0, connect_timeout=90.0)
    with SwarmEnsemble.connect(args["initial_peers"], RoutingConfig("top-k", 1), seed=1, config=cfg) as model:
        model.verifier.rng.seed(0)
        model.client.latency[args["victim"]] = 0.0  # the victim is the fastest replica: it is called first

        def on_step(info):
            events.extend(info.events)
            used.append(model.in_use.get(0))
            if info.step == CUT_AT:
                Path(args["marker"]).write_text("cut now")
                deadline = time.monotonic() + 60
                while not Path(args["ack"]).exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                model.client.latency[args["victim"]] = 0.0  # still thought fastest: the next call goes there

        labels = torch.tensor([0, 1, 2, 3])
        x = generate(model, labels, (1, 8, 8), SamplingConfig(steps=STEPS, sampler="euler", guidance=2.0, seed=1),
                     callback=on_step)
    out.write_text(json.dumps({"finite": bool(torch.isfinite(x).all()), "shape": list(x.shape), "events": events,
                               "used": used}))


def test_swarm_across_namespaces_with_a_nat_and_a_cut_link(tmp_path):
    from diffswarm.data import DatasetSpec
    from diffswarm.experts.train import TrainConfig
    from diffswarm.swarm.local import owned_swarm_name
    from diffswarm.training.jobs import TrainJob, run_train_job, write_partition

    # the swarm: digits (bundled with scikit-learn, no download) in one cluster; the boot peer serves a ddpm expert
    # of it (so vol1 picks fm, the objective the swarm has fewer of; vol2, joining beside both, sees a tie, which
    # goes to fm too) and signs and serves the partition
    spec = DatasetSpec("digits")
    part = tmp_path / "partition.json"
    write_partition(spec.load("train"), spec, 1, 0, part)
    run_train_job(TrainJob(str(part), 0, str(tmp_path / "c0"), objective="ddpm", net="mlp", width=32, depth=1,
                           train=TrainConfig(steps=20, batch=16, warmup=1, ckpt_every=10**9, log_every=10**9,
                                             device="cpu")), progress=False)
    owner = tmp_path / "owner.key"
    swarm = owned_swarm_name("diffswarm", owner)
    net = Netns()
    procs = Procs(tmp_path)
    info = {n: tmp_path / f"{n}.json" for n in ("boot", "vol1", "vol2")}
    try:
        procs.start("boot", net.ns("boot"), [
            # no --validate: admission stays off, so the volunteers' freshly trained experts are used at once
            # (with it, each would wait on probation for the owner's attestation; tests/test_admission_swarm.py)
            "-m", "diffswarm", "peer", "--swarm", swarm, "--owner-key", str(owner), "--serve-partition", str(part),
            "--checkpoint", str(tmp_path / "c0" / "expert.safetensors"), "--host", "10.77.0.1", "--no-relay",
            "--no-nat", "--threads", "1", "--announce-period", "2", "--info-file", str(info["boot"])])
        boot = wait_for("the boot peer online", lambda: online_info(info["boot"]), procs=procs)
        peers = [a for a in boot["maddrs"] if "/ip4/10.77.0.1/" in a]
        assert "no other peer to ask (the first peer of the swarm)" in procs.log("boot")

        # vol2 starts once vol1 is online: vol1's reachability check then asks exactly the boot peer (started
        # together, vol1 could also ask vol2, whose answer races with vol2 stopping after its own failed check)
        procs.start("vol1", net.ns("vol1"), volunteer_command(swarm, peers, tmp_path / "vol1-join", info["vol1"]))
        vol1 = wait_for("vol1 online", lambda: online_info(info["vol1"]), procs=procs)
        nat_vol = procs.start("vol2", net.ns("vol2"),
                              volunteer_command(swarm, peers, tmp_path / "vol2-join", info["vol2"]))
        wait_for("vol2 to give up", lambda: nat_vol.poll() is not None, procs=procs)

        # both joined with nothing but the swarm's name and the boot peer's address: the partition came from the
        # swarm (checked against the owner's signature), they picked its one cluster and trained a fm expert of it
        for name in ("vol1", "vol2"):
            text = procs.log(name)
            assert "sha256 signed by the owner" in text, text[-3000:]
            assert "joining cluster 0 with a fm expert" in text, text[-3000:]
        assert vol1["experts"] == ["c0-fm"], vol1

        # vol1: dialled back at its lan address by the boot peer, the one peer it could ask; that address is all
        # it announces (not 127.0.0.1)
        log1 = procs.log("vol1")
        reached = r"reachability: 1 of 1 peers asked dialled this peer back at /ip4/10\.77\.0\.2/tcp/\d+/p2p/"
        assert re.search(reached + vol1["peer_id"] + "\n", log1), log1[-3000:]
        assert re.search(r"online as \w+ at /ip4/10\.77\.0\.2/tcp/\d+/p2p/\w+\n", log1), log1[-3000:]
        # vol2, behind the NAT: nobody can dial it; it says what to do and stays offline
        log2 = procs.log("vol2")
        assert nat_vol.returncode == 1, log2[-3000:]
        assert "could not dial this peer at /ip4/10.77.1.2/" in log2 and "--announce-maddrs" in log2, log2[-3000:]
        assert "Not going online" in log2 and "online as" not in log2

        marker, ack, result = tmp_path / "cut.marker", tmp_path / "cut.ack", tmp_path / "client.json"
        args = {"out": str(result), "swarm": swarm, "initial_peers": peers, "cache": str(tmp_path / "cache"),
                "victim": vol1["peer_id"], "marker": str(marker), "ack": str(ack)}
        client = procs.start("client", net.ns("cli"), ["-c", CLIENT.format(tests=str(ROOT / "tests"), args=args)])
        wait_for("the client at step 2", lambda: marker.exists() or client.poll() is not None, procs=procs)
        assert marker.exists(), procs.log("client")[-3000:]
        net.cut("vol1")
        ack.write_text("done")
        wait_for("the client to finish", lambda: client.poll() is not None, procs=procs)
        assert client.returncode == 0, procs.log("client")[-4000:]
        out = json.loads(result.read_text())
        assert out["finite"] and out["shape"] == [4, 1, 8, 8]
        assert vol1["peer_id"] in out["used"][:CUT_AT + 1], out  # vol1 served before the cut
        assert out["used"][-1] == boot["peer_id"], out  # the boot peer after it: failover (to its ddpm expert)
        assert any("retrying" in e or "failed" in e for e in out["events"]), out["events"]
        assert procs.close(info) == [], "a peer did not stop on SIGTERM"
        for path in info.values():  # each peer stopped its own daemon and removed its sockets
            assert not [s for s in json.loads(path.read_text())["sockets"] if os.path.exists(s)]
    finally:
        procs.close(info)
        net.close()
