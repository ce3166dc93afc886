"""Forward+backward latency of the fused CPU op vs the eager reference, as ratios from one run.

Usage: PYTHONPATH=$PWD python benchmarks/cpu_vs_reference.py [--batches 64 4096] [--rounds 5] [--threads T]
The two backends are timed back to back for several rounds (machine load drifts; pairing spreads it
evenly): each latency is the median over the rounds, the speed-up the median of the rounds' ratios. Speed goal (issue 3): ratio >= 1.3 at batch 64 and >= 0.95 at batch 4096 on mnist, vgg5, cifar_vgg.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.utils.benchmark as benchmark

from spinal_ops import SpinalLinear

PRESETS = {  # (N, w, L, M), k = 2, ReLU (SPEC §6)
    "mnist": (320, 8, 6, 10),
    "vgg5": (256, 128, 4, 10),
    "cifar_vgg": (512, 512, 4, 10),
}


def forward_backward_seconds(layer: SpinalLinear, x: torch.Tensor, grad: torch.Tensor, min_run_time: float) -> float:
    """Median seconds of one forward plus the backward to the input and every parameter."""
    inputs = [x, *layer.parameters()]
    timer = benchmark.Timer(
        stmt="torch.autograd.grad(layer(x), inputs, grad)",
        globals={"torch": torch, "layer": layer, "x": x, "inputs": inputs, "grad": grad},
    )
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 4096])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--rounds", type=int, default=11, help="paired measurements per backend")
    parser.add_argument("--min-run-time", type=float, default=0.1, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, forward+backward median")
    print(f"{'preset':<10} {'batch':>6} {'reference ms':>13} {'cpu ms':>9} {'speed-up':>9}")
    for preset in args.presets:
        n, w, num_layers, m = PRESETS[preset]
        torch.manual_seed(0)
        reference = SpinalLinear(n, m, layer_width=w, num_layers=num_layers, backend="reference")
        fused = SpinalLinear(n, m, layer_width=w, num_layers=num_layers, backend="cpu")
        fused.load_state_dict(reference.state_dict())
        for batch in args.batches:
            x = torch.randn(batch, n, requires_grad=True)
            grad = torch.randn(batch, m)
            ref_times, cpu_times = [], []
            for _ in range(args.rounds):
                ref_times.append(forward_backward_seconds(reference, x, grad, args.min_run_time))
                cpu_times.append(forward_backward_seconds(fused, x, grad, args.min_run_time))
            ref_s, cpu_s = statistics.median(ref_times), statistics.median(cpu_times)
            speed_up = statistics.median(r / c for r, c in zip(ref_times, cpu_times))
            print(f"{preset:<10} {batch:>6} {ref_s * 1e3:>13.3f} {cpu_s * 1e3:>9.3f} {speed_up:>8.2f}x")


if __name__ == "__main__":
    main()
