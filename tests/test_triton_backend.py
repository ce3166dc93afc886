"""The triton backend against the float64 reference (contract §4), on CUDA tensors where a GPU is
present, else on CPU tensors through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1). Sizes are small: the interpreter runs every program in Python. What is the
triton backend's own: its cases of the edge-case matrix, half types, the launch budget, supports(),
the interpreter, the ahead-of-time compile. What every backend must do is in tests/test_backends.py.
With SPINAL_OPS_TRITON_TILED=1 in the environment the same tests run the tiled kernels (except the
two that pin the one-block kernels); tests/test_triton_tiled.py tests those on their own."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from contract import (
    case_config,
    check_autograd_node,
    check_backend,
    check_gradient_masks,
    check_inference_keeps_no_pre_activation,
    check_tf32_choice_reaches_backward,
    make_config,
)
from spinal_ops import ACTIVATIONS, available_backends
from spinal_ops._extension import extension_status
from spinal_ops.backends.triton import INTERPRETER_ENABLED, settings
from spinal_ops.dispatch import get_backend

pytestmark = pytest.mark.skipif(
    not available_backends()["triton"], reason=f"triton backend unavailable: {available_backends()['triton'].reason}"
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The cases of the edge-case matrix (tests/contract.py) that reach the kernels' branches: wrapped
# windows, L = 1, M = None, w = 17 without bias, w = 1, s = 1, s = N, windows and output columns
# past one block, a long chain, the widest layer.
TRITON_CASES = ("odd_N_wraps", "L1", "M_None", "w17_no_bias", "w1", "s1", "k1", "many_chunks", "k3_long_chain",
                "w128")


@pytest.mark.parametrize("name", TRITON_CASES)
def test_case_matrix_float32(name):
    check_backend("triton", case_config(name), torch.float32, DEVICE, batch_shape=(5,))


def test_row_tiles_and_batch_dims():
    # 2 x 37 = 74 rows: several row tiles, the last one partial.
    check_backend("triton", make_config(in_features=13, out_features=4), torch.float32, DEVICE, batch_shape=(2, 37))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation(activation):
    config = make_config(in_features=9, out_features=4, activation=activation, negative_slope=0.2)
    check_backend("triton", config, torch.float32, DEVICE, batch_shape=(6,))


# The Triton interpreter multiplies bfloat16 tl.dot operands as their raw uint16 storage
# (triton 3.8): supports() refuses bfloat16 on CPU, and it is tested on a GPU only.
BF16_NEEDS_GPU = pytest.mark.skipif(DEVICE == "cpu", reason="Triton interpreter's bfloat16 tl.dot is wrong")


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=BF16_NEEDS_GPU)])
@pytest.mark.parametrize("activation", ["gelu", "sigmoid"])
def test_half_types(dtype, activation):
    config = make_config(in_features=11, out_features=4, layer_width=6, activation=activation)
    check_backend("triton", config, dtype, DEVICE, batch_shape=(6,))


def test_launch_budget_one_forward_two_backward(monkeypatch):
    from spinal_ops.backends.triton import kernels as triton_kernels

    monkeypatch.setattr(settings, "TILED", False)  # the one-block kernels

    launches = []

    class CountingKernel:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

    for name in ("_forward_kernel", "_backward_data_kernel", "_backward_weights_kernel"):
        monkeypatch.setattr(triton_kernels, name, CountingKernel(name, getattr(triton_kernels, name)))
    config = make_config(in_features=10, out_features=3, num_layers=6)
    check_backend("triton", config, torch.float32, DEVICE, batch_shape=(3,))
    assert launches == ["_forward_kernel", "_backward_data_kernel", "_backward_weights_kernel"]


def test_supports_gives_reasons(monkeypatch):
    monkeypatch.setattr(settings, "TILED", False)  # the one-block kernels' width limit
    backend = get_backend("triton")
    device = torch.device(DEVICE)
    assert backend.supports(make_config(), torch.float32, device)
    too_wide = backend.supports(make_config(layer_width=129), torch.float32, device)
    assert not too_wide and "layer_width 129" in too_wide.reason
    float64 = backend.supports(make_config(), torch.float64, device)
    assert not float64 and "float64" in float64.reason
    on_cpu_bf16 = backend.supports(make_config(), torch.bfloat16, torch.device("cpu"))
    # Without the interpreter (a GPU machine) CPU tensors are refused before the dtype is looked at.
    assert not on_cpu_bf16 and ("bfloat16" if INTERPRETER_ENABLED else "interpreter") in on_cpu_bf16.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU, no-interpreter case")
def test_unavailable_without_interpreter_and_import_stays_lazy():
    script = (
        "import sys, spinal_ops\n"
        "print('triton' in sys.modules, '|', spinal_ops.available_backends()['triton'].reason)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    triton_imported, reason = result.stdout.strip().split(" | ")
    assert triton_imported == "False"
    assert "TRITON_INTERPRET=1" in reason


def test_backward_mask_and_inference():
    # No bias and no projection keeps the mask combinations few (the interpreter is slow); the
    # mask then decides which gradients are returned, and the forward drops Z under no_grad.
    config = case_config("M_None_no_bias")
    check_gradient_masks("triton", config, "spinal_ops::triton_backward", torch.float32, DEVICE)
    check_inference_keeps_no_pre_activation("triton", config, "spinal_ops::triton_forward", 6, torch.float32, DEVICE)
    check_tf32_choice_reaches_backward("triton", config, "spinal_ops::triton_forward", "spinal_ops::triton_backward",
                                       DEVICE)


@pytest.mark.skipif(not extension_status(), reason=f"the compiled extension is not loaded: {extension_status().reason}")
def test_autograd_node_is_the_compiled_pairs():
    # Where _C is loaded the triton pair's autograd is the C++ node of the compiled pairs
    # (csrc/autograd.cpp), not a Python function: saved-tensor hooks, retained graphs, threads,
    # in-place checks and forward-mode AD behave as a built-in op's.
    check_autograd_node("triton", "SpinalTritonBackward", torch.float32, DEVICE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter skips Triton's compiler (and its typing rules); this runs the real one,
    # through ptxas, for an H100 target. Needs TRITON_INTERPRET unset, hence the subprocess.
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    script = repo / "scripts" / "triton_aot.py"
    result = subprocess.run([sys.executable, str(script), "90", "--quick"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    # 3 one-block kernels x 3 variants (one with dropout), 4 tiled kernels x 2 variants and the 3
    # that draw masks with dropout
    assert result.stdout.count("registers") == 20, result.stdout
    assert result.stdout.count(" dropout: ") == 6, result.stdout
