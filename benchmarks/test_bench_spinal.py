"""pytest-benchmark suite over spinal-bench's matrix: every implementation, preset, batch and mode.

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
from spinal_ops.bench.workloads import IMPLS, ImplUnavailable, build_impl, cost, make_step
from spinal_ops.config import MODES

CPU_BATCHES = (64, 1024)
CUDA_BATCHES = (64, 4096)
CUDA_DTYPES = (torch.bfloat16, torch.float32)


def _cases():
    """(device, preset, dtype, impl, batch, mode) for CPU and CUDA."""
    for preset, impl, batch, mode in itertools.product(DEFAULT_PRESETS, IMPLS, CPU_BATCHES, MODES):
        # torch.compile costs ~10 s per case on 2 cores: one preset keeps the CPU suite fast
        if impl != "compiled_reference" or (preset, batch) == ("mnist", CPU_BATCHES[0]):
            yield pytest.param("cpu", preset, torch.float32, impl, batch, mode,
                               id=f"cpu-{preset}-float32-{impl}-b{batch}-{mode}")
    for preset, dtype, impl, batch, mode in itertools.product(PRESETS, CUDA_DTYPES, IMPLS, CUDA_BATCHES, MODES):
        dtype_name = str(dtype).removeprefix("torch.")
        yield pytest.param("cuda", preset, dtype, impl, batch, mode,
                           id=f"cuda-{preset}-{dtype_name}-{impl}-b{batch}-{mode}")


@pytest.mark.parametrize("device_type, preset, dtype, impl, batch, mode", list(_cases()))
def test_spinal_layer(benchmark, device_type, preset, dtype, impl, batch, mode):
    if device_type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    device, config = torch.device(device_type), PRESETS[preset]
    try:
        model = build_impl(impl, config, dtype, device)
    except ImplUnavailable as error:
        pytest.skip(str(error))
    step = make_step(model, config, batch, mode, dtype, device)
    if device.type == "cuda":
        launch = step

        def step():  # time the GPU work, not just its launch
            result = launch()
            torch.cuda.synchronize(device)
            return result

    step()  # warm-up (and torch.compile) outside the measurement
    flops, params = cost(impl, config, batch, mode)
    benchmark.group = f"{device_type} {preset} {str(dtype).removeprefix('torch.')} batch {batch} {mode}"
    benchmark.extra_info.update(flops=flops, params=params, rows=batch)
    result = benchmark(step)
    # infer computes the layer's output; train the gradients of x and every parameter; frozen those
    # of every parameter
    if mode == "infer":
        assert result.shape == (batch, config.output_features)
    else:
        shapes = [p.shape for p in model.parameters()]
        assert [g.shape for g in result] == ([(batch, config.in_features)] if mode == "train" else []) + shapes
