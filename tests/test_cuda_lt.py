"""The hoisted chain on the cuBLASLt engine (csrc/cuda/lt_engine.cu, opt-in: SPINAL_OPS_CUDA_LT=1)
against the float64 reference (contract §4).

On a GPU (skipped cleanly without one or without the CUDA kernels): outputs and every gradient for
relu and gelu_tanh (activations in the epilogues) and silu (falls back to gemm + ATen's pass), in
float32, float16 and bfloat16, with and without bias, without projection, wrapped windows, L = 1,
odd N; inference across the chain's row blocks; that the epilogues were taken where they should be
(the engine's call counters); NaN and Inf; the TF32 choice; the gradient mask; and a switch that
changes between a forward and its backward. Anywhere: the switch leaves the CPU op and the cuda
backend's path choice as they are (auto and the cost model never choose the engine).
"""
from __future__ import annotations

import pytest
import torch

from contract import (
    assert_within_contract,
    case_config,
    check_backend,
    check_gradient_masks,
    check_tf32_choice_reaches_backward,
    make_config,
    random_params,
)
from spinal_ops._extension import cuda_kernels_compiled, extension_status
from spinal_ops.backends import cuda
from spinal_ops.backends.cuda_cost import model_for
from spinal_ops.config import SpinalConfig, SpinalParams
from spinal_ops.functional import apply_spinal

LT_ENV = "SPINAL_OPS_CUDA_LT"
GPU = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_kernels_compiled()),
                         reason="needs a CUDA device and spinal_ops built with the CUDA kernels")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# relu and gelu_tanh run in the epilogues; silu falls back (gemm on cuBLASLt, ATen's activation).
ACTIVATIONS = ("relu", "gelu_tanh", "silu")
# Odd N with wrapped windows, a wrapped s, no projection, L = 1, no bias, w > the native kernels,
# no projection and no bias wide, groups of three layers.
CASES = ("odd_N_wraps", "wrap_s12_N33", "M_None_s32", "L1", "no_bias_w10", "hoisted_w300", "hoisted_no_projection",
         "k2_groups_of_three")
# Slots aligned to 128 bytes and an aux leading dimension (L*w) divisible by 8: every call fits cuBLASLt.
ALIGNED = dict(in_features=64, out_features=10, layer_width=64, num_layers=4)


@pytest.fixture
def lt_switch(monkeypatch):
    monkeypatch.setenv(LT_ENV, "1")


def _cuda_params(config: SpinalConfig, dtype: torch.dtype, seed: int = 0) -> SpinalParams:
    params = random_params(config, torch.Generator().manual_seed(seed))
    return SpinalParams(*(None if p is None else p.to("cuda", dtype) for p in params))


def _engine_calls() -> list[int]:
    return list(torch.ops.spinal_ops.cuda_lt_engine_calls())


