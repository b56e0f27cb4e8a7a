"""What training one expert costs: images per second and peak memory on this CPU, and on a GPU when there is one.

CPU (always): the default expert of the demo's ``cpu`` preset (``PRESETS["cpu"]``: UNet 16x3, batch 96, FM)
trained by ``train_expert`` itself (AdamW, EMA, checkpoints at the end) on random 28x28 images, in a fresh
process per thread count (1 thread, as in the demo's 6 processes on 2 cores, and every core), which
reports its wall time per step, images per second, the model FLOPs of one step
(``torch.utils.flop_counter``) and its peak resident memory (VmHWM).

GPU (``--gpu``, or always when CUDA is present): the ``gpu`` preset's DiT (256x6, batch 256) and a larger DiT
(512x12, patch 2) with bf16 autocast; and the same size with AdaLN-single (PixArt-alpha's: one shared
timestep/class modulation instead of one per block, what HDDM uses) via diffusers'
``PixArtTransformer2DModel`` when it imports; each prints steps/s, images/s, peak CUDA memory and model
FLOPs utilisation against the device's dense bf16 peak (``--peak-tflops``, default from the device name).
Without CUDA it says "no CUDA device" and measures nothing there.

    python bench/training.py [--quick] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# dense bf16 peak TFLOPS by device-name fragment (vendor data sheets, SXM parts); --peak-tflops overrides
PEAK_BF16 = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def _flops(step_fn) -> float:
    """Model FLOPs of one call of ``step_fn`` (forward + backward), counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step_fn()
    return float(fc.get_total_flops())


def cpu_worker(threads: int, steps: int) -> None:
    """One process: train the cpu preset's expert ``steps`` steps with ``threads`` threads; print one JSON line."""
    import torch

    from diffswarm.experts.config import ExpertConfig
    from diffswarm.experts.expert import Expert
    from diffswarm.experts.networks import NetConfig
    from diffswarm.experts.objectives import expert_loss
    from diffswarm.experts.train import TrainConfig, train_expert
    from diffswarm.training.presets import PRESETS

    torch.set_num_threads(threads)
    p = PRESETS["cpu"]
    cfg = ExpertConfig(objective="fm", net=NetConfig.for_kind(p.net, channels=1, size=28, num_classes=10,
                                                              width=p.width, depth=p.depth))
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(2048, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 10, (2048,), generator=g)
    probe = Expert(cfg)
    x, y = images[:p.batch], labels[:p.batch]
    flops = _flops(lambda: expert_loss(probe, x, y, g)[0].mean().backward())
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        tc = TrainConfig(steps=steps, batch=p.batch, lr=p.lr, warmup=1, ckpt_every=10**9, log_every=10**9,
                         threads=threads, device="cpu")
        stamps: list[float] = []  # after each step: the steps after the first, without start-up and checkpoint
        train_expert(cfg, tc, images, labels, tmp, progress=False,
                     on_step=lambda *_: stamps.append(time.perf_counter()))
        wall = (stamps[-1] - stamps[0]) * steps / (steps - 1)
    with open("/proc/self/status") as f:
        peak = next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:"))
    print("RESULT " + json.dumps({"threads": threads, "steps": steps, "batch": p.batch, "wall_s": wall,
                                  "flops_per_step": flops, "peak_rss_mb": peak}), flush=True)


def run_cpu(args) -> None:
    from benchlib import tiny

    cores = os.cpu_count() or 1
    print(f"\nCPU: the cpu preset's expert, train_expert for {args.steps} steps (timed from the end of "
          "the first), a fresh process per thread count")
    print(f"{'threads':>7s} {'ms/step':>8s} {'images/s':>9s} {'GFLOP/step':>10s} {'GFLOP/s':>8s} {'peak RSS MB':>11s}")
    base = None
    for threads in sorted({1} if tiny() else {1, cores}):  # a tiny run (the test's): one worker is proof enough
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, __file__, "--cpu-worker", str(threads), "--steps", str(args.steps)],
                              env=env, capture_output=True, text=True, timeout=1800)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"worker failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        r = json.loads(line.removeprefix("RESULT "))
        ms = 1000 * r["wall_s"] / r["steps"]
        ips = r["batch"] * r["steps"] / r["wall_s"]
        base = base or ips
        print(f"{threads:7d} {ms:8.0f} {ips:9.1f} {r['flops_per_step'] / 1e9:10.2f} "
              f"{r['flops_per_step'] * r['steps'] / r['wall_s'] / 1e9:8.1f} {r['peak_rss_mb']:11.0f}"
              f"   ({ips / base:.2f}x the 1-thread images/s)")


