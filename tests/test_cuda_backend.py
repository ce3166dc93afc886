"""The ``cuda`` backend against the float64 reference (contract §4), on a GPU: what is the cuda
backend's own (its two paths, the cost model's choice, supports(), TF32, determinism, streams).
What every backend must do is in tests/test_backends.py.

Skipped cleanly where there is no CUDA device or the extension was built without the CUDA
kernels. The cases hit every code path of csrc/cuda/: partial row tiles (batch 37),
several K-chunks (s > 32), two 128-column chunks of z (128 < w <= 256), several output and dx
column chunks (M, N > 128), padding (w not a multiple of 16, w = 1), wrap-around windows,
L = 1, no output projection, no bias, split-K weight gradients (small batches) and the
hoisted cuBLAS chain (w > 256, and every config again with the path forced, since the cost model
picks it per call).
"""
from __future__ import annotations

import pytest
import torch

from contract import (
    RecordedOps,
    case_config,
    check_autograd_node,
    check_backend,
    check_gradient_masks,
    check_inference_keeps_no_pre_activation,
    check_tf32_choice_reaches_backward,
    random_params,
)
from spinal_ops._extension import cuda_kernels_compiled
from spinal_ops.activations import ACTIVATIONS
from spinal_ops.backends.cuda import (CudaBackend, cuda_path, forced_path, tile_kernel_max_width, tile_kernel_width_limit,
                                      narrow_kernels_fit)
from spinal_ops.config import SpinalParams
from spinal_ops.functional import apply_spinal

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda_kernels_compiled()),
    reason="needs a CUDA device and spinal_ops built with the CUDA kernels",
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The cases of the edge-case matrix (tests/contract.py) that reach the CUDA code paths.
CUDA_CASES = (
    "odd_N_wraps", "wrap_s12_N33", "M_None_s32", "w1", "L1", "no_bias_w10", "s_equals_N", "s1", "two_chunks_wide",
    "columns_no_window_reads", "w_at_tile_limit", "hoisted_w300", "hoisted_no_projection", "k2_groups_of_three",
)
PATHS = ("native", "hoisted")


# ReLU-like kinks: in fp16/bf16 the rounding of h (eager rounds too) can move a z within ~1e-3 of 0
# across the kink, flipping one gradient term of size O(1) in one run and not the other; which run
# flips is luck, so the 2x-eager bound of contract §4 is not a property there. Half-precision tests use
# a smooth activation unless they name one; kinked activations are compared in float32.
KINKED = ("relu", "leaky_relu")


def _config(name: str, dtype: torch.dtype = torch.float32, **overrides):
    if dtype != torch.float32:
        overrides.setdefault("activation", "gelu")
    return case_config(name, **overrides)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CUDA_CASES))
def test_matches_reference(name, dtype, path):
    with forced_path(path):  # configs wider than the native kernels run hoisted either way
        check_backend("cuda", _config(name, dtype), dtype, "cuda", batch_shape=(37,))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["k2_groups_of_three", "wrap_s12_N33"])  # tile and narrow kernels
def test_backward_mask_and_inference(path, name):
    config = _config(name)
    with forced_path(path):
        check_gradient_masks("cuda", config, f"spinal_ops::{path}_backward", torch.float32, "cuda")
        check_inference_keeps_no_pre_activation("cuda", config, f"spinal_ops::{path}_forward", 300, torch.float32,
                                                "cuda")
        check_tf32_choice_reaches_backward("cuda", config, f"spinal_ops::{path}_forward", f"spinal_ops::{path}_backward",
                                           "cuda")


@pytest.mark.parametrize("path", PATHS)
def test_autograd_node_behaves_like_a_builtin_ops(path):
    with forced_path(path):
        check_autograd_node("cuda", f"Spinal{path.capitalize()}Backward", torch.float32, "cuda")


def test_auto_runs_the_path_the_cost_model_names():
    config = _config("wrap_s12_N33")
    for batch, training in ((5, True), (5, False), (70000, True), (70000, False)):
        expected = cuda_path(config, batch, torch.float32, torch.device("cuda"), training).path
        x = torch.randn(batch, config.in_features, device="cuda", requires_grad=training)
        params = random_params(config, torch.Generator().manual_seed(0), dtype=torch.float32)
        params = SpinalParams(*(None if p is None else p.cuda() for p in params))
        with RecordedOps(f"spinal_ops::{expected}_forward") as recorded:
            apply_spinal(x, params, config, "cuda")
        assert len(recorded.calls) == 1, f"batch {batch}: expected the {expected} path"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation(activation, dtype, path):
    if activation in KINKED and dtype != torch.float32:
        pytest.skip("kinked activation: compared in float32 (see KINKED)")
    with forced_path(path):
        check_backend("cuda", _config("wrap_s12_N33", activation=activation, negative_slope=0.2), dtype, "cuda",
                      batch_shape=(37,))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch_shape", [(1,), (2, 3, 5), (70000,)], ids=["batch1", "3d", "batch70000"])
