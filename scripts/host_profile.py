"""Where a small batch's step time goes on the host: torch.profiler's CPU table for the cuda
backend and the dense layer at batch 64 (the calls whose time the host, not the GPU, decides).

    python scripts/host_profile.py [--preset mnist vgg5] [--batch 64] [--steps 50]

Per preset and mode: the median step time (spinal_ops.bench's timer) and the operators with the
most CPU time over `--steps` profiled steps, self and total, per step.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from spinal_ops.bench.presets import PRESETS
from spinal_ops.bench.timing import median_seconds
from spinal_ops.bench.workloads import dense_baseline, make_step, spinal_layer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["mnist", "vgg5"], choices=list(PRESETS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rows", type=int, default=12, help="operators listed per case")
    args = parser.parse_args()
    device = torch.device("cuda")
    dtype = torch.bfloat16
    for name in args.preset:
        config = PRESETS[name]
        models = {"cuda": spinal_layer(config, "cuda", dtype, device), "dense": dense_baseline(config, dtype, device)}
        for mode in ("infer", "train"):
            for impl, model in models.items():
                step = make_step(model, config, args.batch, mode, dtype, device)
                seconds = median_seconds(step, device, 0.2)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(args.steps):
                        step()
                    torch.cuda.synchronize()
                print(f"\n=== {name} {mode} {impl} batch {args.batch}: median step {seconds * 1e6:.1f} us "
                      f"(CPU times below are totals over {args.steps} profiled steps)", flush=True)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
