"""The fused CUDA kernels' own source, run on CPU through tests/cuda_emulation/cuda_shim.h,
against the float64 reference (SPEC §4 criterion): tiling, windows, wrap-around, padding,
partial tiles, the backward chain, dx over overlapping windows and the split-K reduction
are all checked without a GPU. Every accumulator policy runs: exact fp32 (SIMT), the TF32
and fp16/bf16 WMMA paths (fragment layouts modelled; TF32 rounding is not). The op's
multi-launch path for w > 256 (csrc/cuda/multi_launch.cu, plain ATen) runs here too.

Needs the CUDA headers (cuda_fp16.h) and a C++ compiler; builds once per session (~1 min).
"""
from __future__ import annotations

import os

import pytest
import torch

from contract import ATOL_PER_SCALE, GRAD_NAMES, _run, make_config, random_params
from spinal_ops.config import SpinalParams

pytestmark = pytest.mark.slow  # ~1 min to build the harness, ~1 min to run on 2 cores

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_include() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    for root in filter(None, (CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda")):
        if os.path.exists(os.path.join(root, "include", "cuda_fp16.h")):
            return os.path.join(root, "include")
    return None


@pytest.fixture(scope="module")
def emulated_ops():
    include = _cuda_include()
    if include is None:
        pytest.skip("the CUDA headers (cuda_fp16.h) are not installed")
    from torch.utils.cpp_extension import load

    # One build directory per checkout and torch version, not the shared ~/.cache/torch_extensions:
    # newer torch leaves a file named `lock` there (an advisory lock), and torch 2.11, whose lock
    # is that file's mere existence, then waits for it forever.
    build_directory = os.path.join(os.path.dirname(HERE), "build", "cuda_emulation", f"torch-{torch.__version__}")
    os.makedirs(build_directory, exist_ok=True)
    load(
        "spinal_emu",
        [os.path.join(HERE, "cuda_emulation", "emulated_ops.cpp")],
        extra_include_paths=[include],
        extra_cflags=["-O1", "-Wno-attributes"],
        build_directory=build_directory,
        is_python_module=False,
    )
    return torch.ops.spinal_emu


# (dtype, accumulator policy of the kernels)
POLICIES = {
    "fp32_simt": (torch.float32, "simt"),
    "fp32_tf32": (torch.float32, "tf32"),
    "fp16_wmma": (torch.float16, "wmma"),
    "bf16_wmma": (torch.bfloat16, "wmma"),
    "fp32_multi_launch": (torch.float32, "aten"),
    "bf16_multi_launch": (torch.bfloat16, "aten"),
}

CONFIGS = {
    "odd_N_wraps": dict(in_features=7, out_features=3, layer_width=5, num_layers=3),
    "wrap_s40_N70_two_k_chunks": dict(in_features=70, out_features=10, layer_width=33, num_layers=3, split_size=40),
    "no_projection_no_bias": dict(in_features=12, out_features=None, layer_width=6, num_layers=3, bias=False),
    "w1_single_layer": dict(in_features=4, out_features=2, layer_width=1, num_layers=1),
    "two_z_chunks_M_and_N_over_128": dict(in_features=150, out_features=130, layer_width=140, num_layers=2,
                                          split_size=100),
    "columns_no_window_reads": dict(in_features=300, out_features=4, layer_width=8, num_layers=2, split_size=40),
}
WIDE = dict(in_features=20, out_features=5, layer_width=300, num_layers=3, split_size=13)  # w > 256


def _emulated_run(ops, x, params, config, grad_out, policy, sm_count):
    present = [p for p in params if p is not None]
    out, pre_activation = ops.forward(x, *params, config.activation, config.negative_slope, policy)
    grads = ops.backward(grad_out, x, pre_activation, params.weight_in, params.weight_hidden, params.weight_out,
                         config.bias, config.activation, config.negative_slope, policy, sm_count)
    names = [n for n, p in zip(GRAD_NAMES, [x, *params]) if p is not None]
    by_name = dict(zip(GRAD_NAMES, grads))
    assert len(names) == 1 + len(present)
    return [out] + [by_name[n] for n in names]


def _check(ops, config, dtype, policy, batch, sm_count, seed=0):
    generator = torch.Generator().manual_seed(seed)

    # Inputs exact in `dtype`: the float64 reference sees the kernels' inputs, so what is compared
    # is the kernels' arithmetic, not the input rounding.
    def representable(t):
        return None if t is None else t.to(dtype).double()

    params64 = SpinalParams(*(representable(p) for p in random_params(config, generator)))
    x64 = representable(torch.randn(batch, config.in_features, generator=generator, dtype=torch.float64))
    grad_out = torch.randn(batch, config.output_features, generator=generator, dtype=torch.float64)
    expected = _run("reference", x64, params64, config, grad_out)
    params = SpinalParams(*(None if p is None else p.to(dtype) for p in params64))
    eager = _run("reference", x64.to(dtype), params, config, grad_out)
    got = _emulated_run(ops, x64.to(dtype), params, config, grad_out.to(dtype), policy, sm_count)
    names = ["output"] + [n for n, p in zip(GRAD_NAMES, [x64, *params64]) if p is not None]
    for name, ref, eag, out in zip(names, expected, eager, got):
        assert out.shape == ref.shape and out.dtype == dtype, name
        if ref.numel() == 0:
            continue
        assert not out.isnan().any(), f"{name}: NaN (an element the kernel did not write)"
        err = (out.double() - ref).abs().max().item()
        err_eager = (eag.double() - ref).abs().max().item()
        atol = ATOL_PER_SCALE[dtype] * max(1.0, ref.abs().max().item())
        assert err <= 2 * err_eager + atol, f"{policy} {dtype} {name}: {err:.3e} > 2*{err_eager:.3e} + {atol:.1e}"


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kernels_match_reference(emulated_ops, name, policy):
    dtype, mma = POLICIES[policy]
    config = make_config(**CONFIGS[name])
    if dtype != torch.float32:
        # fp16/bf16 round h before the next layer's tensor-core GEMM (as eager does), which can move a
        # z within ~1e-3 of 0 across ReLU's kink and flip a whole gradient term; a smooth activation
        # keeps the comparison about the kernels' indexing and accumulation.
        config = make_config(**CONFIGS[name], activation="gelu")
    # 70 rows: two full and a partial row tile for fp32 (32 rows), a full and a partial for fp16/bf16 (64).
    _check(emulated_ops, config, dtype, mma, batch=70, sm_count=132)


@pytest.mark.parametrize("policy", ["fp32_simt", "bf16_wmma"])
def test_split_k_weight_gradients(emulated_ops, policy):
    # 600 rows and few tiles: the plan splits the rows (>= 256 each) and the last CTA reduces.
    dtype, mma = POLICIES[policy]
    _check(emulated_ops, make_config(**CONFIGS["odd_N_wraps"], activation="gelu"), dtype, mma, batch=600, sm_count=132)


@pytest.mark.parametrize("activation", ["leaky_relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "identity"])
def test_activations(emulated_ops, activation):
    config = make_config(**CONFIGS["odd_N_wraps"], activation=activation, negative_slope=0.2)
    _check(emulated_ops, config, torch.float32, "simt", batch=37, sm_count=132)


@pytest.mark.parametrize("policy", ["fp32_multi_launch", "bf16_multi_launch"])
@pytest.mark.parametrize("bias", [True, False])
def test_multi_launch_path_beyond_fused_width(emulated_ops, policy, bias):
    dtype, mma = POLICIES[policy]
    config = make_config(**WIDE, bias=bias, activation="relu" if dtype == torch.float32 else "gelu")
    _check(emulated_ops, config, dtype, mma, batch=37, sm_count=132)
