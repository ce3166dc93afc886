"""The reference math: contract §1 written literally with PyTorch ops (backends/reference.py
runs it as the ``reference`` backend).

This is the ground truth every other backend is tested against. It is written the
way a user would write SpinalNet (slices, cat, one Linear per layer), works for any
dtype and device, and is differentiable twice through ordinary autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import apply_activation
from .config import SpinalConfig, SpinalParams


def input_window(x: torch.Tensor, config: SpinalConfig, layer: int) -> torch.Tensor:
    """Columns c_l(j) = (l*s + j) mod N of ``x``, as slices (cat of two slices when it wraps)."""
    pieces = [x[..., start:stop] for start, stop in config.window(layer)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)


def hidden_states(x: torch.Tensor, params: SpinalParams, config: SpinalConfig) -> torch.Tensor:
    """H = [h_0, ..., h_{L-1}] for input [..., N]."""
    hidden: list[torch.Tensor] = []
    for layer in range(config.num_layers):
        bias = None if params.bias is None else params.bias[layer]
        z = F.linear(input_window(x, config, layer), params.weight_in[layer], bias)
        if layer > 0:
            z = z + F.linear(hidden[-1], params.weight_hidden[layer - 1])
        hidden.append(apply_activation(config.activation, z, config.negative_slope))
    return torch.cat(hidden, dim=-1)


def spinal_forward(x: torch.Tensor, params: SpinalParams, config: SpinalConfig) -> torch.Tensor:
    """y = W_out H + b_out, or H when the layer has no output projection."""
    hidden = hidden_states(x, params, config)
    if params.weight_out is None:
        return hidden
    return F.linear(hidden, params.weight_out, params.bias_out)