def _gpu_nets(quick: bool):
    """(name, ExpertConfig or a diffusers module factory, batch) of the GPU configurations."""
    from diffswarm.experts.config import ExpertConfig
    from diffswarm.experts.networks import NetConfig

    sizes = [("gpu preset DiT 256x6 p4", dict(width=256, depth=6, patch=4, heads=4), 256)]
    if not quick:
        sizes.append(("DiT 512x12 p2", dict(width=512, depth=12, patch=2, heads=8), 256))
    return [(n, ExpertConfig(objective="fm", net=NetConfig(kind="dit", size=28, num_classes=10, **kw)), b)
            for n, kw, b in sizes]


def _time_cuda(step, steps: int) -> float:
    import torch

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def run_gpu(args) -> None:
    import torch

    if not torch.cuda.is_available():
        print("\nGPU: no CUDA device: GPU throughput and MFU not measured")
        return
    from diffswarm.experts.expert import Expert
    from diffswarm.experts.objectives import expert_loss

    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16.items() if k in name), None)
    print(f"\nGPU: {name}, bf16 autocast, AdamW; MFU against {peak} TFLOPS dense bf16")
    dev = torch.device("cuda")
    rows = []
    for label, cfg, batch in _gpu_nets(args.quick):
        torch.cuda.reset_peak_memory_stats()
        e = Expert(cfg).to(dev)
        opt = torch.optim.AdamW(e.net.parameters(), lr=1e-4, fused=True)
        g = torch.Generator(device=dev).manual_seed(0)
        x, y = torch.randn(batch, 1, 28, 28, device=dev), torch.randint(0, 10, (batch,), device=dev)

        def step(e=e, opt=opt, g=g, x=x, y=y):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = expert_loss(e, x, y, g)
            opt.zero_grad(set_to_none=True)
            loss.mean().backward()
            opt.step()

        flops = _flops(step)
        s = _time_cuda(step, args.steps)
        mfu = flops / s / (peak * 1e12) if peak else float("nan")
        rows.append((label, s, batch / s, flops, mfu, torch.cuda.max_memory_allocated() / 2**20))
    rows.extend(_adaln_single(args, dev, peak))
    print(f"{'network':28s} {'ms/step':>8s} {'images/s':>9s} {'GFLOP/step':>10s} {'MFU':>6s} {'peak MB':>8s}")
    for label, s, ips, flops, mfu, mem in rows:
        print(f"{label:28s} {1000 * s:8.1f} {ips:9.0f} {flops / 1e9:10.1f} {100 * mfu:5.1f}% {mem:8.0f}")


def _adaln_single(args, dev, peak) -> list[tuple]:
    """The larger DiT's size with AdaLN-single (diffusers' PixArtTransformer2DModel): the network alone, v-loss."""
    import torch

    try:
        from diffusers import PixArtTransformer2DModel
    except ImportError as e:
        print(f"AdaLN-single: diffusers has no PixArtTransformer2DModel ({e}); not measured")
        return []
    width, depth, batch = (256, 6, 256) if args.quick else (512, 12, 256)
    torch.cuda.reset_peak_memory_stats()
    net = PixArtTransformer2DModel(num_attention_heads=width // 64, attention_head_dim=64, in_channels=1,
                                   out_channels=1, num_layers=depth, sample_size=28, patch_size=2,
                                   norm_type="ada_norm_single", caption_channels=None, cross_attention_dim=None,
                                   use_additional_conditions=False).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    x, t = torch.randn(batch, 1, 28, 28, device=dev), torch.rand(batch, device=dev) * 999
    ctx = torch.zeros(batch, 1, width, device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = net(x, encoder_hidden_states=ctx, timestep=t, added_cond_kwargs={"resolution": None,
                                                                                   "aspect_ratio": None}).sample
            loss = (out.float() - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    try:
        flops = _flops(step)
        s = _time_cuda(step, args.steps)
    except (TypeError, ValueError, RuntimeError) as e:  # a diffusers version with other arguments
        print(f"AdaLN-single ({width}x{depth}): could not run PixArtTransformer2DModel: {e}; not measured")
        return []
    mfu = flops / s / (peak * 1e12) if peak else float("nan")
    return [(f"AdaLN-single {width}x{depth} p2", s, batch / s, flops, mfu, torch.cuda.max_memory_allocated() / 2**20)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few steps; GPU: the gpu preset's DiT only")
    ap.add_argument("--steps", type=int, default=None, help="training steps per measurement (default 30; quick 5)")
    ap.add_argument("--gpu", action="store_true", help="also the GPU part (it runs anyway when CUDA is present)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    ap.add_argument("--cpu-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from benchlib import footer, header, tiny

    args.steps = max(2, args.steps or (3 if tiny() else 6 if args.quick else 30))
    if args.cpu_worker:
        return cpu_worker(args.cpu_worker, args.steps)
    import torch

    header("training one expert: images/s, FLOPs and peak memory")
    run_cpu(args)
    if args.gpu or torch.cuda.is_available():
        run_gpu(args)
    else:
        print("\nGPU: no CUDA device: GPU throughput and MFU not measured (--gpu to say so explicitly)")
    footer()


if __name__ == "__main__":
    main()
