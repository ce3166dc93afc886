"""Capture in a CUDA graph (``torch.cuda.graph``): a training step of the spinal layer captured once
and replayed on new input values gives the output and gradients of the eager step on those values,
within contract §4 of the float64 reference; batch norm's running statistics advance once per
replay; a training call with dropout refuses capture (its seed is drawn on the host, so a replay
would repeat the captured mask). ``spinal-bench --cuda-graphs`` times steps captured this way.

The capture tests need a GPU and skip cleanly without one; the dropout refusal is also checked on
CPU through the capture test the layer makes.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import spinal_ops.functional
from contract import assert_within_contract
from spinal_ops import SpinalLinear
from spinal_ops.bench.graphs import graphed_step
from spinal_ops.dispatch import BackendUnavailableError, select_backend

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (name, SpinalLinear keyword arguments): a narrow layer, a tile-width layer, one beyond the tiles.
SHAPES = {
    "narrow": dict(in_features=40, out_features=10, layer_width=8, num_layers=6),
    "tile": dict(in_features=96, out_features=10, layer_width=64, num_layers=4),
    "wide": dict(in_features=600, out_features=12, layer_width=300, num_layers=3),
}


def _paths(backend: str):
    """The cuda backend's two paths, each forced; one run for the others."""
    if backend != "cuda":
        return [contextlib.nullcontext]
    from spinal_ops.backends.cuda import forced_path

    return [lambda: forced_path("native"), lambda: forced_path("hoisted")]


def _step(layer: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    def step():
        y = layer(x)
        return (y,) + torch.autograd.grad(y, [x, *layer.parameters()], grad_out)

    return step


@requires_cuda
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("backend", ("cuda", "triton", "reference"))
def test_replay_matches_eager_on_new_inputs(backend, shape, dtype):
    device = torch.device("cuda")
    kwargs = SHAPES[shape]
    try:
        select_backend(backend, SpinalLinear(**kwargs).config, dtype, device)
    except BackendUnavailableError as error:
        pytest.skip(str(error))
    for path in _paths(backend):
        torch.manual_seed(0)
        layer = SpinalLinear(**kwargs, backend=backend, device=device, dtype=dtype)
        x = torch.randn(33, kwargs["in_features"], device=device, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(33, kwargs["out_features"], device=device, dtype=dtype)
        with path():
            replay = graphed_step(_step(layer, x, grad_out), device)
            with torch.no_grad():  # new values in the captured input and output gradient
                x.copy_(torch.randn_like(x))
                grad_out.copy_(torch.randn_like(grad_out))
            got = [t.clone() for t in replay()]
        layer64 = SpinalLinear(**kwargs, backend="reference", dtype=torch.float64)
        layer64.load_state_dict(layer.state_dict())
        x64 = x.detach().double().cpu().requires_grad_(True)
        expected = _step(layer64, x64, grad_out.double().cpu())()
        eager_ref = SpinalLinear(**kwargs, backend="reference", device=device, dtype=dtype)
        eager_ref.load_state_dict(layer.state_dict())
        eager = _step(eager_ref, x.detach().clone().requires_grad_(True), grad_out)()
        for index, (out, ref, eag) in enumerate(zip(got, expected, eager)):
            assert_within_contract(f"{backend} {shape} replay tensor {index}", out, ref.detach(), eag, dtype)


@requires_cuda
@pytest.mark.parametrize("backend", ("cuda", "reference"))
def test_batch_norm_statistics_advance_per_replay(backend):
    device = torch.device("cuda")
    layer = SpinalLinear(48, 10, layer_width=16, num_layers=3, norm="batch", backend=backend, device=device)
    x = torch.randn(64, 48, device=device, requires_grad=True)
    grad_out = torch.randn(64, 10, device=device)
    replay = graphed_step(_step(layer, x, grad_out), device)  # 3 warm-up calls and the captured one
    counted = int(layer.num_batches_tracked)
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    assert int(layer.num_batches_tracked) == counted + 3
    # The running mean moves towards the batch mean at every replay (momentum 0.1), as eager does.
    expected = layer.running_mean.clone()
    eager = SpinalLinear(48, 10, layer_width=16, num_layers=3, norm="batch", backend="reference", device=device)
    eager.load_state_dict(layer.state_dict())
    replay()
    eager(x)
    torch.testing.assert_close(layer.running_mean, eager.running_mean, rtol=1e-5, atol=1e-6)
    assert not torch.equal(layer.running_mean, expected)


@requires_cuda
def test_dropout_refuses_capture_while_training():
    device = torch.device("cuda")
    layer = SpinalLinear(48, 10, layer_width=16, num_layers=3, dropout=0.5, device=device)
    x = torch.randn(64, 48, device=device)
    with pytest.raises(RuntimeError, match="dropout cannot be captured in a CUDA graph"):
        graphed_step(lambda: layer(x), device)
    layer.eval()  # no dropout in eval(): capture works and replays the eager output
    replay = graphed_step(lambda: layer(x), device)
    torch.testing.assert_close(replay(), layer(x), rtol=0, atol=0)


def test_dropout_refusal_comes_before_any_kernel(monkeypatch):
    # Where capture is detected (a CUDA tensor under torch.cuda.graph), the call raises before it
    # draws a seed or runs a backend.
    monkeypatch.setattr(spinal_ops.functional, "_capturing_cuda_graph", lambda x: True)
    monkeypatch.setattr(spinal_ops.functional, "draw_seed", lambda: pytest.fail("a seed was drawn"))
    layer = SpinalLinear(12, 3, layer_width=4, num_layers=3, dropout=0.2)
    with pytest.raises(RuntimeError, match="dropout cannot be captured"):
        layer(torch.randn(5, 12))
    layer.eval()
    assert layer(torch.randn(5, 12)).shape == (5, 3)


def test_capture_needs_a_cuda_device():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        graphed_step(lambda: None, torch.device("cpu"))
