"""The chain's own GEMM kernel against PyTorch's BLAS on the products of a spinal training step.

The cpu op runs its float32 products of up to 2^24 multiply-adds on a register-tiled kernel
(csrc/cpu/tile_gemm.h) instead of BLAS. This program times both on the products one training
step of the chain makes, one GEMM per layer (how the op runs layers of w >= 128 at small batch),
each kind of product alternating between the two kernels in short blocks on the same buffers,
BLAS called exactly as the op calls it (csrc/cpu/blas.h). Each product has buffers of its own,
so operands that share a larger buffer in the op (a layer's slot of H) are contiguous here.
It builds the two sources with torch.utils.cpp_extension.load on first use (~1 minute).

    python benchmarks/tile_gemm_vs_blas.py --preset vgg5 --batch 64
"""
from __future__ import annotations

import argparse
import os

import torch
from torch.utils.cpp_extension import load

from spinal_ops.bench.presets import PRESETS, parse_presets
from spinal_ops.bench.timing import alternating_medians
from spinal_ops.config import SpinalConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (a transposed, b transposed, accumulate, m, n, k)
Product = tuple[bool, bool, bool, int, int, int]


def harness():
    """The compiled timing harness (benchmarks/tile_gemm_vs_blas.cpp with the op's two kernels)."""
    return load(
        "spinal_tile_gemm_vs_blas",
        [os.path.join(ROOT, "benchmarks", "tile_gemm_vs_blas.cpp"),
         os.path.join(ROOT, "csrc", "cpu", "tile_gemm.cpp"),
         os.path.join(ROOT, "csrc", "cpu", "blas.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
    )


def training_products(config: SpinalConfig, batch: int) -> dict[str, list[Product]]:
    """The products of one training step of the chain, one GEMM per layer, by kind."""
    s, w, layers, m = config.split_size, config.layer_width, config.num_layers, config.out_features
    hidden = config.hidden_features
    kinds = {
        "forward x_win @ A^T": [(False, True, False, batch, w, s)] * layers,
        "forward + h @ R^T": [(False, True, True, batch, w, w)] * (layers - 1),
        "dz + dz_next @ R": [(False, False, True, batch, w, w)] * (layers - 1),
        "dW_hidden = dz^T h": [(True, False, False, w, w, batch)] * (layers - 1),
        "dW_in = dz^T x_win": [(True, False, False, w, s, batch)] * layers,
        "dx + dz @ A": [(False, False, True, batch, s, w)] * layers,
    }
    if m is not None:
        kinds["dH = G @ W_out"] = [(False, False, False, batch, hidden, m)]
        kinds["dW_out = G^T H"] = [(True, False, False, m, hidden, batch)]
    return {kind: products for kind, products in kinds.items() if products}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["vgg5"], help=f"names from {', '.join(PRESETS)}")
    parser.add_argument("--batch", nargs="+", type=int, default=[64])
    parser.add_argument("--min-run-time", type=float, default=0.3, metavar="S", help="seconds of measurement per kind")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    module = harness()
    if not module.instructions():
        raise SystemExit("the tile kernel does not run on this CPU (no AVX2+FMA in use)")
    print(f"tile kernel: {module.instructions()} tiles; BLAS: PyTorch's sgemm_; {args.threads} thread(s)")
    print("| preset | batch | products | shape m x n x k | op runs | tiles (µs) | BLAS (µs) | tiles GFLOP/s | BLAS GFLOP/s | tiles / BLAS time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, config in parse_presets(args.preset).items():
        for batch in args.batch:
            totals = {"tiles": 0.0, "BLAS": 0.0}
            step_flops = 0
            for kind, products in training_products(config, batch).items():
                sequence = module.Sequence(products)
                if sequence.max_difference() > 1e-3 * max(1, products[0][5]) ** 0.5:
                    raise SystemExit(f"{name} {kind}: the two kernels disagree")
                steps = {"tiles": lambda: sequence.time(1, True), "BLAS": lambda: sequence.time(1, False)}
                for step in steps.values():
                    step()
                median, failures = alternating_medians(steps, torch.device("cpu"), args.min_run_time)
                if failures:
                    raise SystemExit(f"{name} {kind}: {failures}")
                _, _, _, m, n, k = products[0]
                flops = 2 * m * n * k * len(products)
                step_flops += flops
                runs = "tiles" if module.op_runs_tiles(m, n, k) else "BLAS"
                for key in totals:
                    totals[key] += median[key]
                print(f"| {name} | {batch} | {len(products)} x {kind} | {m} x {n} x {k} | {runs} "
                      f"| {median['tiles'] * 1e6:.1f} | {median['BLAS'] * 1e6:.1f} "
                      f"| {flops / median['tiles'] / 1e9:.1f} | {flops / median['BLAS'] / 1e9:.1f} "
                      f"| {median['tiles'] / median['BLAS']:.3f} |", flush=True)
            print(f"| {name} | {batch} | all | | | {totals['tiles'] * 1e6:.1f} | {totals['BLAS'] * 1e6:.1f} "
                  f"| {step_flops / totals['tiles'] / 1e9:.1f} | {step_flops / totals['BLAS'] / 1e9:.1f} "
                  f"| {totals['tiles'] / totals['BLAS']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
