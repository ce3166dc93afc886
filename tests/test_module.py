"""SpinalLinear as an nn.Module: parameters, init, state_dict, copies, compile, autocast. Its errors
for bad hyper-parameters and input come from SpinalConfig (tests/test_config.py) and dispatch
(tests/test_dispatch.py)."""
import copy
import io
import math
import pickle

import pytest
import torch
from contract import check_backend, make_config
from torch import nn

import spinal_ops
from spinal_ops import SpinalLinear
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
