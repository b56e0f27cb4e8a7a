"""The studies of ``diffswarm eval``, one module each (its computation, report section and plots), and
:data:`TABLE`, the one table of them in run and report order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from diffswarm.eval.studies import alignment, gmm, hddm, objectives, routers, routing, scaling, stability


class StudyRun(NamedTuple):
    """What a study's computation may use: the StudyConfig, the Context (None when no study of
    the run needs the pool) and the results of the studies run before it, by name."""

    cfg: object  # the run's StudyConfig (eval.config imports this table: no import back)
    ctx: object  # the run's eval.context.Context, or None
    done: dict


@dataclass(frozen=True)
class Study:
    """One study: ``compute`` (its JSON-able results), ``section`` (its report section and claims for the
    last one, from the whole results dict and the report folder) and the expert objectives of the pool it
    samples from (``()``: it needs no pool, so it runs once, not once per training seed)."""

    name: str
    compute: Callable[[StudyRun], dict]
    section: Callable[[dict, Path], tuple[str, list[dict]]]
    pool: tuple[str, ...] = ("fm",)


TABLE: tuple[Study, ...] = (
    Study("routing", lambda r: routing.study_routing(r.ctx), routing.section_routing),
    Study("objectives", lambda r: objectives.study_objectives(r.ctx), objectives.section_objectives,
          pool=("fm", "ddpm")),
    Study("stability", lambda r: stability.study_stability(r.ctx), stability.section_stability),
    Study("alignment", lambda r: alignment.study_alignment(r.ctx, r.done.get("stability")),
          alignment.section_alignment),
    Study("routers", lambda r: routers.study_routers(r.ctx), routers.section_routers),
    Study("gmm", lambda r: gmm.study_gmm(r.cfg), gmm.section_gmm, pool=()),
    # the full run's studies only (each trains pools of its own): HDDM as published, and scaling K
    Study("hddm", lambda r: hddm.study_hddm(r.ctx), hddm.section_hddm, pool=("fm", "ddpm-eps")),
    Study("scaling", lambda r: scaling.study_scaling(r.ctx), scaling.section_scaling),
)
STUDIES = tuple(s.name for s in TABLE)
QUICK_STUDIES = ("routing", "objectives", "stability", "alignment", "routers", "gmm")  # --quick's default


def study(name: str) -> Study:
    """The table's entry called ``name``."""
    return next(s for s in TABLE if s.name == name)


__all__ = ["QUICK_STUDIES", "STUDIES", "TABLE", "Study", "StudyRun", "study"]
