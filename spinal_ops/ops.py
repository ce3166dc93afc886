"""Every op of the ``spinal_ops`` namespace is registered here, at ``import spinal_ops``.

Three op pairs share one pair of schemas (FORWARD_SCHEMA, BACKWARD_SCHEMA; the C++ copies in
csrc/ops.cpp must match, and a test checks that they do):

* ``native_forward`` / ``native_backward``: the compiled extension ``spinal_ops._C`` (the CPU op,
  csrc/cpu/, and the CUDA tile and narrow kernels, csrc/cuda/). Loading ``_C`` defines them.
* ``hoisted_forward`` / ``hoisted_backward``: the hoisted ATen chain on cuBLAS (csrc/chain/hoisted_chain.h),
  also from ``_C``; the cuda backend picks between the two CUDA pairs per call.
* ``triton_forward`` / ``triton_backward``: defined here in Python; their kernels
  (backends/triton/launch.py) import triton only on the first call.

``forward`` returns ``(out, pre_activation)``: ``out`` is y (or H when there is no output
projection) and ``pre_activation`` is Z, the L pre-activations z_l (B x L*w), which is all the
backward needs besides the inputs (it recomputes h = phi(z) on the fly). What the
tensor holds belongs to the op pair, and only the pair's own backward reads it: Z in layer order
from the native kernels; from the hoisted chain (csrc/chain/hoisted_chain.h) Z, or H = phi(Z) for
activations whose derivative is a function of their output, in the chain's group-major order. With
``keep_pre_activation=False`` (no gradient will be needed) Z is neither kept nor, where the
backend can avoid it, computed, and an empty tensor is returned in its place. ``allow_tf32`` is
the forward's TF32 choice, passed to the backward too. ``backward`` returns the gradients
``output_mask`` asks for in one call; the others are empty tensors.

Each pair gets its fake (meta) kernels here. The triton pair gets its autograd here too
(``register_op_pair_autograd``); the compiled pairs have the same autograd in C++
(csrc/autograd.cpp), which spares a training step the Python between dispatcher and kernels.
If ``_C`` is missing or was built
for another torch, ``spinal_ops`` still works with the reference (and triton) backends and
``extension_status()`` says why.
"""
from __future__ import annotations

import functools
import importlib
import warnings

import torch

from .about import extension_not_built, extension_torch_mismatch
from .backends.base import Support
from .backends.triton import launch as triton_launch

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


def register_op_pair_autograd(forward_op, backward_op) -> None:
    """Make ``forward_op`` differentiable through one call of ``backward_op`` (the triton pair; the
    compiled pairs register the same in C++, csrc/autograd.cpp).

    Double backward through an op pair raises instead of returning a wrong number.
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
            grad_out, x, pre_activation, weight_in, weight_hidden, weight_out,
            output_mask, ctx.activation, ctx.negative_slope, ctx.allow_tf32,
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


def compiled_schema_mismatches(forward_schema: str = FORWARD_SCHEMA, backward_schema: str = BACKWARD_SCHEMA) -> list[str]:
    """The compiled ops whose schemas differ from these strings (an in-place build left over from
    other sources would otherwise fail on its first call)."""
    expected = {"forward": forward_schema, "backward": backward_schema}
    return [
        f"{pair}_{direction}"
        for pair in ("native", "hoisted")
        for direction, schema in expected.items()
        if getattr(torch.ops.spinal_ops, f"{pair}_{direction}").default._schema
        != torch._C.parse_schema(f"spinal_ops::{pair}_{direction}{schema}")
    ]


def _load_extension() -> Support:
    not_built = extension_not_built()
    if not_built:
        return Support.no(not_built)
    # Checked before loading _C: a _C built against another torch fails with undefined symbols.
    mismatch = extension_torch_mismatch()
    if mismatch:
        warnings.warn(f"spinal_ops: {mismatch}; only the reference backend runs", RuntimeWarning, stacklevel=3)
        return Support.no(mismatch)
    try:
        importlib.import_module("spinal_ops._C")  # defines the native_* and hoisted_* ops
    except ModuleNotFoundError:
        return Support.no(
            "compiled extension spinal_ops._C is not built (pip install --no-build-isolation -e . builds it)"
        )
    except ImportError as error:
        return Support.no(f"compiled extension spinal_ops._C failed to load: {error}")
    stale = compiled_schema_mismatches()
    if stale:
        return Support.no(
            f"compiled extension spinal_ops._C was built from other sources (op schemas differ: {', '.join(stale)}); "
            "rebuild it (pip install --no-build-isolation -e .)"
        )
    for pair in ("native", "hoisted"):  # their autograd is registered by _C (csrc/autograd.cpp)
        torch.library.register_fake(f"spinal_ops::{pair}_forward")(fake_forward)
        torch.library.register_fake(f"spinal_ops::{pair}_backward")(fake_backward)
    return Support.yes()


def _define_triton_ops() -> None:
    for name, schema, kernel, fake in (
        ("triton_forward", FORWARD_SCHEMA, triton_launch.forward, fake_forward),
        ("triton_backward", BACKWARD_SCHEMA, triton_launch.backward, fake_backward),
    ):
        qualname = f"spinal_ops::{name}"
        torch.library.define(qualname, schema)
        torch.library.register_kernel(qualname, ("cpu", "cuda"), kernel)
        torch.library.register_fake(qualname)(fake)
    register_op_pair_autograd(torch.ops.spinal_ops.triton_forward.default, torch.ops.spinal_ops.triton_backward.default)


_EXTENSION: Support = _load_extension()
_define_triton_ops()


def extension_status() -> Support:
    """Whether the compiled extension loaded (its ops exist), and why not."""
    return _EXTENSION


@functools.lru_cache(maxsize=None)
def cpu_vector_kernels() -> bool:
    """Whether the CPU op runs narrow float32 layers (w <= 32) with its AVX2+FMA kernels on this
    machine; elsewhere (no AVX2, ``ATEN_CPU_CAPABILITY=default``) it runs the portable ATen chain."""
    return bool(_EXTENSION) and bool(importlib.import_module("spinal_ops._C").cpu_vector_kernels())


@functools.lru_cache(maxsize=None)
def cpu_tile_gemm() -> str | None:
    """The instruction set ("AVX-512" or "AVX2") of the register-tiled kernel that runs the CPU
    op's float32 products of up to 2^24 multiply-adds on wider layers, or None where BLAS or ATen
    runs them all (no AVX2+FMA in use, e.g. ``ATEN_CPU_CAPABILITY=default``, or
    ``SPINAL_OPS_DIRECT_BLAS=0``)."""
    return importlib.import_module("spinal_ops._C").cpu_tile_gemm() if _EXTENSION else None


@functools.lru_cache(maxsize=None)
def cpu_direct_blas() -> bool:
    """Whether the CPU op's BLAS chain calls PyTorch's BLAS (sgemm_/dgemm_ of libtorch_cpu) on
    pointers; where not (a PyTorch without those symbols, SPINAL_OPS_DIRECT_BLAS=0) it makes a
    view per block and calls ATen's GEMMs."""
    return bool(_EXTENSION) and bool(importlib.import_module("spinal_ops._C").cpu_direct_blas())


@functools.lru_cache(maxsize=None)
def cuda_kernels_compiled() -> bool:
    """Whether the extension was built with the CUDA kernels (nvcc present at build time)."""
    return bool(_EXTENSION) and bool(importlib.import_module("spinal_ops._C").cuda_compiled())
