"""Dropout inside the compiled op pairs (docs/contract.md §1 "Masks", §3): the cpu backend, and the
ops called directly, against the float64 reference given the same seed (output and every
gradient, contract §4) over the regimes of the CPU op (the CPU narrow chain's masked row tiles;
the hoisted chain's: the narrow recurrence, the tile GEMM, BLAS, ungrouped wide layers, row blocks,
the bfloat16 chain); no seed or p = 0 exactly the plain op; the forward's mask in the backward; seeds;
opcheck, torch.compile, bad arguments; the CUDA paths on a GPU (skipped without one)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from contract import (
    EDGE_CASES,
    GRAD_NAMES,
    assert_within_contract,
    case_config,
    check_backend,
    check_gradient_masks,
    fixed_dropout_seed,
    make_config,
    random_params,
)

from spinal_ops import SpinalConfig, SpinalLinear, available_backends
from spinal_ops._extension import cpu_bf16_gemm, cuda_kernels_compiled
from spinal_ops.backends.cuda import DROPOUT_REASON, cuda_path, forced_path
from spinal_ops.config import SpinalParams, TrainingStages
from spinal_ops.dispatch import get_backend, select_backend
from spinal_ops.dropout import keep_mask
from spinal_ops.functional import apply_spinal
from spinal_ops.reference import spinal_forward

pytestmark = pytest.mark.skipif(not available_backends()["cpu"], reason=f"cpu backend: {available_backends()['cpu'].reason}")

P = 0.3
SEED = 1234567890123  # above 2^32: both words of the Philox key matter

# The regimes of the CPU op with dropout (csrc/cpu/forward.cpp): the edge cases (w <= 32: the CPU
# narrow chain in float32, the hoisted chain's narrow recurrence in float64; wrapped windows,
# k = 1..4, s = 1, L = 1, w = 1, no projection, no bias), layers grouped by window without dropout
# (k2_groups: under dropout each layer's own product), 32 < w < 256 (recurrence as GEMMs on the tile
# GEMM), w >= 256 (ungrouped; windows read by several layers, tiling x once, wrapping) and past the
# CUDA tiles.
DROPOUT_CASES = (*EDGE_CASES, "k2_groups", "k2_groups_of_three", "medium_grouped", "medium_grouped_M_None",
                 "wide_k2_overlap", "wide_tiles_once", "wide_wraps", "hoisted_no_projection")
# Activations through every kind of activation code: the CPU engine's loops (relu, leaky_relu,
# identity), ATen's (gelu, silu), and those whose derivative reads H, which the chain keeps in
# place of Z (tanh, sigmoid).
ACTIVATION_CASES = [(name, activation) for name in ("odd_N_wraps", "medium_grouped", "wide_wraps")
                    for activation in ("leaky_relu", "gelu", "silu", "tanh", "sigmoid", "identity")]


def dropout_config(name: str, activation: str = "relu", p: float = P) -> SpinalConfig:
    return case_config(name, activation=activation, negative_slope=0.1, dropout=p)


# ---- the cpu backend against the float64 reference, same seed -------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", DROPOUT_CASES)
def test_cpu_dropout_within_contract(name, dtype):
    check_backend("cpu", dropout_config(name), dtype, batch_shape=(37,), dropout_seed=SEED)


@pytest.mark.parametrize("name, activation", ACTIVATION_CASES)
def test_cpu_dropout_every_activation(name, activation):
    check_backend("cpu", dropout_config(name, activation), torch.float32, batch_shape=(37,), dropout_seed=SEED)


# bfloat16: narrow layers below batch 2048 widen to float32; wider layers and narrow ones at large
# batch run the bfloat16 chain where the CPU multiplies bfloat16 (cpu_bf16_gemm()), float32
# factors applied to bfloat16 values and rounded once, as the eager reference rounds them. gelu:
# in half types a ReLU-like kink makes the 2x-eager bound a matter of luck (tests/test_backends.py).
BF16_CASES = {
    "narrow_widened": ("odd_N_wraps", 37),
    "narrow_no_projection": ("M_None", 37),
    "medium": ("medium_grouped", 37),
    "wide_wraps": ("wide_wraps", 37),
    "wide_tiles_once": ("wide_tiles_once", 37),
}


@pytest.mark.parametrize("case", BF16_CASES)
def test_cpu_dropout_bfloat16(case):
    name, batch = BF16_CASES[case]
    check_backend("cpu", dropout_config(name, "gelu"), torch.bfloat16, batch_shape=(batch,), dropout_seed=SEED)


@pytest.mark.slow
def test_cpu_dropout_bfloat16_narrow_at_large_batch():
    # w = 8 from batch 2048: the bfloat16 chain (where the CPU has it) with the ATen engine's factors.
    config = make_config(40, 6, layer_width=8, num_layers=4, activation="gelu", dropout=P)
    check_backend("cpu", config, torch.bfloat16, batch_shape=(2100,), dropout_seed=SEED)
    assert cpu_bf16_gemm() in (True, False)


# Row blocks: the hoisted chain's training forward and backward recurrence run blocks of ~128k
# elements of [B, L*w] (each block's factors at its own rows' counters, in blocks of 64k factors);
# the CPU narrow chain's backward chunks of 256 rows in blocks of 64; the dx of windows that tile
# x once.
ROW_BLOCK_CASES = {
    "medium_blocks": (make_config(30, 4, layer_width=40, num_layers=3, num_splits=3), 2500),
    "narrow_chunks": (make_config(24, 5, layer_width=16, num_layers=4, num_splits=2), 700),
    "wide_blocks": (make_config(12, None, layer_width=260, num_layers=2, num_splits=2), 600),
}


@pytest.mark.parametrize("case", ROW_BLOCK_CASES)
def test_cpu_dropout_row_blocks(case):
    config, batch = ROW_BLOCK_CASES[case]
    config = SpinalConfig(**{**config.__dict__, "dropout": P})
    check_backend("cpu", config, torch.float32, batch_shape=(batch,), dropout_seed=SEED)


@pytest.mark.parametrize("name", ["odd_N_wraps", "medium_grouped", "wide_wraps"])
def test_cpu_dropout_without_gradients(name):
    # A training call under no_grad keeps no Z: the inference row blocks (1M elements, here several
    # blocks of the wide case) with the masks of their rows.
    config = dropout_config(name)
    batch = 2000 if name == "wide_wraps" else 37
    generator = torch.Generator().manual_seed(5)
    params = random_params(config, generator)
    x = torch.randn(batch, config.in_features, generator=generator, dtype=torch.float64)
    with torch.no_grad(), fixed_dropout_seed(SEED):
        expected = apply_spinal(x, params, config, "reference", training=True)
        eager = apply_spinal(x.float(), SpinalParams(*(None if p is None else p.float() for p in params)), config,
                             "reference", training=True)
        got = apply_spinal(x.float(), SpinalParams(*(None if p is None else p.float() for p in params)), config,
                           "cpu", training=True)
    assert_within_contract(f"cpu no_grad {name}", got, expected, eager, torch.float32)


@pytest.mark.parametrize("name", ["odd_N_wraps", "medium_grouped", "wide_k2_overlap"])
def test_cpu_dropout_output_masks(name):
    # Only the gradients autograd needs, each equal to the reference's, for every requires_grad pattern.
    check_gradient_masks("cpu", dropout_config(name), "spinal_ops::native_backward", dropout_seed=SEED)


CAPABILITY_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from contract import case_config, check_backend
print("capability", torch.backends.cpu.get_cpu_capability())
for name in ("odd_N_wraps", "medium_grouped", "wide_wraps"):
    check_backend("cpu", case_config(name, dropout=0.3), torch.float32, batch_shape=(37,), dropout_seed={seed})
check_backend("cpu", case_config("medium_grouped", activation="gelu", dropout=0.3), torch.bfloat16, batch_shape=(37,),
              dropout_seed={seed})
print("dropout paths ok")
"""


