"""Export of models containing spinal layers to ONNX.

``torch.export`` and AOTInductor keep the fused ops as single nodes (they are ``torch.library``
ops with fake kernels). ONNX has no such op, so ``torch.onnx.export(..., dynamo=True)``
decomposes each forward op into standard operators (Gemm/MatMul, Slice, Concat, Add and the
activation) with the decomposition below, registered at ``import spinal_ops`` in
``torch._decomp.decomposition_table``, where the exporter looks. Outside an ONNX export the entry
only answers shapes, so ``torch.export``, ``run_decompositions()`` and ``torch.compile`` keep the
fused op.

The TorchScript-based exporter (``dynamo=False``) cannot run a Python decomposition: for it the
ops raise a clear error instead.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch._decomp import register_decomposition

from .activations import apply_activation
from .backends.fused import fake_forward
from .config import SpinalConfig, SpinalParams
from .reference import input_window

# The forward ops with FORWARD_SCHEMA (spinal_ops/backends/fused.py), by name in torch.ops.spinal_ops.
FORWARD_OPS: tuple[str, ...] = ("fused_forward", "hoisted_forward", "triton_forward")


def decomposed_forward(
    x: torch.Tensor,
    weight_in: torch.Tensor,
    weight_hidden: torch.Tensor,
    bias: Optional[torch.Tensor],
    weight_out: Optional[torch.Tensor],
    bias_out: Optional[torch.Tensor],
    activation: str,
    negative_slope: float,
    keep_pre_activation: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A forward op's ``(out, pre_activation)`` written with standard PyTorch ops.

    Windows come from SpinalConfig (a wrapped window is a Concat of two Slices); the shapes are
    static, so the exported graph has one Gemm per product and no loop.

    Outside an ONNX export only the shapes are given, as the op's fake kernel gives them:
    FakeTensor consults this table before an op's fake kernel whenever sizes are symbolic
    (torch.compile or torch.export with dynamic shapes), and there the fused op must stay.
    """
    if not torch.onnx.is_in_onnx_export():
        return fake_forward(x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope,
                            keep_pre_activation)
    params = SpinalParams(weight_in, weight_hidden, bias, weight_out, bias_out)
    config = SpinalConfig.from_params(
        x.shape[-1], params, split_size=weight_in.shape[2], activation=activation, negative_slope=negative_slope
    )
    pre_activations: list[torch.Tensor] = []
    hidden: list[torch.Tensor] = []
    for layer in range(config.num_layers):
        z = F.linear(input_window(x, config, layer), weight_in[layer], None if bias is None else bias[layer])
        if layer > 0:
            z = z + F.linear(hidden[-1], weight_hidden[layer - 1])
        pre_activations.append(z)
        hidden.append(apply_activation(activation, z, negative_slope))
    concatenated = torch.cat(hidden, dim=-1)
    out = concatenated if weight_out is None else F.linear(concatenated, weight_out, bias_out)
    return out, torch.cat(pre_activations, dim=-1) if keep_pre_activation else x.new_empty(0)


def _refuse_torchscript_export(g, *args):
    raise RuntimeError(
        "spinal_ops: the TorchScript-based ONNX exporter (torch.onnx.export(..., dynamo=False)) cannot "
        "export spinal_ops layers; use torch.onnx.export(..., dynamo=True), which decomposes them into "
        "standard ONNX operators"
    )


def register_onnx_support() -> None:
    """Register the decomposition (and the TorchScript refusal) for every forward op defined now.

    ``fused_forward`` exists only when the compiled extension loaded; called once by
    ``spinal_ops/__init__.py`` after the backends are set up.
    """
    for name in FORWARD_OPS:
        if not hasattr(torch.ops.spinal_ops, name):
            continue
        overload = getattr(torch.ops.spinal_ops, name).default
        if overload not in torch._decomp.decomposition_table:
            register_decomposition(overload)(decomposed_forward)
        torch.onnx.register_custom_op_symbolic(f"spinal_ops::{name}", _refuse_torchscript_export, 9)
