"""The native C++ CPU op (backend="cpu") against the float64 reference (docs/contract.md §3, §4, §5):
what is the cpu backend's own (gradcheck, bfloat16, the chain's width regimes, inference row blocks,
output masks, double backward). What every backend must do is in tests/test_backends.py."""
import os
import subprocess
import sys

import pytest
import torch
from contract import (
    EDGE_CASES,
    case_config,
    check_autograd_node,
    check_backend,
    check_gradient_masks,
    check_inference_keeps_no_pre_activation,
    check_tf32_choice_reaches_backward,
    gradcheck_problem,
    make_config,
)

from spinal_ops import ACTIVATIONS, SpinalConfig, SpinalLinear
from spinal_ops._extension import cpu_bf16_gemm, cpu_bf16_tile_gemm, cpu_direct_blas, cpu_tile_gemm, cpu_vector_kernels

# The edge-case matrix (tests/contract.py) with relu, and every activation on a case whose windows wrap.
CPU_CASES = [pytest.param(name, "relu", id=name) for name in EDGE_CASES] + [
    pytest.param("odd_N_wraps", activation, id=f"odd_N_wraps-{activation}")
    for activation in ACTIVATIONS
    if activation != "relu"
]


def build(name: str, activation: str) -> SpinalConfig:
    return case_config(name, activation=activation, negative_slope=0.1)


