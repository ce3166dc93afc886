"""The tiled Triton kernels (spinal_ops/backends/triton/tiled.py) against the float64 reference
(contract §4), with the switch of backends/triton/settings.py on: on CUDA tensors where a GPU is
present, else on CPU tensors through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1). The interpreter's blocks are 16 wide (TILED_BLOCKS["interpreter"]), so a layer
of w = 40 runs every K- and column loop three times; shapes stay small, the interpreter runs every
program in Python. Also: the weight gradients split over rows (bitwise the same on every run), the
launches, and the switch (supports() refuses w > 128 without it, the environment sets it)."""
import os
import subprocess
import sys

import pytest
import torch

from contract import (
    case_config,
    check_backend,
    check_gradient_masks,
    check_inference_keeps_no_pre_activation,
    make_config,
    random_params,
)
from spinal_ops import ACTIVATIONS, available_backends
from spinal_ops.backends.triton import settings
from spinal_ops.dispatch import get_backend

pytestmark = pytest.mark.skipif(
    not available_backends()["triton"], reason=f"triton backend unavailable: {available_backends()['triton'].reason}"
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16_NEEDS_GPU = pytest.mark.skipif(DEVICE == "cpu", reason="Triton interpreter's bfloat16 tl.dot is wrong")


@pytest.fixture(autouse=True)
def tiled_kernels_on(monkeypatch):
    monkeypatch.setattr(settings, "TILED", True)


def op_args(config, rows: int) -> tuple:
    """The forward op's arguments: random float32 x and parameters, activation, negative slope."""
    generator = torch.Generator().manual_seed(4)
    params = random_params(config, generator, dtype=torch.float32)
    x = torch.randn(rows, config.in_features, generator=generator)
    tensors = [None if t is None else t.to(DEVICE) for t in (x, *params)]
    return (*tensors, config.activation, config.negative_slope)


def tiled_module():
    from spinal_ops.backends.triton import tiled

    return tiled


# Cases of the edge-case matrix (tests/contract.py): wrapped windows, k = 1, s = 1, L = 1, w = 1, no
# projection, no bias, windows and outputs past one block, a long chain, widths of two and three blocks.
TILED_CASES = ("odd_N_wraps", "k1", "s1", "L1", "w1", "M_None", "M_None_no_bias", "w17_no_bias", "no_bias_w10",
               "many_chunks", "k3_long_chain", "wrap_s12_N33", "medium_grouped", "medium_grouped_M_None")


@pytest.mark.parametrize("name", TILED_CASES)
def test_case_matrix_float32(name):
    check_backend("triton", case_config(name), torch.float32, DEVICE, batch_shape=(5,))


def test_layer_wider_than_two_blocks_with_row_tiles_and_splits():
    # w = 40: three unit chunks and three K-chunks of R; s = 19 on N = 37 wraps; M = 20: two output
    # chunks; 37 rows: three row tiles, the last partial, and (interpreter) weight gradients in splits.
    config = make_config(in_features=37, out_features=20, layer_width=40, num_layers=3)
    check_backend("triton", config, torch.float32, DEVICE, batch_shape=(37,))


def test_wider_than_the_one_block_kernels():
    config = make_config(in_features=6, out_features=3, layer_width=136, num_layers=2)
    check_backend("triton", config, torch.float32, DEVICE, batch_shape=(3,))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation(activation):
    config = make_config(in_features=9, out_features=4, layer_width=20, activation=activation, negative_slope=0.2)
    check_backend("triton", config, torch.float32, DEVICE, batch_shape=(6,))


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=BF16_NEEDS_GPU)])
@pytest.mark.parametrize("activation", ["gelu", "sigmoid"])
def test_half_types(dtype, activation):
    config = make_config(in_features=11, out_features=20, layer_width=24, activation=activation)
    check_backend("triton", config, dtype, DEVICE, batch_shape=(20,))


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU every test runs the GPU's own table row")
@pytest.mark.parametrize("row_tile", ["BLOCK_B", "BLOCK_B_SMALL"])
@pytest.mark.parametrize("kind", ["float32", "half"])
def test_gpu_block_sizes_in_the_interpreter(monkeypatch, kind, row_tile):
    # The sm_90 row's blocks (64 or 16 rows, 32-64 units) on a layer narrower than one of them.
    tiled = tiled_module()
    row = dict(tiled.TILED_BLOCKS[9][kind])
    if row_tile == "BLOCK_B":
        row["sms"] = 1  # 70 rows: two row tiles of 64 are "enough programs"
    monkeypatch.setitem(tiled.TILED_BLOCKS, "interpreter", row)
    assert tiled.launch_blocks(row, 70)["BLOCK_B"] == row[row_tile]
    dtype = torch.float32 if kind == "float32" else torch.float16
    check_backend("triton", case_config("odd_N_wraps"), dtype, DEVICE, batch_shape=(70,))


def test_small_batches_take_smaller_row_tiles():
    tiled = tiled_module()
    row = tiled.TILED_BLOCKS[9]["half"]
    assert tiled.launch_blocks(row, 64)["BLOCK_B"] == row["BLOCK_B_SMALL"] < row["BLOCK_B"]
    assert tiled.launch_blocks(row, 65536)["BLOCK_B"] == row["BLOCK_B"]


