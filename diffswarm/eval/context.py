"""The context every study of one ``diffswarm eval`` run works in: the pool's data, the model cache, the
cell cache and the scoring, and :meth:`Context.cell`, which samples, scores and costs one cell."""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from diffswarm.eval.ablations import sample_native_ddim, sample_native_dpm
from diffswarm.eval.cell_cache import CellCache
from diffswarm.eval.model_cache import ModelCache
from diffswarm.eval.pool import ExpertPool
from diffswarm.eval.scoring import Scoring
from diffswarm.eval.settings import Cell, ensemble_objectives, second_order, strategies
from diffswarm.experts.train import pick_device
from diffswarm.router.local import make_labels
from diffswarm.sampling.loop import sample
from diffswarm.utils.images import save_grid, save_samples

logger = logging.getLogger(__name__)


class Context:
    """Pool, data, models, scoring and the cell cache shared by the studies of one run (``cfg``: a StudyConfig)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = pick_device(cfg.device)
        self.pool = ExpertPool(replace(cfg.pool, device=cfg.device, threads=cfg.training_threads), cfg.cache_dir)
        self.train_ds, self.test_ds, self.partition = self.pool.train_ds, self.pool.test_ds, self.pool.partition
        self.k = cfg.pool.k
        self.num_classes = self.train_ds.num_classes
        self.shape = self.train_ds.shape
        self.strategies = strategies(cfg.threshold, cfg.switch_t)
        self.scoring = Scoring(self.train_ds, self.test_ds, self.partition, cfg.cache_dir, cfg.classifier_epochs)
        self.models = ModelCache(self.pool, self.device, self.k, self.shape, self.num_classes)
        pool_key = {k: v for k, v in cfg.pool.to_dict().items() if k not in ("device", "threads")}
        self.cells = CellCache(self.out, {"pool": pool_key, "n": cfg.n, "threshold": cfg.threshold,
                                          "switch_t": cfg.switch_t, "classifier_epochs": cfg.classifier_epochs,
                                          "sampling": {k: v for k, v in asdict(cfg.sampling).items()
                                                       if k not in ("seed", "batch")}}, cfg.save_samples)

    def labels(self, generation: str = "class") -> torch.Tensor:
        """(n,) requested labels: cycling through the classes, or -1 (unconditional) for ``generation="none"``."""
        classes = list(range(self.num_classes)) if generation == "class" else None
        return make_labels(self.cfg.n, classes or None, self.num_classes)

    def guidance(self, cell: Cell) -> float:
        return self.cfg.sampling.guidance if cell.generation == "class" and self.num_classes else 1.0

    def noise(self, seed: int) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn((self.cfg.n, *self.shape), generator=gen)

    def ensemble(self, cell: Cell):
        """The routed ensemble of ``cell``, with its strategy."""
        return self.models.ensemble(cell, self.strategies[cell.strategy])

    def _draw(self, cell: Cell, x: torch.Tensor, y: torch.Tensor, s) -> tuple:
        """Samples of ``cell`` from noise ``x`` and labels ``y`` with sampling ``s``, and their cost: (samples
        on the CPU, expert calls (K,) or (1,), FLOPs per call of each network, router FLOPs, evaluations)."""
        m = self.models
        if cell.router is None:  # the monolith
            model = m.monolith(cell.train_seed, cell.ensemble.removeprefix("monolith-"))
            if cell.method == "steps-x2":  # the inference compute of top-2: twice the network evaluations
                s = replace(s, steps=2 * s.steps)
            x = sample(model, x, y, s.steps, s.sampler, s.guidance).cpu()
            calls = np.array([self.cfg.n * s.evaluations])
            fl = m.flops_of(("monolith", cell.train_seed, cell.ensemble), lambda: model, "expert", s.guidance)
            return x, calls, [fl], 0, s.evaluations
        ens = self.ensemble(cell)
        heun_steps, nfe2 = second_order(s)
        ddim_steps = {"ddim": s.steps, "ddim-nfe": s.evaluations, "dpm2-nfe": nfe2}.get(cell.method)
        if cell.method == "dpm2-nfe":  # native 2nd order, as many evaluations as translator + Heun
            x = sample_native_dpm(ens, x, y, nfe2, s.guidance).cpu()
        elif ddim_steps:
            x = sample_native_ddim(ens, x, y, ddim_steps, s.guidance).cpu()
        else:
            if cell.method == "heun":  # translator + Heun (the run's steps when it is Heun already)
                s = replace(s, sampler="heun", steps=heun_steps)
            x = sample(ens, x, y, s.steps, s.sampler, s.guidance).cpu()
        calls = ens.calls.numpy().astype(np.float64)
        objs = ensemble_objectives(cell.ensemble, self.k)
        flops = [m.flops_of(("expert", cell.train_seed, o, c), lambda e=e: e, "expert", s.guidance)
                 for c, (o, e) in enumerate(zip(objs, ens.experts, strict=True))]
        router_fl = m.flops_of(("router", cell.router), lambda: ens.router, "router")
        return x, calls, flops, router_fl, ddim_steps or s.evaluations

    def cell(self, cell: Cell, studies: tuple[str, ...] = ()) -> dict:
        """Sample, score and cost one cell (cached)."""

        def compute(key: str) -> dict:
            labels = self.labels(cell.generation)
            noise = self.noise(cell.seed)
            s = replace(self.cfg.sampling, guidance=self.guidance(cell))
            # all n samples in one batch: a trajectory's sample-k draw is per row of the batch, so splitting the
            # batch would give rows i and i + batch the same draw
            x, calls, flops, router_fl, evaluations = self._draw(cell, noise.to(self.device),
                                                                 labels.to(self.device), s)
            x = x.clamp(-1, 1)
            n = self.cfg.n
            res = {**self.scoring.score(x, labels, cell.generation == "class", cell.seed),
                   "calls_per_image": float(calls.sum() / n), "expert_call_share": (calls / calls.sum()).tolist(),
                   "gflops_per_image": float((calls @ np.asarray(flops, dtype=np.float64)
                                              + evaluations * n * router_fl) / n / 1e9),
                   "expert_gflops_per_call": [f / 1e9 for f in flops], "router_gflops_per_call": router_fl / 1e9}
            nrow = max(1, self.num_classes) if self.num_classes else 10
            save_grid(x[: nrow * 4], self.out / "grids" / f"{key}.png", nrow)
            if self.cfg.save_samples:
                save_samples(self.out / "samples" / f"{key}.npz", x, labels, setting=np.array(cell.setting),
                             train_seed=np.array(cell.train_seed), seed=np.array(cell.seed),
                             ensemble=np.array(cell.ensemble), router=np.array(str(cell.router)),
                             strategy=np.array(str(cell.strategy)), method=np.array(cell.method),
                             first_study=np.array(",".join(studies)))
            met = res["metrics"]
            logger.info(f"    {cell.run} {cell.setting}: FD {met['fd']:.2f} (floor {met['fd_floor']:.2f}), "
                     f"TV {res['share_tv']:.3f}, {res['calls_per_image']:.0f} calls/img")
            return res

        self.cells.note_studies(cell, studies)
        return self.cells.load_or("cell", cell, compute)


__all__ = ["Context"]
