"""The reference math: contract §1 written literally with PyTorch ops (backends/reference.py
runs it as the ``reference`` backend).

This is the ground truth every other backend is tested against. It is written the
way a user would write SpinalNet (slices, cat, one Linear per layer), works for any
dtype and device, and is differentiable twice through ordinary autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .activations import apply_activation
from .config import SpinalConfig, SpinalNorm, SpinalParams, TrainingStages
from .dropout import dropped


def input_window(x: torch.Tensor, config: SpinalConfig, layer: int) -> torch.Tensor:
    """Columns c_l(j) = (l*s + j) mod N of ``x``, as slices (cat of two slices when it wraps)."""
    pieces = [x[..., start:stop] for start, stop in config.window(layer)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)


def _normalised(z: torch.Tensor, norm: SpinalNorm, config: SpinalConfig, layer: int, momentum: float) -> torch.Tensor:
    """nn.BatchNorm1d in training mode on layer ``layer``'s pre-activation: batch statistics, and
    the running ones (views into the [L, w] buffers) updated in place."""
    weight = None if norm.weight is None else norm.weight[layer]
    bias = None if norm.bias is None else norm.bias[layer]
    return F.batch_norm(z, norm.running_mean[layer], norm.running_var[layer], weight, bias,
                        training=True, momentum=momentum, eps=config.norm_eps)


def hidden_states(x: torch.Tensor, params: SpinalParams, config: SpinalConfig,
                  stages: Optional[TrainingStages] = None) -> torch.Tensor:
    """H = [h_0, ..., h_{L-1}] for input [..., N] (``stages``: a training call's dropout and batch
    norm, on a 2-D input)."""
    seed = None if stages is None else stages.dropout_seed
    norm = None if stages is None else stages.norm
    # Only a call that drops reads the sites (a plain call, the common one, skips the loop over L).
    site_starts, _, sites_per_row = config.dropout_sites() if seed is not None else ((), 0, 0)
    momentum = 0.0
    if norm is not None:
        norm.num_batches_tracked.add_(1)
        momentum = config.norm_momentum
        if momentum is None:  # cumulative moving average, as nn.BatchNorm1d
            momentum = 1.0 / float(norm.num_batches_tracked)
    hidden: list[torch.Tensor] = []
    for layer in range(config.num_layers):
        bias = None if params.bias is None else params.bias[layer]
        window = input_window(x, config, layer)
        if seed is not None:
            window = dropped(window, seed, site_starts[layer][0], sites_per_row, config.dropout)
        z = F.linear(window, params.weight_in[layer], bias)
        if layer > 0:
            previous = hidden[-1]
            if seed is not None:
                previous = dropped(previous, seed, site_starts[layer][1], sites_per_row, config.dropout)
            z = z + F.linear(previous, params.weight_hidden[layer - 1])
        if norm is not None:
            z = _normalised(z, norm, config, layer, momentum)
        hidden.append(apply_activation(config.activation, z, config.negative_slope))
    return torch.cat(hidden, dim=-1)


def spinal_forward(x: torch.Tensor, params: SpinalParams, config: SpinalConfig,
                   stages: Optional[TrainingStages] = None) -> torch.Tensor:
    """y = W_out H + b_out, or H when the layer has no output projection."""
    hidden = hidden_states(x, params, config, stages)
    if params.weight_out is None:
        return hidden
    if stages is not None and stages.dropout_seed is not None:
        _, projection_start, sites_per_row = config.dropout_sites()
        hidden = dropped(hidden, stages.dropout_seed, projection_start, sites_per_row, config.dropout)
    return F.linear(hidden, params.weight_out, params.bias_out)
