"""The functional form of the spinal layer: spinal_linear(x, weights..., split_size=...)."""
from __future__ import annotations

from typing import Optional

import torch

from .config import SpinalConfig, SpinalParams
from .dispatch import select_backend


def _cast_for_autocast(x: torch.Tensor, params: SpinalParams) -> tuple[torch.Tensor, SpinalParams]:
    """Input and parameters in the autocast dtype where an autocast region covers x's device, as
    ``nn.Linear`` computes in it; unchanged elsewhere."""
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type) or not x.is_floating_point():
        return x, params
    dtype = torch.get_autocast_dtype(device_type)
    return x.to(dtype), SpinalParams(*(None if p is None else p.to(dtype) for p in params))


def _onnx_exporting() -> bool:
    """ONNX has no fused spinal op: an exporter traces the reference, whose slices, GEMMs, adds and
    activations are standard ONNX operators. (Every exporter traces, so an eager call skips
    is_in_onnx_export(), which imports on each call.)"""
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
    return tracing and torch.onnx.is_in_onnx_export()


def apply_spinal(x: torch.Tensor, params: SpinalParams, config: SpinalConfig, backend: str = "auto") -> torch.Tensor:
    """Run the layer described by ``config`` on ``x`` [..., N] -> [..., output_features].

    Under ``torch.autocast`` the input and parameters are cast to the autocast dtype first,
    as ``nn.Linear`` computes in it.
    """
    # One query for "any autocast region at all" first: it spares every other call the per-device ones.
    if torch._C._is_any_autocast_enabled():
        x, params = _cast_for_autocast(x, params)
    config.check_input(x, params)
    impl = select_backend("reference" if _onnx_exporting() else backend, config, x.dtype, x.device)
    if x.dim() == 2:
        return impl.forward(x, params, config)  # not a view: FSDP2 warns about modules returning views
    y = impl.forward(x.reshape(-1, config.in_features), params, config)
    return y.reshape(*x.shape[:-1], config.output_features)


def spinal_linear(
    x: torch.Tensor,
    weight_in: torch.Tensor,
    weight_hidden: torch.Tensor,
    bias: Optional[torch.Tensor],
    weight_out: Optional[torch.Tensor],
    bias_out: Optional[torch.Tensor],
    *,
    split_size: int,
    activation: str = "relu",
    negative_slope: float = 0.01,
    backend: str = "auto",
) -> torch.Tensor:
    """Spinal layer on ``x`` of shape [..., N] with the packed parameters of contract §2.

    ``weight_in`` [L, w, s], ``weight_hidden`` [L-1, w, w], ``bias`` [L, w] or None,
    ``weight_out`` [M, L*w] or None (then the hidden concatenation [..., L*w] is returned),
    ``bias_out`` [M] or None.
    """
    params = SpinalParams(weight_in, weight_hidden, bias, weight_out, bias_out)
    if x.dim() < 1:
        raise ValueError(f"spinal_ops: input must have at least one dimension, got shape {tuple(x.shape)}")
    config = SpinalConfig.from_params(
        x.shape[-1], params, split_size=split_size, activation=activation, negative_slope=negative_slope
    )
    return apply_spinal(x, params, config, backend)
