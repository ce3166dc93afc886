"""The fused C++ CPU op (backend="cpu") against the float64 reference (docs/contract.md §3, §4, §5)."""
import pytest
import torch
from contract import (
    check_backend,
    check_gradient_masks,
    check_inference_keeps_no_pre_activation,
    check_tf32_choice_reaches_backward,
    gradcheck_problem,
    make_config,
    random_params,
)

import spinal_ops
from spinal_ops import ACTIVATIONS, SpinalConfig, SpinalLinear
from spinal_ops.dispatch import select_backend

# Tiny shapes covering every branch of the kernels: odd N, k = 1..4, explicit split_size with a
# wrapped window (two GEMMs), L = 1 (no weight_hidden), w = 1, M = None (y = H), bias=False.
CONFIGS = {
    "odd_N_k2_wraps": dict(in_features=7, out_features=3, layer_width=4, num_layers=3),
    "k1": dict(in_features=5, out_features=2, layer_width=3, num_layers=3, num_splits=1),
    "k3": dict(in_features=9, out_features=4, layer_width=2, num_layers=4, num_splits=3),
    "k4_wraps": dict(in_features=9, out_features=2, layer_width=3, num_layers=5, num_splits=4),
    "split_size_wraps": dict(in_features=8, out_features=3, layer_width=3, num_layers=4, split_size=3),
    "L1": dict(in_features=6, out_features=2, layer_width=4, num_layers=1),
    "w1": dict(in_features=7, out_features=2, layer_width=1, num_layers=4),
    "M_None": dict(in_features=6, out_features=None, layer_width=2, num_layers=3, split_size=4),
    "no_bias": dict(in_features=7, out_features=3, layer_width=3, num_layers=3, bias=False),
    "M_None_no_bias": dict(in_features=5, out_features=None, layer_width=2, num_layers=2, bias=False),
}
# Every activation on a config whose windows wrap.
CASES = [pytest.param(kwargs, "relu", id=name) for name, kwargs in CONFIGS.items()] + [
    pytest.param(CONFIGS["odd_N_k2_wraps"], activation, id=f"odd_N_k2_wraps-{activation}")
    for activation in ACTIVATIONS
    if activation != "relu"
]


def build(kwargs: dict, activation: str) -> SpinalConfig:
    return SpinalConfig.build(**kwargs, activation=activation, negative_slope=0.1)


@pytest.mark.parametrize("kwargs, activation", CASES)
def test_gradcheck_float64(kwargs, activation):
    layer, inputs = gradcheck_problem(build(kwargs, activation), "cpu", seed=3)
    assert torch.autograd.gradcheck(layer, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kwargs, activation", CASES)
def test_contract_against_float64_reference(kwargs, activation, dtype):
    check_backend("cpu", build(kwargs, activation), dtype, batch_shape=(5,))


# The CPU chain's three regimes by width (the configs above are all narrow, w <= 32: recurrence
# in one loop over rows). w = 40: layers grouped by window, recurrence as ATen GEMMs. w >= 256:
# one GEMM per layer, no grouping: windows read by several layers (k = 2, L = 3), tiling x once
# (L = k = 2), wrapping (s does not divide N).
WIDE_CONFIGS = {
    "medium_grouped": dict(in_features=6, out_features=3, layer_width=40, num_layers=3),
    "medium_grouped_M_None": dict(in_features=7, out_features=None, layer_width=33, num_layers=4),
    "wide_k2_overlap": dict(in_features=6, out_features=3, layer_width=256, num_layers=3),
    "wide_tiles_once": dict(in_features=8, out_features=None, layer_width=256, num_layers=2),
    "wide_wraps": dict(in_features=7, out_features=2, layer_width=300, num_layers=4, split_size=3),
}


@pytest.mark.parametrize("kwargs", WIDE_CONFIGS.values(), ids=WIDE_CONFIGS.keys())
def test_wide_layers_one_gemm_per_layer(kwargs):
    config = build(kwargs, "gelu")
    check_backend("cpu", config, torch.float32, batch_shape=(5,))
    check_gradient_masks("cpu", config, "spinal_ops::fused_backward")


# Window groupings of the hoisted chain: one group (k = 1), groups of several layers (k = 2, 3),
# one layer per group (wrapping windows with N/gcd(N, s) > L), and a bias without output bias.
MASK_CONFIGS = {
    "k2_groups": dict(in_features=8, out_features=3, layer_width=3, num_layers=5),
    "wrapped_one_layer_per_group": dict(in_features=7, out_features=2, layer_width=2, num_layers=3, split_size=4),
    "M_None": CONFIGS["M_None"],
    "no_bias": CONFIGS["no_bias"],
}


@pytest.mark.parametrize("kwargs", MASK_CONFIGS.values(), ids=MASK_CONFIGS.keys())
def test_backward_computes_only_what_autograd_asks_for(kwargs):
    check_gradient_masks("cpu", build(kwargs, "tanh"), "spinal_ops::fused_backward")


def test_tf32_choice_reaches_backward():
    check_tf32_choice_reaches_backward("cpu", build(CONFIGS["no_bias"], "relu"), "spinal_ops::fused_forward",
                                       "spinal_ops::fused_backward")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [5, 3000], ids=["one_block", "row_blocks"])
