"""The ``triton`` backend (placeholder until the Triton issue lands: reports itself unavailable)."""
from __future__ import annotations

import torch

from ..config import SpinalConfig, SpinalParams
from .base import Backend, Support


class TritonBackend(Backend):
    name = "triton"

    def availability(self) -> Support:
        return Support.no("the Triton kernels are not implemented yet")

    def supports(self, config: SpinalConfig, dtype: torch.dtype, device: torch.device) -> Support:
        return Support.no("the Triton kernels are not implemented yet")

    def auto_eligible(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def forward(self, x: torch.Tensor, params: SpinalParams, config: SpinalConfig) -> torch.Tensor:
        raise NotImplementedError
