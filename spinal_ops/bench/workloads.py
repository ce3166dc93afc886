"""What one benchmark case runs: the implementation under test, its cost, and the timed callable.

Implementations (``--backends``):
  cuda, triton, cpu, reference  the spinal layer through ``SpinalLinear(backend=...)``
  compiled_reference            ``torch.compile`` of ``SpinalLinear(backend="reference")``
  dense                         the dense layer of equal hidden width, Linear(N, L*w) -> phi -> Linear(L*w, M)
  authors_dense                 the dense head of the preset's source model (heads.py; ``--baseline authors``)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..activations import apply_activation
from ..config import MODES, SpinalConfig
from ..dispatch import BackendUnavailableError, select_backend
from ..module import SpinalLinear
from .heads import AUTHORS_IMPL, authors_head

SPINAL_BACKENDS: tuple[str, ...] = ("cuda", "triton", "cpu", "reference")
SPINAL_IMPLS: tuple[str, ...] = SPINAL_BACKENDS + ("compiled_reference",)
IMPLS: tuple[str, ...] = SPINAL_IMPLS + ("dense",)


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


def _authors_head(preset: str | None, config: SpinalConfig):
    head = None if preset is None else authors_head(preset, config)
    if head is None:
        raise ValueError(f"{AUTHORS_IMPL}: preset {preset!r} has no dense head from the paper (heads.AUTHORS_HEADS)")
    return head


def build_impl(impl: str, config: SpinalConfig, dtype: torch.dtype, device: torch.device,
               preset: str | None = None) -> nn.Module:
    """The module that computes ``impl``; ImplUnavailable (with the reason) when it cannot run here.
    ``preset`` names the preset for ``authors_dense`` (its head depends on the source model)."""
    if impl == "dense":
        return dense_baseline(config, dtype, device)
    if impl == AUTHORS_IMPL:
        return _authors_head(preset, config).build(Activation(config), dtype, device)
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


def cost(impl: str, config: SpinalConfig, batch: int, mode: str, preset: str | None = None) -> tuple[int, int]:
    """(analytic matmul FLOPs of the case, parameters of the implementation)."""
    if impl == "dense":
        return config.dense_baseline_step_flops(batch, mode), config.dense_baseline_parameters()
    if impl == AUTHORS_IMPL:
        head = _authors_head(preset, config)
        return head.step_flops(batch, mode), head.num_parameters()
    return config.step_flops(batch, mode), config.num_parameters()


def make_step(model: nn.Module, config: SpinalConfig, batch: int, mode: str,
              dtype: torch.dtype, device: torch.device, seed: int = 0) -> Callable[[], object]:
    """The callable to time for ``mode`` (one of MODES): infer is one forward without autograd;
    train and frozen are forward + backward of a random output gradient, returning the gradients
    w.r.t. the input (train only) and every parameter (nothing accumulates in .grad)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, config.in_features, generator=generator, dtype=dtype, device=device)
    if mode == "infer":
        def infer() -> torch.Tensor:
            with torch.no_grad():
                return model(x)

        return infer
    leaves = list(model.parameters())
    if mode == "train":
        leaves.insert(0, x.requires_grad_(True))
    grad_out = torch.randn(batch, config.output_features, generator=generator, dtype=dtype, device=device)

    def backward() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(model(x), leaves, grad_out)

    return backward
