"""Dropout and batch norm inside the layer (docs/contract.md §1): the counter-based generator, the
masks and where they apply, batch norm against nn.BatchNorm1d written the authors' way, eval mode
folded, the cpu backend training with dropout, and the backends that do not run a stage saying so.
The compiled op pairs' dropout in depth: tests/test_dropout_ops.py."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spinal_ops import BackendUnavailableError, SpinalConfig, SpinalLinear, available_backends, spinal_linear
from spinal_ops.dispatch import get_backend
from spinal_ops.dropout import keep_mask, keep_threshold, philox4x32

F64 = torch.float64


def words(*values: int) -> list[torch.Tensor]:
    return [torch.tensor([value], dtype=torch.int64) for value in values]


# ---- the generator ----------------------------------------------------------------------------


@pytest.mark.parametrize("counter, key, expected", [
    # Known-answer vectors of Philox4x32-10 (Random123's kat_vectors).
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    seed = key[0] | (key[1] << 32)
    seed = torch.tensor(seed - 2**64 if seed >= 2**63 else seed)  # the key's 64 bits as an int64
    got = philox4x32(seed, *words(*counter))
    assert [int(word) for word in got] == list(expected)


def test_mask_statistics():
    # p of the sites dropped (within 5 sigma of a binomial), independent of the neighbouring site
    # and of the row, and another seed gives another mask.
    p, rows, width = 0.3, 400, 500
    seed = torch.tensor(12345)
    mask = keep_mask(seed, rows, 7, width, 1000, p, torch.device("cpu"))
    n = mask.numel()
    kept = mask.double().mean().item()
    assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    centred = mask.double() - kept
    variance = (centred * centred).mean()
    for neighbour in (centred[:, 1:] * centred[:, :-1], centred[1:] * centred[:-1]):
        assert abs((neighbour.mean() / variance).item()) < 5 / n**0.5 * 2
    other = keep_mask(torch.tensor(12346), rows, 7, width, 1000, p, torch.device("cpu"))
    assert (other != mask).double().mean() > 0.3
    again = keep_mask(seed, rows, 7, width, 1000, p, torch.device("cpu"))
    assert torch.equal(again, mask)
    assert keep_threshold(0.0) == 0 and keep_threshold(0.5) == 2**31


def test_dropout_sites_follow_the_contract():
    # N = 6, s = 3, w = 2, L = 3, M = 4: layer 0 reads 3 sites, layers 1, 2 read 3 + 2, the
    # projection 6: D = 19.
    config = SpinalConfig.build(6, 4, layer_width=2, num_layers=3, dropout=0.5)
    assert config.dropout_sites() == (((0, -1), (3, 6), (8, 11)), 13, 19)
    assert SpinalConfig.build(6, None, layer_width=2, num_layers=3).dropout_sites() == (((0, -1), (3, 6), (8, 11)), -1, 13)


# ---- dropout in the layer ---------------------------------------------------------------------


def explicit_dropout_forward(layer: SpinalLinear, x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The authors' Dropout -> Linear placement, with the masks of the contract's sites written out
    for N = 6, s = 3, w = 2, L = 3, M = 4 (D = 19)."""
    p, scale = layer.dropout, 1 / (1 - layer.dropout)
    rows = x.shape[0]

    def drop(values, first):
        return values * keep_mask(seed, rows, first, values.shape[1], 19, p, x.device).to(values.dtype) * scale

    h0 = F.relu(F.linear(drop(x[:, 0:3], 0), layer.weight_in[0], layer.bias[0]))
    inputs1 = torch.cat([drop(x[:, 3:6], 3), drop(h0, 6)], dim=1)
    h1 = F.relu(F.linear(inputs1, torch.cat([layer.weight_in[1], layer.weight_hidden[0]], 1), layer.bias[1]))
    inputs2 = torch.cat([drop(x[:, 0:3], 8), drop(h1, 11)], dim=1)
    h2 = F.relu(F.linear(inputs2, torch.cat([layer.weight_in[2], layer.weight_hidden[1]], 1), layer.bias[2]))
    return F.linear(drop(torch.cat([h0, h1, h2], dim=1), 13), layer.weight_out, layer.bias_out)


def test_dropout_applies_the_masks_at_the_contract_sites(monkeypatch):
    torch.manual_seed(0)
    layer = SpinalLinear(6, 4, layer_width=2, num_layers=3, dropout=0.4, dtype=F64)
    x = torch.randn(32, 6, dtype=F64, requires_grad=True)
    seed = torch.tensor(987654321)
    monkeypatch.setattr("spinal_ops.functional.draw_seed", lambda: seed)
    got = layer(x)
    expected = explicit_dropout_forward(layer, x, seed)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got.square().sum(), [x, *layer.params()[:2]])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *layer.params()[:2]])
    for grad, grad_expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, grad_expected, rtol=1e-12, atol=1e-12)


