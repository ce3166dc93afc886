"""The triton backend against the float64 reference (contract §4), on CUDA tensors where a GPU is
present, else on CPU tensors through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1). Sizes are small: the interpreter runs every program in Python."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from contract import (
    check_backend,
    check_gradient_masks,
    check_inference_keeps_no_pre_activation,
    check_tf32_choice_reaches_backward,
    make_config,
    random_params,
)
from spinal_ops import ACTIVATIONS, BackendUnavailableError, SpinalLinear, available_backends
from spinal_ops.backends.triton import INTERPRETER_ENABLED
from spinal_ops.config import SpinalParams
from spinal_ops.dispatch import get_backend, select_backend
from spinal_ops.functional import apply_spinal

pytestmark = pytest.mark.skipif(
    not available_backends()["triton"], reason=f"triton backend unavailable: {available_backends()['triton'].reason}"
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CONFIGS = {
    "odd_N_wrap_around": dict(in_features=7, out_features=3),  # s = 4: layers 1 and 2 wrap past N
    "single_layer": dict(in_features=9, out_features=4, num_layers=1),
    "no_output_projection": dict(in_features=7, out_features=None),
    "width_17_no_bias": dict(in_features=11, out_features=5, layer_width=17, bias=False),
    "width_1_split_1": dict(in_features=5, out_features=2, layer_width=1, split_size=1, num_layers=4),
    "split_equals_N": dict(in_features=6, out_features=3, split_size=6),
    "many_chunks": dict(in_features=70, out_features=40, layer_width=24, num_splits=2),  # s, M past one block
    "three_splits_long_chain": dict(in_features=30, out_features=6, num_splits=3, num_layers=7),
    "max_width": dict(in_features=12, out_features=3, layer_width=128, num_layers=2),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_matrix_float32(name):
    check_backend("triton", make_config(**CONFIGS[name]), torch.float32, DEVICE, batch_shape=(5,))


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


def test_non_contiguous_input():
    config = make_config(in_features=7, out_features=3)
    x = torch.randn(7, 10, dtype=torch.float64).t()  # [10, 7], column-major
    check_backend("triton", config, torch.float32, DEVICE, x=x)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf*0
def test_nan_and_inf_propagate_as_in_reference():
    config = make_config(in_features=7, out_features=3, activation="tanh")
    x = torch.randn(6, 7, dtype=torch.float64)
    x[1, 2] = float("nan")
    x[3, 0] = float("inf")
    check_backend("triton", config, torch.float32, DEVICE, x=x)


def test_empty_batch():
    config = make_config(in_features=7, out_features=3)
    params = random_params(config, torch.Generator().manual_seed(0), torch.float32)
    params = SpinalParams(*(None if p is None else p.to(DEVICE).requires_grad_() for p in params))
    x = torch.empty(0, 7, device=DEVICE, requires_grad=True)
    y = apply_spinal(x, params, config, "triton")
    assert y.shape == (0, 3)
    y.sum().backward()
    assert x.grad.shape == (0, 7)
    assert torch.equal(params.weight_in.grad, torch.zeros_like(params.weight_in))
    assert torch.equal(params.bias_out.grad, torch.zeros_like(params.bias_out))


def test_direct_op_call_rejects_bad_input_before_launch():
    config = make_config(in_features=7, out_features=3)
    params = [p.to(DEVICE) for p in random_params(config, torch.Generator().manual_seed(0), torch.float32)]
    forward = torch.ops.spinal_ops.triton_forward
    bad_hidden = torch.zeros(2, 5, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight_hidden must have shape \(2, 5, 5\)"):
        forward(torch.randn(4, 7, device=DEVICE), params[0], bad_hidden, *params[2:], "relu", 0.01)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        forward(torch.randn(4, 7, device=DEVICE), *params, "swish", 0.01)
    with pytest.raises(ValueError, match="x must be contiguous"):
        forward(torch.randn(7, 4, device=DEVICE).t(), *params, "relu", 0.01)
    with pytest.raises(TypeError, match="dtype"):
        forward(torch.randn(4, 7, device=DEVICE, dtype=torch.float16), *params, "relu", 0.01)


def test_supports_gives_reasons():
    backend = get_backend("triton")
    device = torch.device(DEVICE)
    assert backend.supports(make_config(), torch.float32, device)
    too_wide = backend.supports(make_config(layer_width=129), torch.float32, device)
    assert not too_wide and "layer_width 129" in too_wide.reason
    float64 = backend.supports(make_config(), torch.float64, device)
    assert not float64 and "float64" in float64.reason
    with pytest.raises(BackendUnavailableError, match="register budget"):
        select_backend("triton", make_config(layer_width=200), torch.float32, device)
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


def test_auto_uses_triton_only_for_cuda_tensors():
    assert not get_backend("triton").auto_eligible(torch.device("cpu"))
    assert select_backend("auto", make_config(), torch.float32, torch.device("cpu")).name != "triton"


def test_backward_mask_and_inference():
    # No bias and no projection keeps the mask combinations few (the interpreter is slow); the
    # mask then decides which gradients are returned, and the forward drops Z under no_grad.
    config = make_config(in_features=7, out_features=None, bias=False)
    check_gradient_masks("triton", config, "spinal_ops::triton_backward", torch.float32, DEVICE)
    check_inference_keeps_no_pre_activation("triton", config, "spinal_ops::triton_forward", 6, torch.float32, DEVICE)
    check_tf32_choice_reaches_backward("triton", config, "spinal_ops::triton_forward", "spinal_ops::triton_backward",
                                       DEVICE)


def test_opcheck():
    config = make_config(in_features=7, out_features=3)
    params = random_params(config, torch.Generator().manual_seed(1), torch.float32)
    x = torch.randn(4, 7)
    args = [t.to(DEVICE) if t is not None else None for t in (x, *params)]
    args = [t.requires_grad_() if t is not None else None for t in args]
    torch.library.opcheck(torch.ops.spinal_ops.triton_forward.default, (*args, "silu", 0.01))
    x, weight_in, weight_hidden, bias, weight_out, bias_out = (t.detach() for t in args)
    _, pre_activation = torch.ops.spinal_ops.triton_forward(
        x, weight_in, weight_hidden, bias, weight_out, bias_out, "silu", 0.01
    )
    grad_out = torch.randn(4, 3, device=DEVICE)
    torch.library.opcheck(
        torch.ops.spinal_ops.triton_backward.default,
        (grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, [True] * 6, "silu", 0.01),
    )


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    layer = SpinalLinear(9, 4, layer_width=6, num_layers=3, backend="triton").to(DEVICE)
    x = torch.randn(5, 9, device=DEVICE, requires_grad=True)
    # aot_eager traces forward and backward graphs like inductor but skips C++ codegen on CPU.
    compiled = torch.compile(layer, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    y_compiled = compiled(x)
    y_eager = layer(x)
    torch.testing.assert_close(y_compiled, y_eager)
    (grad_compiled,) = torch.autograd.grad(y_compiled.sum(), x)
    (grad_eager,) = torch.autograd.grad(y_eager.sum(), x)
    torch.testing.assert_close(grad_compiled, grad_eager)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter skips Triton's compiler (and its typing rules); this runs the real one,
    # through ptxas, for an H100 target. Needs TRITON_INTERPRET unset, hence the subprocess.
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    script = repo / "scripts" / "triton_aot.py"
    result = subprocess.run([sys.executable, str(script), "90", "--quick"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("registers") == 6, result.stdout
