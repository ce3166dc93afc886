"""The ``reference`` backend: the literal math of spinal_ops/reference.py through ordinary
autograd. Every dtype and device, double backward included; the ground truth the other backends
are tested against."""
from __future__ import annotations

from typing import Optional

import torch

from ..config import SpinalConfig, SpinalParams, TrainingStages
from ..reference import spinal_forward
from ..support import Support
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    runs_dropout = True
    runs_batch_norm = True

    def availability(self) -> Support:
        return Support.yes()

    def forward(self, x: torch.Tensor, params: SpinalParams, config: SpinalConfig,
                stages: Optional[TrainingStages] = None) -> torch.Tensor:
        return spinal_forward(x, params, config, stages)
