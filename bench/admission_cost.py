"""What admission costs: seconds to validate one checkpoint of the default expert, and an attestation's size.

Partitions the default dataset (Fashion-MNIST when installed, else digits) into K clusters, builds the default
expert (``swarm up``'s: unet, the kind's default sizes; randomly initialised: the score's cost does not depend on
training) for cluster 0 of each objective, and times on the CPU, in this process:

- building cluster 0's validation set (once per validator and cluster: assigning the test split);
- ``score_expert`` on it (per checkpoint; the measured figure is the median of ``--repeats`` runs);
- loading the checkpoint file (per checkpoint), as the validator does after fetching it;

then signs one attestation with a fresh RSA-2048 key and prints its msgpack size.

    python bench/admission_cost.py [--k 4] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import msgpack
    from hivemind.utils.crypto import RSAPrivateKey

    from diffswarm.admission.score import score_expert, validation_set
    from diffswarm.data import DatasetSpec, make_partition
    from diffswarm.dht.attestations import sign_attestation
    from diffswarm.dht.records import RECORD_VERSION
    from diffswarm.experts.checkpoint import save_expert
    from diffswarm.experts.expert import Expert
    from diffswarm.training.jobs import ClusterData, expert_config

    spec = DatasetSpec().resolved()
    ds, test = spec.load("train"), spec.load("test")
    t0 = time.perf_counter()
    part = make_partition(ds, args.k, seed=0)
    t_part = time.perf_counter() - t0
    t0 = time.perf_counter()
    vs = validation_set(part, test, 0)
    t_vset = time.perf_counter() - t0
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.machine())
    print(f"machine: {cpu} ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}), "
          f"{torch.backends.cpu.get_cpu_capability()}, "
          f"torch threads {args.threads}; command: {' '.join([sys.executable.split('/')[-1], *sys.argv])}")
    print(f"dataset {ds.dataset_id}, K={args.k}: partition {t_part:.1f} s (not part of validation); cluster 0's "
          f"validation set {len(vs.images)} images + {len(vs.out_images)} of other classes, built in {t_vset:.2f} s")
    for objective in ("fm", "ddpm"):
        cfg = expert_config(ClusterData.of(part, ds), objective, 0, net="unet")
        torch.manual_seed(0)
        e = Expert(cfg).eval()
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "expert.safetensors"
            save_expert(path, e.net.state_dict(), cfg.to_dict(), {})
            t0 = time.perf_counter()
            e = Expert.from_checkpoint(path)
            t_load = time.perf_counter() - t0
            size = path.stat().st_size
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            rep = score_expert(e, vs, 1)
            times.append(time.perf_counter() - t0)
        print(f"{objective:4s} unet ({size / 1e6:.1f} MB checkpoint): load {t_load:.2f} s, score "
              f"{statistics.median(times):.2f} s (median of {args.repeats}; {rep.triples} + "
              f"{len(vs.out_images) * 2} triples), {rep.describe()}")
    key = RSAPrivateKey()
    att = sign_attestation(key, dict(
        version=RECORD_VERSION, subject="checkpoint", swarm="diffswarm", checkpoint_sha256="0" * 64, cluster=0,
        num_clusters=args.k,
        partition_hash=part.partition_hash, score=rep.score, baseline=rep.baseline, in_classes=rep.in_classes,
        out_classes=rep.out_classes, triples=rep.triples, seed=1, issued=1.0, peer_id="Qm" + "x" * 44, updated=1.0))
    print(f"attestation record: {len(msgpack.packb(att.to_dict(), use_bin_type=True))} bytes (msgpack, RSA-2048 key)")


if __name__ == "__main__":
    main()