@pytest.mark.parametrize(
    "env",
    [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ATEN_CPU_CAPABILITY": "default"}, {"SPINAL_OPS_CPU_BF16_GEMM": "0"}],
    ids=["avx2", "default", "float32_engine"],
)
def test_dropout_under_other_capabilities(env):
    """The Philox words follow PyTorch's capability (AVX-512, AVX2 or scalar: the same words), BLAS
    instead of the tile GEMM where PyTorch's kernels are portable, and bfloat16 widened to float32
    (what a CPU without AVX512_BF16 runs): the same masks, within the contract."""
    script = CAPABILITY_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), seed=SEED)
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dropout paths ok" in result.stdout


# ---- the ops called directly --------------------------------------------------------------------


def op_inputs(config: SpinalConfig, batch: int, dtype: torch.dtype, seed: int = 4):
    generator = torch.Generator().manual_seed(seed)
    params = random_params(config, generator)
    x = torch.randn(batch, config.in_features, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(batch, config.output_features, generator=generator, dtype=torch.float64)
    cast = SpinalParams(*(None if p is None else p.to(dtype) for p in params))
    return x.to(dtype), cast, grad_out.to(dtype)


def reference_with_seed(x, params: SpinalParams, config: SpinalConfig, seed: torch.Tensor, grad_out, dtype):
    """Output and gradients of the reference in ``dtype`` with the dropout of ``seed``."""
    leaves = [x.to(dtype).detach().requires_grad_()] + [
        None if p is None else p.to(dtype).detach().requires_grad_() for p in params]
    y = spinal_forward(leaves[0], SpinalParams(*leaves[1:]), config, TrainingStages(seed, None))
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, present, grad_out.to(dtype), allow_unused=True, materialize_grads=True)
    return [y.detach(), *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["odd_N_wraps", "L1", "M_None_no_bias", "medium_grouped", "wide_wraps"])