def test_batch_shapes(batch_shape, dtype, path):
    with forced_path(path):
        check_backend("cuda", _config("wrap_s12_N33", dtype), dtype, "cuda", batch_shape=batch_shape)


@pytest.mark.parametrize("name, narrow", [("wrap_s12_N33", True), ("k2_groups_of_three", False)])
def test_native_path_launches_the_narrow_kernels_where_they_fit(name, narrow):
    # w = 16, M = 10: the narrow forward and backward launch 1; w = 24: the tiled ones. Launch 2
    # (weight gradients) is the tiled kernel either way.
    from torch.profiler import ProfilerActivity, profile

    config = _config(name)
    assert narrow_kernels_fit(config) == narrow
    with forced_path("native"), profile(activities=[ProfilerActivity.CUDA]) as prof:
        _forward_backward(config, torch.float32, 300)
        torch.cuda.synchronize()
    names = " ".join(event.key for event in prof.key_averages())
    expected = (["spinal_narrow_forward_kernel", "spinal_narrow_data_grad_kernel"] if narrow
                else ["spinal_forward_kernel", "spinal_data_grad_kernel"])
    for kernel in [*expected, "spinal_weight_grad_kernel"]:
        assert kernel in names, f"{kernel} not launched: {names}"
    assert ("spinal_narrow" in names) == narrow
    assert ("spinal_forward_kernel" in names) == (not narrow)


# The warp-level narrow forward (csrc/cuda/warp_narrow_kernels.cuh): opt-in, never chosen without
# SPINAL_OPS_CUDA_WARP_NARROW=1, which the launcher reads per call (so monkeypatch reaches it).
WARP_NARROW_SHAPES = {
    "mnist": dict(in_features=320, out_features=10, layer_width=8, num_layers=6),
    "mnist_scaled_down": dict(in_features=40, out_features=10, layer_width=8, num_layers=6, split_size=20),
    "w32_M32_wraps": dict(in_features=50, out_features=32, layer_width=32, num_layers=3, split_size=24),
    "w5_no_projection": dict(in_features=7, out_features=None, layer_width=5, num_layers=3),
}


def _switched_on_kernels(monkeypatch, variable: str, config, dtype: torch.dtype, batches, dropout_seed=None) -> str:
    """check_backend on the native path with the opt-in switch `variable`=1 at each batch; the names
    of the CUDA kernels that ran."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv(variable, "1")
    with forced_path("native"), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for batch in batches:
            check_backend("cuda", config, dtype, "cuda", batch_shape=(batch,), dropout_seed=dropout_seed)
        torch.cuda.synchronize()
    return " ".join(event.key for event in prof.key_averages())


def _warp_narrow_kernels(monkeypatch, config, dtype: torch.dtype, batches=(37, 70000), dropout_seed=None) -> str:
    """_switched_on_kernels under SPINAL_OPS_CUDA_WARP_NARROW=1."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the warp-level narrow kernels run on compute capability 8.0 and newer")
    return _switched_on_kernels(monkeypatch, "SPINAL_OPS_CUDA_WARP_NARROW", config, dtype, batches, dropout_seed)


def _warp_narrow_config(name: str, **options):
    from spinal_ops.config import SpinalConfig

    shape = dict(WARP_NARROW_SHAPES[name])
    return SpinalConfig.build(shape.pop("in_features"), shape.pop("out_features"), activation="gelu", **shape,
                              **options)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("name", sorted(WARP_NARROW_SHAPES))
