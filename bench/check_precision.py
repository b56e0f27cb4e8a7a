"""Which precision a peer may answer in: how far an expert's answers computed another way are from its float32
ones, per row, as the client's cross-check measures them (``client.answer_checks.relative_difference``, allowed:
``TrustConfig.tolerance``, 2e-3, and ``tolerance_noise_end``, 2e-2, within 1e-3 of t = 1).

A cross-check compares a peer's answer with another source's (a replica, or the client's own copy of the weights,
often on another kind of machine) row by row. Rounding that differs between the two sources must stay well inside
the tolerance at every flow time and guidance scale, or honest peers are judged liars. A DDPM expert's translation
to a velocity amplifies its network's rounding near t = 1 (x0 = (x_t - t eps) / (1 - t), the denominator floored
at 1e-4, then clipped), and guidance amplifies the difference of the conditional and unconditional halves.

Compared with each expert's float32 answer on this CPU (x_t from test images, both halves of CFG):

- ``bf16 autocast (CPU)``: the network under CPU bf16 autocast, its output cast back to float32 before CFG and the
  translation, as peers on CUDA once answered (CPU autocast standing in for CUDA's);
- ``float64``: the same expert in float64 (the size of float32's own rounding, which any two float32 machines
  differ by at most about twice);
- ``float32, AVX2 kernels``: the same expert in float32 in a process limited to AVX2 kernels
  (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``), i.e. another CPU's
  rounding (on an AVX-512 machine; skipped where torch already reports AVX2 or less);
- ``float32, NCHW layout``: the same expert in float32 with NCHW weights (a training run's layout; a loaded UNet
  answers channels-last on the CPU, ``UNetDenoiser.inference_layout``);
- on a CUDA machine also ``CUDA float32`` (the peer's path there: IEEE float32, no TF32) and ``CUDA bf16
  autocast``.

Experts: one FM and one DDPM expert of the CPU demo's network (UNet 16x3, 28x28) trained here for
``--train-minutes`` each on the default dataset, or every ``expert.safetensors`` under ``--experts DIR`` (e.g. a
demo run's ``experts/``).

    python bench/check_precision.py                      # two experts trained 1 minute each
    python bench/check_precision.py --experts runs/demo  # a demo's experts
    python bench/check_precision.py --quick              # 15 s of training each
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import types
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import beyond_avx2, footer, header, tiny, with_avx2_kernels  # noqa: E402

from diffswarm.client.answer_checks import NOISE_END, TrustConfig, relative_difference  # noqa: E402
from diffswarm.data.datasets import default_dataset_name, load_dataset  # noqa: E402
from diffswarm.experts.config import ExpertConfig  # noqa: E402
from diffswarm.experts.expert import Expert  # noqa: E402
from diffswarm.experts.networks import NetConfig  # noqa: E402
from diffswarm.experts.train import TrainConfig, train_expert  # noqa: E402

TIMES = (0.02, 0.1, 0.5, 0.9, 0.99, 1.0)
GUIDANCE = (1.0, 2.0, 4.0, 7.5)
WORKER_FLAG = "--answers-worker"


def answers(expert: Expert, cases: dict) -> dict:
    """{(t, g): float32 velocity} of ``expert`` for ``cases`` {t: (x_t, t, labels)}."""
    return {(t, gs): expert.velocity(xt, tt, labels, gs) for t, (xt, tt, labels) in cases.items() for gs in GUIDANCE}


def worker() -> None:
    """``WORKER_FLAG IN OUT``: the answers for the cases saved in IN (expert path + cases), saved to OUT."""
    src, dst = sys.argv[sys.argv.index(WORKER_FLAG) + 1:][:2]
    job = torch.load(src)
    torch.save(answers(Expert.from_checkpoint(job["path"], "cpu"), job["cases"]), dst)


def answers_with_avx2_kernels(path: Path, cases: dict, tmp: str) -> dict | None:
    """``answers`` computed in a child process limited to AVX2 kernels; None where this CPU has nothing more."""
    if not beyond_avx2():
        return None
    src, dst = os.path.join(tmp, "cases.pt"), os.path.join(tmp, "answers.pt")
    torch.save({"path": str(path), "cases": cases}, src)
    with_avx2_kernels(os.path.abspath(__file__), WORKER_FLAG, src, dst)
    return torch.load(dst)


def autocast_bf16(expert: Expert, device_type: str) -> Expert:
    """``expert`` whose network runs under bf16 autocast, its output cast back to the input's dtype (the way
    ``Expert._forward`` ran on CUDA before answers went float32)."""

    def forward(self, inp, ts, labels):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return self.net(inp, ts, labels).to(inp.dtype)

    expert._forward = types.MethodType(forward, expert)
    return expert


def train_two(out: Path, minutes: float, dataset: str) -> list[Path]:
    """One FM and one DDPM expert of the CPU demo's network trained for ``minutes`` each (tiny: an MLP, 2 steps)."""
    ds = load_dataset(dataset, "train", size=None if tiny() else 28)
    net = (NetConfig(kind="mlp", size=ds.images.shape[-1], width=64, depth=2, num_classes=10) if tiny() else
           NetConfig(kind="unet", size=28, width=16, depth=3, num_classes=10))
    paths = []
    for objective in ("fm", "ddpm"):
        length = dict(steps=2) if tiny() else dict(steps=None, minutes=minutes)
        train_expert(ExpertConfig(objective=objective, net=net), TrainConfig(batch=96, **length), ds.images,
                     ds.labels, out / objective, progress=False)
        paths.append(out / objective / "expert.safetensors")
    return paths


