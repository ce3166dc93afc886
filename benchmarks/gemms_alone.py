"""E of the matrix products alone: the spinal chain's BLAS GEMMs against the dense layer's.

For wide layers (w > 32) the CPU op is a chain of BLAS calls (csrc/chain/hoisted_chain.h). This program
times exactly the GEMMs that chain makes, the input products one per layer ("per layer") or one per
window group ("by window", how the op runs layers of w < 128, and of w < 256 from batch 512), against
the dense layer's GEMMs, each into buffers allocated once, with no activation, copy, Python or
autograd work between them, alternating in short blocks. Their time ratio over the FLOP ratio is the E
of the GEMMs alone. Where it is above the goal while the op's full E is close to it, what is left
is BLAS's speed on the chain's narrower matrices, not work around the GEMMs (compare the op's and
the dense step's time beyond their GEMMs).

    python benchmarks/gemms_alone.py --preset vgg5 --batch 64 4096 --mode train frozen infer

A wrapped window is timed as one product (the chain makes two).
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from spinal_ops.bench.presets import PRESETS, parse_presets
from spinal_ops.bench.timing import alternating_medians
from spinal_ops.config import MODES, SpinalConfig

Step = Callable[[], None]


def spinal_gemms(config: SpinalConfig, batch: int, mode: str, grouped: bool) -> Step:
    """The chain's GEMMs into preallocated buffers: the input products (forward, dW_in, dx) one per
    layer, or, grouped, one per window group (layers whose windows start at the same column, their
    columns side by side); the recurrence and its gradients one per layer; the projection's three."""
    n, s, w, layers = config.in_features, config.split_size, config.layer_width, config.num_layers
    m, hidden = config.out_features, config.hidden_features
    by_key: dict[int, list[int]] = {}  # layers sharing a window start, in the op's group order
    for layer in range(layers):
        by_key.setdefault(config.window_start(layer) if grouped else layer, []).append(layer)
    groups = list(by_key.values())
    slot = {layer: index for index, layer in enumerate(layer for group in groups for layer in group)}
    x, hid, grad_hid = torch.randn(batch, n), torch.randn(batch, hidden), torch.randn(batch, hidden)
    a = [torch.randn(len(group) * w, s) for group in groups]  # each group's A_l stacked
    grad_a = [torch.empty_like(t) for t in a]
    r, grad_r = torch.randn(max(layers - 1, 1), w, w), torch.empty(max(layers - 1, 1), w, w)
    grad_x = torch.empty(batch, n)
    w_out = torch.randn(m, hidden)
    y, grad_y, grad_w_out = torch.empty(batch, m), torch.randn(batch, m), torch.empty(m, hidden)

    def x_window(group: list[int]) -> torch.Tensor:
        start = min(config.window_start(group[0]), n - s)  # a wrapped window as one [B, s] product
        return x[:, start:start + s]

    def columns(t: torch.Tensor, group: list[int]) -> torch.Tensor:  # a group's slots, side by side
        return t[:, slot[group[0]] * w:(slot[group[0]] + len(group)) * w]

    def layer_columns(t: torch.Tensor, layer: int) -> torch.Tensor:
        return t[:, slot[layer] * w:(slot[layer] + 1) * w]

    def step() -> None:
        for group, weights in zip(groups, a):
            torch.mm(x_window(group), weights.t(), out=columns(hid, group))
        for layer in range(1, layers):
            z = layer_columns(hid, layer)
            torch.addmm(z, layer_columns(hid, layer - 1), r[layer - 1].t(), out=z)
        torch.mm(hid, w_out.t(), out=y)
        if mode == "infer":
            return
        torch.mm(grad_y.t(), hid, out=grad_w_out)
        torch.mm(grad_y, w_out, out=grad_hid)
        for layer in reversed(range(1, layers)):
            grad_h = layer_columns(grad_hid, layer - 1)
            torch.addmm(grad_h, layer_columns(grad_hid, layer), r[layer - 1], out=grad_h)
            torch.mm(layer_columns(grad_hid, layer).t(), layer_columns(hid, layer - 1), out=grad_r[layer - 1])
        for group, weights, grad_weights in zip(groups, a, grad_a):
            torch.mm(columns(grad_hid, group).t(), x_window(group), out=grad_weights)
            if mode == "train":
                torch.mm(columns(grad_hid, group), weights, out=grad_x[:, :s])

    return step


def dense_gemms(config: SpinalConfig, batch: int, mode: str) -> Step:
    """Linear(N, L*w) -> Linear(L*w, M): two forward GEMMs, four (three frozen) backward."""
    n, m, hidden = config.in_features, config.out_features, config.hidden_features
    x, hid, grad_hid = torch.randn(batch, n), torch.empty(batch, hidden), torch.empty(batch, hidden)
    w_in, grad_w_in, grad_x = torch.randn(hidden, n), torch.empty(hidden, n), torch.empty(batch, n)
    w_out = torch.randn(m, hidden)
    y, grad_y, grad_w_out = torch.empty(batch, m), torch.randn(batch, m), torch.empty(m, hidden)

    def step() -> None:
        torch.mm(x, w_in.t(), out=hid)
        torch.mm(hid, w_out.t(), out=y)
        if mode == "infer":
            return
        torch.mm(grad_y.t(), hid, out=grad_w_out)
        torch.mm(grad_y, w_out, out=grad_hid)
        torch.mm(grad_hid.t(), x, out=grad_w_in)
        if mode == "train":
            torch.mm(grad_hid, w_in, out=grad_x)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["vgg5"], help=f"names from {', '.join(PRESETS)}")
    parser.add_argument("--batch", nargs="+", type=int, default=[64, 4096])
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--min-run-time", type=float, default=0.3, metavar="S", help="seconds of measurement per step")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| preset | batch | mode | per layer (µs) | by window (µs) | dense (µs) | FLOP ratio | E per layer | E by window |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, config in parse_presets(args.preset).items():
        if config.out_features is None:
            raise SystemExit(f"{name}: this comparison needs an output projection")
        for batch in args.batch:
            for mode in args.mode:
                steps = {"per layer": spinal_gemms(config, batch, mode, grouped=False),
                         "by window": spinal_gemms(config, batch, mode, grouped=True),
                         "dense": dense_gemms(config, batch, mode)}
                for step in steps.values():
                    step()  # warm-up: allocates the buffers
                median, failures = alternating_medians(steps, torch.device("cpu"), args.min_run_time)
                if failures:
                    raise SystemExit(f"{name} batch {batch} {mode}: {failures}")
                flop_ratio = config.step_flops(batch, mode) / config.dense_baseline_step_flops(batch, mode)
                e = [median[key] / median["dense"] / flop_ratio for key in ("per layer", "by window")]
                print(f"| {name} | {batch} | {mode} | {median['per layer'] * 1e6:.0f} | {median['by window'] * 1e6:.0f} "
                      f"| {median['dense'] * 1e6:.0f} | {flop_ratio:.3f} | {e[0]:.2f} | {e[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
