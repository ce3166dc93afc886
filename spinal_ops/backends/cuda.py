"""The ``cuda`` backend: hand-written CUDA kernels (csrc/cuda/), same ops as ``cpu``.

Layers up to ``fused_max_width()`` wide run the fused kernels (one forward launch, two
backward launches) where their shared memory fits the device (99 KB parts keep fewer:
``fused_width_limit()``); other layers run the op's multi-launch path (cuBLAS through ATen).
``supports()`` says which, in its reason.
"""
from __future__ import annotations

import torch

from .._extension import cuda_kernels_compiled, load_extension
from ..config import SpinalConfig
from .base import Support
from .fused import FusedOpBackend

CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_COMPUTE_CAPABILITY = (8, 0)  # bf16 tensor-core WMMA; the build targets sm80 and sm90


# Resolved once by availability() (at import, see dispatch.py), so that supports() only reads
# plain values inside a torch.compile trace.
_fused_max_width: int = 0  # kFusedMaxWidth of csrc/cuda/tile_mma.cuh, read from the build
_capabilities: dict[int, tuple[int, int]] = {}
# (device, dtype, TF32 allowed) -> widest fused w on that device, read from the op's own routing
_width_limits: dict[tuple[int, torch.dtype, bool], int] = {}


def fused_max_width() -> int:
    """Widest layer (w) the fused kernels run; wider layers take the multi-launch path."""
    return _fused_max_width


def fused_width_limit(device: int, dtype: torch.dtype, allow_tf32: bool = False) -> int:
    """Widest layer the fused kernels run on CUDA device ``device`` for ``dtype`` (TF32 policy for
    float32 when ``allow_tf32``): ``fused_max_width()``, or less where the device's opt-in shared
    memory per block is smaller than the kernels need."""
    return _width_limits.get((device, dtype, allow_tf32 and dtype == torch.float32), _fused_max_width)


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
        index = device.index if device.index is not None else torch.cuda.current_device()
        capability = _capabilities.get(index, (0, 0))
        if capability < MIN_COMPUTE_CAPABILITY:
            return Support.no(f"needs compute capability >= 8.0, device {index} has {capability[0]}.{capability[1]}")
        tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
        limit = fused_width_limit(index, dtype, tf32)
        if config.layer_width > limit:
            why = "" if limit == fused_max_width() else f" (the fused kernels' shared memory does not fit device {index})"
            return Support.yes(f"multi-launch path: w={config.layer_width} > {limit}{why}")
        return Support.yes("fused kernel")

    def forward_op(self):
        return torch.ops.spinal_ops.fused_forward.default
