"""The ``cpu`` backend: the native C++ op (csrc/cpu/) computing the whole chain in one call, dropout
included (its masks applied by the hoisted chain)."""
from __future__ import annotations

from typing import Optional

import torch

from ..config import SpinalConfig, SpinalParams, TrainingStages
from .._extension import extension_status
from ..support import Support
from . import normed
from .op_pair import OpPairBackend


class CpuBackend(OpPairBackend):
    name = "cpu"
    device_types = ("cpu",)
    dtypes = (torch.float32, torch.float64, torch.bfloat16)
    # Dropout alone runs in the native op (its masks applied by the hoisted chain, csrc/cpu/forward.cpp);
    # batch norm, with or without dropout, on the normed op pair (backends/normed.py).
    runs_dropout = True
    runs_batch_norm = True

    def availability(self) -> Support:
        return extension_status()

    def forward_op(self, config: SpinalConfig, x: torch.Tensor, training: bool):
        return torch.ops.spinal_ops.native_forward.default

    def forward(self, x: torch.Tensor, params: SpinalParams, config: SpinalConfig,
                stages: Optional[TrainingStages] = None) -> torch.Tensor:
        if stages is not None and stages.norm is not None:
            return normed.forward(x, params, config, stages)
        return super().forward(x, params, config, stages)
