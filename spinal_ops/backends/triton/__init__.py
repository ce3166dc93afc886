"""The ``triton`` backend: the Triton kernels of kernels.py, run through the
``spinal_ops::triton_forward`` / ``triton_backward`` op pair (op_pair.py defines it; its kernels
are in launch.py).

The ops are plain custom ops (schema + CPU/CUDA kernels + fake kernels + autograd), so
``torch.compile(fullgraph=True)`` traces them as single nodes. On CPU tensors the kernels run
through the Triton interpreter, which needs ``TRITON_INTERPRET=1`` in the environment before
spinal_ops is imported.

A training call's dropout runs inside the kernels (masks from the counter-based generator of
contract §1, recomputed by the backward, never stored); batch norm in training mode does not run
here.

Layers of width <= 128 run the one-block kernels (kernels.py). The tiled kernels (tiled.py) run
any width but are not yet measured on a GPU: they run, for every width, only with the switch of
settings.py on (``SPINAL_OPS_TRITON_TILED=1`` at import); without it wider layers are refused.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ...config import SpinalConfig
from ...support import Support
from ..op_pair import OpPairBackend
from . import op_pair as _op_pair  # noqa: F401  (defines the triton op pair)
from . import settings
from .settings import MAX_LAYER_WIDTH, set_tiled  # noqa: F401  (the one-block kernels' widest layer)

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Read once, as triton reads it when the kernels are defined (and so that selection inside a
# torch.compile trace reads a constant).
INTERPRETER_ENABLED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class TritonBackend(OpPairBackend):
    name = "triton"
    device_types = ("cuda", "cpu")  # CPU tensors through the Triton interpreter only
    dtypes = TRITON_DTYPES
    # No declared limit: the width check depends on the switch (settings.TILED), in supports_call.
    max_layer_width = None
    # Dropout runs inside the kernels; batch norm has no stage here (base.supports refuses it).
    runs_dropout = True
    auto_runs_training_stages = False  # the dropout kernels wait for a GPU run (tests/test_triton_dropout.py)

    def availability(self) -> Support:
        if importlib.util.find_spec("triton") is None:
            return Support.no("triton is not installed (pip install triton)")
        if not (torch.cuda.is_available() or INTERPRETER_ENABLED):
            return Support.no("no CUDA device, and TRITON_INTERPRET=1 (the Triton interpreter for CPU tensors) is not set")
        return Support.yes()

    def supports_call(self, config: SpinalConfig, dtype: torch.dtype, device: torch.device) -> Support:
        if device.type == "cpu" and not INTERPRETER_ENABLED:
            return Support.no("CPU tensors run only through the Triton interpreter (set TRITON_INTERPRET=1 before importing spinal_ops)")
        if device.type == "cpu" and dtype == torch.bfloat16:
            # triton 3.8's interpreter multiplies bfloat16 tl.dot operands as their raw uint16 bits.
            return Support.no("bfloat16 runs on CUDA tensors only (the Triton interpreter's bfloat16 tl.dot is wrong)")
        if config.layer_width > MAX_LAYER_WIDTH and not settings.TILED:
            return Support.no(f"layer_width {config.layer_width}: {settings.WIDTH_REASON}")
        return Support.yes()

    def auto_eligible(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def forward_op(self, config: SpinalConfig, x: torch.Tensor, training: bool):
        return torch.ops.spinal_ops.triton_forward.default