def force_splits(monkeypatch, splits: int):
    """Make the weight-gradient launch split its rows into ``splits`` ranges."""
    tiled = tiled_module()

    def fixed(num_rows, num_tiles, workspace_per_split, table):
        block = table["BLOCK_WB"]
        rows_per_split = -(-(-(-num_rows // splits)) // block) * block
        return -(-num_rows // rows_per_split), rows_per_split

    monkeypatch.setattr(tiled, "row_splits", fixed)


SPLIT_CONFIG = dict(in_features=13, out_features=5, layer_width=24, num_layers=3)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_split_weight_gradients_within_contract(monkeypatch, splits):
    # 80 rows in blocks of 16: 1, 2 (48 + 32) or 5 (16 each) splits, each summed in row order, then
    # added in split order by the reduction launch.
    force_splits(monkeypatch, splits)
    check_backend("triton", make_config(**SPLIT_CONFIG), torch.float32, DEVICE, batch_shape=(80,))


@pytest.mark.parametrize("changes", [dict(out_features=None, bias=False), dict(num_layers=1, out_features=None)],
                         ids=["M_None_no_bias", "L1_M_None"])
def test_split_weight_gradients_with_absent_gradients(monkeypatch, changes):
    # The workspace holds only the gradients that exist (no bias, no projection, no hidden weight).
    force_splits(monkeypatch, 3)
    check_backend("triton", make_config(**{**SPLIT_CONFIG, **changes}), torch.float32, DEVICE, batch_shape=(40,))


def backward_once(config, rows: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    args = op_args(config, rows)
    out, pre_activation = torch.ops.spinal_ops.triton_forward(*args)
    grad_out = torch.randn(out.shape, generator=generator).to(out)
    x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope = args[:8]
    return torch.ops.spinal_ops.triton_backward(
        grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, [True] * 6, activation, negative_slope
    )


def test_split_weight_gradients_are_bitwise_the_same_every_run(monkeypatch):
    force_splits(monkeypatch, 3)
    config = make_config(**SPLIT_CONFIG)
    first, second = backward_once(config, 70), backward_once(config, 70)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_row_splits_follow_the_shape_only():
    tiled = tiled_module()
    table = tiled.TILED_BLOCKS[9]["half"]
    # A narrow layer at large batch: few tiles, so the rows are split; every split a multiple of
    # BLOCK_WB rows, together covering the batch, at least min_rows_per_split each.
    tiles = tiled.weight_tiles(4, 128, 128, 10, table)
    splits, rows_per_split = tiled.row_splits(65536, tiles, 100_000, table)
    assert splits > 1 and rows_per_split % table["BLOCK_WB"] == 0
    assert (splits - 1) * rows_per_split < 65536 <= splits * rows_per_split
    assert rows_per_split >= table["min_rows_per_split"]
    assert tiled.row_splits(65536, tiles, 100_000, table) == (splits, rows_per_split)
    # Small batch, a workspace too large, or tiles enough to fill the GPU: one split, no reduction.
    assert tiled.row_splits(64, tiles, 100_000, table)[0] == 1
    assert tiled.row_splits(65536, tiles, table["max_workspace"], table)[0] == 1
    assert tiled.row_splits(65536, table["target_programs"], 100_000, table)[0] == 1


@pytest.mark.parametrize("splits, backward_launches", [(1, 2), (3, 3)])
def test_launches(monkeypatch, splits, backward_launches):
    tiled = tiled_module()
    launches = []

    class CountingKernel:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

    for name in ("_tiled_forward_kernel", "_tiled_backward_data_kernel", "_tiled_backward_weights_kernel",
                 "_reduce_splits_kernel"):
        monkeypatch.setattr(tiled, name, CountingKernel(name, getattr(tiled, name)))
    force_splits(monkeypatch, splits)
    check_backend("triton", make_config(in_features=10, out_features=3, num_layers=4), torch.float32, DEVICE,
                  batch_shape=(40,))
    expected = ["_tiled_forward_kernel", "_tiled_backward_data_kernel", "_tiled_backward_weights_kernel",
                "_reduce_splits_kernel"]
    assert launches == expected[: 1 + backward_launches]


def test_backward_mask_and_inference():
    config = case_config("M_None_no_bias")
    check_gradient_masks("triton", config, "spinal_ops::triton_backward", torch.float32, DEVICE)
    check_inference_keeps_no_pre_activation("triton", config, "spinal_ops::triton_forward", 6, torch.float32, DEVICE)


def test_supports_refuses_wide_layers_without_the_switch(monkeypatch):
    backend = get_backend("triton")
    device = torch.device(DEVICE)
    monkeypatch.setattr(settings, "TILED", False)
    assert backend.supports(make_config(layer_width=128), torch.float32, device)
    too_wide = backend.supports(make_config(layer_width=129), torch.float32, device)
    assert not too_wide
    for part in ("layer_width 129", "layers wider than 128", "need the tiled Triton kernels",
                 "not yet measured on a GPU", "SPINAL_OPS_TRITON_TILED=1"):
        assert part in too_wide.reason
    # A direct op call cannot reach the one-block kernels with a layer they cannot hold.
    with pytest.raises(ValueError, match="SPINAL_OPS_TRITON_TILED=1"):
        torch.ops.spinal_ops.triton_forward(*op_args(make_config(layer_width=129), 2))
    monkeypatch.setattr(settings, "TILED", True)
    for width in (129, 512, 4096):
        assert backend.supports(make_config(layer_width=width), torch.float32, device)


@pytest.mark.parametrize("value, expected", [("1", "True"), ("0", "False")])
def test_switch_is_read_from_the_environment(value, expected):
    script = (
        "import torch, spinal_ops\n"
        "from spinal_ops.backends.triton import settings\n"
        "from spinal_ops.config import SpinalConfig\n"
        "from spinal_ops.dispatch import get_backend\n"
        "ok = get_backend('triton').supports(SpinalConfig.build(8, 3, layer_width=256, num_layers=2), torch.float32,"
        " torch.device('cuda' if torch.cuda.is_available() else 'cpu'))\n"
        "print(settings.TILED, bool(ok))\n"
    )
    env = {**os.environ, "SPINAL_OPS_TRITON_TILED": value}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == [expected, expected]
