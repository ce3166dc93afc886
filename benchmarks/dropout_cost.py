"""What dropout costs a training step: the cpu backend with and without dropout, and the eager
reference with and without it, timed in one alternating run per case.

A call of the CPU op with dropout takes its usual path (the CPU narrow chain for mnist, the
hoisted chain for vgg5), each layer's input product on its own masked window (no products shared
by window groups), with one Philox word per dropout site in the forward and again in the backward.
This program measures what that costs against the same step without dropout, and against the
reference layer with dropout (the only backend that trained with dropout before). Each step is `spinal-bench`'s train step (forward and the gradients of the input
and every parameter, spinal_ops/bench/workloads.py: make_step) of a layer in training mode, which
draws a fresh seed per call as training does.

    python benchmarks/dropout_cost.py --preset mnist vgg5 --batch 64 4096 --threads 1 --dropout 0.5
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from spinal_ops import SpinalLinear
from spinal_ops.bench.presets import PRESETS, parse_presets
from spinal_ops.bench.timing import alternating_medians
from spinal_ops.bench.workloads import make_step
from spinal_ops.config import SpinalConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# (column, backend, with dropout)
IMPLS = (("cpu", "cpu", False), ("cpu+dropout", "cpu", True), ("reference", "reference", False),
         ("reference+dropout", "reference", True))


def layer(config: SpinalConfig, backend: str, dropout: float, dtype: torch.dtype) -> SpinalLinear:
    return SpinalLinear(config.in_features, config.out_features, layer_width=config.layer_width,
                        num_layers=config.num_layers, split_size=config.split_size, activation=config.activation,
                        dropout=dropout, backend=backend, dtype=dtype)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["mnist", "vgg5"], metavar="PRESET",
                        help=f"{', '.join(PRESETS)} or custom N,w,L,M[,k]")
    parser.add_argument("--batch", nargs="+", type=int, default=[64, 4096])
    parser.add_argument("--dropout", type=float, default=0.5, help="p of the layers with dropout (default 0.5)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-run-time", type=float, default=1.0, metavar="S")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype, device = DTYPES[args.dtype], torch.device("cpu")
    print(f"train step, {args.dtype}, {args.threads} thread(s), dropout p = {args.dropout}; median ms per step\n")
    print("| preset | batch | cpu | cpu+dropout | cost of dropout | reference | reference+dropout | "
          "cpu+dropout speed-up over reference+dropout |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, config in parse_presets(args.preset).items():
        models = {column: layer(config, backend, args.dropout if drops else 0.0, dtype)
                  for column, backend, drops in IMPLS}
        for batch in args.batch:
            steps = {column: make_step(model, config, batch, "train", dtype, device) for column, model in models.items()}
            for step in steps.values():
                step()  # warm-up
            seconds, failures = alternating_medians(steps, device, args.min_run_time)
            if failures:
                raise RuntimeError(failures)
            ms = {column: seconds[column] * 1e3 for column in seconds}
            print(f"| {name} | {batch} | {ms['cpu']:.3f} | {ms['cpu+dropout']:.3f} | "
                  f"{ms['cpu+dropout'] / ms['cpu']:.2f}x | {ms['reference']:.3f} | {ms['reference+dropout']:.3f} | "
                  f"{ms['reference+dropout'] / ms['cpu+dropout']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
