"""The ``cpu`` backend: the native C++ op (csrc/cpu/) computing the whole chain in one call, dropout
included (its masks applied by the hoisted chain)."""
from __future__ import annotations

import torch

from ..config import SpinalConfig
from .._extension import extension_status
from ..support import Support
from .op_pair import OpPairBackend


class CpuBackend(OpPairBackend):
    name = "cpu"
    device_types = ("cpu",)
    dtypes = (torch.float32, torch.float64, torch.bfloat16)
    # Dropout runs on the hoisted chain (csrc/cpu/forward.cpp); batch norm is not in the op.
    runs_dropout = True

    def availability(self) -> Support:
        return extension_status()

    def forward_op(self, config: SpinalConfig, x: torch.Tensor, training: bool):
        return torch.ops.spinal_ops.native_forward.default
