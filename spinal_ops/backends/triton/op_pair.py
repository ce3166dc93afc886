"""Defines the ``spinal_ops::triton_forward`` / ``triton_backward`` op pair: the schemas every op
pair shares, the kernels of launch.py for CPU (through the Triton interpreter) and CUDA tensors,
fake kernels, and autograd through one call of the backward op.

The kernels do not apply dropout yet: a call with ``dropout_p > 0`` raises (the triton backend's
``runs_dropout`` is False, so the layer never sends it one)."""
from __future__ import annotations

import torch

from ...ops import BACKWARD_SCHEMA, FORWARD_SCHEMA, check_dropout_args, fake_backward, fake_forward, register_op_pair_autograd
from . import launch


def _refuse_dropout(dropout_seed, dropout_p) -> None:
    check_dropout_args(dropout_seed, dropout_p)
    if dropout_p > 0:
        raise NotImplementedError(
            f"spinal_ops: the triton op pair does not apply dropout yet (dropout_p={dropout_p}); "
            "backend='cpu', 'cuda' or 'reference' trains with dropout"
        )


def forward(x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope,
            allow_tf32=False, keep_pre_activation=True, dropout_seed=None, dropout_p=0.0):
    _refuse_dropout(dropout_seed, dropout_p)
    return launch.forward(x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope,
                          allow_tf32, keep_pre_activation)


def backward(grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, output_mask, activation,
             negative_slope, allow_tf32=False, dropout_seed=None, dropout_p=0.0):
    _refuse_dropout(dropout_seed, dropout_p)
    return launch.backward(grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, output_mask, activation,
                           negative_slope, allow_tf32)


def _define() -> None:
    for name, schema, kernel, fake in (
        ("triton_forward", FORWARD_SCHEMA, forward, fake_forward),
        ("triton_backward", BACKWARD_SCHEMA, backward, fake_backward),
    ):
        qualname = f"spinal_ops::{name}"
        torch.library.define(qualname, schema)
        torch.library.register_kernel(qualname, ("cpu", "cuda"), kernel)
        torch.library.register_fake(qualname)(fake)
    register_op_pair_autograd(torch.ops.spinal_ops.triton_forward.default, torch.ops.spinal_ops.triton_backward.default)


_define()
