"""The small interface every backend implements (reference, cpu, cuda, triton)."""
from __future__ import annotations

import abc
from typing import Optional

import torch

from ..config import SpinalConfig, SpinalParams, TrainingStages
from ..support import Support


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)


class Backend(abc.ABC):
    """A peer implementation of the spinal layer.

    A backend declares what it runs (``device_types``, ``dtypes``, ``max_layer_width``; None:
    no limit) and ``supports()`` turns those into reasons; what declarations cannot say (device
    properties, interpreter limits) goes in ``supports_call()``.

    ``forward`` receives the input flattened to 2-D ``[B, N]`` (possibly non-contiguous),
    parameters already checked against ``config`` and sharing the input's dtype and device,
    and returns ``[B, config.output_features]``, differentiable with respect to the input and
    every parameter.
    """

    name: str
    device_types: Optional[tuple[str, ...]] = None
    dtypes: Optional[tuple[torch.dtype, ...]] = None
    max_layer_width: Optional[int] = None
    # Why layers wider than max_layer_width do not run, for the error message.
    width_limit_reason: str = ""
    # Whether forward() takes a training call's dropout seed (``stages.dropout_seed``) and applies
    # the masks, and whether it takes its batch-norm state (``stages.norm``); eval calls reach every
    # backend with batch norm folded and no dropout.
    runs_dropout: bool = False
    runs_batch_norm: bool = False
    # Whether ``auto`` may send this backend a training call with dropout or batch norm. A GPU
    # backend whose stages have not run in a committed GPU measurement keeps False: ``auto`` then
    # goes on to the next backend, and ``backend="<name>"`` still runs them.
    auto_runs_training_stages: bool = True

    @abc.abstractmethod
    def availability(self) -> Support:
        """Whether this backend can run on this machine at all (built, importable, has a device)."""

    def supports(self, config: SpinalConfig, dtype: torch.dtype, device: torch.device) -> Support:
        """Whether this backend runs this call; the reason when it does not."""
        if self.device_types is not None and device.type not in self.device_types:
            kinds = " or ".join(kind.upper() for kind in self.device_types)
            return Support.no(f"runs on {kinds} tensors only, got a tensor on {device}")
        if self.dtypes is not None and dtype not in self.dtypes:
            return Support.no(f"dtype {dtype} not supported ({_dtype_names(self.dtypes)})")
        if config.dropout > 0 and not self.runs_dropout:
            return Support.no(
                f"the {self.name} backend has no dropout stage; training with dropout runs on the cpu, cuda or "
                "reference backend (eval mode runs here, without dropout)"
            )
        if config.norm is not None and not self.runs_batch_norm:
            return Support.no(
                f"the {self.name} backend has no batch-norm stage; training with batch norm runs on the reference "
                "backend (eval mode runs here, batch norm folded into the weights)"
            )
        if self.max_layer_width is not None and config.layer_width > self.max_layer_width:
            return Support.no(
                f"layer_width {config.layer_width} is wider than the {self.name} backend runs "
                f"(at most {self.max_layer_width}: {self.width_limit_reason})"
            )
        return self.supports_call(config, dtype, device)

    def supports_call(self, config: SpinalConfig, dtype: torch.dtype, device: torch.device) -> Support:
        """The checks beyond the declared devices, dtypes and width; the reason may say how the
        call runs."""
        return Support.yes()

    def auto_eligible(self, device: torch.device) -> bool:
        """Whether ``auto`` may pick this backend for tensors on ``device`` (checked before
        ``supports``, whose reasons are not formatted for backends of another device type)."""
        return self.device_types is None or device.type in self.device_types

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, params: SpinalParams, config: SpinalConfig,
                stages: Optional[TrainingStages] = None) -> torch.Tensor:
        """The layer on a 2-D input; ``stages`` (a training call's dropout seed and batch-norm state)
        only where ``runs_dropout`` (a layer with dropout) or ``runs_batch_norm`` (with batch norm)."""
