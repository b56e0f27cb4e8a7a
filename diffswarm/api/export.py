"""``diffswarm export``: a diffusers pipeline folder (``DiffswarmPipeline.save_pretrained``) from a run directory or
from a swarm.

From a swarm, the router is the one its owner's manifest names (fetched and verified by the swarm client) and each
cluster's expert is fetched from a peer serving it by its weights' sha256 (``client/downloads.py``: hash-checked, kept
in the client's cache); the checkpoint most of the cluster's usable replicas announce is chosen.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from diffswarm.api.session import Session, load_run
from diffswarm.router.routing import RoutingConfig
from diffswarm.utils.fileio import fsync_dir

logger = logging.getLogger(__name__)


def swarm_experts(session: Session) -> list:
    """Each cluster's ``Expert`` of a swarm session, fetched by its weights' sha256 (cluster order). Raises
    ValueError naming the clusters that no peer serves or whose checkpoint could not be fetched."""
    client = session.model.client
    client.refresh()
    experts, missing = [], []
    for k in range(session.model.num_experts):
        reps = [r for r in client.view.replicas(k) if r.checkpoint_sha256]
        shas = Counter(r.checkpoint_sha256 for r in reps).most_common()
        expert = None
        for sha, _ in shas:
            expert = client.local_expert(sha, reps, fetch=True)
            if expert is not None:
                logger.info(f"cluster {k}: expert {expert.expert_id} ({sha[:12]}) fetched and verified")
                break
        if expert is None:
            missing.append(f"{k} ({'no peer serves it' if not shas else 'its checkpoint could not be fetched'})")
        experts.append(expert)
    if missing:
        raise ValueError(f"cannot export: clusters {', '.join(missing)}")
    return experts


def export_pipeline(out: str | Path, *, run: str | Path | None = None, session: Session | None = None,
                    routing: RoutingConfig | None = None, router_kind: str = "auto") -> Path:
    """Write the diffusers pipeline of the experts and router of a run directory (``run``) or of a swarm session
    (``session``, from ``connect``) to the folder ``out``; returns ``out``. The folder must not exist or be empty.
    ``routing``: the pipeline's default routing (default ``RoutingConfig()``, top-2); ``router_kind`` (a run: trained,
    stats or auto, as ``load_run``): the router the pipeline holds, a trained router or the statistics router."""
    from diffswarm.api.pipeline import DiffswarmPipeline
    if (run is None) == (session is None):
        raise ValueError("export from either a run directory or a swarm session")
    if session is not None and router_kind != "auto":
        raise ValueError("router_kind is for a run directory; a swarm session's router is set when connecting")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; export into a new one")
    if run is not None:
        with load_run(run, router_kind=router_kind) as local:
            experts, router = local.model.experts, local.model.router
    else:
        experts, router = swarm_experts(session), session.model.router
    pipe = DiffswarmPipeline.from_ensemble(experts, router, routing)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:  # written beside ``out`` and renamed into place: never a half-written pipeline under its name
        pipe.save_pretrained(tmp)
        os.replace(tmp, out)  # onto a missing or empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    return out


__all__ = ["export_pipeline", "swarm_experts"]