def test_dropout_backward_uses_the_forward_mask():
    # One layer, identity activation, no projection: y = (m * x / (1 - p)) W^T + b, so the input
    # gradient of sum(y) is zero exactly where the mask dropped x, and the forward must equal the
    # layer without dropout on x masked there.
    torch.manual_seed(1)
    layer = SpinalLinear(8, None, layer_width=4, num_layers=1, split_size=8, activation="identity",
                         dropout=0.5, dtype=F64)
    x = torch.randn(64, 8, dtype=F64, requires_grad=True)
    y = layer(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    kept = grad != 0
    assert 0.35 < kept.double().mean() < 0.65
    expected = F.linear(x.detach() * kept * 2.0, layer.weight_in[0], layer.bias[0])
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_dropout_is_reproducible_under_manual_seed_and_fresh_per_call():
    layer = SpinalLinear(20, 5, layer_width=4, num_layers=3, dropout=0.5)
    x = torch.randn(16, 20)
    torch.manual_seed(3)
    first, second = layer(x), layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first)
    assert not torch.equal(first, second)


def test_functional_dropout_matches_the_module(monkeypatch):
    torch.manual_seed(2)
    layer = SpinalLinear(20, 5, layer_width=4, num_layers=3, dropout=0.3)
    x = torch.randn(16, 20)
    seed = torch.tensor(42)
    monkeypatch.setattr("spinal_ops.functional.draw_seed", lambda: seed)
    got = spinal_linear(x, *layer.params(), split_size=10, dropout=0.3, training=True)
    assert torch.equal(got, layer(x))
    assert torch.equal(spinal_linear(x, *layer.params(), split_size=10, dropout=0.3), layer.eval()(x))


def test_zero_dropout_and_eval_mode_are_the_plain_layer():
    torch.manual_seed(4)
    plain = SpinalLinear(20, 5, layer_width=4, num_layers=3)
    x = torch.randn(16, 20)
    for dropout, train in ((0.0, True), (0.5, False)):
        layer = SpinalLinear(20, 5, layer_width=4, num_layers=3, dropout=dropout).train(train)
        layer.load_state_dict(plain.state_dict())
        assert torch.equal(layer(x), plain(x))


# ---- batch norm in the layer ------------------------------------------------------------------


