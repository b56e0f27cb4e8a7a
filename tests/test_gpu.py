"""CUDA paths (bf16 autocast in ``Expert.velocity`` and ``train_expert``): run wherever a GPU is present.

On CPU-only machines (CI) these are skipped; `pytest -m gpu` runs just them on a GPU machine.
"""

import pytest
import torch

from diffswarm.experts.config import ExpertConfig
from diffswarm.experts.expert import Expert
from diffswarm.experts.networks import NetConfig
from diffswarm.experts.train import TrainConfig, train_expert

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cfg(objective: str, kind: str = "dit") -> ExpertConfig:
    return ExpertConfig(objective=objective, net=NetConfig(kind=kind, size=16, width=64, depth=2, patch=2,
                                                           num_classes=4), cluster=0, num_clusters=2)


@pytest.mark.parametrize("objective", ["fm", "ddpm"])
@pytest.mark.parametrize("kind", ["dit", "unet", "mlp"])
def test_cuda_velocity_matches_cpu_within_bf16_tolerance(objective, kind):
    torch.manual_seed(0)
    e = Expert(_cfg(objective, kind)).eval()
    with torch.no_grad():  # non-zero output layers, so the comparison is not 0 == 0
        for p in e.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, t, y = torch.randn(8, 1, 16, 16), torch.rand(8), torch.tensor([0, 1, 2, 3, -1, 0, 1, 2])
    want = e.velocity(x, t, y, guidance=2.0)
    got = e.to("cuda").velocity(x.cuda(), t.cuda(), y.cuda(), guidance=2.0)
    assert got.device.type == "cuda" and got.dtype == torch.float32  # bf16 inside, the caller's dtype out
    err = (got.cpu() - want).norm() / want.norm()
    assert err < 0.05, f"relative error {err:.3f}"


def test_cuda_training_with_amp_writes_a_checkpoint_that_loads_on_cpu(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 16, 16, generator=g) * 2 - 1, torch.randint(0, 4, (64,), generator=g)
    summary = train_expert(_cfg("ddpm"), TrainConfig(steps=20, batch=16, device="cuda"), x, y, tmp_path,
                           progress=False)
    assert summary["steps"] == 20 and summary["final_loss"] == summary["final_loss"]  # finite, not NaN
    e = Expert.from_checkpoint(tmp_path / "expert.safetensors", "cpu")
    v = e.velocity(torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([0, 1]))
    assert torch.isfinite(v).all()
