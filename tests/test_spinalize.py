"""spinalize(model, ...): which nn.Linear it replaces, with what, and its errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contract import ATOL_PER_SCALE
from spinal_ops import SpinalLinear, spinalize
from spinal_ops.reference import spinal_forward

SPINAL = {"layer_width": 4, "num_layers": 3}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(9, 12), nn.ReLU(), nn.Linear(12, 10))
        self.head = nn.Module()
        self.head.fc = nn.Linear(10, 6, bias=False)

    def forward(self, x):
        return self.head.fc(F.relu(self.body(x)))


def test_default_replaces_last_linear_only():
    model = Net()
    first, second = model.body[0], model.body[2]
    assert spinalize(model, **SPINAL, num_splits=3, activation="gelu") is model
    assert model.body[0] is first and model.body[2] is second
    fc = model.head.fc
    assert isinstance(fc, SpinalLinear)
    config = fc.config
    assert (config.in_features, config.out_features, config.layer_width, config.num_layers) == (10, 6, 4, 3)
    assert (config.split_size, config.activation, config.bias) == (4, "gelu", False)  # ceil(10 / 3), Linear's bias
    assert model(torch.randn(2, 5, 9)).shape == (2, 5, 6)


def test_spinalized_model_computes_the_spinal_layer():
    """The whole model against float64 (contract §4): body in float64, then the reference spinal math."""
    torch.manual_seed(0)
    model = spinalize(Net(), **SPINAL)
    x = torch.randn(7, 9)
    fc = model.head.fc
    model64 = Net().double()
    model64.body.load_state_dict(model.body.state_dict())
    params64 = type(fc.params())(*(None if p is None else p.detach().double() for p in fc.params()))
    with torch.no_grad():
        got = model(x)
        expected = spinal_forward(F.relu(model64.body(x.double())), params64, fc.config)
        eager = spinal_forward(F.relu(model.body(x)), fc.params(), fc.config)
    scale = max(1.0, expected.abs().max().item())
    err, err_eager = (got.double() - expected).abs().max().item(), (eager.double() - expected).abs().max().item()
    assert err <= 2 * err_eager + ATOL_PER_SCALE[torch.float32] * scale


def test_target_by_name_and_names():
    model = spinalize(Net(), **SPINAL, target="body.0")
    assert isinstance(model.body[0], SpinalLinear) and isinstance(model.head.fc, nn.Linear)
    assert (model.body[0].in_features, model.body[0].out_features) == (9, 12)
    model = spinalize(Net(), **SPINAL, target=["body.2", "head.fc"])
    assert isinstance(model.body[2], SpinalLinear) and isinstance(model.head.fc, SpinalLinear)
    assert isinstance(model.body[0], nn.Linear)
    assert model(torch.randn(3, 9)).shape == (3, 6)


def test_target_predicate():
    seen = []

    def wide_inputs(name, module):
        seen.append(name)
        return module.in_features >= 10

    model = spinalize(Net(), **SPINAL, target=wide_inputs)
    assert seen == ["body.0", "body.2", "head.fc"]  # called on every nn.Linear, in module order
    assert isinstance(model.body[0], nn.Linear)
    assert isinstance(model.body[2], SpinalLinear) and isinstance(model.head.fc, SpinalLinear)


def test_shared_linear_is_replaced_everywhere():
    shared = nn.Linear(5, 5)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    spinalize(model, **SPINAL, target="b.0")
    assert isinstance(model["a"], SpinalLinear) and model["a"] is model["b"][0]


def test_root_linear_returns_the_new_layer():
    new = spinalize(nn.Linear(6, 2), **SPINAL)
    assert isinstance(new, SpinalLinear) and (new.in_features, new.out_features) == (6, 2)


@pytest.mark.parametrize(
    "device,dtype",
    [
        ("cpu", torch.float64),
        ("meta", torch.float32),  # a device other than the default without a GPU
        pytest.param(
            "cuda",
            torch.float16,
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ],
)
def test_device_dtype_and_mode_are_kept(device, dtype):
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 3)).to(device=device, dtype=dtype).eval()
    spinalize(model, **SPINAL)
    for parameter in model[1].parameters():
        assert parameter.device.type == device and parameter.dtype == dtype
    assert not model[1].training
    assert model(torch.randn(2, 8, device=device, dtype=dtype)).dtype == dtype


def test_replaced_layer_trains():
    model = spinalize(Net(), **SPINAL)
    model(torch.randn(4, 9)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.fc.parameters())


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="contains no nn.Linear"):
        spinalize(nn.Sequential(nn.ReLU()), **SPINAL)
    with pytest.raises(ValueError, match=r"no module named 'head\.fc2'.*body\.0"):
        spinalize(Net(), **SPINAL, target="head.fc2")
    with pytest.raises(ValueError, match="is a ReLU, not an nn.Linear"):
        spinalize(Net(), **SPINAL, target="body.1")
    with pytest.raises(ValueError, match="predicate matched none"):
        spinalize(Net(), **SPINAL, target=lambda name, module: False)
    with pytest.raises(ValueError, match="LazyLinear"):
        spinalize(nn.Sequential(nn.LazyLinear(3)), **SPINAL)
    with pytest.raises(ValueError, match="layer_width"):
        spinalize(Net(), layer_width=0, num_layers=2)
