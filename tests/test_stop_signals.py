"""A command's stop signal is never lost: a ``Stopped`` that Python swallows (the handler ran inside a finalizer,
as when the garbage collector runs a weakref callback in the main thread) is raised again by the next round of
the main thread's long loops: a sampling step, a training step, a poll for peers.

CI once saw ``diffswarm generate`` go on sampling for 4 minutes after its one SIGTERM (test_no_orphans); these
tests make the same loss happen on purpose: the signal is sent from inside a ``__del__``, so its handler's
exception is printed as "Exception ignored" and dropped.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest
import torch

from diffswarm.experts.config import ExpertConfig
from diffswarm.experts.networks import NetConfig
from diffswarm.experts.train import TrainConfig, train_expert
from diffswarm.sampling.loop import sample
from diffswarm.utils.signals import Stopped, raise_if_stopped, stop_on_signals


class _SignalInFinalizer:
    """Sends ``sig`` to this process from its ``__del__``: the handler's ``Stopped`` is raised inside the finalizer,
    where Python reports it as unraisable and drops it."""

    def __init__(self, sig: int = signal.SIGTERM):
        self.sig = sig

    def __del__(self):
        os.kill(os.getpid(), self.sig)
        time.sleep(0.05)  # the handler has run by the end of this at the latest, still inside the finalizer


@pytest.fixture
def swallowed(monkeypatch):
    """The exceptions Python dropped as unraisable during the test."""
    seen: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    return seen


def _lose_a_signal() -> None:
    _SignalInFinalizer()  # dropped at once: its finalizer runs here


def test_a_lost_stop_is_raised_at_the_next_sampling_step(swallowed):
    calls: list[int] = []

    class Model:
        def velocity(self, x, t, labels, guidance=1.0):
            calls.append(1)
            if len(calls) == 3:
                _lose_a_signal()
            return -x

    with pytest.raises(Stopped) as e, stop_on_signals():
        sample(Model(), torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), steps=50)
    assert e.value.signum == signal.SIGTERM and e.value.exit_code == 128 + signal.SIGTERM
    assert [type(x) for x in swallowed] == [Stopped]  # the handler's own exception was lost ...
    assert len(calls) == 3  # ... and the step after it did not run


def test_a_lost_stop_is_raised_at_the_next_training_step(tmp_path, swallowed):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 3, (64,), generator=g)
    cfg = ExpertConfig(objective="fm", net=NetConfig(kind="mlp", size=8, width=16, depth=1, num_classes=3),
                       cluster=0, num_clusters=2, partition_hash="ab" * 32, dataset_id="test:8")
    steps: list[int] = []

    def on_step(step, loss, progress):
        steps.append(step)
        if step == 2:
            _lose_a_signal()

    with pytest.raises(Stopped), stop_on_signals():
        train_expert(cfg, TrainConfig(steps=200, batch=8, ckpt_every=1000), x, y, tmp_path, progress=False,
                     on_step=on_step)
    assert [type(x) for x in swallowed] == [Stopped]
    assert steps == [1, 2]


def test_without_a_signal_or_outside_a_block_it_does_nothing(swallowed):
    raise_if_stopped()  # no block
    with stop_on_signals():
        raise_if_stopped()  # a block, no signal
    out: list[BaseException] = []
    with pytest.raises(Stopped), stop_on_signals():
        _lose_a_signal()

        def other_thread():
            try:
                raise_if_stopped()  # only the main thread's loops are stopped this way
            except BaseException as e:  # noqa: BLE001 - what the test looks for
                out.append(e)

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert out == []
        raise_if_stopped()
    raise_if_stopped()  # the block ended: its signal is forgotten
    assert signal.getsignal(signal.SIGTERM) is not None and [type(x) for x in swallowed] == [Stopped]
