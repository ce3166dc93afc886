"""The ``cuda`` backend: hand-written CUDA kernels (csrc/cuda/) and the hoisted cuBLAS chain.

Each call runs one of two op pairs, chosen by the cost model of cuda_cost.py from the call's
shape, batch and device: ``fused_forward``/``fused_backward`` (the fused kernels: one forward
launch, two backward launches, for layers up to ``fused_width_limit()`` wide: ``fused_max_width()``,
or less on devices whose shared memory per block is smaller) or ``hoisted_forward``/
``hoisted_backward`` (csrc/aten_chain.h on cuBLAS: large batches and wide layers). Both keep Z
in the same layout and compute the same function.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

import torch

from .._extension import cuda_kernels_compiled, load_extension
from ..config import SpinalConfig
from .base import Support
from .cuda_cost import GpuModel, PathChoice, choose_path, model_for
from .fused import FusedOpBackend, tf32_allowed

CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_COMPUTE_CAPABILITY = (8, 0)  # bf16 tensor-core WMMA; the build targets sm80 and sm90
PATHS = ("fused", "hoisted")


# Resolved once by availability() (at import, see dispatch.py), so that supports() and the path
# choice only read plain values inside a torch.compile trace.
_fused_max_width: int = 0  # kFusedMaxWidth of csrc/cuda/tile_mma.cuh, read from the build
_capabilities: dict[int, tuple[int, int]] = {}
# (device, dtype, TF32 allowed) -> widest fused w on that device, read from the op's own routing
_width_limits: dict[tuple[int, torch.dtype, bool], int] = {}
_models: dict[int, GpuModel] = {}
_forced_path: Optional[str] = None


def fused_max_width() -> int:
    """Widest layer (w) the fused kernels run on any device; wider layers take the hoisted path."""
    return _fused_max_width


def fused_width_limit(device: int, dtype: torch.dtype, allow_tf32: bool = False) -> int:
    """Widest layer the fused kernels run on CUDA device ``device`` for ``dtype`` (TF32 policy for
    float32 when ``allow_tf32``): ``fused_max_width()``, or less where the device's opt-in shared
    memory per block is smaller than the kernels need."""
    return _width_limits.get((device, dtype, allow_tf32 and dtype == torch.float32), _fused_max_width)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _width_limit_for(device: torch.device, dtype: torch.dtype) -> int:
    return fused_width_limit(_device_index(device), dtype, tf32_allowed(dtype))


@contextlib.contextmanager
def forced_path(path: str) -> Iterator[None]:
    """Run every cuda-backend call inside the block on one path ("fused" or "hoisted"; the fused
    kernels only where the layer fits them): for benchmarks that calibrate the cost model."""
    global _forced_path
    if path not in PATHS:
        raise ValueError(f"spinal_ops: unknown CUDA path {path!r}; expected one of {', '.join(PATHS)}")
    previous, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = previous


def cuda_path(config: SpinalConfig, batch: int, dtype: torch.dtype, device: torch.device,
              training: bool) -> PathChoice:
    """The path the cuda backend runs for this call, and why."""
    limit = _width_limit_for(device, dtype)
    if _forced_path is not None and (_forced_path == "hoisted" or config.layer_width <= limit):
        return PathChoice(_forced_path, f"{_forced_path} path forced")
    return choose_path(config, batch, dtype, _models[_device_index(device)], training, limit)


class CudaBackend(FusedOpBackend):
    name = "cuda"

    def availability(self) -> Support:
        loaded = load_extension()
        if not loaded:
            return loaded
        if not cuda_kernels_compiled():
            return Support.no("spinal_ops was built without CUDA kernels (no nvcc at build time, or SPINAL_OPS_CPU_ONLY=1)")
        if not torch.cuda.is_available():
            return Support.no("no CUDA device is available")
        global _fused_max_width
        _fused_max_width = int(torch.ops.spinal_ops.cuda_fused_max_width())
        for index in range(torch.cuda.device_count()):
            _capabilities[index] = torch.cuda.get_device_capability(index)
            properties = torch.cuda.get_device_properties(index)
            _models[index] = model_for(properties.name, properties.multi_processor_count)
            if _capabilities[index] < MIN_COMPUTE_CAPABILITY:
                continue
            for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.float16, False),
                                (torch.bfloat16, False)):
                _width_limits[(index, dtype, tf32)] = int(
                    torch.ops.spinal_ops.cuda_fused_width_limit(index, dtype, tf32))
        return Support.yes()

    def supports(self, config: SpinalConfig, dtype: torch.dtype, device: torch.device) -> Support:
        if device.type != "cuda":
            return Support.no(f"runs on CUDA tensors only, got a tensor on {device}")
        if dtype not in CUDA_DTYPES:
            return Support.no(f"dtype {dtype} not supported (float32, float16, bfloat16)")
        index = _device_index(device)
        capability = _capabilities.get(index, (0, 0))
        if capability < MIN_COMPUTE_CAPABILITY:
            return Support.no(f"needs compute capability >= 8.0, device {index} has {capability[0]}.{capability[1]}")
        limit = _width_limit_for(device, dtype)
        if config.layer_width > limit:
            why = "" if limit == fused_max_width() else f" (the fused kernels' shared memory does not fit device {index})"
            return Support.yes(f"hoisted cuBLAS chain: w={config.layer_width} > {limit}{why}")
        return Support.yes("fused kernels or hoisted cuBLAS chain, per call by the cost model")

    def forward_op(self, config: SpinalConfig, x: torch.Tensor, training: bool):
        choice = cuda_path(config, x.shape[0], x.dtype, x.device, training)
        return getattr(torch.ops.spinal_ops, f"{choice.path}_forward").default
