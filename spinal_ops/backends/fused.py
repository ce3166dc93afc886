"""What the fused backends (cpu, cuda, triton) share: op schemas, fake (meta) kernels,
autograd, and the Backend wrapper around a (forward, backward) op pair.

Every fused backend exposes two ops in the ``spinal_ops`` namespace with the schemas below.
``forward`` returns ``(out, pre_activation)``: ``out`` is y (or H when there is no output
projection) and ``pre_activation`` is Z = [z_0, ..., z_{L-1}] (B x L*w), which is all the
backward needs besides the inputs (it recomputes h = phi(z) on the fly). ``backward`` returns
every gradient in one call; absent parameters get empty gradients.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config import SpinalConfig, SpinalParams
from .base import Backend

FORWARD_SCHEMA = (
    "(Tensor x, Tensor weight_in, Tensor weight_hidden, Tensor? bias, Tensor? weight_out, "
    "Tensor? bias_out, str activation, float negative_slope) -> (Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor x, Tensor pre_activation, Tensor weight_in, Tensor weight_hidden, "
    "Tensor? weight_out, bool has_bias, str activation, float negative_slope) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def fake_forward(x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope):
    num_layers, layer_width, _ = weight_in.shape
    hidden = num_layers * layer_width
    out_features = hidden if weight_out is None else weight_out.shape[0]
    return x.new_empty(x.shape[0], out_features), x.new_empty(x.shape[0], hidden)


def fake_backward(grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, has_bias, activation, negative_slope):
    num_layers, layer_width, _ = weight_in.shape
    return (
        torch.empty_like(x),
        torch.empty_like(weight_in),
        torch.empty_like(weight_hidden),
        x.new_empty((num_layers, layer_width) if has_bias else (0,)),
        torch.empty_like(weight_out) if weight_out is not None else x.new_empty(0),
        x.new_empty(weight_out.shape[0] if (has_bias and weight_out is not None) else 0),
    )


def register_fused_autograd(forward_op, backward_op, backend_name: str) -> None:
    """Make ``forward_op`` differentiable through one call of ``backward_op``.

    Double backward through a fused backend raises instead of returning a wrong number.
    """

    def setup_context(ctx, inputs, output):
        x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope = inputs
        ctx.save_for_backward(x, output[1], weight_in, weight_hidden, weight_out)
        ctx.has_bias = bias is not None
        ctx.has_bias_out = bias_out is not None
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        # Z is never differentiated; without this autograd allocates and zero-fills a [B, L*w]
        # gradient for it on every backward (measurable on CPU at large batch).
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, _grad_pre_activation):
        if grad_out is None:  # only Z was used downstream, so no gradient flows
            return (None,) * 8
        x, pre_activation, weight_in, weight_hidden, weight_out = ctx.saved_tensors
        grads = backward_op(
            grad_out.contiguous(), x, pre_activation, weight_in, weight_hidden, weight_out,
            ctx.has_bias, ctx.activation, ctx.negative_slope,
        )
        grad_x, grad_w_in, grad_w_hidden, grad_bias, grad_w_out, grad_b_out = grads
        return (
            grad_x,
            grad_w_in,
            grad_w_hidden,
            grad_bias if ctx.has_bias else None,
            grad_w_out if weight_out is not None else None,
            grad_b_out if ctx.has_bias_out else None,
            None,
            None,
        )

    def no_double_backward(ctx, *grads):
        raise RuntimeError(
            f"spinal_ops: double backward is not supported by the fused {backend_name!r} backend; "
            "use backend='reference' for higher-order gradients"
        )

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
    torch.library.register_autograd(backward_op, no_double_backward)


class FusedOpBackend(Backend):
    """A backend whose forward is one call of a fused op with FORWARD_SCHEMA."""

    def forward_op(self) -> Callable:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, params: SpinalParams, config: SpinalConfig) -> torch.Tensor:
        contiguous = [None if p is None else p.contiguous() for p in params]
        out, _ = self.forward_op()(x.contiguous(), *contiguous, config.activation, config.negative_slope)
        return out
