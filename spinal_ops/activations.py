"""Activation functions of contract §1, by name, for the reference backend and for validation.

The op-pair backends receive the activation as its name (a string in the op schema) and
implement the same formulas in their kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS: tuple[str, ...] = (
    "relu",
    "leaky_relu",
    "gelu",
    "gelu_tanh",
    "silu",
    "tanh",
    "sigmoid",
    "identity",
)


def apply_activation(name: str, z: torch.Tensor, negative_slope: float = 0.01) -> torch.Tensor:
    """phi(z) with PyTorch ops; differentiable twice."""
    if name == "relu":
        return F.relu(z)
    if name == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "silu":
        return F.silu(z)
    if name == "tanh":
        return torch.tanh(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    if name == "identity":
        return z
    raise ValueError(f"spinal_ops: unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")
