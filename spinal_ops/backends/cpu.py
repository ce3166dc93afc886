"""The ``cpu`` backend: the fused C++ op (csrc/cpu/) computing the whole chain in one call."""
from __future__ import annotations

import torch

from .._extension import load_extension
from ..config import SpinalConfig
from .base import Support
from .fused import FusedOpBackend

CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


class CpuBackend(FusedOpBackend):
    name = "cpu"

    def availability(self) -> Support:
        return load_extension()

    def supports(self, config: SpinalConfig, dtype: torch.dtype, device: torch.device) -> Support:
        if device.type != "cpu":
            return Support.no(f"runs on CPU tensors only, got a tensor on {device}")
        if dtype not in CPU_DTYPES:
            return Support.no(f"dtype {dtype} not supported (float32, float64, bfloat16)")
        return Support.yes()

    def forward_op(self, config: SpinalConfig, x: torch.Tensor, training: bool):
        return torch.ops.spinal_ops.fused_forward.default
