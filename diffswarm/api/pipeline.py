"""``DiffswarmPipeline``: a trained ensemble (K experts and their router) as a diffusers pipeline.

Its components are ``router`` (a ``RouterModel``, absent for a single expert) and ``expert_0`` .. ``expert_{K-1}``
(``ExpertModel``, cluster order), so ``save_pretrained`` writes the layout of the released Paris weights: one folder
per expert, ``router/`` and ``model_index.json``. Loading needs this module imported (diffusers resolves the
components' classes from ``model_index.json`` and imports no module a folder names):

    from diffswarm.api import DiffswarmPipeline

    pipe = DiffswarmPipeline.from_pretrained("runs/pipeline")
    images = pipe(class_labels=[0, 1, 2], num_inference_steps=6, guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(0)).images

Sampling is the library's own (``router.local.generate``: the sampler loop over the ``RoutedEnsemble``), so with
``generator=torch.Generator().manual_seed(S)`` the pipeline makes the images ``diffswarm generate --local --seed S``
makes. The number of experts is free up to ``MAX_EXPERTS``: diffusers reads a pipeline's components from its
``__init__`` signature, which is generated here with one optional keyword per expert slot.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput

from diffswarm.api.components import ExpertModel, RouterModel, StatsRouterModel
from diffswarm.api.result import pil_images
from diffswarm.router.routing import RoutingConfig
from diffswarm.sampling.config import SamplingConfig
from diffswarm.sampling.loop import StepInfo

MAX_EXPERTS = 64  # expert slots of the pipeline signature (Paris has 8; the DHT allows more, export refuses them)
EXPERT_SLOTS = tuple(f"expert_{i}" for i in range(MAX_EXPERTS))
OUTPUT_TYPES = ("pil", "np", "pt")


class DiffswarmPipeline(DiffusionPipeline):
    """Class-conditional generation with a routed ensemble of experts (top-k routing per step, flow-time Euler or
    Heun integration, classifier-free guidance per expert). Build one from the library's objects with
    ``DiffswarmPipeline.from_ensemble`` (or ``diffswarm export``), or load a saved folder with ``from_pretrained``.

    Config (saved in ``model_index.json``): ``routing`` (top-k | full | threshold | sample-k), ``k``,
    ``threshold``, ``full_above``, ``sampler`` (euler | heun) and ``draw`` (sample-k: trajectory | step), the
    defaults of ``__call__``.
    """

    _optional_components = ["router", *EXPERT_SLOTS[1:]]
    model_cpu_offload_seq = None

    def __init__(self, *, router: RouterModel | StatsRouterModel | None = None, routing: str = "top-k", k: int = 2,
                 threshold: float = 0.1, full_above: float | None = None, sampler: str = "heun",
                 draw: str = "trajectory", **experts):
        super().__init__()
        names = [n for n, m in experts.items() if m is not None]
        if sorted(names, key=EXPERT_SLOTS.index) != list(EXPERT_SLOTS[:len(names)]) or not names:
            raise ValueError(f"experts must fill expert_0 .. expert_{{K-1}} without gaps (K <= {MAX_EXPERTS}); "
                             f"got {sorted(experts)}")
        if len(names) > 1 and router is None:
            raise ValueError(f"{len(names)} experts need their router")
        RoutingConfig(routing, k, threshold, full_above, draw)  # ValueError on a bad strategy, k or draw
        SamplingConfig(sampler=sampler)
        self.register_modules(router=router, **{n: experts[n] for n in EXPERT_SLOTS[:len(names)]})
        self.register_to_config(routing=routing, k=k, threshold=threshold, full_above=full_above, sampler=sampler,
                                draw=draw)

    @classmethod
    def _get_signature_keys(cls, obj):
        """diffusers' components of the signature; an instance's are its router and its own K experts."""
        expected, optional = super()._get_signature_keys(obj)
        if isinstance(obj, DiffswarmPipeline):
            expected = [m for m in expected if m in obj.config]
        return expected, optional

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader (offline for a folder); without ``accelerate`` it loads the way diffusers falls back
        to anyway, without the warning."""
        from diffusers.utils import is_accelerate_available

        if not is_accelerate_available():
            kwargs.setdefault("low_cpu_mem_usage", False)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_ensemble(cls, experts: Sequence, router=None, routing: RoutingConfig | None = None,
                      sampler: str = SamplingConfig.sampler) -> DiffswarmPipeline:
        """A pipeline holding copies of ``experts`` (``Expert``s in cluster order) and ``router`` (a ``Router`` or a
        ``StatsRouter``)."""
        from diffswarm.router.model import Router

        if not 1 <= len(experts) <= MAX_EXPERTS:
            raise ValueError(f"a pipeline holds 1..{MAX_EXPERTS} experts, got {len(experts)}")
        rc = routing or RoutingConfig()
        if router is not None:
            router = RouterModel.from_router(router) if isinstance(router, Router) else \
                StatsRouterModel.from_stats_router(router)
        return cls(router=router, routing=rc.strategy,
                   k=rc.k, threshold=rc.threshold, full_above=rc.full_above, sampler=sampler, draw=rc.draw,
                   **{EXPERT_SLOTS[i]: ExpertModel.from_expert(e) for i, e in enumerate(experts)})

    @property
    def experts(self) -> list[ExpertModel]:
        """The K expert components, cluster order."""
        return [getattr(self, n) for n in EXPERT_SLOTS if n in self.config]

    def ensemble(self, routing: RoutingConfig | None = None, seed: int = 0):
        """The ``RoutedEnsemble`` of the components (the library's velocity model)."""
        from diffswarm.router.ensemble import RoutedEnsemble

        c = self.config
        rc = routing or RoutingConfig(c.routing, c.k, c.threshold, c.full_above, c.get("draw", "trajectory"))
        router = self.router.router if self.router is not None else None
        return RoutedEnsemble([m.expert for m in self.experts], router, rc, seed=seed)

    @torch.no_grad()
    def __call__(self, class_labels: int | Sequence[int] | torch.Tensor | None = None,
                 num_inference_steps: int = SamplingConfig.steps, guidance_scale: float = SamplingConfig.guidance,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True, batch_size: int | None = None, routing: str | None = None,
                 k: int | None = None, sampler: str | None = None,
                 callback: Callable[[StepInfo], None] | None = None) -> ImagePipelineOutput | tuple:
        """Generate one image per entry of ``class_labels`` (-1 or None: unconditional; with None, ``batch_size``
        images, default 1).

        ``generator`` draws the starting noise (one CPU generator: the images of ``diffswarm generate --seed``
        with its seed; a list: one generator per image); ``routing``, ``k`` and ``sampler`` override the pipeline's
        config. ``output_type``: "pil" (list of PIL images), "np" ((N, H, W, C) float in [0, 1]) or "pt"
        ((N, C, H, W) float in [0, 1]). ``callback(StepInfo)`` is called after every sampling step.
        Returns ``ImagePipelineOutput(images)`` (or ``(images,)`` with ``return_dict=False``).
        """
        from diffswarm.router.local import generate

        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if self.dtype != torch.float32:
            raise ValueError(f"the experts' weights are {self.dtype}: diffswarm experts answer in float32 (the "
                             "swarm's cross-checks compare float32 answers); load the pipeline without torch_dtype "
                             "or call .to(torch.float32)")
        ncfg = self.experts[0].expert_config.net
        shape = (ncfg.channels, ncfg.size, ncfg.size)
        labels = self._labels(class_labels, batch_size, ncfg.num_classes)
        noise, seed = self._noise(generator, labels.shape[0], shape)
        c = self.config
        rc = RoutingConfig(routing or c.routing, k if k is not None else c.k, c.threshold, c.full_above,
                           c.get("draw", "trajectory"))
        sampling = SamplingConfig(steps=num_inference_steps, sampler=sampler or c.sampler, guidance=guidance_scale,
                                  seed=seed)
        batches = -(-labels.shape[0] // sampling.batch)
        with self.progress_bar(total=num_inference_steps * batches) as bar:
            def on_step(info: StepInfo) -> None:
                bar.update(1)
                if callback is not None:
                    callback(info)

            x = generate(self.ensemble(rc, seed), labels, shape, sampling, self.device, callback=on_step,
                         noise=noise)
        x = x.float().clamp(-1, 1)
        if output_type == "pil":
            images = pil_images(x)
        elif output_type == "np":
            images = ((x + 1) / 2).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
        else:
            images = (x + 1) / 2
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @staticmethod
    def _labels(class_labels, batch_size: int | None, num_classes: int) -> torch.Tensor:
        if class_labels is None:
            return torch.full((batch_size or 1,), -1, dtype=torch.long)
        if batch_size is not None:
            raise ValueError("batch_size is for unconditional images; with class_labels, pass one label per image")
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).cpu()
        if labels.numel() == 0:
            raise ValueError("class_labels is empty")
        bad = labels[(labels < -1) | (labels >= num_classes)]
        if bad.numel():
            raise ValueError(f"class labels {bad.tolist()} are outside 0..{num_classes - 1} (-1: unconditional)")
        return labels

    @staticmethod
    def _noise(generator, n: int, shape: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
        """(noise (n, *shape) float32 on the CPU, the seed of sample-k's per-trajectory noise)."""
        if isinstance(generator, list):
            if len(generator) != n:
                raise ValueError(f"{len(generator)} generators for {n} images")
            noise = torch.stack([torch.randn(shape, generator=g, device=g.device).cpu() for g in generator])
            return noise, int(generator[0].initial_seed())
        if generator is None:
            return torch.randn((n, *shape)), 0
        noise = torch.randn((n, *shape), generator=generator, device=generator.device).cpu()
        return noise, int(generator.initial_seed())


def _signature() -> inspect.Signature:
    """``__init__``'s signature as diffusers reads it: ``self``, the router and one keyword per expert slot
    (``expert_0`` required), then the config options."""
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("router", kw, default=None, annotation=RouterModel | StatsRouterModel | None),
              inspect.Parameter(EXPERT_SLOTS[0], kw, annotation=ExpertModel)]
    params += [inspect.Parameter(n, kw, default=None, annotation=ExpertModel | None) for n in EXPERT_SLOTS[1:]]
    own = inspect.signature(DiffswarmPipeline.__init__).parameters
    params += [own[n] for n in ("routing", "k", "threshold", "full_above", "sampler", "draw")]
    return inspect.Signature(params)


DiffswarmPipeline.__init__.__signature__ = _signature()

__all__ = ["EXPERT_SLOTS", "MAX_EXPERTS", "DiffswarmPipeline"]
