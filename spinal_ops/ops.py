"""What every op pair of the ``spinal_ops`` namespace shares: the schemas, the fake (meta)
kernels, and the Python autograd of an op pair defined in Python.

Three op pairs have these schemas (FORWARD_SCHEMA, BACKWARD_SCHEMA; the C++ copies in
csrc/ops.cpp must match, and ``spinal_ops._extension`` refuses a ``_C`` whose schemas differ):

* ``native_forward`` / ``native_backward``: the compiled extension's own kernels per device (the
  CPU op, csrc/cpu/; the CUDA tile and narrow kernels, csrc/cuda/). Loading ``_C`` defines them
  (``spinal_ops._extension``).
* ``hoisted_forward`` / ``hoisted_backward``: the hoisted chain (csrc/chain/), also from ``_C``;
  the cuda backend picks between the two compiled pairs per call.
* ``triton_forward`` / ``triton_backward``: defined in Python (``backends/triton/op_pair.py``);
  their kernels import triton only on the first call.

``forward`` returns ``(out, pre_activation)``: ``out`` is y (or H when there is no output
projection) and ``pre_activation`` is Z, the L pre-activations z_l (B x L*w), which is all the
backward needs besides the inputs (it recomputes h = phi(z) on the fly). What the tensor holds
belongs to the op pair, and only the pair's own backward reads it: Z in layer order from the
native kernels; from the hoisted chain Z, or H = phi(Z) for activations whose derivative is a
function of their output, in the chain's group-major order. With ``keep_pre_activation=False``
(no gradient will be needed) Z is neither kept nor, where the backend can avoid it, computed,
and an empty tensor is returned in its place. ``allow_tf32`` is the forward's TF32 choice, passed
to the backward too. ``backward`` returns the gradients ``output_mask`` asks for in one call; the
others are empty tensors.

A fourth pair, ``normed_forward`` / ``normed_backward`` (NORMED_FORWARD_SCHEMA,
NORMED_BACKWARD_SCHEMA, also from ``_C``), runs a training call with batch norm (and dropout): see
``spinal_ops/backends/normed.py``.

``dropout_seed`` (the 0-dim int64 CPU tensor of ``spinal_ops.dropout.draw_seed()``) and
``dropout_p`` are a training call's dropout (contract §1, "Masks"): both ops apply the masks of that
seed, the backward recomputing the forward's from the same two arguments (no mask is stored). With
no seed or p = 0 the ops are exactly the layer without dropout. p outside [0, 1) and a seed that is
not a 0-dim int64 CPU tensor raise before anything runs.

The op pairs' autograd is in C++ (csrc/autograd.cpp), which spares a training step the Python
between dispatcher and kernels: the triton pair's too, wherever ``_C`` is loaded;
``register_op_pair_autograd`` gives the triton pair the same semantics in Python where it is not.
"""
from __future__ import annotations

import torch

FORWARD_SCHEMA = (
    "(Tensor x, Tensor weight_in, Tensor weight_hidden, Tensor? bias, Tensor? weight_out, "
    "Tensor? bias_out, str activation, float negative_slope, bool allow_tf32=False, bool keep_pre_activation=True, "
    "Tensor? dropout_seed=None, float dropout_p=0.0) -> (Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor x, Tensor pre_activation, Tensor weight_in, Tensor weight_hidden, "
    "Tensor? weight_out, bool[6] output_mask, str activation, float negative_slope, bool allow_tf32=False, "
    "Tensor? dropout_seed=None, float dropout_p=0.0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
# output_mask / gradient order of the backward: x, weight_in, weight_hidden, bias, weight_out, bias_out.
NUM_GRADS = 6
# FORWARD_SCHEMA's defaults of allow_tf32, keep_pre_activation, dropout_seed, dropout_p.
_FORWARD_FLAG_DEFAULTS = (False, True, None, 0.0)


def check_dropout_args(dropout_seed, dropout_p) -> None:
    """The op pairs' dropout arguments, as the compiled ops check them (csrc/chain/dropout_factors.h)."""
    if not 0.0 <= dropout_p < 1.0:
        raise RuntimeError(f"spinal_ops: dropout_p must be a probability in [0, 1), got {dropout_p}")
    if dropout_seed is not None and not (
        dropout_seed.dim() == 0 and dropout_seed.dtype == torch.int64 and dropout_seed.device.type == "cpu"
    ):
        raise RuntimeError(
            "spinal_ops: dropout_seed must be a 0-dim int64 CPU tensor (spinal_ops.dropout.draw_seed()), got a "
            f"{dropout_seed.dim()}-dim {dropout_seed.dtype} tensor on {dropout_seed.device}"
        )


def fake_forward(x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope,
                 allow_tf32=False, keep_pre_activation=True, dropout_seed=None, dropout_p=0.0):
    check_dropout_args(dropout_seed, dropout_p)
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
                  negative_slope, allow_tf32=False, dropout_seed=None, dropout_p=0.0):
    check_dropout_args(dropout_seed, dropout_p)
    return tuple(x.new_empty(shape) for shape in gradient_shapes(x, weight_in, weight_hidden, weight_out, output_mask))


