"""The configuration of one ``diffswarm eval`` run: :class:`StudyConfig` and the Gaussian-mixture
study's sizes (:class:`GMMSettings`)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from diffswarm.eval.pool import PoolConfig
from diffswarm.eval.studies import STUDIES, study
from diffswarm.sampling.config import SamplingConfig


@dataclass(frozen=True)
class GMMSettings:
    """Sizes of :func:`diffswarm.eval.studies.gmm.run_gmm_study` (its defaults are the full run's)."""

    n_samples: int = 2000
    steps: int = 50
    router_steps: int = 1500
    stats_fit_samples: int = 20000
    kl_samples: int = 4000
    reference_samples: int = 20000
    # replicates (each trains its own routers and draws its own samples): the unit the GMM verdicts replicate
    # over, apart from the image studies' sampling seeds; as many as the full run's training seeds (with 3, a
    # paired t test with 2 df could not pass Holm over the report's 75 tests: 2026-12-03, raw p 0.0018)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)

    def run_kwargs(self) -> dict:
        """Keyword arguments of ``run_gmm_study`` (all but the seeds)."""
        return {k: v for k, v in asdict(self).items() if k != "seeds"}


QUICK_GMM = GMMSettings(n_samples=500, steps=20, router_steps=300, stats_fit_samples=4000, kl_samples=1000,
                        reference_samples=4000, seeds=(0, 1))


@dataclass(frozen=True)
class StudyConfig:
    """One ``diffswarm eval`` run (built by ``diffswarm.cli.eval_plans.plan_eval`` from a preset and the options)."""

    out: str
    pool: PoolConfig
    sampling: SamplingConfig  # steps, sampler, guidance (seed: each sampling seed; batch: all n of a cell at once)
    train_seeds: tuple[int, ...] = (0, 1)
    seeds: tuple[int, ...] = (0, 1, 2)  # sampling seeds
    n: int = 400  # samples per cell
    studies: tuple[str, ...] = STUDIES
    quick: bool = False  # only a label in the report
    classifier_epochs: int = 2
    threshold: float = 0.1  # the threshold strategy's cut-off
    switch_t: float = 0.5  # time-scheduled: full ensemble while t > switch_t, top-1 below
    stability_n: int = 32  # samples traced per stability cell
    lipschitz_directions: int = 2
    lipschitz_every: int = 3  # probe every this many steps
    align_n: int = 256  # real test images for the real-data alignment
    align_times: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    router_eval_n: int = 2000  # test images for routing accuracy against t
    gmm: GMMSettings = field(default_factory=GMMSettings)
    save_samples: bool = False
    jobs: int | None = None  # training processes (None: one per core)
    threads: int | None = None  # torch threads of this process (None: every core) and of each training
    #                            process (None: the cores shared out among the jobs)
    device: str = "auto"
    cache_dir: str | None = None  # None: $DIFFSWARM_CACHE or ~/.cache/diffswarm

    def __post_init__(self) -> None:
        unknown = set(self.studies) - set(STUDIES)
        if unknown or not self.studies:
            raise ValueError(f"studies must be some of {', '.join(STUDIES)}; got {', '.join(self.studies) or 'none'}")
        if not self.seeds or (self.needs_pool and not self.train_seeds):
            raise ValueError("give at least one sampling seed and one training seed")
        if self.n < 10 or self.stability_n < 2 or self.stability_n > self.n:
            raise ValueError(f"need n >= 10 samples per cell and 2 <= stability_n <= n, got {self.n}, "
                             f"{self.stability_n}")
        if (self.jobs is not None and self.jobs < 1) or (self.threads is not None and self.threads < 1):
            raise ValueError("jobs and threads must be >= 1")

    @property
    def cores(self) -> int:
        return os.cpu_count() or 1

    @property
    def sampling_threads(self) -> int:
        """Torch threads of the process that samples and scores."""
        return self.threads or self.cores

    @property
    def training_jobs(self) -> int:
        return self.jobs or self.cores

    @property
    def training_threads(self) -> int:
        """Torch threads of each training process."""
        return self.threads or max(1, self.cores // self.training_jobs)

    @property
    def needs_pool(self) -> bool:
        return any(study(s).pool for s in self.studies)


__all__ = ["QUICK_GMM", "GMMSettings", "StudyConfig"]
