"""The ``cuda`` backend: hand-written CUDA kernels (csrc/cuda/), same ops as ``cpu``."""
from __future__ import annotations

import torch

from .._extension import cuda_kernels_compiled, load_extension
from ..config import SpinalConfig
from .base import Support
from .fused import FusedOpBackend

CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
        return Support.yes()

    def supports(self, config: SpinalConfig, dtype: torch.dtype, device: torch.device) -> Support:
        if device.type != "cuda":
            return Support.no(f"runs on CUDA tensors only, got a tensor on {device}")
        if dtype not in CUDA_DTYPES:
            return Support.no(f"dtype {dtype} not supported (float32, float16, bfloat16)")
        return Support.yes()

    def forward_op(self):
        return torch.ops.spinal_ops.fused_forward.default
