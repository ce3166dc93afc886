"""The reference backend against an independent, index-based reading of contract §1."""
import pytest
import torch
import torch.nn.functional as F
from contract import EDGE_CASES, case_config, gradcheck_problem, random_params

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


# The edge-case matrix (tests/contract.py): wrapped windows, k = 1..4, s = 1, L = 1, w = 1, no
# projection, no bias.
@pytest.mark.parametrize("name", EDGE_CASES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_matches_spec_formula(name, activation):
    config = case_config(name, activation=activation, negative_slope=0.2)
    gen = torch.Generator().manual_seed(1)
    params = random_params(config, gen)
    x = torch.randn(4, config.in_features, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(apply_spinal(x, params, config, "reference"), spec_formula(x, params, config))


@pytest.mark.parametrize("name", EDGE_CASES)
def test_reference_gradcheck_and_gradgradcheck(name):
    fn, inputs = gradcheck_problem(case_config(name, activation="tanh"), "reference", seed=2)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