NORMED_FORWARD_SCHEMA = (
    "(Tensor x, Tensor weight_in, Tensor weight_hidden, Tensor? bias, Tensor? weight_out, Tensor? bias_out, "
    "Tensor? norm_weight, Tensor? norm_bias, str activation, float negative_slope, float norm_eps, "
    "bool allow_tf32=False, Tensor? dropout_seed=None, float dropout_p=0.0) "
    "-> (Tensor out, Tensor pre_norm, Tensor batch_mean, Tensor batch_var)"
)
NORMED_BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor x, Tensor pre_norm, Tensor batch_mean, Tensor batch_var, Tensor weight_in, "
    "Tensor weight_hidden, Tensor? weight_out, Tensor? norm_weight, Tensor? norm_bias, bool[8] output_mask, "
    "str activation, float negative_slope, float norm_eps, bool allow_tf32=False, Tensor? dropout_seed=None, "
    "float dropout_p=0.0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
# Gradient order of normed_backward: NUM_GRADS as above, then norm_weight, norm_bias.
NORMED_NUM_GRADS = 8


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the normed pair's batch statistics: float32 for half inputs, else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def fake_normed_forward(x, weight_in, weight_hidden, bias, weight_out, bias_out, norm_weight, norm_bias, activation,
                        negative_slope, norm_eps, allow_tf32=False, dropout_seed=None, dropout_p=0.0):
    num_layers, layer_width, _ = weight_in.shape
    hidden = num_layers * layer_width
    out_features = hidden if weight_out is None else weight_out.shape[0]
    stats = x.new_empty(num_layers, layer_width, dtype=statistics_dtype(x.dtype))
    return x.new_empty(x.shape[0], out_features), x.new_empty(x.shape[0], hidden), stats, stats.new_empty(stats.shape)


def fake_normed_backward(grad_out, x, pre_norm, batch_mean, batch_var, weight_in, weight_hidden, weight_out,
                         norm_weight, norm_bias, output_mask, activation, negative_slope, norm_eps, allow_tf32=False,
                         dropout_seed=None, dropout_p=0.0):
    shapes = gradient_shapes(x, weight_in, weight_hidden, weight_out, output_mask[:NUM_GRADS])
    rows = tuple(weight_in.shape[:2])
    shapes += [rows if wanted else (0,) for wanted in output_mask[NUM_GRADS:]]
    return tuple(x.new_empty(shape) for shape in shapes)


def register_op_pair_autograd(forward_op, backward_op) -> None:
    """Make ``forward_op`` differentiable through one call of ``backward_op`` (the triton pair where
    ``_C`` is not loaded; elsewhere every pair's autograd is the C++ node of csrc/autograd.cpp).

    Double backward through an op pair raises instead of returning a wrong number.
    """

    def setup_context(ctx, inputs, output):
        x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope, *flags = inputs
        # The trailing arguments where the call left them to their defaults.
        allow_tf32, _, dropout_seed, dropout_p = (*flags, *_FORWARD_FLAG_DEFAULTS[len(flags):])
        # The backward recomputes the forward's dropout masks from the same seed.
        ctx.save_for_backward(x, output[1], weight_in, weight_hidden, weight_out, dropout_seed)
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        # The backward runs with the forward's TF32 choice, whatever the global flag is by then.
        ctx.allow_tf32 = allow_tf32
        ctx.dropout_p = dropout_p
        # Z is never differentiated; without this autograd allocates and zero-fills a [B, L*w]
        # gradient for it on every backward (measurable on CPU at large batch).
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, _grad_pre_activation):
        if grad_out is None:  # only Z was used downstream, so no gradient flows
            return (None,) * len(ctx.needs_input_grad)
        x, pre_activation, weight_in, weight_hidden, weight_out, dropout_seed = ctx.saved_tensors
        # Only what autograd asks for (None inputs never ask): a frozen input pays no dx, frozen
        # weights no weight gradients.
        output_mask = list(ctx.needs_input_grad[:NUM_GRADS])
        grads = backward_op(
            grad_out, x, pre_activation, weight_in, weight_hidden, weight_out,
            output_mask, ctx.activation, ctx.negative_slope, ctx.allow_tf32, dropout_seed, ctx.dropout_p,
        )
        trailing = (None,) * (len(ctx.needs_input_grad) - NUM_GRADS)
        return (*(grad if wanted else None for grad, wanted in zip(grads, output_mask)), *trailing)

    def no_double_backward(ctx, *grads):
        raise RuntimeError(
            f"spinal_ops: double backward is not supported by the op pairs ({backward_op.name()}); "
            "use backend='reference' for higher-order gradients"
        )

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
    torch.library.register_autograd(backward_op, no_double_backward)