def test_native_ops_called_directly(name, dtype):
    config = dropout_config(name, "gelu")
    x, params, grad_out = op_inputs(config, 37, dtype)
    seed = torch.tensor(SEED)
    ops = torch.ops.spinal_ops
    out, pre_activation = ops.native_forward(x, *params, config.activation, config.negative_slope, False, True, seed, P)
    mask = [True, True, True, params.bias is not None, params.weight_out is not None, params.bias_out is not None]
    grads = ops.native_backward(grad_out, x, pre_activation, params.weight_in, params.weight_hidden, params.weight_out,
                                mask, config.activation, config.negative_slope, False, seed, P)
    expected = reference_with_seed(x.double(), params, config, seed, grad_out.double(), torch.float64)
    eager = reference_with_seed(x, params, config, seed, grad_out, dtype)
    got = [out] + [g for g, wanted in zip(grads, mask) if wanted]
    names = ["output"] + [n for n, wanted in zip(GRAD_NAMES, mask) if wanted]
    for label, result, ref, eag in zip(names, got, expected, eager):
        assert_within_contract(f"native ops {name} {dtype} {label}", result, ref.double(), eag, dtype)


NO_DROPOUT_CASES = ("odd_N_wraps", "L1", "M_None", "k2_groups", "medium_grouped", "wide_k2_overlap")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", NO_DROPOUT_CASES)
def test_no_seed_or_zero_p_is_the_plain_op(name, dtype):
    # The ops exactly as without the arguments (every path: the narrow chain included), bit for bit.
    config = case_config(name, activation="gelu")
    x, params, grad_out = op_inputs(config, 37, dtype)
    ops = torch.ops.spinal_ops
    args = (x, *params, config.activation, config.negative_slope, False, True)
    plain_out, plain_z = ops.native_forward(*args)
    mask = [True, True, True, params.bias is not None, params.weight_out is not None, params.bias_out is not None]
    backward_args = (grad_out, x, plain_z, params.weight_in, params.weight_hidden, params.weight_out, mask,
                     config.activation, config.negative_slope, False)
    plain_grads = ops.native_backward(*backward_args)
    for seed, p in ((None, 0.0), (torch.tensor(SEED), 0.0), (None, 0.5)):
        out, z = ops.native_forward(*args, seed, p)
        assert torch.equal(out, plain_out) and torch.equal(z, plain_z), (seed, p)
        grads = ops.native_backward(*backward_args, seed, p)
        assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads)), (seed, p)


