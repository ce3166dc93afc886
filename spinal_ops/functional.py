"""The functional form of the spinal layer: spinal_linear(x, weights..., split_size=...)."""
from __future__ import annotations

from typing import Optional

import torch

from .config import SpinalConfig, SpinalNorm, SpinalParams, TrainingStages
from .dispatch import select_backend
from .dropout import draw_seed


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


def folded_norm(params: SpinalParams, norm: SpinalNorm, config: SpinalConfig) -> SpinalParams:
    """The parameters of eval mode's layer with batch norm folded in: BN(z) = scale * z + shift
    with scale = gamma / sqrt(running_var + eps), shift = beta - running_mean * scale, so each
    layer's rows of weight_in and weight_hidden scale by ``scale`` and its bias becomes
    bias * scale + shift. Differentiable in every parameter (eval-mode fine-tuning)."""
    scale = torch.rsqrt(norm.running_var + config.norm_eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    bias = shift if params.bias is None else params.bias * scale + shift
    bias_out = params.bias_out
    if bias_out is None and params.weight_out is not None:  # the folded layer has biases throughout
        bias_out = params.weight_out.new_zeros(params.weight_out.shape[0])
    return SpinalParams(
        params.weight_in * scale[:, :, None], params.weight_hidden * scale[1:, :, None], bias,
        params.weight_out, bias_out,
    )


def apply_spinal(x: torch.Tensor, params: SpinalParams, config: SpinalConfig, backend: str = "auto", *,
                 training: bool = False, norm: Optional[SpinalNorm] = None) -> torch.Tensor:
    """Run the layer described by ``config`` on ``x`` [..., N] -> [..., output_features].

    Under ``torch.autocast`` the input and parameters are cast to the autocast dtype first,
    as ``nn.Linear`` computes in it. A layer with dropout or batch norm (``norm``: its state) runs
    them when ``training``; otherwise it runs without dropout and with batch norm folded into the
    weights, on any backend.
    """
    # One query for "any autocast region at all" first: it spares every other call the per-device ones.
    if torch._C._is_any_autocast_enabled():
        x, params = _cast_for_autocast(x, params)
    config.check_input(x, params)
    stages = None
    if config.has_training_stages:
        if (norm is None) != (config.norm is None):
            raise ValueError(
                f"spinal_ops: a layer with norm={config.norm!r} needs its batch-norm state (SpinalNorm) "
                "and a layer without norm takes none"
            )
        if training:
            if config.dropout > 0 and _capturing_cuda_graph(x):
                raise RuntimeError(
                    "spinal_ops: a layer with dropout cannot be captured in a CUDA graph while training: its "
                    "mask seed is drawn on the host at each call, so every replay would reuse the captured "
                    "mask; capture it in eval() mode, or without dropout"
                )
            stages = TrainingStages(draw_seed() if config.dropout > 0 else None, norm)
        else:
            if norm is not None:
                params = folded_norm(params, _norm_like(norm, x), config)
            config = config.inference_config()
    impl = select_backend("reference" if _onnx_exporting() else backend, config, x.dtype, x.device)
    rows = x if x.dim() == 2 else x.reshape(-1, config.in_features)
    # Only a training call passes stages: backends without them keep their plain signature's speed.
    y = impl.forward(rows, params, config) if stages is None else impl.forward(rows, params, config, stages)
    # A 2-D input returns y itself, not a view: FSDP2 warns about modules returning views.
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], config.output_features)


def _capturing_cuda_graph(x: torch.Tensor) -> bool:
    """Whether this call is being captured into a CUDA graph (never while torch.compile traces:
    its graphs run the seed draw at every call)."""
    return x.is_cuda and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing()


def _norm_like(norm: SpinalNorm, x: torch.Tensor) -> SpinalNorm:
    """The batch-norm state in the compute dtype (under autocast the weights are cast, the
    float32 running statistics are not)."""
    if norm.running_mean.dtype == x.dtype:
        return norm
    weight, bias, mean, var, count = norm
    return SpinalNorm(*(None if t is None else t.to(x.dtype) for t in (weight, bias, mean, var)), count)


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
    dropout: float = 0.0,
    training: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Spinal layer on ``x`` of shape [..., N] with the packed parameters of contract §2.

    ``weight_in`` [L, w, s], ``weight_hidden`` [L-1, w, w], ``bias`` [L, w] or None,
    ``weight_out`` [M, L*w] or None (then the hidden concatenation [..., L*w] is returned),
    ``bias_out`` [M] or None. ``dropout`` applies when ``training``, as ``F.dropout`` (batch norm,
    which keeps state, is ``SpinalLinear``'s ``norm="batch"``).
    """
    params = SpinalParams(weight_in, weight_hidden, bias, weight_out, bias_out)
    if x.dim() < 1:
        raise ValueError(f"spinal_ops: input must have at least one dimension, got shape {tuple(x.shape)}")
    config = SpinalConfig.from_params(
        x.shape[-1], params, split_size=split_size, activation=activation, negative_slope=negative_slope,
        dropout=dropout,
    )
    return apply_spinal(x, params, config, backend, training=training)