@pytest.mark.parametrize("name, activation", CPU_CASES)
def test_gradcheck_float64(name, activation):
    layer, inputs = gradcheck_problem(build(name, activation), "cpu", seed=3)
    assert torch.autograd.gradcheck(layer, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name, activation", CPU_CASES)
def test_contract_against_float64_reference(name, activation, dtype):
    check_backend("cpu", build(name, activation), dtype, batch_shape=(5,))


# The CPU chain's three regimes by width (the edge cases are all narrow, w <= 32: recurrence in one
# loop over rows). 32 < w < 256: layers grouped by window (w >= 128 only from batch 512), recurrence
# as ATen GEMMs. w >= 256: one GEMM per layer, no grouping: windows read by several layers, tiling x
# once, wrapping.
WIDE_CASES = ("medium_grouped", "medium_grouped_M_None", "wide_k2_overlap", "wide_tiles_once", "wide_wraps")


# gelu's derivative reads Z; relu's, tanh's, sigmoid's and identity's read H, which the chain then
# keeps instead of Z where there is a projection (csrc/chain/hoisted_chain.h).
@pytest.mark.parametrize("activation", ["gelu", "relu", "tanh", "sigmoid", "identity"])
@pytest.mark.parametrize("name", WIDE_CASES)
def test_wide_layers_one_gemm_per_layer(name, activation):
    config = build(name, activation)
    check_backend("cpu", config, torch.float32, batch_shape=(5,))
    check_gradient_masks("cpu", config, "spinal_ops::native_backward")


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("batch", [5, 600], ids=["ungrouped", "grouped"])
def test_layers_of_width_128_group_from_batch_512(batch, activation):
    config = make_config(10, 3, layer_width=128, num_layers=4, num_splits=2, activation=activation)
    check_backend("cpu", config, torch.float32, batch_shape=(batch,))


# Training runs the chain in row blocks (csrc/chain/hoisted_chain.cpp, kCpuTrainingBlockElements): 256 rows
# where L*w >= 512, so batch 600 is blocks of 256, 256 and 88 rows; 4096 rows at L*w = 32 (the narrow
# recurrence, which float64 takes), so 5000 rows end in a block of 904. H kept in place (relu), Z
# with H beside it (gelu), no projection, and the narrow recurrence.
TRAINING_BLOCK_CASES = {
    "grouped_keeps_H": (dict(layer_width=128, num_layers=4, activation="relu"), 10, torch.float32, 600),
    "wide_Z_and_H": (dict(layer_width=256, num_layers=4, activation="gelu"), 10, torch.float32, 600),
    "wide_M_None": (dict(layer_width=256, num_layers=2, activation="tanh"), None, torch.float32, 600),
    "narrow_recurrence": (dict(layer_width=8, num_layers=4, activation="leaky_relu"), 3, torch.float64, 5000),
}


@pytest.mark.parametrize("name", TRAINING_BLOCK_CASES)
def test_training_over_row_blocks(name):
    kwargs, out_features, dtype, batch = TRAINING_BLOCK_CASES[name]
    config = make_config(21, out_features, num_splits=3, negative_slope=0.1, **kwargs)
    check_backend("cpu", config, dtype, batch_shape=(batch,))
    check_gradient_masks("cpu", config, "spinal_ops::native_backward", dtype=dtype, batch=batch)


# The chain's float32 products of up to 2^24 multiply-adds run on register tiles
# (csrc/cpu/tile_gemm.h): 4 rows by 3 or 2 vectors of 8 columns, the depth in chunks of 128, b read
# in place or packed. Cases at its edges, batch 37 (a last tile of 1 row): w = 100 (panels of 24,
# 24, 24, 16 and 16 columns, the last with 4 past c's edge); w = 300 with s = 350 (depths of
# several chunks; one GEMM per layer) and N = 700 (x's rows far apart: its panels are packed).
TILE_GEMM_CASES = {
    "ragged_panels": (200, 10, dict(layer_width=100, num_layers=3, activation="relu")),
    "ragged_panels_M_None": (200, None, dict(layer_width=100, num_layers=2, activation="leaky_relu")),
    "deep_chunks_far_rows": (700, 5, dict(layer_width=300, num_layers=3, activation="gelu", bias=False)),
}


def tile_gemm_config(name: str) -> SpinalConfig:
    in_features, out_features, kwargs = TILE_GEMM_CASES[name]
    return make_config(in_features, out_features, num_splits=2, negative_slope=0.1, **kwargs)


@pytest.mark.parametrize("name", TILE_GEMM_CASES)
def test_register_tiled_products(name):
    config = tile_gemm_config(name)
    check_backend("cpu", config, torch.float32, batch_shape=(37,))
    check_gradient_masks("cpu", config, "spinal_ops::native_backward", batch=37)


# Products of one to four rows whose b is a weight's transpose (the forward's x @ A^T, h @ R^T and
# H @ W_out^T) run as dot products of a's rows with the weight's rows, read in place
# (csrc/cpu/tile_gemm.cpp, dot_rows): batch 1 to 4, w = 67 (groups of 4 or 2 weight rows, then
# single ones), s = 101 and N = 202 (masked tails of the depth), the recurrence's products adding
# into the input products', with and without bias; M = 37 (past the few-column projection kernel).
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_products_of_one_to_four_rows(batch, bias):
    config = make_config(202, 37, layer_width=67, num_layers=3, num_splits=2, activation="gelu", bias=bias)
    check_backend("cpu", config, torch.float32, batch_shape=(batch,))
    check_gradient_masks("cpu", config, "spinal_ops::native_backward", batch=batch)


TILE_GEMM_AVX2_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from contract import check_backend
from test_cpu_backend import TILE_GEMM_CASES, tile_gemm_config
from spinal_ops._extension import cpu_tile_gemm

assert cpu_tile_gemm() == "AVX2", cpu_tile_gemm()
for name in TILE_GEMM_CASES:
    check_backend("cpu", tile_gemm_config(name), torch.float32, batch_shape=(37,))
print("avx2 tiles ok")
"""


@pytest.mark.skipif(cpu_tile_gemm() != "AVX-512", reason="the AVX-512 tiles do not run here: the test above ran these")
def test_register_tiled_products_on_avx2():
    """ATEN_CPU_CAPABILITY=avx2 (PyTorch's switch) turns the AVX-512 tiles off: the AVX2 tiles,
    of other panel widths, run the same cases within the contract."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    script = TILE_GEMM_AVX2_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "avx2 tiles ok" in result.stdout


# The wide chain's output projection of at most 16 columns runs the AVX2 kernel of
# csrc/cpu/skinny_product.h (one or two vectors of columns); 17 columns run BLAS. Batch 37 ends in
# a partial tile of rows.
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("out_features", [1, 8, 9, 16, 17])
def test_output_projection_of_few_columns(out_features, bias):
    config = make_config(in_features=20, out_features=out_features, layer_width=40, num_layers=3, bias=bias)
    check_backend("cpu", config, torch.float32, batch_shape=(37,))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("activation", ["relu", "tanh", "leaky_relu"])
def test_wide_layers_propagate_nan_and_inf_like_the_reference(activation):
    """relu's gradient from the kept H passes a NaN as the reference's does (its mask is h > 0), in
    float32 and in bfloat16."""
    config = build("medium_grouped", activation)
    # A fixed input, as every contract check has: a random one may put a pre-activation within
    # bfloat16's rounding of relu's or leaky relu's kink (|z| below ~1e-3), where two roundings of
    # the same sum take different sides and the gradient rule cannot hold (seed 0 puts one of
    # leaky relu's 720 pre-activations there).
    x = torch.randn(6, config.in_features, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[1, 2] = float("nan")
    x[3, 5] = float("inf")
    x[4, 0] = -float("inf")
    check_backend("cpu", config, torch.float32, x=x)
    check_backend("cpu", config, torch.bfloat16, x=x)  # the bfloat16 loops on the values' bits
    check_backend("cpu", config, torch.bfloat16, batch_shape=(5,))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize("width", [8, 40])
def test_bfloat16_recurrence_epilogues_propagate_nan_and_inf(activation, width):
    """The bfloat16 chain runs ReLU-like recurrence steps with their activation (forward) and its
    gradient (backward) in the tile GEMM's epilogue: NaN and Inf pass as through the reference, on
    narrow layers (from batch 2048) and wider ones."""
    config = make_config(320, 10, layer_width=width, num_layers=4, activation=activation, negative_slope=0.1)
    x = torch.randn(2100, config.in_features, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[1, 2] = float("nan")
    x[3, 200] = float("inf")
    x[4, 0] = -float("inf")
    x[5, 170] = -float("inf")
    check_backend("cpu", config, torch.bfloat16, x=x)


@pytest.mark.parametrize("batch", [300, 5000])
def test_narrow_recurrence_over_row_chunks(batch):
    """w <= 32: the backward loop sums dR (weight_hidden's gradient) per fixed chunk of rows; with
    several chunks it matches the reference and gives the same bits with one thread or two."""
    config = build("k2_groups", "gelu")
    assert config.layer_width <= 32 and config.num_layers > 1
    check_backend("cpu", config, torch.float32, batch_shape=(batch,))
    torch.manual_seed(0)
    layer = SpinalLinear(config.in_features, config.out_features, layer_width=config.layer_width,
                         num_layers=config.num_layers, split_size=config.split_size, activation="gelu", backend="cpu")
    x = torch.randn(batch, config.in_features)
    before = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            layer.zero_grad()
            layer(x).square().sum().backward()
            grads.append(layer.weight_hidden.grad.clone())
    finally:
        torch.set_num_threads(before)
    assert torch.equal(grads[0], grads[1])


# Window groupings of the hoisted chain: one group (k = 1), groups of several layers (k = 2, 3),
# one layer per group (wrapping windows with N/gcd(N, s) > L), and no bias or no projection.
MASK_CASES = ("k1", "k2_groups", "k3", "odd_N_wraps", "M_None", "no_bias")


@pytest.mark.parametrize("name", MASK_CASES)
def test_backward_computes_only_what_autograd_asks_for(name):
    check_gradient_masks("cpu", build(name, "tanh"), "spinal_ops::native_backward")


def test_tf32_choice_reaches_backward():
    check_tf32_choice_reaches_backward("cpu", build("no_bias", "relu"), "spinal_ops::native_forward",
                                       "spinal_ops::native_backward")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [5, 3000], ids=["one_block", "row_blocks"])
@pytest.mark.parametrize("out_features", [3, None], ids=["projection", "M_None"])
def test_inference_keeps_no_pre_activation(batch, out_features, dtype):
    # L*w = 1024: inference runs row blocks of 1024 rows, so batch 3000 ends in a partial block.
    config = make_config(12, out_features, layer_width=256, num_layers=4, num_splits=3, activation="gelu")
    check_inference_keeps_no_pre_activation("cpu", config, "spinal_ops::native_forward", batch, dtype)


def test_double_backward_raises_a_clear_error():
    layer = SpinalLinear(7, 3, layer_width=4, num_layers=3, activation="tanh", backend="cpu", dtype=torch.float64)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported by the op pairs"):
        grad_x.sum().backward()


def test_autograd_node_behaves_like_a_builtin_ops():
    check_autograd_node("cpu", "SpinalNativeBackward")


# Narrow float32 layers (w <= 32, every edge case above) run the CPU op's AVX2 kernels
# (csrc/cpu/narrow_chain.h) where PyTorch's own kernels use AVX2; elsewhere the portable ATen chain.
def test_narrow_layers_take_the_vector_kernels_where_torch_uses_avx2():
    assert cpu_vector_kernels() == (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


# The narrow backward's dx regimes (csrc/cpu/narrow_chain_backward.cpp, block_input_grad): windows of
# whole vectors written in place, ragged or wrapped windows through a scratch block, with and without
# a zero fill (the windows partition x's columns, or overlap, or leave columns unread); batches with a
# last tile of fewer than 4 rows, in one block of 64 rows and across blocks.
DX_REGIMES = {
    "partition_whole_vectors": dict(in_features=32, layer_width=8, num_layers=3, split_size=16),
    "partition_ragged": dict(in_features=24, layer_width=5, num_layers=4, split_size=12),
    "unread_columns_whole_vectors": dict(in_features=48, layer_width=8, num_layers=2, split_size=16),
    "wrapped_and_whole": dict(in_features=40, layer_width=8, num_layers=5, split_size=16),
}


@pytest.mark.parametrize("batch", [37, 133])
@pytest.mark.parametrize("name", DX_REGIMES)
def test_narrow_input_gradient_regimes(name, batch):
    config = make_config(out_features=6, **DX_REGIMES[name])
    check_backend("cpu", config, torch.float32, batch_shape=(batch,))
    check_gradient_masks("cpu", config, "spinal_ops::native_backward", dtype=torch.float32)


# From 4 MB of x the narrow backward's dW_in reads each block of x transposed (x read in place
# below that, as above): windows that wrap and a ragged one, a last block of 12 rows.
def test_narrow_weight_gradient_of_a_large_input():
    config = make_config(in_features=1001, out_features=6, layer_width=8, num_layers=5, split_size=300)
    assert 1100 * config.in_features * 4 >= 4 << 20
    check_backend("cpu", config, torch.float32, batch_shape=(1100,))
    check_gradient_masks("cpu", config, "spinal_ops::native_backward", dtype=torch.float32, batch=1100)


# The narrow forward packs A^T, R^T and W_out^T by 8x8 register transposes with element-wise edges:
# w and s whole blocks, s with an edge, w with an edge, M < 8 (all edge).
PACKING_SHAPES = {
    "whole_blocks": dict(in_features=32, out_features=16, layer_width=8, num_layers=3, split_size=16),
    "split_edge": dict(in_features=33, out_features=10, layer_width=16, num_layers=4, split_size=12),
    "width_edge": dict(in_features=40, out_features=9, layer_width=12, num_layers=3, split_size=20),
    "small_projection": dict(in_features=16, out_features=3, layer_width=24, num_layers=2, split_size=8),
}


@pytest.mark.parametrize("name", PACKING_SHAPES)
def test_narrow_weight_packing_edges(name):
    check_backend("cpu", make_config(**PACKING_SHAPES[name]), torch.float32, batch_shape=(9,))


# Without projection the chain's dZ starts as G regrouped by window (a copy of G in layer order):
# grouped layers (k = 2, L = 4: two groups of two) through the narrow recurrence (float64) and the
# grouped GEMMs (w = 40, float32).
@pytest.mark.parametrize("dtype, layer_width", [(torch.float64, 3), (torch.float32, 40)])
def test_chain_without_projection_regroups_the_output_gradient(dtype, layer_width):
    config = make_config(in_features=8, out_features=None, layer_width=layer_width, num_layers=4)
    check_backend("cpu", config, dtype, batch_shape=(7,))


PORTABLE_CHAIN_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from contract import case_config, check_backend, check_gradient_masks
from spinal_ops._extension import cpu_direct_blas, cpu_tile_gemm, cpu_vector_kernels

assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
assert not cpu_vector_kernels()
assert cpu_tile_gemm() is None
for name in ("k2_groups", "odd_N_wraps", "M_None", "w1"):
    config = case_config(name, activation="gelu", negative_slope=0.1)
    check_backend("cpu", config, torch.float32, batch_shape=(37,))
    check_gradient_masks("cpu", config, "spinal_ops::native_backward", dtype=torch.float32)
print("portable chain ok")
"""


def test_portable_chain_where_torch_uses_no_avx2():
    """ATEN_CPU_CAPABILITY=default (PyTorch's own switch for its vector kernels) turns the AVX2
    kernels off: the portable chain runs and meets the same contract."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    script = PORTABLE_CHAIN_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "portable chain ok" in result.stdout


ATEN_GEMM_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from contract import case_config, check_backend, check_gradient_masks, make_config
from spinal_ops._extension import cpu_direct_blas, cpu_tile_gemm

assert not cpu_direct_blas()
assert cpu_tile_gemm() is None
wide = [make_config(in_features=70, out_features=5, layer_width=40, num_layers=3, activation=activation)
        for activation in ("relu", "leaky_relu", "tanh", "identity")]
wide += [make_config(in_features=71, out_features=None, layer_width=40, num_layers=4, split_size=30, bias=False)]
for config in wide + [case_config("odd_N_wraps", negative_slope=0.1)]:
    for dtype in (torch.float32, torch.float64):
        check_backend("cpu", config, dtype, batch_shape=(9,))
    check_gradient_masks("cpu", config, "spinal_ops::native_backward", dtype=torch.float64)
print("aten gemms ok")
"""


def test_blas_chain_on_aten_views():
    """SPINAL_OPS_DIRECT_BLAS=0: the chain's GEMMs and activations go through ATen views, the path
    CUDA tensors take, and meet the same contract (wide layers, wrapping windows, no bias, no
    projection, every gradient mask)."""
    env = {**os.environ, "SPINAL_OPS_DIRECT_BLAS": "0"}
    script = ATEN_GEMM_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "aten gemms ok" in result.stdout


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="PyTorch without MKL: its BLAS may not export sgemm_")
def test_blas_chain_calls_pytorchs_blas_directly():
    assert cpu_direct_blas()


# bfloat16 on every CPU path (docs/design.md): the narrow chain (the edge cases above, in bfloat16
# by test_contract_against_float64_reference), narrow layers at large batch, and the hoisted chain's regimes, whose products run
# where the CPU multiplies bfloat16 natively (cpu_bf16_gemm(); float32 kernels elsewhere) on the
# AVX512_BF16 tile GEMM (cpu_bf16_tile_gemm(): products up to 2^24 multiply-adds) or oneDNN's
# bfloat16 GEMM: grouped and ungrouped wide layers, the tile GEMM's sizes, training row blocks, a
# projection of few columns (float32 skinny product) and of many.
BF16_HOISTED_CASES = {
    **{name: (lambda name=name: build(name, "relu"), 5) for name in WIDE_CASES},
    "wide_gelu": (lambda: build("wide_k2_overlap", "gelu"), 5),
    "wide_tanh_M_None": (lambda: build("medium_grouped_M_None", "tanh"), 5),
    **{f"tile_{name}": (lambda name=name: tile_gemm_config(name), 37) for name in TILE_GEMM_CASES},
    "grouped_row_blocks": (lambda: make_config(21, 10, num_splits=3, layer_width=128, num_layers=4), 600),
    "projection_of_40_columns": (lambda: make_config(64, 40, layer_width=48, num_layers=3), 70),
    # Two of the benchmark's presets (docs/contract.md §6): products 128 and 1024 deep, M = 1000.
    # Narrow layers from batch 2048 on (csrc/cpu/dtypes.h, kBfloat16NarrowChainMaxBatch).
    "narrow_large_batch": (lambda: make_config(320, 10, layer_width=8, num_layers=6), 2100),
    "preset_vgg5": (lambda: make_config(256, 10, layer_width=128, num_layers=4), 64),
    "preset_resnet_head": (lambda: make_config(2048, 1000, layer_width=256, num_layers=4), 32),
    # The bfloat16 tiles' edges: an odd depth (s = 23, windows wrapping past N = 45) read through
    # packed pairs, panels of 3 vectors (w = 40) and of 4 + 1 (M = 70), rows past the last 4-row
    # tile (37), leaky ReLU's loops on bfloat16.
    "bf16_tile_edges": (lambda: make_config(45, 70, layer_width=40, num_layers=3, split_size=23,
                                            activation="leaky_relu", negative_slope=0.1), 37),
    # Weight gradients of at most 64 rows deeper than one depth chunk pack b chunk by chunk inside
    # the product: an odd batch ends in a chunk of odd depth, over wrapped windows and M = 70.
    "bf16_fused_b_packing": (lambda: make_config(45, 70, layer_width=40, num_layers=3, split_size=23,
                                                 activation="leaky_relu", negative_slope=0.1), 301),
    "narrow_fused_b_packing_odd_batch": (lambda: make_config(320, 10, layer_width=8, num_layers=6), 2101),
    # resnet_head at batch 128: products beyond the bfloat16 tiles' limit run on oneDNN, the
    # rest on the tiles, in one call.
    "tiles_and_onednn": (lambda: make_config(2048, 1000, layer_width=256, num_layers=4), 128),
}


@pytest.mark.parametrize("name", BF16_HOISTED_CASES)
def test_bfloat16_hoisted_chain(name):
    make, batch = BF16_HOISTED_CASES[name]
    config = make()
    check_backend("cpu", config, torch.bfloat16, batch_shape=(batch,))


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return {flag for line in cpuinfo if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo to read the CPU's flags from")
def test_bfloat16_gemm_runs_where_the_cpu_multiplies_bfloat16():
    expected = "avx512_bf16" in _cpu_flags() and torch.backends.mkldnn.is_available()
    expected = expected and os.environ.get("SPINAL_OPS_CPU_BF16_GEMM") != "0"
    assert cpu_bf16_gemm() == expected


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo to read the CPU's flags from")
def test_bfloat16_tiles_run_where_the_cpu_has_avx512_bf16_and_torch_uses_avx512():
    flags = _cpu_flags()
    expected = cpu_bf16_gemm() and {"avx512_bf16", "avx512bw", "avx512vl"} <= flags
    expected = expected and torch.backends.cpu.get_cpu_capability() == "AVX512"
    assert cpu_bf16_tile_gemm() == expected


@pytest.mark.skipif(not cpu_bf16_tile_gemm(), reason="the bfloat16 tiles do not run here (oneDNN's bits may follow the threads)")
def test_bfloat16_tiles_same_bits_with_one_thread_or_two():
    """The bfloat16 tiles split a product into tasks of rows by column panels, each output summed
    by one task in a fixed order: two threads give the bits of one, and the contract holds with two
    (batch 300: five row blocks; w = 100 in grouped layers: panels of 4, 3 and 1 vectors)."""
    make, _ = BF16_HOISTED_CASES["tile_ragged_panels"]
    config = make()
    torch.manual_seed(0)
    layer = SpinalLinear(config.in_features, config.out_features, layer_width=config.layer_width,
                         num_layers=config.num_layers, split_size=config.split_size, backend="cpu").to(torch.bfloat16)
    x = torch.randn(300, config.in_features, dtype=torch.bfloat16, requires_grad=True)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            layer.zero_grad()
            x.grad = None
            y = layer(x)
            y.float().square().sum().backward()
            results.append([y.detach(), x.grad, *(p.grad for p in layer.parameters())])
        check_backend("cpu", config, torch.bfloat16, batch_shape=(300,))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results):
        assert torch.equal(one, two)


BF16_PATHS_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from contract import case_config, check_backend
from test_cpu_backend import BF16_HOISTED_CASES
from spinal_ops._extension import cpu_bf16_gemm, cpu_bf16_tile_gemm, cpu_vector_kernels

print("capability", torch.backends.cpu.get_cpu_capability(), "bf16 gemm", cpu_bf16_gemm(),
      "bf16 tiles", cpu_bf16_tile_gemm(),
      "vector kernels", cpu_vector_kernels())
for name in ("k2_groups", "odd_N_wraps", "M_None"):
    config = case_config(name, activation="gelu", negative_slope=0.1)
    check_backend("cpu", config, torch.bfloat16, batch_shape=(37,))
for name in ("wide_k2_overlap", "wide_wraps", "tile_ragged_panels", "grouped_row_blocks", "bf16_tile_edges"):
    make, batch = BF16_HOISTED_CASES[name]
    check_backend("cpu", make(), torch.bfloat16, batch_shape=(batch,))
print("bf16 paths ok")
"""


@pytest.mark.parametrize(
    "env",
    [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ATEN_CPU_CAPABILITY": "default"}, {"SPINAL_OPS_CPU_BF16_GEMM": "0"}],
    ids=["avx2", "default", "float32_engine"],
)
def test_bfloat16_paths_under_other_capabilities(env):
    """PyTorch's AVX2 and portable kernels (narrow layers then run the hoisted chain, on the
    bfloat16 engine where the CPU has it), and the float32 engine for bfloat16
    (SPINAL_OPS_CPU_BF16_GEMM=0: what a CPU without AVX512_BF16 runs) meet the same contract."""
    script = BF16_PATHS_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bf16 paths ok" in result.stdout
    assert "bf16 tiles False" in result.stdout  # the tiles need PyTorch's AVX-512 kernels and AVX512_BF16