def test_warp_narrow_forward_matches_reference(monkeypatch, name, dtype):
    # Training calls (the forward's Z feeds the backward) at a partial tile and at a batch whose tiles
    # outnumber the persistent grid's warps; the profiler shows the warp-level kernel ran.
    names = _warp_narrow_kernels(monkeypatch, _warp_narrow_config(name), dtype)
    assert "spinal_warp_narrow_forward_kernel" in names, names
    assert "spinal_narrow_forward_kernel" not in names and "spinal_forward_kernel" not in names, names


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("name", sorted(WARP_NARROW_SHAPES))
def test_warp_narrow_backward_matches_reference(monkeypatch, name: str, dtype: torch.dtype) -> None:
    # The switched-on training path: every gradient within contract §4 with launch 1 on the warp-level
    # kernel (at a partial tile and at a batch whose tiles outnumber its persistent grid's warps), and
    # with a dropout on today's launch 1 (the warp-level one has no dropout stage).
    names = _warp_narrow_kernels(monkeypatch, _warp_narrow_config(name), dtype)
    assert "spinal_warp_narrow_data_grad_kernel" in names, names
    assert "spinal_narrow_data_grad_kernel" not in names and "spinal_data_grad_kernel" not in names, names

    dropped = _warp_narrow_config(name, dropout=0.3)
    names = _warp_narrow_kernels(monkeypatch, dropped, dtype, batches=(37,), dropout_seed=1234)
    assert "spinal_warp_narrow_data_grad_kernel" not in names, names


