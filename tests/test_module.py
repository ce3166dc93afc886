"""SpinalLinear as an nn.Module: parameters, init, state_dict, copies, compile, autocast, errors."""
import copy
import io
import math
import pickle

import pytest
import torch
from contract import check_backend, make_config
from torch import nn

import spinal_ops
from spinal_ops import BackendUnavailableError, SpinalConfig, SpinalLinear, spinal_linear
from spinal_ops.reference import spinal_forward


def test_parameters_have_spec_shapes():
    layer = SpinalLinear(7, 3, layer_width=5, num_layers=4)
    assert layer.weight_in.shape == (4, 5, 4)
    assert layer.weight_hidden.shape == (3, 5, 5)
    assert layer.bias.shape == (4, 5)
    assert layer.weight_out.shape == (3, 20)
    assert layer.bias_out.shape == (3,)
    assert sum(p.numel() for p in layer.parameters()) == layer.config.num_parameters()


def test_absent_parameters_are_registered_as_none():
    layer = SpinalLinear(6, None, layer_width=2, num_layers=1, bias=False)
    assert layer.bias is None and layer.weight_out is None and layer.bias_out is None
    assert layer.weight_hidden.shape == (0, 2, 2)
    assert set(dict(layer.named_parameters())) == {"weight_in", "weight_hidden"}
    assert layer(torch.randn(3, 6)).shape == (3, 2)


def test_init_bounds_match_nn_linear_fan_in():
    torch.manual_seed(0)
    layer = SpinalLinear(64, 10, layer_width=32, num_layers=3)
    s, w = layer.split_size, layer.layer_width
    assert layer.weight_in[0].abs().max() <= 1 / math.sqrt(s)
    assert layer.weight_in[0].abs().max() > 0.9 / math.sqrt(s)  # really spans the range
    assert layer.weight_in[1:].abs().max() <= 1 / math.sqrt(s + w)
    assert layer.weight_hidden.abs().max() <= 1 / math.sqrt(s + w)
    assert layer.bias[0].abs().max() <= 1 / math.sqrt(s)
    assert layer.weight_out.abs().max() <= 1 / math.sqrt(3 * w)


def test_extra_repr_names_the_configuration():
    text = repr(SpinalLinear(320, 10, layer_width=8, num_layers=6, activation="leaky_relu", negative_slope=0.1))
    for part in ("in_features=320", "out_features=10", "layer_width=8", "num_layers=6", "split_size=160",
                 "leaky_relu", "negative_slope=0.1"):
        assert part in text


def test_leading_dimensions_and_empty_batch():
    layer = SpinalLinear(7, 3, layer_width=5, num_layers=3, backend="reference")
    assert layer(torch.randn(2, 4, 7)).shape == (2, 4, 3)
    assert layer(torch.randn(7)).shape == (3,)
    empty = torch.randn(0, 7, requires_grad=True)
    out = layer(empty)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert empty.grad.shape == (0, 7)
    assert torch.count_nonzero(layer.weight_in.grad) == 0


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_state_dict_round_trip(backend):
    a = SpinalLinear(9, 4, layer_width=3, num_layers=4, num_splits=3, backend=backend)
    b = SpinalLinear(9, 4, layer_width=3, num_layers=4, num_splits=3, backend=backend)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer))
    x = torch.randn(5, 9)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_deepcopy_and_pickle_keep_values_and_config():
    layer = SpinalLinear(7, 3, layer_width=5, num_layers=3, activation="gelu")
    x = torch.randn(4, 7)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.config == layer.config
        torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)


def test_from_linears_matches_authors_forward():
    torch.manual_seed(0)
    n, s, w, n_layers = 7, 4, 5, 3
    linears = [nn.Linear(s, w)] + [nn.Linear(s + w, w) for _ in range(n_layers - 1)]
    output = nn.Linear(n_layers * w, 2)
    x = torch.randn(6, n, dtype=torch.float32)
    tiled = torch.cat([x, x], dim=1)  # the authors' customizable model tiles x for wrap-around
    hidden, h = [], None
    for layer, linear in enumerate(linears):
        window = tiled[:, (layer * s) % n:(layer * s) % n + s]
        h = torch.relu(linear(window if layer == 0 else torch.cat([window, h], 1)))
        hidden.append(h)
    expected = output(torch.cat(hidden, 1))
    spinal = SpinalLinear.from_linears(linears, output, in_features=n)
    torch.testing.assert_close(spinal(x), expected)


