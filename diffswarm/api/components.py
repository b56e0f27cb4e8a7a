"""diffusers components for a trained ensemble: ``ExpertModel`` (one expert denoiser) and ``RouterModel`` (the
router), ``ModelMixin`` + ``ConfigMixin`` models that ``save_pretrained`` / ``from_pretrained`` write and read as a
folder each (``config.json`` + ``diffusion_pytorch_model.safetensors``).

Each wraps the library's own object (``Expert``, ``Router``) built from the config dataclass stored in
``config.json``, so a loaded component answers exactly as its checkpoint does. The config also records the
weights' sha256 (``tensors_sha256`` over the wrapped network's state, as a diffswarm checkpoint records it);
``from_pretrained`` recomputes it and refuses a folder whose weights do not match, as ``Expert.from_checkpoint``
refuses a corrupt checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from diffswarm.experts.checkpoint import CheckpointError, tensors_sha256
from diffswarm.experts.config import ExpertConfig
from diffswarm.experts.expert import Expert
from diffswarm.router.model import Router, RouterConfig


class _Verified:
    """Shared by both components: the weights' sha256 recorded on save and checked on load."""

    def _weights(self) -> torch.nn.Module:
        raise NotImplementedError

    def weights_digest(self) -> str:
        return tensors_sha256(self._weights().state_dict())

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.register_to_config(weights_sha256=self.weights_digest())  # the weights being written now
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """diffusers' loader, then the sha256 check (skipped when ``torch_dtype`` converts the weights)."""
        from diffusers.utils import is_accelerate_available

        if not is_accelerate_available():  # what diffusers falls back to anyway, without its warning
            kwargs.setdefault("low_cpu_mem_usage", False)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        want = model.config.get("weights_sha256")
        if want and kwargs.get("torch_dtype") in (None, torch.float32):
            got = model.weights_digest()
            if got != want:
                raise CheckpointError(f"{Path(str(pretrained_model_name_or_path)) / kwargs.get('subfolder', '')}: "
                                      f"weights sha256 {got[:12]} does not match the recorded {want[:12]}; "
                                      "the folder is corrupt")
        return model


class ExpertModel(_Verified, ModelMixin, ConfigMixin):
    """One expert denoiser as a diffusers model. ``self.expert`` is its ``Expert`` (``velocity(x, t, labels,
    guidance)`` in flow time, the objective adapter and classifier-free guidance included)."""

    @register_to_config
    def __init__(self, expert_config: dict | None = None, weights_sha256: str | None = None,
                 summary: dict | None = None):
        super().__init__()
        self.expert = Expert(ExpertConfig.from_dict(dict(expert_config or {})), summary=dict(summary or {}))
        self.expert.weights_sha256 = weights_sha256

    def _weights(self) -> torch.nn.Module:
        return self.expert.net

    @classmethod
    def from_expert(cls, expert: Expert) -> ExpertModel:
        """A component holding a copy of ``expert``'s configuration and weights."""
        m = cls(expert_config=expert.config.to_dict(), weights_sha256=expert.weights_sha256,
                summary=dict(expert.summary))
        m.expert.net.load_state_dict(expert.net.state_dict())
        m.register_to_config(weights_sha256=m.weights_digest())
        m.expert.weights_sha256 = m.config.weights_sha256
        return m.eval()

    @property
    def expert_config(self) -> ExpertConfig:
        return self.expert.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
        """The expert's velocity (B, C, H, W) at flow time t (B,) for labels (B,) (-1: unconditional)."""
        return self.expert.velocity(x, t, labels, guidance)


class RouterModel(_Verified, ModelMixin, ConfigMixin):
    """The trained router p(cluster | x_t, t, class) as a diffusers model (``self.router``: its ``Router``)."""

    @register_to_config
    def __init__(self, router_config: dict | None = None, weights_sha256: str | None = None,
                 summary: dict | None = None):
        super().__init__()
        self.router = Router(RouterConfig.from_dict(dict(router_config or {})))
        self.router.summary = dict(summary or {})

    def _weights(self) -> torch.nn.Module:
        return self.router

    @classmethod
    def from_router(cls, router: Router) -> RouterModel:
        m = cls(router_config=router.cfg.to_dict(), summary=dict(router.summary))
        m.router.load_state_dict(router.state_dict())
        m.register_to_config(weights_sha256=m.weights_digest())
        return m.eval()

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """p(k | x_t, t, labels): (B, K)."""
        return self.router.probs(x, t, labels)


class StatsRouterModel(_Verified, ModelMixin, ConfigMixin):
    """The statistics router (``StatsRouter``: p(cluster | x_t, t, class) in closed form) as a diffusers model: the
    K clusters' statistics blobs (``ClusterStats.to_bytes``) are its uint8 buffers ``blob_0`` .. ``blob_{K-1}``,
    parsed and bounds-checked (``ClusterStats.from_bytes``) into the router on first use."""

    @register_to_config
    def __init__(self, blob_sizes: list[int] | None = None, options: dict | None = None,
                 partition_hash: str | None = None, dataset_id: str | None = None,
                 weights_sha256: str | None = None):
        from diffswarm.router.stats.blob import MAX_STATS_BYTES

        super().__init__()
        sizes = list(blob_sizes or [])
        if not sizes or any(not 0 < n <= MAX_STATS_BYTES for n in sizes):
            raise ValueError(f"blob_sizes must be 1..{MAX_STATS_BYTES} bytes each, one per cluster; got {sizes}")
        for k, n in enumerate(sizes):
            self.register_buffer(f"blob_{k}", torch.zeros(n, dtype=torch.uint8))
        self._built: tuple | None = None  # (blobs' device, StatsRouter)

    def _weights(self) -> torch.nn.Module:
        return self

    @classmethod
    def from_stats_router(cls, router) -> StatsRouterModel:
        from dataclasses import asdict

        blobs = [s.to_bytes() for s in router.stats]
        m = cls(blob_sizes=[len(b) for b in blobs], options=asdict(router.options),
                partition_hash=router.cfg.partition_hash, dataset_id=router.cfg.dataset_id)
        for k, b in enumerate(blobs):
            getattr(m, f"blob_{k}").copy_(torch.frombuffer(bytearray(b), dtype=torch.uint8))
        m.register_to_config(weights_sha256=m.weights_digest())
        return m.eval()

    @property
    def router(self):
        """The ``StatsRouter`` of the blobs (built once per device)."""
        from diffswarm.router.stats.blob import ClusterStats
        from diffswarm.router.stats.router import StatsRouter, StatsRouterOptions

        dev = self.blob_0.device
        if self._built is None or self._built[0] != dev:
            c = self.config
            stats = [ClusterStats.from_bytes(bytes(getattr(self, f"blob_{k}").cpu().numpy()))
                     for k in range(len(c.blob_sizes))]
            opts = StatsRouterOptions(**{k: v for k, v in dict(c.options or {}).items()
                                         if k in StatsRouterOptions.__dataclass_fields__})
            router = StatsRouter(stats, opts, partition_hash=c.partition_hash, dataset_id=c.dataset_id)
            self._built = (dev, router.to(dev))
        return self._built[1]

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """p(k | x_t, t, labels): (B, K)."""
        return self.router.probs(x, t, labels)


__all__ = ["ExpertModel", "RouterModel", "StatsRouterModel"]