def test_tf32_allowed_stays_within_contract():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:  # the eager reference then uses TF32 too, which sets the error budget; gelu: see KINKED
        check_backend("cuda", _config("two_chunks_wide", activation="gelu"), torch.float32, "cuda", batch_shape=(37,))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _forward_backward(config, dtype, batch, seed=0):
    """Output and all gradients of one forward+backward through the cuda backend."""
    generator = torch.Generator().manual_seed(seed)
    params = random_params(config, generator)
    x = torch.randn(batch, config.in_features, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(batch, config.output_features, generator=generator, dtype=torch.float64)
    leaves = [t.to("cuda", dtype).requires_grad_(True) for t in [x, *(p for p in params if p is not None)]]
    it = iter(leaves[1:])
    run_params = SpinalParams(*(None if p is None else next(it) for p in params))
    y = apply_spinal(leaves[0], run_params, config, "cuda")
    grads = torch.autograd.grad(y, leaves, grad_outputs=grad_out.to("cuda", dtype))
    return [y.detach(), *grads]


@pytest.mark.parametrize("name", ["two_chunks_wide", "wrap_s12_N33"])  # tile and narrow kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [300, 5000], ids=["split_k", "large"])
def test_deterministic(dtype, batch, name):
    config = _config(name)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = _forward_backward(config, dtype, batch)
        second = _forward_backward(config, dtype, batch)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_non_default_stream():
    config = _config("two_chunks_wide")
    expected = _forward_backward(config, torch.bfloat16, 300)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = _forward_backward(config, torch.bfloat16, 300)
    stream.synchronize()
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_supports_reports_the_path():
    backend = CudaBackend()
    limit = tile_kernel_max_width()
    assert limit == 256
    device = torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(device)
    # Before compute capability 8.0 (T4, sm_75) there are no bf16 tensor cores: every bf16 layer takes
    # the hoisted chain, and supports() says why; fp16 runs 32-row tiles (all of w <= 256 in its
    # 64 KB), float32 SimtMma up to w = 96.
    half = torch.bfloat16 if capability >= (8, 0) else torch.float16
    if capability < (8, 0):
        assert tile_kernel_width_limit(device, torch.bfloat16) == 0
        assert tile_kernel_width_limit(device, torch.float32) == tile_kernel_width_limit(device, torch.float32, True) == 96
        for name in ("w1", "w_at_tile_limit"):
            refused = backend.supports(_config(name), torch.bfloat16, torch.device("cuda"))
            assert refused and refused.reason == (
                f"hoisted cuBLAS chain: the native kernels do not run on device {device}: compute capability "
                f"{capability[0]}.{capability[1]} has no bfloat16 tensor cores (the native kernels need 8.0)")
    # 99 KB of opt-in shared memory per block (sm_86/89/120) keeps w <= 192 on the native kernels in bf16.
    optin_99k = capability in ((8, 6), (8, 9), (12, 0))
    assert tile_kernel_width_limit(device, half) == (192 if optin_99k else 256)
    native = backend.supports(_config("w_at_tile_limit"), half, torch.device("cuda"))
    if optin_99k:
        assert native and native.reason.startswith("hoisted cuBLAS chain: w=256 > 192 (the native kernels' shared memory")
    else:
        assert native and "cost model" in native.reason
    wide = backend.supports(_config("hoisted_w300"), half, torch.device("cuda"))
    assert wide and wide.reason == f"hoisted cuBLAS chain: w=300 > {limit}"
    assert not backend.supports(_config("w1"), torch.float64, torch.device("cuda"))
    assert not backend.supports(_config("w1"), torch.float32, torch.device("cpu"))


# The persistent forward (csrc/cuda/persistent_forward.cuh) and backward launch 1
# (persistent_backward.cuh) behind SPINAL_OPS_CUDA_PERSISTENT=1: native_forward and native_backward
# run them at every width. Tile edges: partial row tiles (37 rows), padding (w = 1, 10), two column
# tiles (w = 200), w at the tile limit and beyond it (300), no projection, L = 1, wrap-around windows.
PERSISTENT_CASES = ("odd_N_wraps", "M_None_s32", "w1", "L1", "no_bias_w10", "two_chunks_wide", "w_at_tile_limit",
                    "hoisted_w300")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", PERSISTENT_CASES)
def test_persistent_forward_matches_reference(monkeypatch, name, dtype):
    monkeypatch.setenv("SPINAL_OPS_CUDA_PERSISTENT", "1")
    config = _config(name, dtype)
    gpu = torch.device("cuda")
    assert cuda_path(config, 37, dtype, gpu, False).path == "native"
    check_backend("cuda", config, dtype, "cuda", batch_shape=(37,))
    check_inference_keeps_no_pre_activation("cuda", config, "spinal_ops::native_forward", 300, dtype, "cuda")
    params = random_params(config, torch.Generator().manual_seed(0), dtype=dtype)
    params = SpinalParams(*(None if p is None else p.cuda() for p in params))
    x = torch.randn(300, config.in_features, device=gpu, dtype=dtype)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        apply_spinal(x, params, config, "cuda")
        torch.cuda.synchronize()
    names = [event.name for event in profile.events()]
    assert any("spinal_persistent_forward_kernel" in name for name in names), names


# Wider than the tile kernels (w = 260, 300), two column tiles of dZ and of dx (w = 200, N = 300),
# no projection, wrap-around windows; 37 rows (one partial row tile) and 300 (several, and launch 2
# splits its rows).
PERSISTENT_BACKWARD_CASES = ("odd_N_wraps", "M_None_s32", "two_chunks_wide", "hoisted_w300", "hoisted_no_projection")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", PERSISTENT_BACKWARD_CASES)
def test_persistent_backward_matches_reference(monkeypatch, name, dtype):
    # Training with the switch on: every gradient within contract §4 with the persistent forward and
    # launch 1 and the tile launch 2 at every width; with a dropout the persistent kernels step aside.
    config = _config(name, dtype)
    names = _switched_on_kernels(monkeypatch, "SPINAL_OPS_CUDA_PERSISTENT", config, dtype, (37, 300))
    assert cuda_path(config, 37, dtype, torch.device("cuda"), True).path == "native"
    for kernel in ("spinal_persistent_forward_kernel", "spinal_persistent_data_grad_kernel", "spinal_weight_grad_kernel"):
        assert kernel in names, names
    assert "spinal_data_grad_kernel" not in names and "spinal_narrow_data_grad_kernel" not in names, names

    dropped = _config(name, dtype, dropout=0.3)
    names = _switched_on_kernels(monkeypatch, "SPINAL_OPS_CUDA_PERSISTENT", dropped, dtype, (37,), dropout_seed=1234)
    assert "spinal_persistent_data_grad_kernel" not in names, names


@pytest.mark.parametrize("forward_on", [True, False], ids=["on_then_off", "off_then_on"])
def test_persistent_switch_changed_before_backward_raises(monkeypatch, forward_on):
    # A layer wider than the tile kernels keeps Z in the persistent kernels' layout with the switch
    # on and in the hoisted chain's without: a backward under the other setting must refuse, not
    # read the wrong layout.
    def set_switch(on: bool) -> None:
        if on:
            monkeypatch.setenv("SPINAL_OPS_CUDA_PERSISTENT", "1")
        else:
            monkeypatch.delenv("SPINAL_OPS_CUDA_PERSISTENT", raising=False)

    config = _config("hoisted_w300", torch.float32)
    params = random_params(config, torch.Generator().manual_seed(0), dtype=torch.float32)
    params = SpinalParams(*(None if p is None else p.cuda().requires_grad_() for p in params))
    x = torch.randn(37, config.in_features, device="cuda")
    set_switch(forward_on)
    out, _ = torch.ops.spinal_ops.native_forward(x, *params, config.activation, config.negative_slope, False, True)
    set_switch(not forward_on)
    with pytest.raises(RuntimeError, match="SPINAL_OPS_CUDA_PERSISTENT changed between"):
        out.sum().backward()