@pytest.mark.parametrize("out_features", [3, None], ids=["projection", "M_None"])
def test_inference_keeps_no_pre_activation(batch, out_features, dtype):
    # L*w = 1024: inference runs row blocks of 1024 rows, so batch 3000 ends in a partial block.
    config = make_config(12, out_features, layer_width=256, num_layers=4, num_splits=3, activation="gelu")
    check_inference_keeps_no_pre_activation("cpu", config, "spinal_ops::fused_forward", batch, dtype)


@pytest.mark.parametrize("batch_shape", [(2, 3), (0,), (2, 0)], ids=["3d", "empty", "3d_empty"])
def test_leading_dimensions_and_empty_batch(batch_shape):
    check_backend("cpu", make_config(7, 3, split_size=4), torch.float32, batch_shape=batch_shape)


def test_non_contiguous_input():
    config = make_config(7, 3, split_size=4)
    x = torch.randn(14, 5, dtype=torch.float64).t()[:, ::2]  # [5, 7], neither dimension unit-stride
    assert x.shape == (5, 7) and not x.is_contiguous()
    check_backend("cpu", config, torch.float32, x=x)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh"])
def test_nan_and_inf_propagate_like_the_reference(activation):
    config = make_config(7, 3, split_size=4, activation=activation)
    x = torch.randn(6, 7, dtype=torch.float64)
    x[1, 2] = float("nan")
    x[3, 5] = float("inf")
    x[4, 0] = -float("inf")
    check_backend("cpu", config, torch.float32, x=x)


def op_args(config: SpinalConfig, batch: int, requires_grad: bool):
    gen = torch.Generator().manual_seed(4)
    params = random_params(config, gen, dtype=torch.float32)
    x = torch.randn(batch, config.in_features, generator=gen)
    tensors = [x, *params]
    if requires_grad:
        tensors = [None if t is None else t.requires_grad_(True) for t in tensors]
    return (*tensors, config.activation, config.negative_slope)


OPCHECK_CONFIGS = [CONFIGS[name] for name in ("odd_N_k2_wraps", "M_None_no_bias", "L1")]


@pytest.mark.parametrize("kwargs", OPCHECK_CONFIGS)
def test_opcheck_fused_forward(kwargs):
    config = build(kwargs, "gelu")
    torch.library.opcheck(torch.ops.spinal_ops.fused_forward.default, op_args(config, 4, requires_grad=True))


@pytest.mark.parametrize("kwargs", OPCHECK_CONFIGS)
def test_opcheck_fused_backward(kwargs):
    config = build(kwargs, "gelu")
    x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, slope = op_args(config, 4, False)
    _, pre_activation = torch.ops.spinal_ops.fused_forward(
        x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, slope
    )
    grad_out = torch.randn(4, config.output_features)
    mask = [True, True, True, bias is not None, weight_out is not None, bias_out is not None]
    args = (grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, mask, activation, slope)
    torch.library.opcheck(torch.ops.spinal_ops.fused_backward.default, args)


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    layer = SpinalLinear(7, 3, layer_width=4, num_layers=3, activation="silu", backend="cpu")
    x = torch.randn(5, 7, requires_grad=True)
    inputs = [x, *layer.parameters()]
    compiled = torch.compile(layer, fullgraph=True)
    y_compiled, y_eager = compiled(x), layer(x)
    torch.testing.assert_close(y_compiled, y_eager)
    grad_out = torch.randn_like(y_eager)
    grads_compiled = torch.autograd.grad(y_compiled, inputs, grad_out)
    grads_eager = torch.autograd.grad(y_eager, inputs, grad_out)
    for got, expected in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(got, expected)


def test_double_backward_raises_a_clear_error():
    layer = SpinalLinear(7, 3, layer_width=4, num_layers=3, activation="tanh", backend="cpu", dtype=torch.float64)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported by the fused"):
        grad_x.sum().backward()


def test_auto_picks_cpu_for_cpu_float32():
    config = make_config()
    assert select_backend("auto", config, torch.float32, torch.device("cpu")).name == "cpu"
    assert spinal_ops.available_backends()["cpu"].ok


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "weight_hidden": a["weight_hidden"][:1]}, "weight_hidden must be"),
        (lambda a: {**a, "bias": a["bias"].double()}, "dtype mismatch"),
        (lambda a: {**a, "weight_out": a["weight_out"][:, :-1]}, "weight_out must be"),
        (lambda a: {**a, "activation": "swish"}, "unknown activation 'swish'"),
        (lambda a: {**a, "x": a["x"].half(), **{k: a[k].half() for k in
                                               ("weight_in", "weight_hidden", "bias", "weight_out", "bias_out")}},
         "support float32, float64 and bfloat16"),
    ],
    ids=["weight_hidden_shape", "dtype_mismatch", "weight_out_shape", "activation", "float16"],
)
def test_direct_op_call_checks_its_inputs(change, message):
    config = make_config(7, 3, split_size=4)
    names = ("x", "weight_in", "weight_hidden", "bias", "weight_out", "bias_out", "activation", "negative_slope")
    args = change(dict(zip(names, op_args(config, 4, requires_grad=False))))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.spinal_ops.fused_forward(*(args[name] for name in names))