def _check_inference(config: SpinalConfig, dtype: torch.dtype, batch: int) -> None:
    """Contract §4 for the output of a no_grad call (the inference forward: row blocks, no Z kept)."""
    params = _cuda_params(config, dtype)
    x = torch.randn(batch, config.in_features, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x.to("cuda", dtype)
    with torch.no_grad():
        got = apply_spinal(x, params, config, "cuda")
        eager = apply_spinal(x, params, config, "reference")
    params64 = SpinalParams(*(None if p is None else p.double().cpu() for p in params))
    expected = apply_spinal(x.double().cpu(), params64, config, "reference")
    assert_within_contract(f"cuda lt inference {dtype} ({config})", got, expected, eager, dtype)


@GPU
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name", CASES)
def test_matches_reference(lt_switch, name, activation, dtype):
    if activation == "relu" and dtype != torch.float32:
        pytest.skip("kinked activation: compared in float32 (tests/test_cuda_backend.py, KINKED)")
    config = case_config(name, activation=activation)
    with cuda.forced_path("hoisted"):
        check_backend("cuda", config, dtype, "cuda", batch_shape=(37,))
        _check_inference(config, dtype, 37)


@GPU
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_epilogues_are_taken(lt_switch, activation, dtype):
    # On aligned slots every product runs on cuBLASLt; relu and gelu_tanh take their L-1 recurrence
    # steps with the activation in the epilogue (training: relu keeps H in place, gelu_tanh writes Z
    # through GELU_AUX), gelu_tanh its L-1 backward steps with DGELU; silu takes neither.
    config = make_config(**ALIGNED, activation=activation)
    steps = config.num_layers - 1
    params = SpinalParams(*(None if p is None else p.requires_grad_() for p in _cuda_params(config, dtype)))
    x = torch.randn(256, config.in_features, device="cuda", dtype=dtype, requires_grad=True)
    with cuda.forced_path("hoisted"):
        before = _engine_calls()
        with torch.no_grad():
            apply_spinal(x, params, config, "cuda")
        inference = [after - b for after, b in zip(_engine_calls(), before)]
        before = _engine_calls()
        apply_spinal(x, params, config, "cuda").sum().backward()
        training = [after - b for after, b in zip(_engine_calls(), before)]
    in_epilogue = activation != "silu"
    assert inference[0] > 0 and training[0] > 0, (inference, training)
    assert inference[1:] == [steps if in_epilogue else 0, 0], inference
    assert training[1:] == [steps if in_epilogue else 0, steps if activation == "gelu_tanh" else 0], training


@GPU
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ("relu", "gelu_tanh"))
def test_inference_across_row_blocks(lt_switch, activation, dtype):
    # Inference runs row blocks of 2^26 elements of the [rows, L*w] buffer (hoisted_chain.cpp): one
    # full block and a partial one of 37 rows. (Training runs the whole batch at once.)
    config = make_config(in_features=20, out_features=5, layer_width=40, num_layers=8, activation=activation)
    with cuda.forced_path("hoisted"):
        _check_inference(config, dtype, (1 << 26) // config.hidden_features + 37)


@GPU
@pytest.mark.parametrize("activation", ("relu", "gelu_tanh"))
def test_nan_and_inf_propagate_like_the_reference(lt_switch, activation):
    config = case_config("wrap_s12_N33", activation=activation)
    x = torch.randn(37, config.in_features, dtype=torch.float64)
    x[1, 2] = float("nan")
    x[3, 5] = float("inf")
    x[4, 0] = -float("inf")
    with cuda.forced_path("hoisted"):
        check_backend("cuda", config, torch.float32, "cuda", x=x)


@GPU
def test_tf32_choice_and_gradient_mask(lt_switch):
    config = make_config(**ALIGNED, activation="gelu_tanh")
    with cuda.forced_path("hoisted"):
        check_tf32_choice_reaches_backward("cuda", config, "spinal_ops::hoisted_forward",
                                           "spinal_ops::hoisted_backward", "cuda")
        check_gradient_masks("cuda", config, "spinal_ops::hoisted_backward", torch.float32, "cuda")


@GPU
@pytest.mark.parametrize("forward_lt, backward_lt", [("1", "0"), ("0", "1")])
@pytest.mark.parametrize("activation", ("relu", "gelu_tanh"))
def test_switch_may_change_between_forward_and_backward(monkeypatch, activation, forward_lt, backward_lt):
    # Both engines keep the same buffers (group-major Z, or H for relu with a projection).
    config = make_config(**ALIGNED, activation=activation)
    generator = torch.Generator().manual_seed(2)
    x64 = torch.randn(37, config.in_features, generator=generator, dtype=torch.float64)
    grad64 = torch.randn(37, config.output_features, generator=generator, dtype=torch.float64)
    params64 = random_params(config, generator)

    def run(backend: str, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
        leaves = [t.to(device, dtype).requires_grad_() for t in (x64, *params64)]
        y = apply_spinal(leaves[0], SpinalParams(*leaves[1:]), config, backend)
        monkeypatch.setenv(LT_ENV, backward_lt)
        y.backward(grad64.to(device, dtype))
        monkeypatch.setenv(LT_ENV, forward_lt)
        return [y.detach()] + [t.grad for t in leaves]

    monkeypatch.setenv(LT_ENV, forward_lt)
    with cuda.forced_path("hoisted"):
        got = run("cuda", "cuda", torch.float32)
    expected = run("reference", "cpu", torch.float64)
    eager = run("reference", "cuda", torch.float32)
    for index, (out, ref, eag) in enumerate(zip(got, expected, eager)):
        assert_within_contract(f"output/gradient {index}, lt {forward_lt} -> {backward_lt}", out, ref, eag,
                               torch.float32)


# ---- anywhere ------------------------------------------------------------------------------------


@pytest.mark.skipif(not extension_status(), reason="the compiled extension is not built")
def test_switch_leaves_the_cpu_op_alone(monkeypatch):
    # The CPU op never reads the switch: its outputs and gradients are bit for bit the same.
    config = case_config("k2_groups_of_three", activation="gelu_tanh")
    results = []
    for value in ("0", "1"):
        monkeypatch.setenv(LT_ENV, value)
        leaves = [t.float().requires_grad_() for t in (torch.randn(9, config.in_features,
                                                                   generator=torch.Generator().manual_seed(5),
                                                                   dtype=torch.float64),
                                                       *random_params(config, torch.Generator().manual_seed(6)))]
        y = apply_spinal(leaves[0], SpinalParams(*leaves[1:]), config, "cpu")
        y.sum().backward()
        results.append([y.detach()] + [t.grad for t in leaves])
    for off, on in zip(*results):
        assert torch.equal(off, on)


def test_switch_does_not_change_the_path_choice(monkeypatch):
    # auto and the cost model never choose the engine: the cuda backend's path is the same with the
    # switch set (an H100 as the backend would see it; no GPU needed).
    limits = {(dtype, tf32): 256 for dtype, tf32 in ((torch.float32, False), (torch.float32, True),
                                                     (torch.float16, False), (torch.bfloat16, False))}
    monkeypatch.setattr(cuda, "DEVICES", {0: cuda.CudaDevice((9, 0), model_for("NVIDIA H100 80GB HBM3", 132),
                                                             limits)})
    gpu = torch.device("cuda", 0)
    configs = [make_config(in_features=n, out_features=m, layer_width=w, num_layers=4)
               for n, w, m in ((512, 512, 10), (4096, 256, 10), (2048, 256, 1000), (320, 8, 10))]
    cases = [(config, batch, dtype, training) for config in configs for batch in (64, 1024, 65536)
             for dtype in (torch.float32, torch.bfloat16) for training in (False, True)]
    monkeypatch.delenv(LT_ENV, raising=False)
    default = [cuda.cuda_path(config, batch, dtype, gpu, training) for config, batch, dtype, training in cases]
    monkeypatch.setenv(LT_ENV, "1")
    assert [cuda.cuda_path(config, batch, dtype, gpu, training) for config, batch, dtype, training in cases] == default
