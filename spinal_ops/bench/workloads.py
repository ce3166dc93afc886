"""What one benchmark case runs: the implementation under test, its cost, and the timed callable.

Implementations (``--backends``):
  cuda, triton, cpu, reference  the spinal layer through ``SpinalLinear(backend=...)``
  compiled_reference            ``torch.compile`` of ``SpinalLinear(backend="reference")``
  dense                         the dense layer of equal hidden width, Linear(N, L*w) -> phi -> Linear(L*w, M)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..activations import apply_activation
from ..config import SpinalConfig
from ..dispatch import BackendUnavailableError, select_backend
from ..module import SpinalLinear

SPINAL_BACKENDS: tuple[str, ...] = ("cuda", "triton", "cpu", "reference")
IMPLS: tuple[str, ...] = SPINAL_BACKENDS + ("compiled_reference", "dense")
PASSES: tuple[str, ...] = ("forward", "forward_backward")


class ImplUnavailable(Exception):
    """This implementation cannot run the case here; the message says why."""


class Activation(nn.Module):
    """phi of the config as a module, so the dense baseline uses the same activation code."""

    def __init__(self, config: SpinalConfig) -> None:
        super().__init__()
        self.name, self.negative_slope = config.activation, config.negative_slope

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return apply_activation(self.name, z, self.negative_slope)


def dense_baseline(config: SpinalConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Linear(N, L*w) -> phi -> Linear(L*w, M) (no output Linear when M is None)."""
    factory = {"dtype": dtype, "device": device}
    layers: list[nn.Module] = [
        nn.Linear(config.in_features, config.hidden_features, bias=config.bias, **factory),
        Activation(config),
    ]
    if config.out_features is not None:
        layers.append(nn.Linear(config.hidden_features, config.out_features, bias=config.bias, **factory))
    return nn.Sequential(*layers)


def spinal_layer(config: SpinalConfig, backend: str, dtype: torch.dtype, device: torch.device) -> SpinalLinear:
    return SpinalLinear(
        config.in_features,
        config.out_features,
        layer_width=config.layer_width,
        num_layers=config.num_layers,
        split_size=config.split_size,
        activation=config.activation,
        negative_slope=config.negative_slope,
        bias=config.bias,
        backend=backend,
        device=device,
        dtype=dtype,
    )


def build_impl(impl: str, config: SpinalConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The module that computes ``impl``; ImplUnavailable (with the reason) when it cannot run here."""
    if impl == "dense":
        return dense_baseline(config, dtype, device)
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; expected one of {', '.join(IMPLS)}")
    backend = "reference" if impl == "compiled_reference" else impl
    try:
        select_backend(backend, config, dtype, device)
    except BackendUnavailableError as error:
        raise ImplUnavailable(str(error).removeprefix("spinal_ops: ")) from None
    layer = spinal_layer(config, backend, dtype, device)
    if impl != "compiled_reference":
        return layer
    # Every SpinalLinear shares one forward code object: without a reset, the compiled graphs of
    # earlier presets count against dynamo's recompile limit and later ones silently run eager.
    torch._dynamo.reset()
    return torch.compile(layer)


def cost(impl: str, config: SpinalConfig, batch: int, pass_name: str) -> tuple[int, int]:
    """(analytic matmul FLOPs of the case, parameters of the implementation)."""
    if impl == "dense":
        flops = (config.dense_baseline_forward_flops if pass_name == "forward"
                 else config.dense_baseline_forward_backward_flops)(batch)
        return flops, config.dense_baseline_parameters()
    flops = (config.forward_flops if pass_name == "forward" else config.forward_backward_flops)(batch)
    return flops, config.num_parameters()


def make_step(model: nn.Module, config: SpinalConfig, batch: int, pass_name: str,
              dtype: torch.dtype, device: torch.device, seed: int = 0) -> Callable[[], object]:
    """The callable to time: one forward (no autograd graph), or forward + backward of a random
    output gradient with respect to the input and every parameter (nothing accumulates in .grad)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, config.in_features, generator=generator, dtype=dtype, device=device)
    if pass_name == "forward":
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return model(x)

        return forward
    if pass_name != "forward_backward":
        raise ValueError(f"unknown pass {pass_name!r}; expected one of {', '.join(PASSES)}")
    x.requires_grad_(True)
    leaves = [x, *model.parameters()]
    grad_out = torch.randn(batch, config.output_features, generator=generator, dtype=dtype, device=device)

    def forward_backward() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(model(x), leaves, grad_out)

    return forward_backward
