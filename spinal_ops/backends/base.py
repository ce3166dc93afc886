"""The small interface every backend implements (reference, cpu, cuda, triton)."""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from ..config import SpinalConfig, SpinalParams


@dataclass(frozen=True)
class Support:
    """A yes, or a no with the reason (shown to users in errors and available_backends())."""

    ok: bool
    reason: str = ""

    @classmethod
    def yes(cls, reason: str = "") -> "Support":
        """A yes; ``reason`` may say how the call runs (e.g. which kernel path)."""
        return cls(True, reason)

    @classmethod
    def no(cls, reason: str) -> "Support":
        return cls(False, reason)

    def __bool__(self) -> bool:
        return self.ok


class Backend(abc.ABC):
    """A peer implementation of the spinal layer.

    ``forward`` receives the input flattened to 2-D ``[B, N]`` (possibly non-contiguous),
    parameters already checked against ``config`` and sharing the input's dtype and device,
    and returns ``[B, config.output_features]``, differentiable with respect to the input and
    every parameter.
    """

    name: str

    @abc.abstractmethod
    def availability(self) -> Support:
        """Whether this backend can run on this machine at all (built, importable, has a device)."""

    @abc.abstractmethod
    def supports(self, config: SpinalConfig, dtype: torch.dtype, device: torch.device) -> Support:
        """Whether this backend runs this call; the reason when it does not."""

    def auto_eligible(self, device: torch.device) -> bool:
        """Whether ``auto`` may pick this backend for tensors on ``device``."""
        return True

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, params: SpinalParams, config: SpinalConfig) -> torch.Tensor:
        """The layer on a 2-D input."""
