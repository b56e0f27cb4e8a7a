"""CUDA paths (IEEE float32 answers in ``Expert.velocity``, bf16 autocast in ``train_expert``): run wherever a GPU
is present.

On CPU-only machines (CI) these are skipped; `pytest -m gpu` runs just them on a GPU machine.
"""

import copy

import pytest
import torch

from diffswarm.client.answer_checks import TrustConfig, relative_difference, row_tolerance
from diffswarm.experts.config import ExpertConfig
from diffswarm.experts.expert import Expert
from diffswarm.experts.networks import NetConfig
from diffswarm.experts.train import TrainConfig, train_expert
from diffswarm.peer.batching import BatchPolicy
from diffswarm.peer.hosted import ServedExpert

DEVICE = "cuda"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cfg(objective: str, kind: str = "dit") -> ExpertConfig:
    return ExpertConfig(objective=objective, net=NetConfig(kind=kind, size=16, width=64, depth=2, patch=2,
                                                           num_classes=4), cluster=0, num_clusters=2)


@pytest.mark.parametrize("objective", ["fm", "ddpm"])
@pytest.mark.parametrize("kind", ["dit", "unet", "mlp"])
def test_cuda_answers_pass_a_cpu_clients_cross_check(objective, kind):
    """An expert on CUDA answers in IEEE float32 (no bf16 autocast, no TF32): a CPU source's answer agrees with it
    per row within the cross-check's tolerance at every t, t = 1 included (where a DDPM expert's translation
    amplifies the network's rounding and the check allows 2e-2) and with strong guidance."""
    torch.manual_seed(0)
    e = Expert(_cfg(objective, kind)).eval()
    with torch.no_grad():  # non-zero output layers, so the comparison is not 0 == 0
        for p in e.parameters():
            p.add_(0.02 * torch.randn_like(p))
    on_gpu = copy.deepcopy(e).to(DEVICE)
    x, y = torch.randn(8, 1, 16, 16), torch.tensor([0, 1, 2, 3, -1, 0, 1, 2])
    for t in (0.02, 0.5, 0.99, 1.0):
        for g in (1.0, 7.5):
            tt = torch.full((8,), t)
            want = e.velocity(x, tt, y, guidance=g)
            got = on_gpu.velocity(x.to(DEVICE), tt.to(DEVICE), y.to(DEVICE), guidance=g)
            assert got.device.type == DEVICE and got.dtype == torch.float32
            diff = relative_difference(got.cpu(), want)
            assert (diff <= row_tolerance(TrustConfig(), tt)).all(), f"t={t} g={g}: per-row {float(diff.max()):.2e}"
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_a_peer_on_cuda_says_it_answers_in_float32():
    served = ServedExpert(Expert(_cfg("ddpm")).to(DEVICE), BatchPolicy())
    assert served.precision == "fp32" and served.device.type == DEVICE


def test_cuda_training_with_amp_writes_a_checkpoint_that_loads_on_cpu(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 16, 16, generator=g) * 2 - 1, torch.randint(0, 4, (64,), generator=g)
    summary = train_expert(_cfg("ddpm"), TrainConfig(steps=20, batch=16, device="cuda"), x, y, tmp_path,
                           progress=False)
    assert summary["steps"] == 20 and summary["final_loss"] == summary["final_loss"]  # finite, not NaN
    e = Expert.from_checkpoint(tmp_path / "expert.safetensors", "cpu")
    v = e.velocity(torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([0, 1]))
    assert torch.isfinite(v).all()


def test_a_cuda_clients_own_answer_is_compared_with_a_peers_cpu_answer():
    """A peer's answer arrives on the CPU while a CUDA client's own copy answers on its device: the cross-check
    compares them (it once raised a device mismatch at the first checked answer)."""
    a = torch.randn(4, 1, 8, 8)
    assert torch.equal(relative_difference(a.to(DEVICE), a), torch.zeros(4))
    assert relative_difference(a, -a.to(DEVICE)).tolist() == pytest.approx([2.0] * 4)
