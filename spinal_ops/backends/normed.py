"""Training calls with batch norm on the compiled backends (cpu, cuda): the ``normed_forward`` /
``normed_backward`` op pair (csrc/chain/normed_chain.h, one ATen implementation for CPU and CUDA
tensors; schemas in spinal_ops/ops.py) and the running statistics kept as nn.BatchNorm1d keeps them.

The op normalises with the batch's statistics and returns them (mean and biased variance, float32
for half inputs) without touching the running ones; ``forward`` here updates those once per call,
under no_grad, as the reference does (unbiased variance B/(B-1), momentum or cumulative average).

The pair's autograd is registered through ``torch.library`` when this module is imported (the
cpu and cuda backends import it) and ``_C`` has loaded: the backward is one call of
``normed_backward`` with an output mask of the gradients autograd asks for; a double backward
raises.
"""
from __future__ import annotations

import torch

from ..config import SpinalConfig, SpinalNorm, SpinalParams, TrainingStages
from .._extension import extension_status
from ..ops import NORMED_NUM_GRADS
from .op_pair import tf32_allowed


def forward(x: torch.Tensor, params: SpinalParams, config: SpinalConfig, stages: TrainingStages) -> torch.Tensor:
    """The layer's training call with batch norm (``stages.norm``) and the dropout of
    ``stages.dropout_seed``, on the normed pair; updates the running statistics."""
    norm = stages.norm
    seed = stages.dropout_seed
    # Under autocast x is cast and the norm state is not: gamma and beta follow x (differentiably).
    weight = None if norm.weight is None else norm.weight.to(x.dtype)
    bias = None if norm.bias is None else norm.bias.to(x.dtype)
    out, _, mean, var = torch.ops.spinal_ops.normed_forward(
        x, *params, weight, bias, config.activation, config.negative_slope, config.norm_eps,
        x.is_cuda and tf32_allowed(x.dtype), seed, config.dropout if seed is not None else 0.0,
    )
    update_running_statistics(norm, mean, var, config, x.shape[0])
    return out


def update_running_statistics(norm: SpinalNorm, mean: torch.Tensor, var: torch.Tensor, config: SpinalConfig,
                              batch: int) -> None:
    """nn.BatchNorm1d's update from one batch's mean and biased variance, in the statistics' dtype;
    tensor arithmetic only (no host sync, and a torch.compile graph keeps it)."""
    with torch.no_grad():
        norm.num_batches_tracked.add_(1)
        if config.norm_momentum is None:  # cumulative moving average
            momentum = 1.0 / norm.num_batches_tracked.to(mean.dtype)
        else:
            momentum = config.norm_momentum
        unbiased = var * (batch / (batch - 1))
        for running, batch_value in ((norm.running_mean, mean), (norm.running_var, unbiased)):
            running.copy_(running.to(mean.dtype) * (1 - momentum) + batch_value * momentum)


def register_autograd() -> None:
    """Make ``normed_forward`` differentiable through one call of ``normed_backward``."""
    forward_op = torch.ops.spinal_ops.normed_forward.default
    backward_op = torch.ops.spinal_ops.normed_backward.default

    def setup_context(ctx, inputs, output):
        (x, weight_in, weight_hidden, _bias, weight_out, _bias_out, norm_weight, norm_bias, activation,
         negative_slope, norm_eps, *options) = inputs
        allow_tf32, dropout_seed, dropout_p = (list(options) + [False, None, 0.0][len(options):])
        _, pre_norm, mean, var = output
        ctx.save_for_backward(x, pre_norm, mean, var, weight_in, weight_hidden, weight_out, norm_weight, norm_bias,
                              dropout_seed)
        ctx.activation, ctx.negative_slope, ctx.norm_eps = activation, negative_slope, norm_eps
        ctx.allow_tf32, ctx.dropout_p = allow_tf32, dropout_p
        ctx.mark_non_differentiable(pre_norm, mean, var)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, *_unused):
        if grad_out is None:  # only the non-differentiable outputs were used downstream
            return (None,) * len(ctx.needs_input_grad)
        x, pre_norm, mean, var, weight_in, weight_hidden, weight_out, norm_weight, norm_bias, seed = ctx.saved_tensors
        output_mask = list(ctx.needs_input_grad[:NORMED_NUM_GRADS])
        grads = backward_op(
            grad_out.contiguous(), x, pre_norm, mean, var, weight_in, weight_hidden, weight_out, norm_weight, norm_bias,
            output_mask, ctx.activation, ctx.negative_slope, ctx.norm_eps, ctx.allow_tf32, seed, ctx.dropout_p,
        )
        trailing = (None,) * (len(ctx.needs_input_grad) - NORMED_NUM_GRADS)
        return (*(grad if wanted else None for grad, wanted in zip(grads, output_mask)), *trailing)

    def no_double_backward(ctx, *grads):
        raise RuntimeError(
            "spinal_ops: double backward is not supported by the op pairs (spinal_ops.normed_backward); "
            "use backend='reference' for higher-order gradients"
        )

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
    torch.library.register_autograd(backward_op, no_double_backward)


if extension_status():
    register_autograd()
