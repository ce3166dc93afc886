"""Converting the authors' SpinalNet models (contract §7) gives their outputs within contract §4.

Each model below is rebuilt from the description of the authors' scripts (dipuk0506/SpinalNet):
module names, layer shapes and the forward's slicing written out as they do it, with explicit
slices, independent of SpinalConfig's windows. Weights are random; BatchNorm1d layers get
non-trivial running statistics and are in eval mode. The check: the converted layer in dtype d
differs from the authors' model in float64 by at most 2x the authors' own model in d, plus atol.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contract import ATOL_PER_SCALE
from spinal_ops import SpinalLinear, from_spinalnet
from spinal_ops.authors import from_arch2_mnist, from_customizable, from_mnist_script, from_spinal_head

DTYPES = (torch.float64, torch.float32)


def authors_chain(x: torch.Tensor, layers, half: int, act=F.relu) -> torch.Tensor:
    """The MNIST / VGG scripts' forward: halves x[:, 0:half], x[:, half:2*half] alternately."""
    outputs = []
    for index, layer in enumerate(layers):
        part = x[:, 0:half] if index % 2 == 0 else x[:, half : 2 * half]
        outputs.append(act(layer(part if index == 0 else torch.cat([part, outputs[-1]], dim=1))))
    return torch.cat(outputs, dim=1)


