"""The ``triton`` backend: the Triton kernels of spinal_ops/triton_kernels.py as two ops,
``spinal_ops::triton_forward`` and ``spinal_ops::triton_backward``, with the fused schemas.

The ops are plain custom ops (schema + CPU/CUDA kernels + fake kernels + autograd), so
``torch.compile(fullgraph=True)`` traces them as single nodes. Nothing here imports triton:
the kernels module is imported on the first op call, which keeps ``import spinal_ops`` fast and
working without triton. On CPU tensors the kernels run through the Triton interpreter, which
needs ``TRITON_INTERPRET=1`` in the environment before spinal_ops is imported.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

from ..config import SpinalConfig, SpinalParams
from .base import Support
from .fused import BACKWARD_SCHEMA, FORWARD_SCHEMA, FusedOpBackend, fake_backward, fake_forward, register_fused_autograd

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The widest layer whose [w, w] hidden weight and [BLOCK_B, w] state fit one program's registers.
MAX_LAYER_WIDTH = 128


# Read once, as triton reads it when the kernels are defined (and so that selection inside a
# torch.compile trace reads a constant).
INTERPRETER_ENABLED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _device_guard(tensor: torch.Tensor):
    """Launch on the tensor's GPU (the current stream of that device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _checked_config(x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope) -> SpinalConfig:
    """Direct op calls get SpinalConfig's shape/dtype/device errors before any kernel runs."""
    if x.dim() != 2 or weight_in.dim() != 3:
        raise ValueError(
            f"spinal_ops::triton ops: x must be [B, N] and weight_in [L, w, s], got {tuple(x.shape)} and {tuple(weight_in.shape)}"
        )
    params = SpinalParams(weight_in, weight_hidden, bias, weight_out, bias_out)
    config = SpinalConfig.from_params(
        x.shape[1], params, split_size=weight_in.shape[2], activation=activation, negative_slope=negative_slope
    )
    config.check_input(x, params)
    return config


def _check_contiguous(**tensors) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and not tensor.is_contiguous():
            raise ValueError(f"spinal_ops::triton ops: {name} must be contiguous")


def _triton_forward(x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope,
                    allow_tf32=False, keep_pre_activation=True):
    from .. import triton_kernels

    _checked_config(x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope)
    _check_contiguous(x=x, weight_in=weight_in, weight_hidden=weight_hidden, bias=bias, weight_out=weight_out, bias_out=bias_out)
    with _device_guard(x):
        out, pre_activation = triton_kernels.spinal_forward(
            x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope
        )
    return out, pre_activation if keep_pre_activation else x.new_empty(0)


def _triton_backward(grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, output_mask, activation,
                     negative_slope, allow_tf32=False):
    from .. import triton_kernels

    config = _checked_config(x, weight_in, weight_hidden, None, weight_out, None, activation, negative_slope)
    rows = x.shape[0]
    for name, tensor, shape in (
        ("grad_out", grad_out, (rows, config.output_features)),
        ("pre_activation", pre_activation, (rows, config.hidden_features)),
    ):
        if tuple(tensor.shape) != shape or tensor.dtype != x.dtype or tensor.device != x.device:
            raise ValueError(
                f"spinal_ops::triton_backward: {name} must be {shape} {x.dtype} on {x.device}, "
                f"got {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}"
            )
    _check_contiguous(grad_out=grad_out, x=x, pre_activation=pre_activation, weight_in=weight_in,
                      weight_hidden=weight_hidden, weight_out=weight_out)
    with _device_guard(x):
        # The kernels compute every weight gradient in one launch; the mask decides which bias
        # gradients exist (the rest are computed and dropped by autograd).
        return triton_kernels.spinal_backward(
            grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, output_mask[3], output_mask[5],
            activation, negative_slope,
        )


@functools.lru_cache(maxsize=None)
def register_triton_ops() -> None:
    """Define the two ops (once): schemas, CPU/CUDA kernels, fake kernels and autograd."""
    for name, schema, kernel, fake in (
        ("triton_forward", FORWARD_SCHEMA, _triton_forward, fake_forward),
        ("triton_backward", BACKWARD_SCHEMA, _triton_backward, fake_backward),
    ):
        qualname = f"spinal_ops::{name}"
        torch.library.define(qualname, schema)
        torch.library.register_kernel(qualname, ("cpu", "cuda"), kernel)
        torch.library.register_fake(qualname)(fake)
    register_fused_autograd(
        torch.ops.spinal_ops.triton_forward.default, torch.ops.spinal_ops.triton_backward.default, "triton"
    )


class TritonBackend(FusedOpBackend):
    name = "triton"

    def availability(self) -> Support:
        if importlib.util.find_spec("triton") is None:
            return Support.no("triton is not installed (pip install triton)")
        if not (torch.cuda.is_available() or INTERPRETER_ENABLED):
            return Support.no("no CUDA device, and TRITON_INTERPRET=1 (the Triton interpreter for CPU tensors) is not set")
        register_triton_ops()
        return Support.yes()

    def supports(self, config: SpinalConfig, dtype: torch.dtype, device: torch.device) -> Support:
        if device.type == "cpu" and not INTERPRETER_ENABLED:
            return Support.no("CPU tensors run only through the Triton interpreter (set TRITON_INTERPRET=1 before importing spinal_ops)")
        if device.type not in ("cuda", "cpu"):
            return Support.no(f"runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got a tensor on {device}")
        if dtype not in TRITON_DTYPES:
            return Support.no(f"dtype {dtype} not supported (float32, float16, bfloat16)")
        if device.type == "cpu" and dtype == torch.bfloat16:
            # triton 3.8's interpreter multiplies bfloat16 tl.dot operands as their raw uint16 bits.
            return Support.no("bfloat16 runs on CUDA tensors only (the Triton interpreter's bfloat16 tl.dot is wrong)")
        if config.layer_width > MAX_LAYER_WIDTH:
            return Support.no(
                f"layer_width {config.layer_width} is past the register budget of the Triton kernels "
                f"(at most {MAX_LAYER_WIDTH}: one program holds a whole layer and its hidden weight)"
            )
        return Support.yes()

    def auto_eligible(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def forward_op(self, config: SpinalConfig, x: torch.Tensor, training: bool):
        return torch.ops.spinal_ops.triton_forward.default
