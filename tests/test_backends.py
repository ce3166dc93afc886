"""What every backend must do (docs/contract.md §3-§5), each backend in turn: torch.compile(fullgraph=True)
matches eager, the op pairs pass torch.library.opcheck, non-contiguous input, leading dimensions
and an empty batch, NaN and Inf propagate as in the reference, bad input raises a clear error.

Each backend runs on its device: ``cuda`` on a GPU; ``triton`` on a GPU, else on CPU tensors through
the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1; sizes stay small, it is slow);
``reference`` and ``cpu`` on CPU. A backend that cannot run here is skipped with its reason from
``spinal_ops.available_backends()``. What is one backend's own is in tests/test_<backend>_backend.py
(tests/test_reference.py for the reference).
"""
from __future__ import annotations

import pytest
import torch
from contract import CASES, case_config, check_backend, random_params

from spinal_ops import SpinalLinear, available_backends
from spinal_ops.config import SpinalParams
from spinal_ops.functional import apply_spinal, spinal_linear

DEVICES = {
    "reference": "cpu",
    "cpu": "cpu",
    "triton": "cuda" if torch.cuda.is_available() else "cpu",
    "cuda": "cuda",
}
# The op pairs (spinal_ops::<pair>_forward, <pair>_backward) behind each op-pair backend; the cuda
# backend has one per path.
OP_PAIRS = {"cpu": ("native",), "triton": ("triton",), "cuda": ("native", "hoisted")}
# The dtypes each backend's tests here run in: the CUDA kernels have a path per dtype.
DTYPES = {
    "reference": (torch.float32,),
    "cpu": (torch.float32,),
    "triton": (torch.float32,),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


def _skip_unavailable(name: str) -> tuple:
    support = available_backends()[name]
    return () if support else (pytest.mark.skip(reason=f"{name} backend unavailable: {support.reason}"),)


def backends(names=tuple(DEVICES)) -> list:
    """One pytest param per backend, skipped with the backend's reason where it cannot run here."""
    return [pytest.param(name, id=name, marks=_skip_unavailable(name)) for name in names]


def backend_cases(cases: dict[str, tuple]) -> list:
    """(backend, item) params for each backend's items, skipped like ``backends()``."""
    return [
        pytest.param(name, item, id=f"{name}-{item}", marks=_skip_unavailable(name))
        for name, items in cases.items()
        for item in items
    ]


def batch_of(backend: str) -> int:
    # 37 rows on a GPU: the CUDA kernels' row tiles, the last one partial.
    return 37 if DEVICES[backend] == "cuda" else 5


def activation_for(dtype: torch.dtype) -> str:
    # In half types a ReLU-like kink makes the 2x-eager bound a matter of luck (see KINKED in
    # tests/test_cuda_backend.py): a smooth activation there.
    return "relu" if dtype == torch.float32 else "gelu"


# ---- torch.compile --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends())
def test_compile_fullgraph_matches_eager(backend):
    device = DEVICES[backend]
    torch.manual_seed(0)
    layer = SpinalLinear(**CASES["wrap_s12_N33"], activation="silu", backend=backend).to(device)
    x = torch.randn(batch_of(backend), layer.in_features, device=device, requires_grad=True)
    inputs = [x, *layer.parameters()]
    # Triton's CPU tensors run through the interpreter, which inductor cannot generate C++ code
    # around; aot_eager traces the same forward and backward graphs.
    compiler = "aot_eager" if backend == "triton" and device == "cpu" else "inductor"
    compiled = torch.compile(layer, fullgraph=True, backend=compiler)
    y_compiled, y_eager = compiled(x), layer(x)
    # A fused op is one opaque node of the graph: compiled, the same kernel runs on the same values.
    exact = {} if backend == "reference" else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(y_compiled, y_eager, **exact)
    grad_out = torch.randn_like(y_eager)
    grads_compiled = torch.autograd.grad(y_compiled, inputs, grad_out)
    grads_eager = torch.autograd.grad(y_eager, inputs, grad_out)
    for got, expected in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(got, expected)


# ---- torch.library.opcheck of the op pairs ---------------------------------------------------------

OPCHECK_CASES = {
    "cpu": ("odd_N_wraps", "M_None_no_bias", "L1"),
    "triton": ("odd_N_wraps",),
    "cuda": ("odd_N_wraps", "M_None_s32", "hoisted_w300"),
}


def op_args(config, batch: int, device: str, requires_grad: bool) -> tuple:
    """The forward op's arguments: random float32 x and parameters, activation, negative slope."""
    generator = torch.Generator().manual_seed(4)
    params = random_params(config, generator, dtype=torch.float32)
    x = torch.randn(batch, config.in_features, generator=generator)
    tensors = [None if t is None else t.to(device).requires_grad_(requires_grad) for t in (x, *params)]
    return (*tensors, config.activation, config.negative_slope)


@pytest.mark.parametrize("backend, case", backend_cases(OPCHECK_CASES))
def test_opcheck_op_pairs(backend, case):
    config = case_config(case, activation="gelu")
    device, batch = DEVICES[backend], batch_of(backend)
    for pair in OP_PAIRS[backend]:
        forward = getattr(torch.ops.spinal_ops, f"{pair}_forward")
        backward = getattr(torch.ops.spinal_ops, f"{pair}_backward")
        torch.library.opcheck(forward.default, op_args(config, batch, device, requires_grad=True))
        x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, slope = op_args(config, batch, device,
                                                                                            requires_grad=False)
        _, pre_activation = forward(x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, slope)
        grad_out = torch.randn(batch, config.output_features, device=device)
        mask = [True, True, True, bias is not None, weight_out is not None, bias_out is not None]
        args = (grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, mask, activation, slope)
        torch.library.opcheck(backward.default, args)


# ---- layouts and shapes -----------------------------------------------------------------------------

# [B, N] float64 inputs; check_backend keeps their strides in the backend's dtype.
LAYOUTS = {
    "transposed": lambda b, n: torch.randn(n, b, dtype=torch.float64).t(),  # column-major
    "every_other": lambda b, n: torch.randn(2 * b, 2 * n, dtype=torch.float64)[::2, ::2],  # no unit stride
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend, dtype", backend_cases(DTYPES))
def test_non_contiguous_input(backend, dtype, layout):
    config = case_config("wrap_s12_N33", activation=activation_for(dtype))
    x = LAYOUTS[layout](batch_of(backend), config.in_features)
    assert not x.is_contiguous()
    check_backend(backend, config, dtype, DEVICES[backend], x=x)


@pytest.mark.parametrize("batch_shape", [(2, 3), (0,), (2, 0)], ids=["3d", "empty", "3d_empty"])
@pytest.mark.parametrize("backend", backends())
def test_leading_dimensions_and_empty_batch(backend, batch_shape):
    check_backend(backend, case_config("odd_N_wraps"), torch.float32, DEVICES[backend], batch_shape=batch_shape)


@pytest.mark.parametrize("backend", backends())
def test_empty_batch_gives_every_gradient_as_zeros(backend):
    device = DEVICES[backend]
    config = case_config("odd_N_wraps")
    params = random_params(config, torch.Generator().manual_seed(0), dtype=torch.float32)
    params = SpinalParams(*(None if p is None else p.to(device).requires_grad_() for p in params))
    x = torch.empty(0, config.in_features, device=device, requires_grad=True)
    y = apply_spinal(x, params, config, backend)
    assert y.shape == (0, config.output_features)
    y.sum().backward()
    assert x.grad.shape == (0, config.in_features)
    for name, p in params._asdict().items():
        if p is not None:
            assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


# ---- NaN and Inf ------------------------------------------------------------------------------------


def nan_inf_cases() -> list:
    return [
        pytest.param(backend.values[0], activation, id=f"{backend.id}-{activation}", marks=backend.marks)
        for backend in backends()
        for activation in ("relu", "leaky_relu", "tanh")
    ]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's inf * 0
@pytest.mark.parametrize("backend, activation", nan_inf_cases())
def test_nan_and_inf_propagate_like_the_reference(backend, activation):
    config = case_config("odd_N_wraps", activation=activation)
    x = torch.randn(6, 7, dtype=torch.float64)
    x[1, 2] = float("nan")
    x[3, 5] = float("inf")
    x[4, 0] = -float("inf")
    check_backend(backend, config, torch.float32, DEVICES[backend], x=x)


# ---- bad input (contract §5) -----------------------------------------------------------------------



def _with_params(change):
    """Runs spinal_linear, which checks the parameters' shapes, on the changed parameters."""
    return lambda x, p, config, backend: spinal_linear(x, *change(p), split_size=config.split_size, backend=backend)


# Checked by the layer before any backend runs: (the call on the bad input, error, message).
LAYER_ERRORS = {
    "last_dimension": (lambda x, p, config, backend: apply_spinal(x[:, :-1], p, config, backend), ValueError,
                       r"in_features=7.*\(4, 6\)"),
    "dtype": (lambda x, p, config, backend: apply_spinal(x.double(), p, config, backend), TypeError,
              "input dtype torch.float64 does not match"),
    "weight_hidden_shape": (_with_params(lambda p: p._replace(weight_hidden=p.weight_hidden[:1])), ValueError,
                            r"weight_hidden must have shape \(2, 5, 5\)"),
    "bias_out_missing": (_with_params(lambda p: p._replace(bias_out=None)), ValueError, r"bias_out of shape \(3,\)"),
}


@pytest.mark.parametrize("error", LAYER_ERRORS)
@pytest.mark.parametrize("backend", backends())
def test_layer_rejects_bad_input_before_the_backend_runs(backend, error):
    config = case_config("odd_N_wraps")
    device = DEVICES[backend]
    params = SpinalParams(*(p.to(device) for p in random_params(config, torch.Generator().manual_seed(0),
                                                                dtype=torch.float32)))
    call, exception, message = LAYER_ERRORS[error]
    with pytest.raises(exception, match=message):
        call(torch.randn(4, 7, device=device), params, config, backend)


_OP_ARG_NAMES = ("x", "weight_in", "weight_hidden", "bias", "weight_out", "bias_out", "activation", "negative_slope")
_OP_TENSORS = _OP_ARG_NAMES[:6]
# How each case breaks the forward op's arguments (a dict by name).
OP_ARG_CHANGES = {
    "weight_hidden_shape": lambda a: {**a, "weight_hidden": a["weight_hidden"][:1]},
    "weight_out_shape": lambda a: {**a, "weight_out": a["weight_out"][:, :-1]},
    "bias_dtype": lambda a: {**a, "bias": a["bias"].double()},
    "x_dtype": lambda a: {**a, "x": a["x"].half()},
    "float16": lambda a: {**a, **{k: a[k].half() for k in _OP_TENSORS}},
    "x_3d": lambda a: {**a, "x": a["x"][None]},
    "activation": lambda a: {**a, "activation": "swish"},
}
# backend -> case -> (error, message) of a direct call of its forward op: the op checks its inputs
# before any kernel runs.
OP_ERRORS = {
    "cpu": {
        "weight_hidden_shape": (RuntimeError, "weight_hidden must be"),
        "weight_out_shape": (RuntimeError, "weight_out must be"),
        "bias_dtype": (RuntimeError, "dtype mismatch"),
        "x_dtype": (RuntimeError, "dtype mismatch"),
        "float16": (RuntimeError, "support float32, float64 and bfloat16"),
        "x_3d": (RuntimeError, "x must be 2-D"),
        "activation": (RuntimeError, "unknown activation 'swish'"),
    },
    "triton": {
        "weight_hidden_shape": (ValueError, r"weight_hidden must have shape \(2, 5, 5\)"),
        "x_dtype": (TypeError, "dtype"),
        "activation": (ValueError, "unknown activation 'swish'"),
    },
}
# csrc/cuda/register.cu checks shapes and dtypes with the cpu op's check_spinal_shape: the same
# errors, except that float16 is a CUDA dtype.
OP_ERRORS["cuda"] = {case: error for case, error in OP_ERRORS["cpu"].items() if case != "float16"}


@pytest.mark.parametrize("backend, change", backend_cases(OP_ERRORS))
def test_direct_op_call_rejects_bad_input(backend, change):
    config = case_config("odd_N_wraps")
    args = OP_ARG_CHANGES[change](dict(zip(_OP_ARG_NAMES, op_args(config, 4, DEVICES[backend], requires_grad=False))))
    exception, message = OP_ERRORS[backend][change]
    for pair in OP_PAIRS[backend]:
        with pytest.raises(exception, match=message):
            getattr(torch.ops.spinal_ops, f"{pair}_forward")(*(args[name] for name in _OP_ARG_NAMES))
