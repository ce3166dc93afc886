"""Defines the ``spinal_ops::triton_forward`` / ``triton_backward`` op pair: the schemas every op
pair shares, the kernels of launch.py for CPU (through the Triton interpreter) and CUDA tensors,
fake kernels, and autograd through one call of the backward op (the compiled pairs' C++ node where
``_C`` is loaded). A training call's dropout (``dropout_seed``, ``dropout_p``) runs inside the
kernels; the backward gets the forward's seed."""
from __future__ import annotations

import torch

from ... import _extension  # noqa: F401  (loads _C, which registers the pair's autograd, first)
from ...ops import BACKWARD_SCHEMA, FORWARD_SCHEMA, fake_backward, fake_forward, register_op_pair_autograd
from . import launch


def _define() -> None:
    for name, schema, kernel, fake in (
        ("triton_forward", FORWARD_SCHEMA, launch.forward, fake_forward),
        ("triton_backward", BACKWARD_SCHEMA, launch.backward, fake_backward),
    ):
        qualname = f"spinal_ops::{name}"
        torch.library.define(qualname, schema)
        torch.library.register_kernel(qualname, ("cpu", "cuda"), kernel)
        torch.library.register_fake(qualname)(fake)
    # A loaded _C has registered the pair's autograd in C++ (csrc/autograd.cpp, the compiled pairs'
    # node: no Python between the dispatcher and the kernels), even one whose other ops are stale;
    # without it, the same in Python.
    if not torch._C._dispatch_has_kernel_for_dispatch_key("spinal_ops::triton_forward", "Autograd"):
        register_op_pair_autograd(torch.ops.spinal_ops.triton_forward.default,
                                  torch.ops.spinal_ops.triton_backward.default)


_define()
