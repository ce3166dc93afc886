"""Batch norm (and dropout with it) in training on the compiled backends: the normed op pair
(csrc/chain/normed_chain.h) against the float64 reference under the contract's error rule (§4),
the running statistics it leaves, its registration (gradcheck, opcheck, torch.compile), and its
errors."""
from __future__ import annotations

import pytest
import torch

from contract import CASES, assert_within_contract
from spinal_ops import SpinalConfig, SpinalLinear, available_backends, ops
from spinal_ops.activations import ACTIVATIONS

pytestmark = pytest.mark.skipif(not available_backends()["cpu"], reason="the compiled extension is not built here")

F64 = torch.float64
BATCH = 16
NORM_STATE = ("running_mean", "running_var")


def build(case: str, dtype: torch.dtype, backend: str, **overrides) -> SpinalLinear:
    kwargs = {**CASES[case], **overrides}
    return SpinalLinear(kwargs.pop("in_features"), kwargs.pop("out_features"), backend=backend, dtype=dtype, **kwargs)


def trio(case: str, dtype: torch.dtype, backend: str = "cpu", device: str = "cpu", seed: int = 0, **overrides):
    """(layer under test, eager reference in dtype, float64 reference) with the same parameters,
    rounded to dtype, and batch-norm affine parameters away from (1, 0)."""
    torch.manual_seed(seed)
    reference64 = build(case, F64, "reference", norm="batch", **overrides)
    with torch.no_grad():
        if reference64.norm_weight is not None:
            reference64.norm_weight.uniform_(0.5, 1.5)
            reference64.norm_bias.uniform_(-0.5, 0.5)
        for tensor in (*reference64.parameters(), *reference64.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype).double())
    layers = []
    for backend_name in (backend, "reference"):
        layer = build(case, dtype, backend_name, norm="batch", **overrides).to(device)
        layer.load_state_dict(reference64.state_dict())
        layers.append(layer)
    return layers[0], layers[1], reference64