# ---- the mask: the forward's in the backward, a function of the seed -----------------------------


@pytest.mark.parametrize("layer_width", [4, 40, 256])
def test_dropped_input_gets_zero_gradient(layer_width):
    # k = 2, L = 2: each column of x is read by one layer, so its gradient is zero exactly where the
    # mask dropped it (columns 0-3 are layer 0's window, sites 0-3 of the row; columns 4-7 layer 1's,
    # sites 4-7). Identity activation and no projection (whose mask could zero a whole dz_l), so a
    # kept column's gradient is not zero.
    config = SpinalConfig.build(8, None, layer_width=layer_width, num_layers=2, activation="identity", dropout=0.5)
    layer = SpinalLinear(8, None, layer_width=layer_width, num_layers=2, activation="identity", dropout=0.5,
                         backend="cpu")
    x = torch.randn(64, 8, requires_grad=True)
    with fixed_dropout_seed(SEED):
        (grad,) = torch.autograd.grad(layer(x).sum(), x)
    seed = torch.tensor(SEED)
    sites = config.dropout_sites()
    sites_per_row = sites[2]
    kept = torch.cat([keep_mask(seed, 64, sites[0][0][0], 4, sites_per_row, 0.5, x.device),
                      keep_mask(seed, 64, sites[0][1][0], 4, sites_per_row, 0.5, x.device)], dim=1)
    assert 0.3 < kept.double().mean() < 0.7
    assert torch.equal(grad == 0, ~kept)


def test_seeds_make_the_masks():
    layer = SpinalLinear(20, 5, layer_width=40, num_layers=3, dropout=0.5, backend="cpu")
    x = torch.randn(16, 20)
    with fixed_dropout_seed(1):
        first, again = layer(x), layer(x)
    with fixed_dropout_seed(2):
        other = layer(x)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # Drawn per call from torch's generator: fresh masks each call, reproducible under manual_seed.
    torch.manual_seed(3)
    drawn = layer(x), layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), drawn[0]) and not torch.equal(drawn[0], drawn[1])


def test_module_with_dropout_trains_on_the_cpu_backend():
    # auto picks the cpu backend for a training call with dropout (not the reference any more); the
    # same layer on the reference with the same seed gives the same numbers within the contract.
    torch.manual_seed(8)
    layer = SpinalLinear(12, 5, layer_width=4, num_layers=3, dropout=0.2, dtype=torch.float64)
    assert select_backend("auto", layer.config, torch.float64, torch.device("cpu")).name == "cpu"
    reference = SpinalLinear(12, 5, layer_width=4, num_layers=3, dropout=0.2, backend="reference",
                             dtype=torch.float64)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(9, 12, dtype=torch.float64)
    with fixed_dropout_seed(SEED):
        got, expected = layer(x), reference(x)
    assert got.grad_fn.name() == "SpinalNativeBackward"
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# ---- opcheck, torch.compile, errors ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["odd_N_wraps", "M_None_no_bias", "medium_grouped"])
def test_opcheck_with_dropout(name):
    config = dropout_config(name, "gelu")
    x, params, grad_out = op_inputs(config, 5, torch.float32)
    seed = torch.tensor(SEED)
    ops = torch.ops.spinal_ops
    leaves = [None if t is None else t.clone().requires_grad_() for t in (x, *params)]
    torch.library.opcheck(ops.native_forward.default,
                          (*leaves, config.activation, config.negative_slope, False, True, seed, P))
    _, pre_activation = ops.native_forward(x, *params, config.activation, config.negative_slope, False, True, seed, P)
    mask = [True, True, True, params.bias is not None, params.weight_out is not None, params.bias_out is not None]
    torch.library.opcheck(ops.native_backward.default,
                          (grad_out, x, pre_activation, params.weight_in, params.weight_hidden, params.weight_out,
                           mask, config.activation, config.negative_slope, False, seed, P))


