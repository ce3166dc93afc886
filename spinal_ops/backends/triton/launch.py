"""The kernels of the ``triton_forward`` / ``triton_backward`` ops (defined by op_pair.py):
argument checks, the device guard, and the calls into kernels.py (the one-block kernels, w <= 128)
or tiled.py (the tiled kernels, any width, behind the switch of settings.py).

kernels.py and tiled.py (and with them triton) are imported on the first call, which keeps
``import spinal_ops`` fast and working without triton. Both write Z in the same layout, so a
backward runs whichever kernels the switch says, whatever ran the forward. A training call's
dropout (``dropout_seed``, ``dropout_p``) reaches the kernels as scalars; both kernel sets draw the
same masks, so that holds with dropout too.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ...config import SpinalConfig, SpinalParams
from ...dropout import keep_threshold
from . import settings


def _device_guard(tensor: torch.Tensor):
    """Launch on the tensor's GPU (the current stream of that device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


# Checked configs by the arguments' shapes, dtypes and devices (all that the checks read): building
# and checking a SpinalConfig costs ~4x the key, twice per training step. Only calls that passed the
# checks are kept; a full cache is emptied (a process sees few shapes).
_CONFIG_CACHE: dict = {}
_CONFIG_CACHE_SIZE = 256


def _checked_config(x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope) -> SpinalConfig:
    """Direct op calls get SpinalConfig's shape/dtype/device errors before any kernel runs."""
    key = (activation, negative_slope) + tuple(
        None if t is None else (t.shape, t.dtype, t.device) for t in (x, weight_in, weight_hidden, bias, weight_out, bias_out)
    )
    config = _CONFIG_CACHE.get(key)
    if config is None:
        config = _check_config(x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope)
        if len(_CONFIG_CACHE) >= _CONFIG_CACHE_SIZE:
            _CONFIG_CACHE.clear()
        _CONFIG_CACHE[key] = config
    return config


def _check_config(x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope) -> SpinalConfig:
    if x.dim() != 2 or weight_in.dim() != 3:
        raise ValueError(
            f"spinal_ops::triton ops: x must be [B, N] and weight_in [L, w, s], got {tuple(x.shape)} and {tuple(weight_in.shape)}"
        )
    params = SpinalParams(weight_in, weight_hidden, bias, weight_out, bias_out)
    config = SpinalConfig.from_params(
        x.shape[1], params, split_size=weight_in.shape[2], activation=activation, negative_slope=negative_slope
    )
    config.check_input(x, params)
    return config


def _contiguous(*tensors):
    """The kernels index row-major memory; like the compiled ops, these ops accept any strides."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def _dropout(op: str, dropout_seed: Optional[torch.Tensor], dropout_p: float, config: SpinalConfig) -> Optional[tuple]:
    """The kernels' dropout scalars (the 64-bit key, D sites per row, floor(p * 2^32), 1 / (1 - p)), or
    None: no seed, or p = 0, runs the plain kernels. The seed is read on the host (a CPU tensor: no
    device sync)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"spinal_ops::{op}: dropout_p must be a probability in [0, 1), got {dropout_p!r}")
    if dropout_seed is None:
        if dropout_p > 0:
            raise ValueError(f"spinal_ops::{op}: dropout_p = {dropout_p} needs a dropout_seed")
        return None
    if dropout_seed.dim() != 0 or dropout_seed.dtype != torch.int64 or dropout_seed.device.type != "cpu":
        raise ValueError(
            f"spinal_ops::{op}: dropout_seed must be a 0-dim int64 CPU tensor (spinal_ops.dropout.draw_seed()), "
            f"got {tuple(dropout_seed.shape)} {dropout_seed.dtype} on {dropout_seed.device}"
        )
    if dropout_p == 0:
        return None
    _, _, sites_per_row = config.dropout_sites()
    return int(dropout_seed), sites_per_row, keep_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def _kernels(layer_width: int):
    """The module whose kernels run a call of this width (the switch of settings.py)."""
    if settings.use_tiled(layer_width):
        from . import tiled

        return tiled
    from . import kernels

    return kernels


def forward(x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope,
            allow_tf32=False, keep_pre_activation=True, dropout_seed=None, dropout_p=0.0):
    config = _checked_config(x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope)
    dropout = _dropout("triton_forward", dropout_seed, dropout_p, config)
    kernels = _kernels(config.layer_width)
    x, weight_in, weight_hidden, bias, weight_out, bias_out = _contiguous(x, weight_in, weight_hidden, bias, weight_out, bias_out)
    with _device_guard(x):
        out, pre_activation = kernels.spinal_forward(
            x, weight_in, weight_hidden, bias, weight_out, bias_out, activation, negative_slope, dropout
        )
    return out, pre_activation if keep_pre_activation else x.new_empty(0)


def backward(grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, output_mask, activation,
             negative_slope, allow_tf32=False, dropout_seed=None, dropout_p=0.0):
    config = _checked_config(x, weight_in, weight_hidden, None, weight_out, None, activation, negative_slope)
    dropout = _dropout("triton_backward", dropout_seed, dropout_p, config)
    kernels = _kernels(config.layer_width)
    rows = x.shape[0]
    for name, tensor, shape in (
        ("grad_out", grad_out, (rows, config.output_features)),
        ("pre_activation", pre_activation, (rows, config.hidden_features)),
    ):
        if tuple(tensor.shape) != shape or tensor.dtype != x.dtype or tensor.device != x.device:
            raise ValueError(
                f"spinal_ops::triton_backward: {name} must be {shape} {x.dtype} on {x.device}, "
                f"got {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}"
            )
    grad_out, x, pre_activation, weight_in, weight_hidden, weight_out = _contiguous(
        grad_out, x, pre_activation, weight_in, weight_hidden, weight_out
    )
    with _device_guard(x):
        # The kernels compute every weight gradient in one launch (or one per row split and a sum); the mask decides which bias
        # gradients exist (the rest are computed and dropped by autograd).
        return kernels.spinal_backward(
            grad_out, x, pre_activation, weight_in, weight_hidden, weight_out, output_mask[3], output_mask[5],
            activation, negative_slope, dropout,
        )
