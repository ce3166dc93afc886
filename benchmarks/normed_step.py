"""A training step of a layer with batch norm and dropout, as the authors train their VGG heads
(Dropout -> Linear -> BatchNorm1d -> ReLU per layer): the cpu backend (the normed op pair) against
the reference backend, on a preset's sizes.

    python benchmarks/normed_step.py --preset vgg5 --batch 64 1024 --threads 1

The step is forward + torch.autograd.grad of a random output gradient w.r.t. the input and every
parameter (running statistics updated, as in training). The two backends take turns in short
blocks (spinal_ops.bench.timing), so both see the same machine state; the ratio is theirs in
this one run.
"""
from __future__ import annotations

import argparse

import torch

from spinal_ops import SpinalLinear
from spinal_ops.bench.presets import PRESETS
from spinal_ops.bench.timing import alternating_medians

BACKENDS = ("cpu", "reference")


def training_step(layer: SpinalLinear, batch: int):
    x = torch.randn(batch, layer.in_features, requires_grad=True)
    grad_out = torch.randn(batch, layer.config.output_features)
    leaves = [x, *layer.parameters()]

    def step() -> None:
        torch.autograd.grad(layer(x), leaves, grad_outputs=grad_out)

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vgg5", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds per backend and batch")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c = PRESETS[args.preset]
    layers = {
        backend: SpinalLinear(c.in_features, c.out_features, layer_width=c.layer_width, num_layers=c.num_layers,
                              split_size=c.split_size, norm="batch", dropout=args.dropout, backend=backend)
        for backend in BACKENDS
    }
    print(f"{args.preset} (N={c.in_features}, w={c.layer_width}, L={c.num_layers}, M={c.out_features}), norm='batch', "
          f"dropout={args.dropout}, float32, train step, {args.threads} thread(s)")
    print(f"{'batch':>6} {'cpu ms':>9} {'reference ms':>13} {'reference / cpu':>16}")
    for batch in args.batch:
        steps = {backend: training_step(layer, batch) for backend, layer in layers.items()}
        for step in steps.values():
            step()  # warm-up
        medians, failures = alternating_medians(steps, torch.device("cpu"), args.min_run_time)
        if failures:
            raise SystemExit(f"failed: {failures}")
        cpu, reference = medians["cpu"], medians["reference"]
        print(f"{batch:>6} {cpu * 1e3:>9.3f} {reference * 1e3:>13.3f} {reference / cpu:>16.2f}")


if __name__ == "__main__":
    main()