def test_compile_fullgraph_training_step_matches_eager():
    torch.manual_seed(0)
    layer = SpinalLinear(33, 10, layer_width=16, num_layers=4, split_size=12, activation="silu", dropout=P,
                         backend="cpu")
    x = torch.randn(37, 33, requires_grad=True)
    inputs = [x, *layer.parameters()]
    compiled = torch.compile(layer, fullgraph=True)
    with fixed_dropout_seed(SEED):
        y_compiled, y_eager = compiled(x), layer(x)
    # One opaque node of the graph, given the same seed: the same kernel on the same values.
    torch.testing.assert_close(y_compiled, y_eager, rtol=0, atol=0)
    grad_out = torch.randn_like(y_eager)
    grads_compiled = torch.autograd.grad(y_compiled, inputs, grad_out)
    grads_eager = torch.autograd.grad(y_eager, inputs, grad_out)
    for got, expected in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(got, expected)


def test_compile_draws_the_seed_as_eager_does():
    # The seed drawn inside the compiled graph (torch.randint on the default generator; inductor's
    # fallback_random keeps eager's draws): under manual_seed the compiled step masks as eager does.
    torch.manual_seed(1)
    layer = SpinalLinear(20, 4, layer_width=8, num_layers=3, dropout=0.5, backend="cpu")
    x = torch.randn(16, 20)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(layer, fullgraph=True)
        torch.manual_seed(7)
        got = compiled(x), compiled(x)
    torch.manual_seed(7)
    expected = layer(x), layer(x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(got[0], got[1])


BAD_ARGUMENTS = {
    "p_one": (lambda: torch.tensor(SEED), 1.0, "dropout_p must be a probability in \\[0, 1\\), got 1"),
    "p_negative": (lambda: torch.tensor(SEED), -0.1, "dropout_p must be a probability"),
    "p_nan": (lambda: torch.tensor(SEED), float("nan"), "dropout_p must be a probability"),
    "p_one_no_seed": (lambda: None, 1.5, "dropout_p must be a probability"),
    "seed_1d": (lambda: torch.tensor([SEED]), P, "dropout_seed must be a 0-dim int64 CPU tensor"),
    "seed_float": (lambda: torch.tensor(1.0), P, "dropout_seed must be a 0-dim int64 CPU tensor"),
    "seed_int32": (lambda: torch.tensor(1, dtype=torch.int32), P, "dropout_seed must be a 0-dim int64 CPU tensor"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_dropout_arguments_raise_before_anything_runs(case):
    make_seed, p, message = BAD_ARGUMENTS[case]
    config = case_config("odd_N_wraps")
    x, params, grad_out = op_inputs(config, 5, torch.float32)
    ops = torch.ops.spinal_ops
    with pytest.raises(RuntimeError, match=message):
        ops.native_forward(x, *params, config.activation, config.negative_slope, False, True, make_seed(), p)
    _, z = ops.native_forward(x, *params, config.activation, config.negative_slope, False, True)
    mask = [True] * 6
    with pytest.raises(RuntimeError, match=message):
        ops.native_backward(grad_out, x, z, params.weight_in, params.weight_hidden, params.weight_out, mask,
                            config.activation, config.negative_slope, False, make_seed(), p)
    # The fake kernels (torch.compile, export) refuse them alike.
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode, pytest.raises(RuntimeError, match=message):
        fake = [None if t is None else mode.from_tensor(t) for t in (x, *params)]
        seed = make_seed()
        ops.native_forward(*fake, config.activation, config.negative_slope, False, True,
                           None if seed is None else mode.from_tensor(seed), p)


# ---- which backends run dropout --------------------------------------------------------------------


def test_backends_say_which_run_dropout():
    config = dropout_config("odd_N_wraps")
    cpu = torch.device("cpu")
    for name in ("reference", "cpu"):
        assert get_backend(name).supports(config, torch.float32, cpu)
    from spinal_ops.backends.triton import TritonBackend

    assert TritonBackend().supports(config, torch.float32, torch.device("cuda"))  # masks in its kernels
    # The cuda backend sends a call with dropout to the hoisted pair whatever the cost model says.
    choice = cuda_path(config, 64, torch.float32, torch.device("cuda", 0), True)
    assert (choice.path, choice.reason) == ("hoisted", DROPOUT_REASON)
    # Batch norm in training mode: the normed pair on cpu, none on triton.
    normed = SpinalConfig(**{**config.__dict__, "norm": "batch"})
    assert get_backend("cpu").supports(normed, torch.float32, cpu)
    assert "no batch-norm stage" in TritonBackend().supports(normed, torch.float32, torch.device("cuda")).reason


def test_cuda_path_runs_the_native_kernels_with_dropout_only_when_forced(monkeypatch):
    # Until a GPU run times the native kernels' dropout, the cost model does not pick them for it;
    # forced_path("native") runs them (an H100's limits, no GPU needed).
    from spinal_ops.backends import cuda
    from spinal_ops.backends.cuda_cost import model_for

    limits = {(dtype, tf32): 256 for dtype, tf32 in ((torch.float32, False), (torch.float32, True),
                                                     (torch.float16, False), (torch.bfloat16, False))}
    monkeypatch.setattr(cuda, "TILE_KERNEL_MAX_WIDTH", 256)
    monkeypatch.setattr(cuda, "DEVICES", {0: cuda.CudaDevice((9, 0), model_for("NVIDIA H100 80GB HBM3", 132),
                                                             limits, {})})
    gpu = torch.device("cuda", 0)
    for name in ("odd_N_wraps", "w_at_tile_limit"):
        config = dropout_config(name)
        assert cuda_path(config, 64, torch.float32, gpu, True).path == "hoisted"
        with forced_path("native"):
            assert cuda_path(config, 64, torch.float32, gpu, True).path == "native"
        with forced_path("hoisted"):
            assert cuda_path(config, 64, torch.float32, gpu, True).path == "hoisted"


# ---- the CUDA paths (GPU) ----------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_kernels_compiled()),
                                reason="needs a CUDA GPU and spinal_ops built with its CUDA kernels")
CUDA_CASES = ("odd_N_wraps", "L1", "M_None_no_bias", "k2_groups_of_three", "w_at_tile_limit", "hoisted_w300")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", CUDA_CASES)
def test_cuda_dropout_within_contract(name, dtype):
    activation = "relu" if dtype == torch.float32 else "gelu"
    check_backend("cuda", dropout_config(name, activation), dtype, device="cuda", batch_shape=(37,),
                  dropout_seed=SEED)


@needs_cuda
def test_cuda_dropout_row_blocks_and_factors_kernel():
    # Enough rows for several blocks of the factor kernel's grid, and counters past 2^32.
    config = make_config(40, 7, layer_width=64, num_layers=3, dropout=P)
    check_backend("cuda", config, torch.float32, device="cuda", batch_shape=(3000,), dropout_seed=2**40 + 5)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["odd_N_wraps", "L1", "M_None_no_bias", "k2_groups_of_three", "w_at_tile_limit"])
def test_cuda_native_kernels_dropout_within_contract(name, dtype):
    # Forced onto the native pair, the tile kernels (the narrow ones for w <= 16) apply the masks
    # themselves; w = 256 takes the hoisted chain where the tiles do not fit the device.
    config = dropout_config(name, "relu" if dtype == torch.float32 else "gelu")
    with forced_path("native"):
        if config.layer_width <= 192:
            assert cuda_path(config, 37, dtype, torch.device("cuda", 0), True).path == "native"
        check_backend("cuda", config, dtype, device="cuda", batch_shape=(37,), dropout_seed=SEED)


@needs_cuda
def test_cuda_native_ops_take_dropout():
    # Called directly, the native ops apply the masks (the schemas' trailing arguments), and p = 0
    # with a seed is the op without dropout, bit for bit.
    config = dropout_config("odd_N_wraps", "gelu")
    x, params, _ = op_inputs(config, 37, torch.float32)
    x = x.cuda()
    params = SpinalParams(*(None if p is None else p.cuda() for p in params))
    ops = torch.ops.spinal_ops
    args = (x, *params, config.activation, config.negative_slope, False, True)
    for pair in (ops.native_forward, ops.hoisted_forward):
        torch.library.opcheck(pair.default, (*args, torch.tensor(SEED), P))
    plain, seeded = ops.native_forward(*args), ops.native_forward(*args, torch.tensor(SEED), 0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain, seeded))