def test_compile_fullgraph_matches_eager():
    layer = SpinalLinear(7, 3, layer_width=5, num_layers=3, backend="auto")
    x = torch.randn(4, 7, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    (grad_compiled,) = torch.autograd.grad(compiled(x).sum(), x)
    (grad_eager,) = torch.autograd.grad(layer(x).sum(), x)
    torch.testing.assert_close(grad_compiled, grad_eager)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_autocast_computes_in_bfloat16(backend):
    layer = SpinalLinear(16, 4, layer_width=8, num_layers=3, backend=backend)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = spinal_forward(x.bfloat16(), spinal_ops.SpinalParams(*(
        None if p is None else p.bfloat16() for p in layer.params())), layer.config)
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert layer.weight_in.grad.dtype == torch.float32


def test_auto_on_cpu_meets_the_contract():
    check_backend("auto", make_config(9, 4, num_splits=3, activation="gelu"), torch.float32)


def test_available_backends_reports_reasons():
    report = spinal_ops.available_backends()
    assert set(report) == {"cuda", "triton", "cpu", "reference"}
    assert report["reference"].ok
    for name, support in report.items():
        assert support.ok or support.reason, f"{name} unavailable without a reason"


# ---- contract §5: every bad input raises a clear error before any kernel runs -----------------

def test_wrong_last_dimension():
    layer = SpinalLinear(7, 3, layer_width=5, num_layers=3)
    with pytest.raises(ValueError, match=r"in_features=7.*\(4, 6\)"):
        layer(torch.randn(4, 6))


def test_dtype_mismatch():
    layer = SpinalLinear(7, 3, layer_width=5, num_layers=3)
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(4, 7, dtype=torch.float64))


def test_device_mismatch():
    layer = SpinalLinear(7, 3, layer_width=5, num_layers=3, device="meta")
    with pytest.raises(ValueError, match="meta"):
        layer(torch.randn(4, 7))


@pytest.mark.parametrize("split_size", [0, 8, -1])
def test_split_size_out_of_range(split_size):
    with pytest.raises(ValueError, match="split_size"):
        SpinalLinear(7, 3, layer_width=5, num_layers=3, split_size=split_size)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layer_width=0, num_layers=3), "layer_width"),
        (dict(layer_width=2, num_layers=0), "num_layers"),
        (dict(layer_width=2, num_layers=2, num_splits=0), "num_splits"),
        (dict(layer_width=2, num_layers=2, activation="swish"), "unknown activation 'swish'"),
        (dict(layer_width=2, num_layers=2, backend="fast"), "unknown backend 'fast'"),
    ],
)
def test_bad_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpinalLinear(7, 3, **kwargs)


def test_requested_backend_that_cannot_run_names_its_reason():
    unavailable = [name for name, s in spinal_ops.available_backends().items() if not s.ok]
    assert unavailable, "on a machine without a GPU at least the cuda backend is unavailable"
    layer = SpinalLinear(7, 3, layer_width=5, num_layers=3, backend=unavailable[0])
    with pytest.raises(BackendUnavailableError, match=unavailable[0]):
        layer(torch.randn(2, 7))


def test_functional_checks_parameter_shapes():
    layer = SpinalLinear(7, 3, layer_width=5, num_layers=3)
    p = layer.params()
    with pytest.raises(ValueError, match="weight_hidden must have shape"):
        spinal_linear(torch.randn(2, 7), p.weight_in, p.weight_hidden[:1], p.bias, p.weight_out, p.bias_out,
                      split_size=4)
    with pytest.raises(ValueError, match="split_size=3"):
        spinal_linear(torch.randn(2, 7), *p, split_size=3)


def test_config_flops_and_params_of_mnist_preset():
    config = SpinalConfig.build(320, 10, layer_width=8, num_layers=6)
    # 6 layers: 6*8*160 input weights, 5*8*8 hidden, 10*48 output
    assert config.forward_flops(1) == 2 * (6 * 8 * 160 + 5 * 64 + 10 * 48)
    assert config.num_parameters() == 6 * 8 * 160 + 5 * 64 + 6 * 8 + 10 * 48 + 10
