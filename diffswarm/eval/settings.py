"""What a cell of ``diffswarm eval`` is made of: the routing strategies, the ensembles (objective per
cluster) and :class:`Cell`, the key of one sample set."""

from __future__ import annotations

from dataclasses import dataclass

from diffswarm.router.routing import RoutingConfig

ROUTERS = ("cond", "uncond", "stats", "stats-uncond")


def strategies(threshold: float = 0.1, switch_t: float = 0.5) -> dict[str, RoutingConfig]:
    """The routing strategies of the routing study, by display name."""
    return {
        "full": RoutingConfig("full"),
        "top-1": RoutingConfig("top-k", k=1),
        "top-2": RoutingConfig("top-k", k=2),
        "top-3": RoutingConfig("top-k", k=3),
        f"threshold-{threshold:g}": RoutingConfig("threshold", threshold=threshold),
        "sample-1": RoutingConfig("sample-k", k=1),  # drawn once per trajectory
        "sample-1/step": RoutingConfig("sample-k", k=1, draw="step"),  # redrawn at every evaluation (DDM)
        f"full>{switch_t:g}/top-1": RoutingConfig("top-k", k=1, full_above=switch_t),
    }


def ddpm_clusters(k: int, n_ddpm: int) -> list[int]:
    """Evenly spaced clusters that get DDPM experts in a mix: K = 8, 2 -> [0, 4]; 4 -> [0, 2, 4, 6]."""
    return sorted({round(i * k / n_ddpm) for i in range(n_ddpm)}) if n_ddpm else []


def ensemble_objectives(name: str, k: int) -> list[str]:
    """Pool objective per cluster for an ensemble name: ``fm``, ``ddpm``, ``ddpm-eps``, ``mix-<n DDPM>`` (this
    project's DDPM recipe) or ``hmix-<n>[@<shift>]`` (HDDM's eps-loss DDPM experts, their evenly spaced clusters
    shifted by ``shift``: a second placement)."""
    if name in ("fm", "ddpm", "ddpm-eps"):
        return [name] * k
    if name.startswith(("mix-", "hmix-")):
        kind, _, rest = name.partition("-")
        n, _, shift = rest.partition("@")
        dd = {(c + int(shift or 0)) % k for c in ddpm_clusters(k, int(n))}
        obj = "ddpm" if kind == "mix" else "ddpm-eps"
        return [obj if c in dd else "fm" for c in range(k)]
    raise ValueError(f"unknown ensemble {name!r}")


def mixes(k: int) -> dict[str, str]:
    """{ensemble name: display name} of the objectives study: all FM, all DDPM, ~1/4 DDPM, 1/2 DDPM."""
    q, h = max(1, k // 4), max(1, k // 2)
    out = {"fm": f"{k} FM", "ddpm": f"{k} DDPM", f"mix-{q}": f"{q} DDPM + {k - q} FM"}
    out.setdefault(f"mix-{h}", f"{h} DDPM + {k - h} FM")
    return out


@dataclass(frozen=True)
class Cell:
    """One sample set (:mod:`diffswarm.eval.run`'s docstring). ``router``/``strategy`` are None for the monolith."""

    train_seed: int
    seed: int
    ensemble: str  # fm | ddpm | mix-<n> | monolith-fm
    router: str | None = None  # cond | uncond | stats | stats-uncond
    strategy: str | None = None  # a key of strategies()
    method: str = "flow"  # flow (the sampler over velocities) | ddim (native DDPM, as many steps) | ddim-nfe
    # (native DDPM, as many network evaluations as the flow sampler) | no-translator (ablations.py) |
    # dpm2-nfe (native DPM-Solver++ 2M at the flow sampler's evaluations) | steps-x2 (monolith: twice the steps)
    generation: str = "class"  # class: labels cycling through the classes, with CFG | none: unconditional, no CFG

    @property
    def setting(self) -> str:
        """Display name without the seeds."""
        gen = "uncond gen | " if self.generation == "none" else ""
        if self.router is None:
            return gen + self.ensemble + ("" if self.method == "flow" else f", {self.method}")
        extra = "" if self.method == "flow" else f", {self.method}"
        return f"{gen}{self.ensemble} | {self.router} router | {self.strategy}{extra}"

    @property
    def run(self) -> str:
        return f"s{self.train_seed}/r{self.seed}"


def second_order(sampling) -> tuple[int, int]:
    """(Heun steps, network evaluations) of the translator + Heun cell of the objectives study: the run's own
    sampler when it is Heun, else Heun at half the run's Euler steps (2 h - 1 evaluations); DPM-Solver runs
    as many evaluations."""
    h = sampling.steps if sampling.sampler == "heun" else max(2, sampling.steps // 2)
    return h, 2 * h - 1


def runs(cfg) -> list[tuple[int, int]]:
    """(training seed, sampling seed) of every run of a StudyConfig."""
    return [(ts, s) for ts in cfg.train_seeds for s in cfg.seeds]


__all__ = ["ROUTERS", "Cell", "ddpm_clusters", "ensemble_objectives", "mixes", "runs", "second_order", "strategies"]
