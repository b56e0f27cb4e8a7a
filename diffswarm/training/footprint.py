"""What training one expert costs the volunteer's machine, said before it starts (Petals users asked "how much
GPU RAM does it need?"; horde workers warn about low RAM/VRAM), and whether the machine can hold it.

``measure_footprint`` builds the configured expert and measures, on the CPU:

1. its parameters (fp32 bytes);
2. the training state: weights, gradients, AdamW's two moments and the EMA copy: five fp32 copies of the weights;
3. the activations one training step keeps for its backward pass, counted tensor by tensor through
   ``torch.autograd.graph.saved_tensors_hooks`` at a small batch and scaled linearly to the training batch;
4. the cluster's images and labels, which training keeps on its device.

``available_memory`` is what the device has free now (CUDA: ``torch.cuda.mem_get_info``; CPU: the kernel's
``MemAvailable``); ``fits`` says whether the footprint fits in it with ``HEADROOM`` to spare.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HEADROOM = 0.8  # use at most this fraction of the free memory (allocator slack, the serving process, the rest)
PROBE_BATCH = 4  # batch at which activations are measured (then scaled to the training batch)


@dataclass(frozen=True)
class Footprint:
    """Bytes training one expert needs on its device."""

    params: int  # parameter count
    state_bytes: int  # weights, gradients, AdamW moments, EMA (fp32)
    activation_bytes: int  # saved for backward by one step at the training batch
    data_bytes: int  # the cluster's images and labels on the device

    @property
    def total(self) -> int:
        return self.state_bytes + self.activation_bytes + self.data_bytes

    def describe(self) -> str:
        mib = 1 << 20
        return (f"{self.total / mib:.0f} MiB ({self.params / 1e6:.2f} M parameters: {self.state_bytes / mib:.0f} MiB "
                f"of weights, gradients, optimizer and EMA state; {self.activation_bytes / mib:.0f} MiB of "
                f"activations per step; {self.data_bytes / mib:.0f} MiB of training images)")


def measure_footprint(config, batch: int, n_images: int) -> Footprint:
    """The ``Footprint`` of training an expert of ``ExpertConfig`` config with batches of ``batch`` rows on
    ``n_images`` images (measured on the CPU; see the module docstring)."""
    from diffswarm.experts.expert import Expert
    from diffswarm.experts.objectives import expert_loss

    expert = Expert(config)
    params = sum(p.numel() for p in expert.parameters())
    c, s = config.net.channels, config.net.size
    probe = min(batch, PROBE_BATCH)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    x0 = torch.zeros(probe, c, s, s)
    labels = torch.zeros(probe, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = expert_loss(expert, x0, labels)
    del loss
    return Footprint(params=params, state_bytes=5 * 4 * params, activation_bytes=saved * batch // probe,
                     data_bytes=n_images * (c * s * s * 4 + 8))


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """(free bytes on ``device`` now, what they are); None when it cannot be told."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), f"free GPU memory of {torch.cuda.get_device_name(device)} ({total >> 20} MiB in all)"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    return None, "available RAM (unknown on this system)"


def fits(footprint: Footprint, free: int | None, headroom: float = HEADROOM) -> bool:
    """Whether ``footprint`` fits in ``free`` bytes, using at most ``headroom`` of them (unknown ``free``: yes)."""
    return free is None or footprint.total <= headroom * free