def variants(expert: Expert) -> dict[str, tuple[Expert, torch.device, torch.dtype]]:
    out = {"bf16 autocast (CPU)": (autocast_bf16(copy.deepcopy(expert), "cpu"), torch.device("cpu"), torch.float32),
           "float64": (copy.deepcopy(expert).double(), torch.device("cpu"), torch.float64)}
    if getattr(expert.net, "channels_last", False):  # a loaded UNet answers channels-last on the CPU
        nchw = copy.deepcopy(expert)
        nchw.net.inference_layout(channels_last=False)
        out["float32, NCHW layout"] = (nchw, torch.device("cpu"), torch.float32)
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        out["CUDA float32"] = (copy.deepcopy(expert).to(cuda), cuda, torch.float32)
        out["CUDA bf16 autocast"] = (autocast_bf16(copy.deepcopy(expert).to(cuda), "cuda"), cuda, torch.float32)
    return out


def measure(expert: Expert, path: Path, x0: torch.Tensor, labels: torch.Tensor, seed: int,
            tmp: str) -> dict[str, dict[float, float]]:
    """{variant: {t: largest per-row relative difference from float32 over the guidance scales}}."""
    g = torch.Generator().manual_seed(seed)
    cases = {t: ((1 - t) * x0 + t * torch.randn(x0.shape, generator=g), torch.full((len(x0),), t), labels)
             for t in TIMES}
    want = answers(expert, cases)
    res: dict[str, dict[float, float]] = {}
    for name, (e, dev, dtype) in variants(expert).items():
        got = {(t, gs): e.velocity(xt.to(dev, dtype), tt.to(dev, dtype), y.to(dev), gs).cpu().float()
               for t, (xt, tt, y) in cases.items() for gs in GUIDANCE}
        res[name] = worst_by_t(got, want)
    avx2 = answers_with_avx2_kernels(path, cases, tmp)
    if avx2 is not None:
        res["float32, AVX2 kernels"] = worst_by_t(avx2, want)
    return res


def worst_by_t(got: dict, want: dict) -> dict[float, float]:
    return {t: max(float(relative_difference(got[t, gs], want[t, gs]).max()) for gs in GUIDANCE) for t in TIMES}


def main() -> None:
    if WORKER_FLAG in sys.argv:
        return worker()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", default=None, help="measure every expert.safetensors under this folder")
    ap.add_argument("--train-minutes", type=float, default=1.0, help="training per expert when none are given")
    ap.add_argument("--rows", type=int, default=64, help="test images per flow time")
    ap.add_argument("--quick", action="store_true", help="15 s of training per expert, 32 rows")
    args = ap.parse_args()
    if args.quick:
        args.train_minutes, args.rows = 0.25, 32
    header(f"answer precision vs the cross-check's tolerance: t {list(TIMES)}, guidance {list(GUIDANCE)}")
    with tempfile.TemporaryDirectory(prefix="precision-bench-") as tmp:
        dataset = default_dataset_name()
        if args.experts:
            paths = sorted(Path(args.experts).rglob("expert.safetensors"))
            if not paths:
                sys.exit(f"no expert.safetensors under {args.experts}")
        else:
            print(f"training an FM and a DDPM expert on {dataset}, {args.train_minutes:g} min each", flush=True)
            paths = train_two(Path(tmp), args.train_minutes, dataset)
        worst: dict[str, list[float]] = {}  # variant objective -> [largest below the noise end, largest in it]
        for i, path in enumerate(paths):
            expert = Expert.from_checkpoint(path, "cpu")
            c = expert.config
            test = load_dataset(dataset, "test", size=c.net.size)
            idx = torch.randperm(len(test.images), generator=torch.Generator().manual_seed(i))[:args.rows]
            res = measure(expert, path, test.images[idx], test.labels[idx], seed=i, tmp=tmp)
            steps = expert.summary.get("steps", "?")
            print(f"\n{path.parent.name}: {c.objective} {c.net.kind} {c.net.width}x{c.net.depth} ({steps} steps); "
                  "largest per-row relative difference from float32 over the guidance scales")
            print(f"{'computed as':>22} | " + " ".join(f"{'t=' + format(t, 'g'):>8}" for t in TIMES))
            for name, by_t in res.items():
                print(f"{name:>22} | " + " ".join(f"{v:8.1e}" for v in by_t.values()))
                w = worst.setdefault(f"{name} {c.objective}", [0.0, 0.0])
                for t, v in by_t.items():
                    end = t >= 1 - NOISE_END
                    w[end] = max(w[end], v)
    trust = TrustConfig()
    print(f"\nlargest per-row difference from float32 against the cross-check's tolerance: {trust.tolerance:g} below "
          f"t = {1 - NOISE_END:g}, {trust.tolerance_noise_end:g} from there to t = 1")
    for name, (below, end) in worst.items():
        r = max(below / trust.tolerance, end / trust.tolerance_noise_end)
        verdict = "passes" if r <= 1 else "FAILS: an honest peer computing so would be judged a liar"
        print(f"  {name:>30}: {below:.2e} below, {end:.2e} at the noise end ({r:.2f} x tolerance) {verdict}")
    footer()


if __name__ == "__main__":
    main()
