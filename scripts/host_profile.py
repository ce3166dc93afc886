"""Where a small batch's step time goes on the host: torch.profiler's CPU table for the spinal
layer and the dense layer at batch 64 (the calls whose time the host, not the GPU, decides), then
the host time of one forward op call and of one training step, each split into its parts.

    python scripts/host_profile.py [--preset mnist vgg5] [--batch 64] [--steps 50] [--device cuda] [--dtype bfloat16]
                                   [--backend triton]

Per preset and mode: the median step time (spinal_ops.bench's timer) and the operators with the
most CPU time over `--steps` profiled steps, self and total. Then, per preset, host microseconds
per call (time to return, the device's work not waited for) of: a trivial op of ours (an
extension built with the CUDA kernels), an empty tensor, the forward op on an empty batch
(checks, routing, allocation; no launch), on `--batch` rows without and with Z kept, the whole
module call and, on a GPU, the hoisted forward op and a trivial op that reads a device attribute.
`--split-only` leaves out the profiled steps (for A/B runs of two builds). `--device cpu` runs the
cpu backend (a check of the script without a GPU); `--backend triton` the triton backend and its
op pair instead of the device's native one.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from spinal_ops.bench.presets import PRESETS
from spinal_ops.bench.timing import median_seconds
from spinal_ops.bench.workloads import dense_baseline, make_step, spinal_layer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def host_microseconds(fn: Callable[[], object], device: torch.device, calls: int = 2000) -> float:
    """Mean host time per call of ``fn`` (the device's queue is drained before, not after)."""
    for _ in range(50):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return elapsed / calls * 1e6


def op_pair(backend: str) -> tuple[str, Callable, Callable]:
    """The name and the forward and backward ops of the pair a backend's module call runs (the cuda
    backend: its native pair, whichever path its cost model picks for the module call)."""
    pair = "triton" if backend == "triton" else "native"
    return pair, getattr(torch.ops.spinal_ops, f"{pair}_forward").default, getattr(torch.ops.spinal_ops,
                                                                                     f"{pair}_backward").default


def layers_and_weights(config, backend: str, dtype: torch.dtype, device: torch.device):
    """The spinal layer on `backend`, the dense head, and the spinal layer's five weights detached
    (in the op pairs' argument order)."""
    layer = spinal_layer(config, backend, dtype, device)
    weights = [p.detach() for p in (layer.weight_in, layer.weight_hidden, layer.bias, layer.weight_out,
                                    layer.bias_out)]
    return layer, dense_baseline(config, dtype, device), weights


def split_forward_call(name: str, batch: int, backend: str, device: torch.device, dtype: torch.dtype) -> None:
    config = PRESETS[name]
    layer, dense, weights = layers_and_weights(config, backend, dtype, device)
    pair, forward_op, _ = op_pair(backend)
    empty = torch.randn(0, config.in_features, device=device, dtype=dtype)
    rows = torch.randn(batch, config.in_features, device=device, dtype=dtype)

    def forward(x: torch.Tensor, keep: bool) -> Callable[[], object]:
        return lambda: forward_op(x, *weights, config.activation, config.negative_slope, False, keep)

    # The dispatcher's share: a trivial op of ours where the build has one (the CUDA build's
    # cuda_tile_kernel_max_width); a CPU-only build's nearest is the forward op on an empty batch
    # (its checks and allocations counted too, so the op's share reads low by those).
    trivial = getattr(torch.ops.spinal_ops, "cuda_tile_kernel_max_width", None)
    dispatcher_label = ("a trivial op of ours (cuda_tile_kernel_max_width)" if trivial is not None
                        else f"{pair}_forward, empty batch")
    cases = {
        **({dispatcher_label: trivial} if trivial is not None else {}),
        f"torch.empty({batch}, {config.output_features})": (
            lambda: torch.empty(batch, config.output_features, device=device, dtype=dtype)),
        f"{pair}_forward, empty batch": forward(empty, False),
        f"{pair}_forward, {batch} rows": forward(rows, False),
        f"{pair}_forward, {batch} rows, Z kept": forward(rows, True),
        f"layer(x), {batch} rows": lambda: layer(rows),
        f"dense head(x), {batch} rows": lambda: dense(rows),
    }
    if backend == "cuda":  # the other path's host cost, and one device-attribute query
        hoisted_forward = torch.ops.spinal_ops.hoisted_forward.default
        cases[f"hoisted_forward, {batch} rows"] = (
            lambda: hoisted_forward(rows, *weights, config.activation, config.negative_slope, False, False))
        cases["cuda_tile_kernel_width_limit (a device attribute query)"] = (
            lambda: torch.ops.spinal_ops.cuda_tile_kernel_width_limit(0, dtype, False))
    print(f"\n=== {name}: host time per call ({backend} backend, {device.type}, {dtype}, no_grad)", flush=True)
    times = {}
    with torch.no_grad():
        for label, fn in cases.items():
            times[label] = host_microseconds(fn, device)
            print(f"  {label:60s} {times[label]:8.1f} us", flush=True)
    # The module call's layers: its Python (module, selection, checks), the dispatcher (what a
    # trivial op of ours costs), the op's C++ (checks, allocation and, on a CPU, the math).
    op = times[f"{pair}_forward, {batch} rows"]
    dispatcher = times[dispatcher_label]
    print(f"  layer(x) = Python {times[f'layer(x), {batch} rows'] - op:.1f} + dispatcher {dispatcher:.1f} "
          f"+ op {op - dispatcher:.1f} us; the dense head {times[f'dense head(x), {batch} rows']:.1f} us", flush=True)


def split_training_step(name: str, batch: int, backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """One training step (forward + autograd.grad of every input, as spinal-bench's train mode)
    split into: autograd.grad's own cost (a one-multiply graph), the module call's Python, the two
    ops called directly, and the rest (the autograd node, saved tensors, gradient tensors)."""
    config = PRESETS[name]
    layer, dense, weights = layers_and_weights(config, backend, dtype, device)
    rows = torch.randn(batch, config.in_features, device=device, dtype=dtype)
    pair, forward_op, backward_op = op_pair(backend)
    out, pre_activation = forward_op(rows, *weights, config.activation, config.negative_slope, False, True)
    grad_out = torch.randn_like(out)
    leaf = torch.randn(batch, config.output_features, device=device, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        python = host_microseconds(lambda: layer(rows), device) - host_microseconds(
            lambda: forward_op(rows, *weights, config.activation, config.negative_slope, False, False), device)

    def both_ops() -> object:
        forward_op(rows, *weights, config.activation, config.negative_slope, False, True)
        return backward_op(grad_out, rows, pre_activation, weights[0], weights[1], weights[3], [True] * 6,
                               config.activation, config.negative_slope, False)

    step_label, dense_label = f"train step, {batch} rows", f"dense head, train step, {batch} rows"
    ops_label = f"{pair}_forward (Z kept) + {pair}_backward"
    times = {
        "autograd.grad of a one-multiply graph": host_microseconds(
            lambda: torch.autograd.grad(leaf * 1.0, (leaf,), grad_out), device),
        ops_label: host_microseconds(both_ops, device),
        step_label: host_microseconds(make_step(layer, config, batch, "train", dtype, device), device),
        dense_label: host_microseconds(make_step(dense, config, batch, "train", dtype, device), device),
    }
    print(f"\n=== {name}: host time of one training step ({backend} backend, {device.type}, {dtype})", flush=True)
    for label, value in times.items():
        print(f"  {label:60s} {value:8.1f} us", flush=True)
    harness, ops = times["autograd.grad of a one-multiply graph"], times[ops_label]
    step = times[step_label]
    print(f"  train step = autograd.grad {harness:.1f} + module Python {python:.1f} + ops {ops:.1f} "
          f"+ node and the rest {step - harness - python - ops:.1f} us; the dense head's {times[dense_label]:.1f} us",
          flush=True)


def profile_steps(name: str, batch: int, steps: int, rows: int, backend: str, device: torch.device,
                  dtype: torch.dtype) -> None:
    config = PRESETS[name]
    models = {backend: spinal_layer(config, backend, dtype, device),
              "dense": dense_baseline(config, dtype, device)}
    for mode in ("infer", "train"):
        for impl, model in models.items():
            step = make_step(model, config, batch, mode, dtype, device)
            seconds = median_seconds(step, device, 0.2)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            print(f"\n=== {name} {mode} {impl} batch {batch}: median step {seconds * 1e6:.1f} us "
                  f"(CPU times below are totals over {steps} profiled steps)", flush=True)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["mnist", "vgg5"], choices=list(PRESETS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rows", type=int, default=12, help="operators listed per case")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--backend", choices=["cpu", "cuda", "triton"],
                        help="the spinal layer's backend (default: the device's, cpu or cuda)")
    parser.add_argument("--split-only", action="store_true", help="skip the profiled steps (for A/B runs)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    backend = args.backend or device.type
    for name in args.preset if not args.split_only else ():
        profile_steps(name, args.batch, args.steps, args.rows, backend, device, dtype)
    for name in args.preset:
        split_forward_call(name, args.batch, backend, device, dtype)
        split_training_step(name, args.batch, backend, device, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