class AuthorsBatchNormHead(nn.Module):
    """Linear -> BatchNorm1d -> ReLU per layer over [x window, h_prev], then Linear: the authors' VGG
    head written with torch.nn modules, weights taken from a SpinalLinear."""

    def __init__(self, spinal: SpinalLinear):
        super().__init__()
        self.config = spinal.config
        c = spinal.config
        self.linears = nn.ModuleList()
        self.norms = nn.ModuleList()
        for layer in range(c.num_layers):
            linear = nn.Linear(c.fan_in(layer), c.layer_width, dtype=F64)
            norm = nn.BatchNorm1d(c.layer_width, eps=c.norm_eps, momentum=c.norm_momentum, dtype=F64)
            with torch.no_grad():
                weight = spinal.weight_in[layer] if layer == 0 else torch.cat(
                    [spinal.weight_in[layer], spinal.weight_hidden[layer - 1]], 1)
                linear.weight.copy_(weight)
                linear.bias.copy_(spinal.bias[layer])
                norm.weight.copy_(spinal.norm_weight[layer])
                norm.bias.copy_(spinal.norm_bias[layer])
            self.linears.append(linear)
            self.norms.append(norm)
        self.out = nn.Linear(c.hidden_features, c.out_features, dtype=F64)
        with torch.no_grad():
            self.out.weight.copy_(spinal.weight_out)
            self.out.bias.copy_(spinal.bias_out)

    def forward(self, x):
        hidden = []
        for layer, (linear, norm) in enumerate(zip(self.linears, self.norms)):
            window = torch.cat([x[:, a:b] for a, b in self.config.window(layer)], dim=1)
            inputs = window if layer == 0 else torch.cat([window, hidden[-1]], dim=1)
            hidden.append(F.relu(norm(linear(inputs))))
        return self.out(torch.cat(hidden, dim=1))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_trains_like_batchnorm1d(momentum):
    torch.manual_seed(5)
    spinal = SpinalLinear(10, 3, layer_width=4, num_layers=3, norm="batch", norm_momentum=momentum, dtype=F64)
    with torch.no_grad():
        spinal.norm_weight.uniform_(0.5, 1.5)
        spinal.norm_bias.uniform_(-0.5, 0.5)
    authors = AuthorsBatchNormHead(spinal)
    for _ in range(3):
        x = torch.randn(24, 10, dtype=F64, requires_grad=True)
        got, expected = spinal(x), authors(x)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        ours = torch.autograd.grad(got.square().sum(), [x, spinal.weight_in, spinal.norm_weight, spinal.norm_bias])
        theirs = torch.autograd.grad(expected.square().sum(), [x, *[m.weight for m in authors.linears],
                                                               *[n.weight for n in authors.norms], *[n.bias for n in authors.norms]])
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours[1][0], theirs[1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours[2], torch.stack(theirs[4:7]), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours[3], torch.stack(theirs[7:10]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(spinal.running_mean, torch.stack([n.running_mean for n in authors.norms]))
    torch.testing.assert_close(spinal.running_var, torch.stack([n.running_var for n in authors.norms]))
    assert int(spinal.num_batches_tracked) == 3
    # eval mode: the running statistics folded into the weights
    spinal.eval(), authors.eval()
    x = torch.randn(7, 10, dtype=F64)
    torch.testing.assert_close(spinal(x), authors(x), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not available_backends()["cpu"], reason="the cpu backend is not built here")
def test_eval_mode_runs_on_the_op_pair_backends_and_training_with_batch_norm_says_where_it_runs():
    torch.manual_seed(6)
    reference = SpinalLinear(12, 5, layer_width=4, num_layers=3, dropout=0.2, norm="batch", bias=False,
                             backend="reference", dtype=F64)
    reference(torch.randn(32, 12, dtype=F64))  # running statistics away from (0, 1)
    cpu = SpinalLinear(12, 5, layer_width=4, num_layers=3, dropout=0.2, norm="batch", bias=False, backend="cpu", dtype=F64)
    cpu.load_state_dict(reference.state_dict())
    x = torch.randn(9, 12, dtype=F64)
    torch.testing.assert_close(cpu.eval()(x), reference.eval()(x), rtol=1e-12, atol=1e-12)
    # cpu trains with both stages (tests/test_batchnorm_ops.py, tests/test_dropout_ops.py); a backend
    # without a batch-norm stage says where such a training call runs.
    triton = get_backend("triton")
    support = triton.supports(cpu.config, torch.float32, torch.device("cuda"))
    assert not support and "no batch-norm stage; training with batch norm runs on the reference" in support.reason
    auto = SpinalLinear(12, 5, layer_width=4, num_layers=3, norm="batch")
    assert auto(torch.randn(4, 12)).shape == (4, 5)  # auto: the reference runs training


@pytest.mark.skipif(not available_backends()["cpu"], reason="the cpu backend is not built here")
def test_training_with_dropout_runs_on_the_cpu_backend(monkeypatch):
    # The op pair applies the masks itself: the same numbers as the reference given the same seed.
    torch.manual_seed(9)
    reference = SpinalLinear(12, 5, layer_width=4, num_layers=3, dropout=0.2, backend="reference", dtype=F64)
    cpu = SpinalLinear(12, 5, layer_width=4, num_layers=3, dropout=0.2, backend="cpu", dtype=F64)
    cpu.load_state_dict(reference.state_dict())
    seed = torch.tensor(24680)
    monkeypatch.setattr("spinal_ops.functional.draw_seed", lambda: seed)
    x = torch.randn(9, 12, dtype=F64, requires_grad=True)
    got, expected = cpu(x), reference(x)
    assert got.grad_fn.name() == "SpinalNativeBackward"
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got.square().sum(), [x, *cpu.parameters()])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *reference.parameters()])
    for grad, grad_expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, grad_expected, rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_keeps_the_norm_state():
    torch.manual_seed(7)
    layer = SpinalLinear(12, 5, layer_width=4, num_layers=3, norm="batch")
    layer(torch.randn(32, 12))
    keys = set(layer.state_dict())
    assert {"norm_weight", "norm_bias", "running_mean", "running_var", "num_batches_tracked"} <= keys
    restored = SpinalLinear(12, 5, layer_width=4, num_layers=3, norm="batch")
    restored.load_state_dict(layer.state_dict())
    x = torch.randn(6, 12)
    assert torch.equal(restored.eval()(x), layer.eval()(x))


@pytest.mark.parametrize("kwargs, message", [
    ({"dropout": 1.0}, "dropout must be a probability in \\[0, 1\\)"),
    ({"dropout": -0.1}, "dropout must be a probability"),
    ({"dropout": "0.5"}, "dropout must be a probability"),
    ({"norm": "layer"}, "unknown norm 'layer'"),
    ({"norm": "batch", "norm_eps": 0.0}, "norm_eps must be > 0"),
    ({"norm": "batch", "norm_momentum": 1.5}, "norm_momentum must be in \\[0, 1\\]"),
])
def test_bad_training_options_raise_before_anything_runs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpinalLinear(12, 5, layer_width=4, num_layers=3, **kwargs)