def step(layer: SpinalLinear, x: torch.Tensor, grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Output and the gradients of x and of every parameter (in parameters() order)."""
    x = x.detach().to(layer.weight_in.dtype).requires_grad_(True)
    y = layer(x)
    leaves = [x, *layer.parameters()]
    grads = torch.autograd.grad(y, leaves, grad_outputs=grad_out.to(y.dtype), allow_unused=True, materialize_grads=True)
    return [y.detach(), *(g.detach() for g in grads)]


def check_training(case: str, dtype: torch.dtype, steps: int = 3, device: str = "cpu", backend: str = "cpu",
                   monkeypatch=None, **overrides) -> None:
    """Several training steps of ``backend`` against the float64 reference (same dropout seed per
    step): output, every gradient, then the running statistics and the batch count."""
    tested, eager, reference64 = trio(case, dtype, backend, device, **overrides)
    names = ["output", "x", *(name for name, _ in tested.named_parameters())]
    generator = torch.Generator().manual_seed(1)
    for index in range(steps):
        x = torch.randn(BATCH, tested.in_features, generator=generator, dtype=F64).to(dtype).double()
        grad_out = torch.randn(BATCH, tested.config.output_features, generator=generator, dtype=F64).to(dtype).double()
        seed = torch.tensor(1000 + index)
        monkeypatch.setattr("spinal_ops.functional.draw_seed", lambda: seed)
        expected = step(reference64, x, grad_out)
        got = step(tested, x.to(device), grad_out.to(device))
        eager_got = step(eager, x.to(device), grad_out.to(device))
        for name, ref, eag, out in zip(names, expected, eager_got, got):
            assert out.dtype == dtype, f"{name}: dtype {out.dtype}"
            assert_within_contract(f"step {index} {name} ({case}, {overrides})", out, ref, eag, dtype)
    for name in NORM_STATE:
        assert_within_contract(name, getattr(tested, name), getattr(reference64, name), getattr(eager, name), dtype)
    assert int(tested.num_batches_tracked) == int(reference64.num_batches_tracked) == steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("dropout", [0.0, 0.5], ids=["no_dropout", "dropout"])
def test_training_matches_the_reference(monkeypatch, dtype, affine, momentum, dropout):
    check_training("odd_N_wraps", dtype, monkeypatch=monkeypatch, norm_affine=affine, norm_momentum=momentum,
                   dropout=dropout)


# Wrapped windows, k = 1..4, s = 1, L = 1, w = 1, no projection, no bias.
@pytest.mark.parametrize("case", ["split_size_wraps", "k1", "k4", "s1", "L1", "w1", "M_None", "no_bias",
                                  "M_None_no_bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_edge_cases_match_the_reference(monkeypatch, case, dropout):
    check_training(case, torch.float32, steps=2, monkeypatch=monkeypatch, dropout=dropout)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_matches_the_reference(monkeypatch, activation):
    check_training("k3", torch.float32, steps=1, monkeypatch=monkeypatch, activation=activation, dropout=0.2)


def test_float64_is_the_reference_to_rounding(monkeypatch):
    check_training("k2_groups", F64, steps=2, monkeypatch=monkeypatch, dropout=0.4)


def test_auto_takes_the_cpu_backend_for_training_with_batch_norm():
    from spinal_ops import select_backend

    for stages in ({"norm": "batch", "dropout": 0.5}, {"norm": "batch"}):
        config = SpinalConfig.build(12, 5, layer_width=4, num_layers=3, **stages)
        assert select_backend("auto", config, torch.float32, torch.device("cpu")).name == "cpu"


def test_eval_mode_after_training_is_the_folded_layer(monkeypatch):
    cpu, _, reference64 = trio("odd_N_wraps", F64, dropout=0.3)
    for index in range(3):
        seed = torch.tensor(index)
        monkeypatch.setattr("spinal_ops.functional.draw_seed", lambda: seed)
        x = torch.randn(BATCH, 7, dtype=F64)
        cpu(x), reference64(x)
    x = torch.randn(5, 7, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(cpu.eval()(x), reference64.eval()(x), rtol=1e-12, atol=1e-12)
    assert int(cpu.num_batches_tracked) == 3


def test_frozen_layer_updates_statistics_and_computes_only_the_input_gradient():
    cpu, _, reference64 = trio("k4", torch.float32)
    cpu.requires_grad_(False)
    reference64.requires_grad_(False)
    x = torch.randn(BATCH, 8, dtype=F64)
    xs = x.float().requires_grad_(True)
    x64 = x.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(cpu(xs).square().sum(), xs)
    (expected,) = torch.autograd.grad(reference64(x64).square().sum(), x64)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # no autograd at all: statistics still update, as BatchNorm1d's do in train()
        cpu(xs), reference64(x64)
    torch.testing.assert_close(cpu.running_var.double(), reference64.running_var, rtol=1e-5, atol=1e-6)


# ---- the op pair itself -------------------------------------------------------------------------


def op_inputs(config: SpinalConfig, dtype=F64, device="cpu", affine=True, requires_grad=True, batch=6):
    generator = torch.Generator().manual_seed(3)

    def rand(*shape):
        return (torch.rand(*shape, generator=generator, dtype=F64) - 0.5).to(device=device, dtype=dtype)

    w, L = config.layer_width, config.num_layers
    tensors = [rand(batch, config.in_features), rand(L, w, config.split_size), rand(L - 1, w, w),
               rand(L, w) if config.bias else None,
               rand(config.out_features, config.hidden_features) if config.out_features else None,
               rand(config.out_features) if config.out_features and config.bias else None,
               rand(L, w) + 1 if affine else None, rand(L, w) if affine else None]
    return [None if t is None else t.requires_grad_(requires_grad) for t in tensors]


OPS = torch.ops.spinal_ops


def test_the_schemas_match_the_cpp_definitions():
    for name, schema in (("normed_forward", ops.NORMED_FORWARD_SCHEMA),
                         ("normed_backward", ops.NORMED_BACKWARD_SCHEMA)):
        registered = getattr(OPS, name).default._schema
        assert registered == torch._C.parse_schema(f"spinal_ops::{name}{schema}"), (str(registered), schema)


@pytest.mark.parametrize("case, affine, dropout", [("odd_N_wraps", True, 0.0), ("odd_N_wraps", True, 0.4),
                                                   ("M_None_no_bias", False, 0.4), ("L1", True, 0.3)])
def test_gradcheck_of_the_op_pair(case, affine, dropout):
    config = SpinalConfig.build(**CASES[case])
    inputs = op_inputs(config, affine=affine)
    seed = torch.tensor(77)
    present = [t for t in inputs if t is not None]

    def layer(*tensors):
        it = iter(tensors)
        args = [None if t is None else next(it) for t in inputs]
        return OPS.normed_forward(*args, "tanh", 0.01, 1e-5, False, seed, dropout)[0]

    assert torch.autograd.gradcheck(layer, present)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_opcheck(dropout):
    config = SpinalConfig.build(**CASES["odd_N_wraps"])
    inputs = op_inputs(config, dtype=torch.float32)
    args = (*inputs, "relu", 0.01, 1e-5, False, torch.tensor(5), dropout)
    torch.library.opcheck(OPS.normed_forward.default, args)
    x = inputs[0].detach()
    out, pre_norm, mean, var = OPS.normed_forward(*(None if t is None else t.detach() for t in inputs),
                                                  "relu", 0.01, 1e-5, False, torch.tensor(5), dropout)
    backward_args = (torch.randn_like(out), x, pre_norm, mean, var, *(t.detach() for t in inputs[1:3]),
                     inputs[4].detach(), inputs[6].detach(), inputs[7].detach(), [True] * 8, "relu", 0.01, 1e-5,
                     False, torch.tensor(5), dropout)
    torch.library.opcheck(OPS.normed_backward.default, backward_args)


def test_the_op_leaves_running_statistics_to_the_caller_and_returns_biased_batch_statistics():
    config = SpinalConfig.build(**CASES["k3"])
    inputs = op_inputs(config, requires_grad=False, batch=11)
    out, pre_norm, mean, var = OPS.normed_forward(*inputs, "relu", 0.01, 1e-5)
    assert out.shape == (11, config.out_features) and pre_norm.shape == (11, config.hidden_features)
    flat = pre_norm.view(11, config.num_layers, config.layer_width)
    torch.testing.assert_close(mean, flat.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, flat.var(0, unbiased=False), rtol=1e-12, atol=1e-12)


def test_half_inputs_keep_float32_statistics():
    config = SpinalConfig.build(**CASES["k3"])
    inputs = op_inputs(config, dtype=torch.bfloat16, requires_grad=False)
    out, pre_norm, mean, var = OPS.normed_forward(*inputs, "relu", 0.01, 1e-5)
    assert (out.dtype, pre_norm.dtype, mean.dtype, var.dtype) == (torch.bfloat16,) * 2 + (torch.float32,) * 2


def test_double_backward_raises():
    layer = SpinalLinear(7, 3, layer_width=5, num_layers=3, norm="batch", backend="cpu", dtype=F64)
    x = torch.randn(8, 7, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        grad.sum().backward()


def test_torch_compile_fullgraph_training_step_matches_eager(monkeypatch):
    seed = torch.tensor(4242)
    monkeypatch.setattr("spinal_ops.functional.draw_seed", lambda: seed)
    torch.manual_seed(9)
    kwargs = dict(layer_width=6, num_layers=3, norm="batch", dropout=0.5, norm_momentum=None, backend="cpu")
    eager = SpinalLinear(10, 4, **kwargs)
    compiled_layer = SpinalLinear(10, 4, **kwargs)
    compiled_layer.load_state_dict(eager.state_dict())

    def training_step(layer, x):
        x = x.clone().requires_grad_(True)
        y = layer(x)
        return [y, *torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])]

    compiled = torch.compile(compiled_layer, fullgraph=True)
    for _ in range(2):
        x = torch.randn(12, 10)
        expected = training_step(eager, x)
        got = training_step(compiled, x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name in (*NORM_STATE, "num_batches_tracked"):
        torch.testing.assert_close(getattr(compiled_layer, name), getattr(eager, name))


# ---- errors ----------------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors():
    config = SpinalConfig.build(**CASES["odd_N_wraps"])
    inputs = op_inputs(config, dtype=torch.float32, requires_grad=False)
    x, weight_in, weight_hidden, bias, weight_out, bias_out, gamma, beta = inputs

    def call(*args, **changes):
        given = dict(zip(["x", "weight_in", "weight_hidden", "bias", "weight_out", "bias_out", "norm_weight",
                          "norm_bias"], inputs))
        given.update(changes)
        return OPS.normed_forward(*given.values(), "relu", 0.01, *args)

    with pytest.raises(RuntimeError, match=r"norm_weight must be \[L, w\] = \[3, 5\], got \[5\]"):
        call(1e-5, norm_weight=gamma[0])
    with pytest.raises(RuntimeError, match="(?i)norm_bias has dtype double but x has float"):
        call(1e-5, norm_bias=beta.double())
    with pytest.raises(RuntimeError, match="more than one row per batch, got B=1"):
        call(1e-5, x=x[:1])
    with pytest.raises(RuntimeError, match="norm_eps must be > 0"):
        call(0.0)
    with pytest.raises(RuntimeError, match="dropout_seed must be a 0-dim int64 CPU tensor"):
        call(1e-5, False, torch.tensor(1.5), 0.5)
    with pytest.raises(RuntimeError, match=r"dropout_p must be a probability in \[0, 1\)"):
        call(1e-5, False, torch.tensor(1), 1.0)
    with pytest.raises(RuntimeError, match="unknown activation"):
        OPS.normed_forward(*inputs, "swish", 0.01, 1e-5)
    out, pre_norm, mean, var = call(1e-5)
    with pytest.raises(RuntimeError, match="(?i)batch_var must have dtype float for x of float, got double"):
        OPS.normed_backward(out, x, pre_norm, mean, var.double(), weight_in, weight_hidden, weight_out, gamma, beta,
                            [True] * 8, "relu", 0.01, 1e-5)
    with pytest.raises(RuntimeError, match="asks for a norm_weight or norm_bias gradient but the layer has none"):
        OPS.normed_backward(out, x, pre_norm, mean, var, weight_in, weight_hidden, weight_out, None, None,
                            [True] * 8, "relu", 0.01, 1e-5)


def test_a_one_row_training_batch_is_refused():
    layer = SpinalLinear(7, 3, layer_width=5, num_layers=3, norm="batch", backend="cpu")
    with pytest.raises(RuntimeError, match="more than one row per batch"):
        layer(torch.randn(1, 7))
    assert int(layer.num_batches_tracked) == 0


# ---- CUDA ------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not available_backends()["cuda"], reason="needs the cuda backend and a GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.5], ids=["no_dropout", "dropout"])
def test_cuda_training_matches_the_reference(monkeypatch, dtype, dropout):
    check_training("odd_N_wraps", dtype, device="cuda", backend="cuda", monkeypatch=monkeypatch, dropout=dropout)


@cuda
@pytest.mark.parametrize("case", ["M_None_no_bias", "L1", "wide_wraps"])
def test_cuda_edge_cases_match_the_reference(monkeypatch, case):
    check_training(case, torch.float32, steps=2, device="cuda", backend="cuda", monkeypatch=monkeypatch, dropout=0.3)


@cuda
def test_cuda_gradcheck_and_opcheck():
    config = SpinalConfig.build(**CASES["odd_N_wraps"])
    inputs = op_inputs(config, device="cuda")
    seed = torch.tensor(11)
    assert torch.autograd.gradcheck(
        lambda *t: OPS.normed_forward(*t, "tanh", 0.01, 1e-5, False, seed, 0.3)[0], inputs)
    inputs32 = op_inputs(config, dtype=torch.float32, device="cuda")
    torch.library.opcheck(OPS.normed_forward.default, (*inputs32, "relu", 0.01, 1e-5, False, seed, 0.3))
