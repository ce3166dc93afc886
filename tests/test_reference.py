"""The reference backend against an independent, index-based reading of contract §1."""
import pytest
import torch
import torch.nn.functional as F
from contract import gradcheck_problem, make_config, random_params

from spinal_ops import ACTIVATIONS, SpinalConfig
from spinal_ops.activations import apply_activation
from spinal_ops.config import SpinalParams
from spinal_ops.functional import apply_spinal


def spec_formula(x: torch.Tensor, params: SpinalParams, config: SpinalConfig) -> torch.Tensor:
    """contract §1 written with the column formula c_l(j) = (l*s + j) mod N and index_select."""
    n, s = config.in_features, config.split_size
    hidden, h = [], None
    for layer in range(config.num_layers):
        columns = torch.tensor([(layer * s + j) % n for j in range(s)])
        z = x.index_select(-1, columns) @ params.weight_in[layer].T
        if params.bias is not None:
            z = z + params.bias[layer]
        if layer > 0:
            z = z + h @ params.weight_hidden[layer - 1].T
        h = apply_activation(config.activation, z, config.negative_slope)
        hidden.append(h)
    big_h = torch.cat(hidden, -1)
    if params.weight_out is None:
        return big_h
    return F.linear(big_h, params.weight_out, params.bias_out)


CONFIGS = [
    dict(in_features=7, out_features=3, layer_width=5, num_layers=3),  # odd N, k=2 -> s=4, wraps
    dict(in_features=8, out_features=2, layer_width=3, num_layers=5, num_splits=4),
    dict(in_features=9, out_features=4, layer_width=1, num_layers=4, num_splits=3),
    dict(in_features=6, out_features=None, layer_width=2, num_layers=3, split_size=4),
    dict(in_features=5, out_features=2, layer_width=3, num_layers=1, num_splits=1),
    dict(in_features=5, out_features=2, layer_width=3, num_layers=3, split_size=5),
    dict(in_features=10, out_features=3, layer_width=4, num_layers=4, bias=False),
]


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_matches_spec_formula(kwargs, activation):
    config = SpinalConfig.build(**kwargs, activation=activation, negative_slope=0.2)
    gen = torch.Generator().manual_seed(1)
    params = random_params(config, gen)
    x = torch.randn(4, config.in_features, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(apply_spinal(x, params, config, "reference"), spec_formula(x, params, config))


def test_paper_mnist_windows():
    # contract §1: N = 320, k = 2 gives columns 0-159, 160-319, 0-159, ...
    config = SpinalConfig.build(320, 10, layer_width=8, num_layers=6)
    assert config.split_size == 160
    assert [config.window(layer) for layer in range(3)] == [((0, 160),), ((160, 320),), ((0, 160),)]


def test_wrapping_window_is_two_ranges():
    config = make_config(7, 3, split_size=4)  # layer 1 starts at 4: columns 4,5,6,0
    assert config.window(1) == ((4, 7), (0, 1))
    assert config.window(2) == ((1, 5),)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_reference_gradcheck_and_gradgradcheck(kwargs):
    fn, inputs = gradcheck_problem(SpinalConfig.build(**kwargs, activation="tanh"), "reference", seed=2)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
