"""Sampling defaults on trained experts: sampler and steps at equal network evaluations, and the
guidance scale. Scores each setting on the same noise (FD, floor, class accuracy) and measures its
CPU time on one thread.

Either one expert (a monolith from ``bench/recipe_choice.py``) or a demo-like ensemble from
``bench/demo_like.py`` (its expert folders and router, top-2 routing):

    python bench/sampling_choice.py --expert runs/recipe_choice/<tag>-06/expert.safetensors
    python bench/sampling_choice.py --run runs/demo_like/<tag> --router runs/demo_like/router-k4-s0-1000.safetensors

``--sweep nfe`` compares Euler and Heun at (nearly) equal network evaluations (Heun with N steps
makes 2N - 1, the last step being Euler), at the guidance of ``--guidance``; ``--sweep guidance``
varies the guidance scale at ``--sampler``/``--steps``; ``--settings`` lists settings by hand as
``method:steps:guidance,...``. One evaluation with guidance != 1 is one batched forward over the
conditional and the unconditional rows (twice the rows).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

NFE_SWEEP = [("euler", 10), ("heun", 6), ("euler", 15), ("heun", 8), ("euler", 20), ("heun", 10),
             ("euler", 30), ("heun", 16), ("euler", 50), ("heun", 25)]
GUIDANCE_SWEEP = [1.0, 1.5, 2.0, 3.0, 4.0, 5.0]


def nfe(method: str, steps: int) -> int:
    return 2 * steps - 1 if method == "heun" else steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--expert", default=None, help="one expert checkpoint")
    ap.add_argument("--run", default=None, help="a demo_like run folder (c*/expert.safetensors)")
    ap.add_argument("--router", default=None, help="router for --run")
    ap.add_argument("--sweep", default="nfe", choices=["nfe", "guidance", "none"])
    ap.add_argument("--settings", default=None, help="extra settings method:steps:guidance,...")
    ap.add_argument("--sampler", default="euler", choices=["euler", "heun"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default: next to the checkpoint)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from diffswarm.data import load_dataset
    from diffswarm.eval import get_classifier, quality_report
    from diffswarm.experts.expert import Expert
    from diffswarm.router.local import generate, load_local_ensemble
    from diffswarm.router.routing import RoutingConfig
    from diffswarm.sampling.config import SamplingConfig
    from diffswarm.utils.images import save_grid

    ds, test = load_dataset("fashion", "train"), load_dataset("fashion", "test")
    clf = get_classifier(ds, test_ds=test, progress=False)
    if args.expert:
        model, where = Expert.from_checkpoint(args.expert), Path(args.expert).parent
        what = f"expert {args.expert} ({model.config.objective}, {model.config.net.kind})"
    elif args.run:
        where = Path(args.run)
        paths = sorted(where.glob("c*/expert.safetensors"))
        model = load_local_ensemble(paths, args.router, RoutingConfig("top-k", 2), "cpu", seed=args.seed)
        what = f"{len(paths)} experts in {args.run}, top-2 routing"
    else:
        ap.error("give --expert or --run")
    settings = []
    if args.sweep == "nfe":
        settings += [(m, s, args.guidance) for m, s in NFE_SWEEP]
    elif args.sweep == "guidance":
        settings += [(args.sampler, args.steps, g) for g in GUIDANCE_SWEEP]
    if args.settings:
        for item in args.settings.split(","):
            m, s, g = item.split(":")
            settings.append((m, int(s), float(g)))
    labels = torch.arange(args.n) % ds.num_classes
    print(f"{what}; {args.n} samples, seed {args.seed}, one thread")
    head = f"{'sampler':>7s} {'steps':>5s} {'NFE':>4s} {'CFG':>4s} {'FD':>6s} {'floor':>5s} {'acc':>7s}"
    print(f"{head} {'CPU-s/1k':>8s}", flush=True)
    records = []
    for method, steps, g in settings:
        c0 = time.process_time()
        samples = generate(model, labels, ds.shape, SamplingConfig(steps=steps, sampler=method, guidance=g,
                                                                   seed=args.seed + 1, batch=250))
        cpu = (time.process_time() - c0) * 1000 / args.n
        rep = quality_report(samples, labels, ds, test, clf, seed=args.seed)
        rows = torch.cat([samples[labels == c][:10] for c in range(ds.num_classes)])
        save_grid(rows, where / "sampling" / f"grid-{method}{steps}-g{g:g}.png", 10)
        rec = {"sampler": method, "steps": steps, "nfe": nfe(method, steps), "guidance": g, "fd": rep.fd,
               "fd_floor": rep.fd_floor, "class_accuracy": rep.class_accuracy, "cpu_s_per_1000": cpu}
        records.append(rec)
        print(f"{method:>7s} {steps:5d} {rec['nfe']:4d} {g:4.1f} {rep.fd:6.1f} {rep.fd_floor:5.1f} "
              f"{100 * rep.class_accuracy:6.1f}% {cpu:8.1f}", flush=True)
    out = Path(args.out) if args.out else where / "sampling" / f"sweep-{args.sweep}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "what": what, "records": records}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