def randomize_batchnorms(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            shape = module.running_mean.shape
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
                if module.affine:
                    module.weight.copy_(1 + 0.3 * torch.randn(shape, generator=generator))
                    module.bias.copy_(0.2 * torch.randn(shape, generator=generator))


def assert_matches(authors: nn.Module, convert, run_converted, inputs: tuple[torch.Tensor, ...], dtype) -> None:
    """contract §4 on the outputs: |converted_d - authors_64| <= 2 |authors_d - authors_64| + atol.

    ``authors`` has float32 values, so its float64 copy holds exactly the same numbers.
    ``convert(model)`` builds the converted layer(s) from a model; ``run_converted(model, layers,
    *inputs)`` runs the whole forward with them in place of the authors' spinal layers.
    """
    model64 = copy.deepcopy(authors).double().eval()
    model_d = copy.deepcopy(authors).to(dtype).eval()
    inputs64 = tuple(t.double() for t in inputs)
    inputs_d = tuple(t.to(dtype) for t in inputs)
    with torch.no_grad():
        expected = model64(*inputs64)
        eager = model_d(*inputs_d)
        got = run_converted(model_d, convert(model_d), *inputs_d)
    assert got.dtype == dtype and got.shape == expected.shape
    scale = max(1.0, expected.abs().max().item())
    err_got = (got.double() - expected).abs().max().item()
    err_eager = (eager.double() - expected).abs().max().item()
    atol = ATOL_PER_SCALE[dtype] * scale
    assert err_got <= 2 * err_eager + atol, f"{dtype}: error {err_got:.3e} > 2 * {err_eager:.3e} + {atol:.1e}"


# ---- SpinalNet_MNIST.py: fc1, fc1_1..fc1_5 (160 + w inputs), fc2 over 6w -----------------------


class MnistScriptNet(nn.Module):
    def __init__(self, first_hl: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(160, first_hl)
        for index in range(1, 6):
            setattr(self, f"fc1_{index}", nn.Linear(160 + first_hl, first_hl))
        self.fc2 = nn.Linear(first_hl * 6, 10)

    def features(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        return x.view(-1, 320)

    def forward(self, x):
        layers = [self.fc1] + [getattr(self, f"fc1_{index}") for index in range(1, 6)]
        return F.log_softmax(self.fc2(authors_chain(self.features(x), layers, 160)), dim=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mnist_script(dtype):
    torch.manual_seed(0)
    images = torch.randn(5, 1, 28, 28)
    assert_matches(
        MnistScriptNet(),
        lambda model: from_mnist_script(model.state_dict()),
        lambda model, spinal, x: F.log_softmax(spinal(model.features(x)), dim=1),
        (images,),
        dtype,
    )


def test_mnist_script_layout():
    spinal = from_spinalnet(MnistScriptNet(first_hl=8).state_dict())
    assert isinstance(spinal, SpinalLinear)
    config = spinal.config
    assert (config.in_features, config.split_size, config.layer_width, config.num_layers) == (320, 160, 8, 6)
    assert config.out_features == 10
    # the paper's MNIST windows: 0-159, 160-319, 0-159, ...
    assert [config.window(layer) for layer in range(3)] == [((0, 160),), ((160, 320),), ((0, 160),)]


# ---- Arch2_MNIST.py: chains fc1* (conv2, 8 layers), fcp* (conv1, 8), fcp2* (image, 10) ------------


class Arch2Net(nn.Module):
    CHAINS = {"fc1": (160, 8), "fcp": (720, 8), "fcp2": (392, 10)}  # half width, layers

    def __init__(self, first_hl: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        for name, (half, count) in self.CHAINS.items():
            setattr(self, name, nn.Linear(half, first_hl))
            for index in range(1, count):
                setattr(self, f"{name}_{index}", nn.Linear(half + first_hl, first_hl))
        self.fc2 = nn.Linear(first_hl * 26, 50)
        self.fc3 = nn.Linear(50, 10)

    def trunk(self, x):
        """Inputs of the chains fcp2 (image), fcp (conv1 features), fc1 (conv2 features)."""
        x_real = x.view(-1, 28 * 28)
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x_conv1 = x.view(-1, 1440)
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        return {"fcp2": x_real, "fcp": x_conv1, "fc1": x.view(-1, 320)}

    def head(self, hidden):
        return F.log_softmax(self.fc3(F.relu(self.fc2(hidden))), dim=1)

    def forward(self, x):
        inputs = self.trunk(x)
        hidden = []
        for name in ("fcp2", "fcp", "fc1"):  # Arch2's concatenation order
            half, count = self.CHAINS[name]
            layers = [getattr(self, name)] + [getattr(self, f"{name}_{index}") for index in range(1, count)]
            hidden.append(authors_chain(inputs[name], layers, half))
        return self.head(torch.cat(hidden, dim=1))


def run_arch2_converted(model, chains, x):
    inputs = model.trunk(x)
    return model.head(torch.cat([chain(inputs[name]) for name, chain in chains.items()], dim=1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_arch2_mnist(dtype):
    torch.manual_seed(1)
    assert_matches(
        Arch2Net(), lambda model: from_arch2_mnist(model), run_arch2_converted, (torch.randn(3, 1, 28, 28),), dtype
    )


def test_arch2_chains_have_no_output_projection():
    chains = from_arch2_mnist(Arch2Net(first_hl=4).state_dict())
    assert list(chains) == ["fcp2", "fcp", "fc1"]
    assert [(c.in_features, c.num_layers, c.out_features) for c in chains.values()] == [
        (784, 10, None),
        (1440, 8, None),
        (320, 8, None),
    ]
    with pytest.raises(ValueError, match="from_arch2_mnist"):
        from_spinalnet(Arch2Net().state_dict())


# ---- Customizable Model/spinalnettorch.py: fc1..fcN, fcx; x tiled, windows wrap around ----------


class CustomizableSpinalNet(nn.Module):
    def __init__(self, input_size, number_of_split, hl_width, number_hl, output_size, activation):
        super().__init__()
        split = int(np.round(input_size / number_of_split))
        self.act = activation
        self.number_hl = number_hl
        self.fc1 = nn.Linear(split, hl_width)
        for index in range(2, number_hl + 1):
            setattr(self, f"fc{index}", nn.Linear(split + hl_width, hl_width))
        self.fcx = nn.Linear(hl_width * number_hl, output_size)

    def forward(self, x):
        split = self.fc1.in_features
        x_all = x
        while x_all.size(1) < self.number_hl * split:  # tile x until every layer has its slice
            x_all = torch.cat([x_all, x], dim=1)
        h = self.act(self.fc1(x_all[:, 0:split]))
        outputs = [h]
        for index in range(1, self.number_hl):
            part = x_all[:, split * index : split * (index + 1)]
            h = self.act(getattr(self, f"fc{index + 1}")(torch.cat([part, h], dim=1)))
            outputs.append(h)
        return self.fcx(torch.cat(outputs, dim=1))


CUSTOMIZABLE_CASES = [
    # input size, splits, width, layers, outputs, module, our activation name
    (10, 3, 5, 5, 4, nn.ReLU(), "relu"),  # s = 3: windows 0-2, 3-5, 6-8, {9, 0, 1}, 2-4
    (7, 2, 3, 4, 2, nn.LeakyReLU(0.2), "leaky_relu"),  # s = round(3.5) = 4: wraps from layer 1
    (12, 4, 6, 6, 3, nn.GELU(), "gelu"),  # s = 3 divides N: no wrap
    (9, 2, 4, 3, 5, nn.Tanh(), "tanh"),  # s = round(4.5) = 4 (numpy rounds half to even)
]


@pytest.mark.parametrize("case", CUSTOMIZABLE_CASES, ids=lambda case: f"N{case[0]}k{case[1]}L{case[3]}-{case[6]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_customizable(case, dtype):
    size, splits, width, layers, outputs, module, name = case
    torch.manual_seed(2)
    kwargs = {"negative_slope": 0.2} if name == "leaky_relu" else {}
    assert_matches(
        CustomizableSpinalNet(size, splits, width, layers, outputs, module),
        lambda model: from_customizable(model, in_features=size, activation=name, **kwargs),
        lambda model, spinal, x: spinal(x),
        (torch.randn(6, size),),
        dtype,
    )


def test_customizable_detected_and_split_read_from_weights():
    model = CustomizableSpinalNet(10, 3, 5, 5, 4, nn.ReLU())
    spinal = from_spinalnet(model.state_dict(), in_features=10)
    assert (spinal.split_size, spinal.num_layers, spinal.layer_width, spinal.out_features) == (3, 5, 5, 4)
    assert spinal.config.window(3) == ((9, 10), (0, 2))


# ---- VGG / transfer heads: fc_spinal_layerI = Sequential(Dropout, Linear, BatchNorm1d, ReLU) ------


class SpinalHead(nn.Module):
    """The authors' heads; ``style`` picks the Sequential layout of their scripts."""

    def __init__(self, half, width, classes, style="vgg", out_bias=True):
        super().__init__()
        self.half = half
        for index in range(1, 5):
            linear = nn.Linear(half if index == 1 else half + width, width)
            if style == "vgg":  # MNIST_VGG, Transfer_Learning_* SpinalNet_VGG
                block = [nn.Dropout(p=0.5), linear, nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            elif style == "resnet":  # Transfer_Learning_* SpinalNet_ResNet: Dropout and BN commented out
                block = [linear, nn.ReLU(inplace=True)]
            else:  # CNN_dropout_SpinalFC: Dropout, Linear, ReLU
                block = [nn.Dropout(p=0.1), linear, nn.ReLU(inplace=True)]
            setattr(self, f"fc_spinal_layer{index}", nn.Sequential(*block))
        out = nn.Linear(width * 4, classes, bias=out_bias)
        self.fc_out = nn.Sequential(out) if style == "resnet" else nn.Sequential(nn.Dropout(p=0.5), out)

    def forward(self, x):
        layers = [getattr(self, f"fc_spinal_layer{index}") for index in range(1, 5)]
        return self.fc_out(authors_chain(x, layers, self.half, act=lambda h: h))


class TransferModel(nn.Module):
    """``model_ft.fc = SpinalNet_VGG()``: the head's keys sit under ``fc.``."""

    def __init__(self, head):
        super().__init__()
        self.features = nn.Linear(6, 6)
        self.fc = head

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("style", ["vgg", "resnet", "cnn_dropout"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_spinal_head(style, dtype):
    torch.manual_seed(3)
    head = SpinalHead(half=12, width=7, classes=5, style=style)
    randomize_batchnorms(head, torch.Generator().manual_seed(4))
    assert_matches(
        head,
        lambda model: from_spinalnet(model.state_dict()).eval(),
        lambda model, spinal, x: spinal(x),
        (torch.randn(8, 24),),
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_spinal_head_under_prefix_without_output_bias(dtype):
    torch.manual_seed(5)
    model = TransferModel(SpinalHead(half=9, width=4, classes=3, style="vgg", out_bias=False))
    randomize_batchnorms(model, torch.Generator().manual_seed(6))
    assert_matches(
        model,
        lambda m: from_spinal_head(m.state_dict(), prefix="fc.").eval(),
        lambda m, spinal, x: spinal(x),
        (torch.randn(4, 18),),
        dtype,
    )


def test_spinal_head_module_trains_like_the_authors_head():
    # From a module the head keeps its Dropout's p and its batch norm (eps, momentum, affine,
    # running statistics), so training steps match the authors' module step for step (with
    # p = 0: their masks come from another generator).
    torch.manual_seed(8)
    model = TransferModel(SpinalHead(half=9, width=4, classes=3, style="vgg")).double()
    randomize_batchnorms(model, torch.Generator().manual_seed(9))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.momentum = 0.3
    assert from_spinal_head(model, prefix="fc.").dropout == 0.5
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    spinal = from_spinal_head(model, prefix="fc.")
    assert spinal.norm == "batch" and spinal.config.norm_momentum == 0.3 and spinal.dropout == 0.0
    for step in range(2):
        x = torch.randn(16, 18, dtype=torch.float64, requires_grad=True)
        expected, got = model(x), spinal(x)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
        (grad_got,) = torch.autograd.grad(got.square().sum(), x)
        torch.testing.assert_close(grad_got, grad_expected, rtol=1e-12, atol=1e-12)
    norms = [model.fc.get_submodule(f"fc_spinal_layer{i}.2") for i in range(1, 5)]
    torch.testing.assert_close(spinal.running_mean, torch.stack([n.running_mean for n in norms]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(spinal.running_var, torch.stack([n.running_var for n in norms]), rtol=1e-12, atol=1e-12)
    assert int(spinal.num_batches_tracked) == int(norms[0].num_batches_tracked) == 2


def test_spinal_head_with_two_dropout_probabilities_needs_one():
    head = SpinalHead(half=6, width=3, classes=2, style="cnn_dropout")  # layers p = 0.1, output p = 0.5
    with pytest.raises(ValueError, match="Dropout modules differ"):
        from_spinalnet(head)
    assert from_spinalnet(head, dropout=0.2).dropout == 0.2


def test_spinal_head_bad_in_features_is_refused():
    state = SpinalHead(half=12, width=7, classes=5).state_dict()
    with pytest.raises(ValueError, match="cannot express"):
        from_spinal_head(state, in_features=25)  # an odd feature count: column 24 is never read


def test_unknown_scheme_and_prefix():
    with pytest.raises(KeyError, match="no SpinalNet naming scheme"):
        from_spinalnet(nn.Sequential(nn.Linear(3, 3)).state_dict())
    with pytest.raises(KeyError, match="prefix"):
        from_spinalnet(SpinalHead(4, 3, 2).state_dict(), prefix="head.")


# ---- from_linears(batchnorms=...) errors -------------------------------------------------------


def test_from_linears_batchnorm_errors():
    layers = [nn.Linear(3, 4), nn.Linear(7, 4)]
    with pytest.raises(ValueError, match="2 layers"):
        SpinalLinear.from_linears(layers, in_features=6, batchnorms=[nn.BatchNorm1d(4)])
    with pytest.raises(ValueError, match="BatchNorm1d\\(4\\)"):
        SpinalLinear.from_linears(layers, in_features=6, batchnorms=[nn.BatchNorm1d(4), nn.BatchNorm1d(5)])
    with pytest.raises(ValueError, match="running statistics"):
        SpinalLinear.from_linears(
            layers, in_features=6, batchnorms=[nn.BatchNorm1d(4), nn.BatchNorm1d(4, track_running_stats=False)]
        )
