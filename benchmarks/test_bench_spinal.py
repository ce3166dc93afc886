"""pytest-benchmark suite over spinal-bench's matrix: every implementation, preset, batch and pass.

    make bench-suite                                            # measure (groups compare impls per case)
    python -m pytest benchmarks -q --benchmark-disable          # CI smoke: each case runs once

CPU cases use small sizes; CUDA cases skip without a GPU; an implementation that cannot run
here (backend not built, no device) skips with its reason.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from spinal_ops.bench import DEFAULT_PRESETS, PRESETS
from spinal_ops.bench.workloads import IMPLS, PASSES, ImplUnavailable, build_impl, cost, make_step

CPU_BATCHES = (64, 1024)
CUDA_BATCHES = (64, 4096)
CUDA_DTYPES = (torch.bfloat16, torch.float32)


def _cases():
    """(device, preset, dtype, impl, batch, pass) for CPU and CUDA."""
    for preset, impl, batch, pass_name in itertools.product(DEFAULT_PRESETS, IMPLS, CPU_BATCHES, PASSES):
        # torch.compile costs ~10 s per case on 2 cores: one preset keeps the CPU suite fast
        if impl != "compiled_reference" or (preset, batch) == ("mnist", CPU_BATCHES[0]):
            yield pytest.param("cpu", preset, torch.float32, impl, batch, pass_name,
                               id=f"cpu-{preset}-float32-{impl}-b{batch}-{pass_name}")
    for preset, dtype, impl, batch, pass_name in itertools.product(PRESETS, CUDA_DTYPES, IMPLS, CUDA_BATCHES, PASSES):
        dtype_name = str(dtype).removeprefix("torch.")
        yield pytest.param("cuda", preset, dtype, impl, batch, pass_name,
                           id=f"cuda-{preset}-{dtype_name}-{impl}-b{batch}-{pass_name}")


@pytest.mark.parametrize("device_type, preset, dtype, impl, batch, pass_name", list(_cases()))
def test_spinal_layer(benchmark, device_type, preset, dtype, impl, batch, pass_name):
    if device_type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    device, config = torch.device(device_type), PRESETS[preset]
    try:
        model = build_impl(impl, config, dtype, device)
    except ImplUnavailable as error:
        pytest.skip(str(error))
    step = make_step(model, config, batch, pass_name, dtype, device)
    if device.type == "cuda":
        launch = step

        def step():  # time the GPU work, not just its launch
            result = launch()
            torch.cuda.synchronize(device)
            return result

    step()  # warm-up (and torch.compile) outside the measurement
    flops, params = cost(impl, config, batch, pass_name)
    benchmark.group = f"{device_type} {preset} {str(dtype).removeprefix('torch.')} batch {batch} {pass_name}"
    benchmark.extra_info.update(flops=flops, params=params, rows=batch)
    result = benchmark(step)
    # the step computed the layer's output (forward) or grad_x first of its gradients
    output, width = (result, config.output_features) if pass_name == "forward" else (result[0], config.in_features)
    assert output.shape == (batch, width)
