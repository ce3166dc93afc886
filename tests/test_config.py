"""spinal_ops/config.py: SpinalConfig's windows, shapes, parameter counts and FLOPs, and the errors of
docs/contract.md §5 it raises (through the module and the functional form too)."""
import dataclasses
import pickle

import pytest
import torch
from contract import CASES, case_config, make_config

from spinal_ops import SpinalConfig, SpinalLinear, spinal_linear


def test_paper_mnist_windows():
    # contract §1: N = 320, k = 2 gives columns 0-159, 160-319, 0-159, ...
    config = SpinalConfig.build(320, 10, layer_width=8, num_layers=6)
    assert config.split_size == 160
    assert [config.window(layer) for layer in range(3)] == [((0, 160),), ((160, 320),), ((0, 160),)]


def test_wrapping_window_is_two_ranges():
    config = make_config(7, 3, split_size=4)  # layer 1 starts at 4: columns 4,5,6,0
    assert config.window(1) == ((4, 7), (0, 1))
    assert config.window(2) == ((1, 5),)


@pytest.mark.parametrize("name", CASES)
def test_windows_read_the_columns_of_the_spec_formula(name):
    # contract §1: layer l reads columns (l*s + j) mod N, j < s, in that order.
    config = case_config(name)
    n, s = config.in_features, config.split_size
    for layer in range(config.num_layers):
        columns = [c for start, stop in config.window(layer) for c in range(start, stop)]
        assert columns == [(layer * s + j) % n for j in range(s)], (name, layer)


@pytest.mark.parametrize("name", CASES)
def test_parameter_shapes_match_the_layout(name):
    # contract §2: weight_in [L, w, s], weight_hidden [L-1, w, w], bias [L, w], weight_out [M, L*w], bias_out [M].
    config = case_config(name)
    n_layers, w, s, m = config.num_layers, config.layer_width, config.split_size, config.out_features
    assert config.parameter_shapes() == {
        "weight_in": (n_layers, w, s),
        "weight_hidden": (n_layers - 1, w, w),
        "bias": (n_layers, w) if config.bias else None,
        "weight_out": None if m is None else (m, n_layers * w),
        "bias_out": (m,) if m is not None and config.bias else None,
    }
    assert config.output_features == (n_layers * w if m is None else m)


def test_config_flops_and_params_of_mnist_preset():
    config = SpinalConfig.build(320, 10, layer_width=8, num_layers=6)
    # 6 layers: 6*8*160 input weights, 5*8*8 hidden, 10*48 output
    assert config.forward_flops(1) == 2 * (6 * 8 * 160 + 5 * 64 + 10 * 48)
    assert config.num_parameters() == 6 * 8 * 160 + 5 * 64 + 6 * 8 + 10 * 48 + 10


def test_step_flops_per_mode():
    config = SpinalConfig.build(320, 10, layer_width=8, num_layers=6)
    forward = config.forward_flops(4)
    input_products = 2 * 4 * 6 * 8 * 160
    assert config.step_flops(4, "infer") == forward
    assert config.step_flops(4, "train") == 3 * forward
    assert config.step_flops(4, "frozen") == 3 * forward - input_products
    with pytest.raises(ValueError, match="unknown mode 'eval'"):
        config.step_flops(4, "eval")


def test_config_hash_follows_equality_across_copies_and_pickles():
    # The hash is cached per object (the backend selection hashes the config on every call): equal
    # configs must hash equal however they were made, and a pickle must not carry a hash computed
    # in another process (a string's hash differs between processes).
    config = SpinalConfig.build(320, 10, layer_width=8, num_layers=6, activation="gelu")
    first = hash(config)
    assert "_hash" not in pickle.loads(pickle.dumps(config)).__dict__
    twins = [pickle.loads(pickle.dumps(config)), dataclasses.replace(config),
             SpinalConfig.build(320, 10, layer_width=8, num_layers=6, activation="gelu")]
    for twin in twins:
        assert twin == config and hash(twin) == first
    other = dataclasses.replace(config, activation="relu")
    assert other != config and len({config, other, *twins}) == 2


# ---- contract §5: bad hyper-parameters and inputs raise a clear error --------------------------------

# SpinalConfig.build and SpinalLinear take the same arguments and raise the same errors.
CONSTRUCTORS = {
    "config": lambda n, m, **kwargs: SpinalConfig.build(n, m, **kwargs),
    "module": lambda n, m, **kwargs: SpinalLinear(n, m, **kwargs),
}


@pytest.mark.parametrize("construct", CONSTRUCTORS.values(), ids=CONSTRUCTORS.keys())
@pytest.mark.parametrize("split_size", [0, 8, -1])
def test_split_size_out_of_range(split_size, construct):
    with pytest.raises(ValueError, match="split_size"):
        construct(7, 3, layer_width=5, num_layers=3, split_size=split_size)


@pytest.mark.parametrize("construct", CONSTRUCTORS.values(), ids=CONSTRUCTORS.keys())
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layer_width=0, num_layers=3), "layer_width"),
        (dict(layer_width=2, num_layers=0), "num_layers"),
        (dict(layer_width=2, num_layers=2, num_splits=0), "num_splits"),
        (dict(layer_width=2, num_layers=2, activation="swish"), "unknown activation 'swish'"),
        (dict(layer_width=2, num_layers=2, negative_slope=float("nan")), "negative_slope must be finite"),
        (dict(layer_width=2.0, num_layers=2), "layer_width must be an integer"),
        (dict(layer_width=True, num_layers=2), "layer_width must be an integer"),
    ],
    ids=["layer_width", "num_layers", "num_splits", "activation", "negative_slope", "float_width", "bool_width"],
)
def test_bad_hyper_parameters(kwargs, message, construct):
    with pytest.raises(ValueError, match=message):
        construct(7, 3, **kwargs)


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


def test_functional_checks_parameter_shapes():
    layer = SpinalLinear(7, 3, layer_width=5, num_layers=3)
    p = layer.params()
    with pytest.raises(ValueError, match="weight_hidden must have shape"):
        spinal_linear(torch.randn(2, 7), p.weight_in, p.weight_hidden[:1], p.bias, p.weight_out, p.bias_out,
                      split_size=4)
    with pytest.raises(ValueError, match="split_size=3"):
        spinal_linear(torch.randn(2, 7), *p, split_size=3)


def test_check_params_names_each_problem():
    config = make_config(7, 3, split_size=4)
    layer = SpinalLinear(7, 3, layer_width=5, num_layers=3, split_size=4)
    p = layer.params()
    with pytest.raises(ValueError, match="bias_out of shape \\(3,\\) is missing"):
        config.check_params(p._replace(bias_out=None))
    with pytest.raises(ValueError, match="weight_out must be None"):
        make_config(7, None, split_size=4).check_params(p._replace(bias_out=None))
    with pytest.raises(TypeError, match="bias has dtype torch.float64 but weight_in has torch.float32"):
        config.check_params(p._replace(bias=p.bias.double()))
    config.check_params(p)  # the layer's own parameters pass
