"""What the fused backends (cpu, cuda, triton) share: op schemas, fake (meta) kernels,
autograd, and the Backend wrapper around a (forward, backward) op pair.

Every fused backend exposes two ops in the ``spinal_ops`` namespace with the schemas below.
``forward`` returns ``(out, pre_activation)``: ``out`` is y (or H when there is no output
projection) and ``pre_activation`` is Z = [z_0, ..., z_{L-1}] (B x L*w), which is all the
backward needs besides the inputs (it recomputes h = phi(z) on the fly). With
``keep_pre_activation=False`` (no gradient will be needed) Z is neither kept nor, where the
backend can avoid it, computed, and an empty tensor is returned in its place. ``backward``
returns the gradients ``output_mask`` asks for in one call; the others are empty tensors.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config import SpinalConfig, SpinalParams
from .base import Backend

FORWARD_SCHEMA = (
    "(Tensor x, Tensor weight_in, Tensor weight_hidden, Tensor? bias, Tensor? weight_out, "
    "Tensor? bias_out, str activation, float negative_slope, bool allow_tf32=False, bool keep_pre_activation=True) "
    "-> (Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor x, Tensor pre_activation, Tensor weight_in, Tensor weight_hidden, "
    "Tensor? weight_out, bool[6] output_mask, str activation, float negative_slope, bool allow_tf32=False) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
# output_mask / gradient order of the backward: x, weight_in, weight_hidden, bias, weight_out, bias_out.
NUM_GRADS = 6


def fake_forward(x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope,
                 allow_tf32=False, keep_pre_activation=True):
    num_layers, layer_width, _ = weight_in.shape
    hidden = num_layers * layer_width
    out_features = hidden if weight_out is None else weight_out.shape[0]
    pre_activation = x.new_empty(x.shape[0], hidden) if keep_pre_activation else x.new_empty(0)
    return x.new_empty(x.shape[0], out_features), pre_activation


def gradient_shapes(x, weight_in, weight_hidden, weight_out, output_mask) -> list[tuple[int, ...]]:
    """Shapes of the backward's six outputs: the gradient's where the mask asks for it, else (0,)."""
    num_layers, layer_width, _ = weight_in.shape
    full = [
        tuple(x.shape),
        tuple(weight_in.shape),
        tuple(weight_hidden.shape),
        (num_layers, layer_width),
        tuple(weight_out.shape) if weight_out is not None else (0,),
        (weight_out.shape[0],) if weight_out is not None else (0,),
    ]
    return [shape if wanted else (0,) for shape, wanted in zip(full, output_mask)]


def fake_backward(grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, output_mask, activation,
                  negative_slope, allow_tf32=False):
    return tuple(x.new_empty(shape) for shape in gradient_shapes(x, weight_in, weight_hidden, weight_out, output_mask))


def tf32_allowed(dtype: torch.dtype) -> bool:
    """Whether float32 products may use TF32 (``torch.backends.cuda.matmul.allow_tf32``), read once
    per forward and passed to both ops: the CUDA kernels and cuBLAS follow it, the CPU and Triton
    ops compute exact float32 whatever it says."""
    return dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


def needs_pre_activation(x: torch.Tensor, params) -> bool:
    """Whether autograd will call the backward: only then does the forward keep Z."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))


def register_fused_autograd(forward_op, backward_op, backend_name: str) -> None:
    """Make ``forward_op`` differentiable through one call of ``backward_op``.

    Double backward through a fused backend raises instead of returning a wrong number.
    """

    def setup_context(ctx, inputs, output):
        x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope, *flags = inputs
        ctx.save_for_backward(x, output[1], weight_in, weight_hidden, weight_out)
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        # The backward runs with the forward's TF32 choice, whatever the global flag is by then.
        ctx.allow_tf32 = flags[0] if flags else False
        # Z is never differentiated; without this autograd allocates and zero-fills a [B, L*w]
        # gradient for it on every backward (measurable on CPU at large batch).
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, _grad_pre_activation):
        if grad_out is None:  # only Z was used downstream, so no gradient flows
            return (None,) * len(ctx.needs_input_grad)
        x, pre_activation, weight_in, weight_hidden, weight_out = ctx.saved_tensors
        # Only what autograd asks for (None inputs never ask): a frozen input pays no dx, frozen
        # weights no weight gradients.
        output_mask = list(ctx.needs_input_grad[:NUM_GRADS])
        grads = backward_op(
            grad_out.contiguous(), x, pre_activation, weight_in, weight_hidden, weight_out,
            output_mask, ctx.activation, ctx.negative_slope, ctx.allow_tf32,
        )
        trailing = (None,) * (len(ctx.needs_input_grad) - NUM_GRADS)
        return (*(grad if wanted else None for grad, wanted in zip(grads, output_mask)), *trailing)

    def no_double_backward(ctx, *grads):
        raise RuntimeError(
            f"spinal_ops: double backward is not supported by the fused {backend_name!r} backend; "
            "use backend='reference' for higher-order gradients"
        )

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
    torch.library.register_autograd(backward_op, no_double_backward)


class FusedOpBackend(Backend):
    """A backend whose forward is one call of a fused op with FORWARD_SCHEMA."""

    def forward_op(self, config: SpinalConfig, x: torch.Tensor, training: bool) -> Callable:
        """The forward op (an OpOverload with FORWARD_SCHEMA) that runs this call."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, params: SpinalParams, config: SpinalConfig) -> torch.Tensor:
        contiguous = [None if p is None else p.contiguous() for p in params]
        training = needs_pre_activation(x, params)
        op = self.forward_op(config, x, training)
        out, _ = op(x.contiguous(), *contiguous, config.activation, config.negative_slope, tf32_allowed(x.dtype),
                    training)
        return out
