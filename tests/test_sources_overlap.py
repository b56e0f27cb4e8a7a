"""The client's own evaluations (cross-checks, local fallback) run while its remote calls are in flight, not after
them (``Sources.answer_all``); answers come back in call order either way. No network, no timing."""

from __future__ import annotations

import threading

import torch
from peer_harness import FakeSwarmClient

from diffswarm.client.answer_checks import TrustConfig
from diffswarm.client.selection import Replica
from diffswarm.client.sources import LocalSource, Sources


class Scaled(torch.nn.Module):
    """A velocity model v = scale * x; ``started`` is set when it is called, ``wait_for`` blocks the call."""

    def __init__(self, scale: float, wait_for: threading.Event | None = None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(scale))
        self.expert_id = f"x{scale}"
        self.started, self.wait_for, self.saw = threading.Event(), wait_for, None

    def velocity(self, x, t, labels, guidance):
        self.started.set()
        if self.wait_for is not None:
            self.saw = self.wait_for.wait(timeout=30)
        return self.w.detach() * x


def test_local_answers_overlap_the_remote_calls_and_keep_their_order():
    local_model = Scaled(3.0)
    remote_model = Scaled(2.0, wait_for=local_model.started)  # answers only once the local evaluation started
    client = FakeSwarmClient({"peerA": remote_model})
    sources = Sources(client, TrustConfig())
    rep = Replica("peerA", "x2.0", "a" * 64, 0, 100.0, 0.0)
    local = LocalSource(local_model, "b" * 64, 0)
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.zeros(4, dtype=torch.long)
    out = sources.answer_all([(rep, x, t, y), (local, x, t, y)], 1.0)
    assert remote_model.saw is True  # the local evaluation ran while the remote call was waiting
    assert torch.equal(out[0][0], 2.0 * x) and torch.equal(out[1][0], 3.0 * x)
    # only local sources, or only remote ones: no worker thread needed, same answers
    assert torch.equal(sources.answer_all([(local, x, t, y)], 1.0)[0][0], 3.0 * x)
    assert torch.equal(sources.answer_all([(rep, x, t, y)], 1.0)[0][0], 2.0 * x)
