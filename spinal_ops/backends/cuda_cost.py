"""Which CUDA path runs a call: the native kernels or the hoisted cuBLAS chain.

Both paths compute the same function from the same parameters and keep Z in the same layout,
so the cuda backend picks one per call, by predicted time. The model (seconds):

  native  = launches * NATIVE_LAUNCH + work * waves * (L * TILE_LAYER + tile_flops / tile_cta_flops)
            One CTA per row tile (64 rows for half types, 32 for float32) walks the whole chain;
            waves = ceil(row tiles / SMs), so a small batch leaves SMs idle. A CTA's rate falls
            with narrow layers (its column tiles are 64 wide): tile_cta_flops * min(1, w / 64).
            Narrow layers (w <= 16, M <= 16: the narrow kernels, one thread per row) replace the
            forward's tile work by narrow = max(flops / narrow_flops, bytes / bandwidth) (x read
            once, Z and y written), and the backward's launch 1 by as much again.
  hoisted = ops * OP + max(flops / gemm_flops, bytes / bandwidth)
            ops: the ATen calls of the chain (window GEMMs, three per layer, the output GEMM and
            bookkeeping); bytes: x read once, four [B, L*w] passes (products, Z, H written and
            read), y written. On an H100 one op costs ~16 us of host and launch time, so at small
            batch the hoisted chain's 20-90 ops lose to the native kernels' 1-3 launches.

Training calls (a backward will follow) add the backward of each path: the native backward's two
launches each do the forward's tile work (launch 1 on narrow layers: the narrow forward's);
the hoisted backward has ~3 ops per layer more and twice the forward's FLOPs. Layers wider than
the tile kernels' width limit always take the hoisted path.

The constants of each GPU live in GPU_MODELS and nowhere else; scripts/cuda_paths.py (run by
scripts/gpu_session.sh with PATHS=1) times both paths on the presets, and they are calibrated
from its JSON (benchmarks/results/cuda-paths/), which tests/test_cuda_cost.py checks them against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import SpinalConfig


@dataclass(frozen=True)
class GpuModel:
    """Cost constants of one GPU (rates in FLOP/s and bytes/s, times in seconds)."""

    name: str
    sm_count: int
    gemm_flops: dict[torch.dtype, float]  # what cuBLAS sustains on the hoisted chain's GEMMs
    bandwidth: float  # device memory, bytes read + written per second
    op_seconds: float  # host + launch cost of one ATen call of the hoisted chain
    native_launch_seconds: float
    tile_layer_seconds: float  # per layer and row tile: the chain's barriers and staging
    tile_cta_flops: dict[torch.dtype, float]  # one CTA of the native kernels on w >= 64
    narrow_flops: dict[torch.dtype, float]  # the whole GPU running the narrow forward kernel
    half_row_tile: int = 64  # rows per CTA of the half-type tile kernels: 32 before sm_80 (64 KB of shared memory)


_HALF = (torch.float16, torch.bfloat16)


def _rates(half: float, single: float) -> dict[torch.dtype, float]:
    return {torch.float16: half, torch.bfloat16: half, torch.float32: single}


GPU_MODELS: dict[str, GpuModel] = {
    # H100 SXM (132 SMs): ~3.0 TB/s copy bandwidth, ~790 TFLOP/s bf16 on large GEMMs; the chain's
    # GEMMs are skinny, hence a third of that. The per-op and per-launch times (host work
    # included: at small batch they decide) and the native kernels' per-CTA rates are fitted to
    # scripts/cuda_paths.py on an H100 (benchmarks/results/cuda-paths/nvidia-h100-80gb-hbm3.json,
    # which has no narrow-kernel timings: their rate is the H200's, on the same SMs).
    "h100": GpuModel("H100", 132, _rates(250e12, 40e12), 3.0e12, 16e-6, 60e-6, 5e-6, _rates(0.19e12, 0.10e12),
                     _rates(5e12, 5e12)),
    # H200 (the H100's SMs, 4.3 TB/s): the H100's constants but for the narrow kernels' rate and the
    # native launches' host time, fitted to scripts/cuda_paths.py on an H200 machine whose host was
    # slower (benchmarks/results/cuda-paths/nvidia-h200.json: mnist, vgg5).
    "h200": GpuModel("H200", 132, _rates(250e12, 40e12), 4.3e12, 16e-6, 120e-6, 5e-6, _rates(0.19e12, 0.10e12),
                     _rates(5e12, 5e12)),
    # A100 (108 SMs, 312 TFLOP/s bf16, 2.0 TB/s): the H100's fractions of the datasheet rates and
    # its host costs; the native kernels' rates scaled by the SM clock and tensor-core ratio.
    "a100": GpuModel("A100", 108, _rates(100e12, 16e12), 1.6e12, 16e-6, 60e-6, 5e-6, _rates(0.12e12, 0.08e12),
                     _rates(5e12, 5e12)),
}


def model_for(name: str, sm_count: int, capability: tuple[int, int] = (9, 0)) -> GpuModel:
    """The constants for a device by its name; an unknown GPU gets the A100's rates (uncalibrated
    there) with its own SM count and, before sm_80, the 32-row half-type tiles the op launches."""
    lowered = name.lower()
    if "h200" in lowered:  # GH200 too
        return GPU_MODELS["h200"]
    if "h100" in lowered:
        return GPU_MODELS["h100"]
    if "a100" in lowered:
        return GPU_MODELS["a100"]
    generic = GPU_MODELS["a100"]
    return GpuModel(name, sm_count, generic.gemm_flops, generic.bandwidth, generic.op_seconds,
                    generic.native_launch_seconds, generic.tile_layer_seconds, generic.tile_cta_flops,
                    generic.narrow_flops, 64 if capability >= (8, 0) else 32)


def _row_tile(dtype: torch.dtype, model: GpuModel) -> int:
    """Rows per CTA of the tile kernels (with_kernel_types in csrc/cuda/launch.cuh)."""
    return model.half_row_tile if dtype in _HALF else 32


def native_seconds(config: SpinalConfig, batch: int, dtype: torch.dtype, model: GpuModel, training: bool,
                  narrow: bool = False) -> float:
    """Predicted time of the native kernels (forward, plus backward when ``training``);
    ``narrow``: the layer runs the narrow kernels."""
    tile = _row_tile(dtype, model)
    waves = math.ceil(math.ceil(max(batch, 1) / tile) / model.sm_count)
    tile_flops = config.forward_flops(tile)
    cta_flops = model.tile_cta_flops[dtype] * min(1.0, config.layer_width / 64)
    tiled_seconds = waves * (config.num_layers * model.tile_layer_seconds + tile_flops / cta_flops)
    if narrow:
        moved = dtype.itemsize * batch * (config.in_features + config.hidden_features + config.output_features)
        forward = max(config.forward_flops(batch) / model.narrow_flops[dtype], moved / model.bandwidth)
        data_grad = forward  # ncu on an H200 (mnist, B = 65536): launch 1 156 us, the forward 182-243 us
    else:
        forward = data_grad = tiled_seconds
    backward = 2 * model.native_launch_seconds + data_grad + tiled_seconds if training else 0.0
    return model.native_launch_seconds + forward + backward


def hoisted_ops(config: SpinalConfig, training: bool) -> int:
    """ATen calls of the hoisted chain: window GEMMs, three per layer, the output GEMM, bookkeeping."""
    groups = min(config.num_layers, config.in_features // math.gcd(config.in_features, config.split_size))
    window_gemms = groups * (1 if config.in_features % config.split_size == 0 else 2)
    forward = window_gemms + 3 * config.num_layers + 4
    # The backward: dZ's recurrence and phi' per layer, dW_hidden per layer, the window GEMMs for
    # dx and dW_in, allocations, the group-order copies and the autograd call around it.
    return forward + (3 * window_gemms + 5 * config.num_layers + 25 if training else 0)


def hoisted_seconds(config: SpinalConfig, batch: int, dtype: torch.dtype, model: GpuModel, training: bool) -> float:
    """Predicted time of the hoisted chain on cuBLAS (forward, plus backward when ``training``)."""
    flops = config.step_flops(batch, "train" if training else "infer")
    passes = 10 if training else 4  # [B, L*w] passes: the backward reads Z, writes H and dZ, reads both twice
    moved = dtype.itemsize * batch * (config.in_features * (2 if training else 1)
                                      + passes * config.hidden_features + config.output_features)
    compute = max(flops / model.gemm_flops[dtype], moved / model.bandwidth)
    return hoisted_ops(config, training) * model.op_seconds + compute


@dataclass(frozen=True)
class PathChoice:
    path: str  # "native" or "hoisted"
    reason: str


def choose_path(config: SpinalConfig, batch: int, dtype: torch.dtype, model: GpuModel, training: bool,
                tile_kernel_max_width: int, narrow: bool = False) -> PathChoice:
    """The faster path by the model (the native kernels only up to ``tile_kernel_max_width``;
    ``narrow``: the layer runs the narrow kernels)."""
    if config.layer_width > tile_kernel_max_width:
        return PathChoice("hoisted", f"hoisted cuBLAS chain: w={config.layer_width} > {tile_kernel_max_width} "
                                     "(the native kernels' widest tile)")
    native = native_seconds(config, batch, dtype, model, training, narrow)
    hoisted = hoisted_seconds(config, batch, dtype, model, training)
    path = "native" if native <= hoisted else "hoisted"
    label = "native kernels" if path == "native" else "hoisted cuBLAS chain"
    return PathChoice(path, f"{label}: predicted {native * 1e3:.3f} ms native vs {hoisted * 1e3:.3f} ms hoisted "
                            f"({model.name} model, batch {batch}, {'training' if training else 'inference'})")
