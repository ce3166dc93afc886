"""SpinalLinear: the spinal layer as a drop-in ``nn.Module``."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .config import SpinalConfig, SpinalParams
from .dispatch import check_backend_name
from .functional import apply_spinal


class SpinalLinear(nn.Module):
    """SpinalNet fully-connected layer (Kabir et al., 2020), computed by one fused op.

    Input ``[..., in_features]`` -> output ``[..., out_features]`` (or ``[..., L*w]``, the
    hidden concatenation, when ``out_features`` is None). Layer ``l`` reads the input columns
    ``(l*s + j) mod in_features``, ``j < s``, plus the previous layer's output.

    Example::

        layer = SpinalLinear(320, 10, layer_width=8, num_layers=6)
        y = layer(torch.randn(64, 320))  # [64, 10]
    """

    def __init__(
        self,
        in_features: int,
        out_features: Optional[int],
        *,
        layer_width: int,
        num_layers: int,
        num_splits: int = 2,
        split_size: Optional[int] = None,
        activation: str = "relu",
        negative_slope: float = 0.01,
        bias: bool = True,
        backend: str = "auto",
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        check_backend_name(backend)
        self.config = SpinalConfig.build(
            in_features,
            out_features,
            layer_width=layer_width,
            num_layers=num_layers,
            num_splits=num_splits,
            split_size=split_size,
            activation=activation,
            negative_slope=negative_slope,
            bias=bias,
        )
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        for name, shape in self.config.parameter_shapes().items():
            param = None if shape is None else nn.Parameter(torch.empty(shape, **factory))
            self.register_parameter(name, param)
        self.reset_parameters()

    # nn.Linear-style read-only views of the configuration
    in_features = property(lambda self: self.config.in_features)
    out_features = property(lambda self: self.config.out_features)
    layer_width = property(lambda self: self.config.layer_width)
    num_layers = property(lambda self: self.config.num_layers)
    split_size = property(lambda self: self.config.split_size)
    activation = property(lambda self: self.config.activation)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, layer by layer: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        config = self.config
        with torch.no_grad():
            for layer in range(config.num_layers):
                bound = 1.0 / math.sqrt(config.fan_in(layer))
                self.weight_in[layer].uniform_(-bound, bound)
                if layer > 0:
                    self.weight_hidden[layer - 1].uniform_(-bound, bound)
                if self.bias is not None:
                    self.bias[layer].uniform_(-bound, bound)
            if self.weight_out is not None:
                bound = 1.0 / math.sqrt(config.hidden_features)
                self.weight_out.uniform_(-bound, bound)
                if self.bias_out is not None:
                    self.bias_out.uniform_(-bound, bound)

    def params(self) -> SpinalParams:
        # Straight from the parameter dict: nn.Module.__getattr__ per name costs more than the rest of
        # a small layer's Python.
        p = self._parameters
        return SpinalParams(p["weight_in"], p["weight_hidden"], p["bias"], p["weight_out"], p["bias_out"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_spinal(x, self.params(), self.config, self.backend)

    def extra_repr(self) -> str:
        c = self.config
        text = (
            f"in_features={c.in_features}, out_features={c.out_features}, layer_width={c.layer_width}, "
            f"num_layers={c.num_layers}, split_size={c.split_size}, activation={c.activation!r}"
        )
        if c.activation == "leaky_relu":
            text += f", negative_slope={c.negative_slope}"
        return text + f", bias={c.bias}, backend={self.backend!r}"

    @classmethod
    def from_linears(
        cls,
        layers: Sequence[nn.Linear],
        output: Optional[nn.Linear] = None,
        *,
        in_features: int,
        activation: str = "relu",
        negative_slope: float = 0.01,
        batchnorms: Optional[Sequence[nn.BatchNorm1d]] = None,
        **kwargs,
    ) -> "SpinalLinear":
        """Build from the authors' per-layer ``nn.Linear`` modules.

        ``layers[0]`` is ``Linear(s, w)``; ``layers[l]`` for l >= 1 is ``Linear(s + w, w)`` applied to
        ``cat([x_window, h_prev])``; ``output`` is ``Linear(L*w, M)`` or None. ``kwargs`` go to the
        constructor (``backend``, for example). Weights are copied; the result has the layers' dtype
        and device.

        ``batchnorms`` (one ``BatchNorm1d(w)`` per layer, as in the authors' VGG and transfer heads
        ``Linear -> BatchNorm1d -> activation``) are folded into each layer's weight and bias with
        their running statistics: the result computes what the authors' model computes in eval
        mode. A layer or output without bias gets a zero bias when any other one has a bias.
        """
        if len(layers) == 0:
            raise ValueError("spinal_ops: from_linears needs at least one layer")
        layer_width, split_size = layers[0].weight.shape
        for index, linear in enumerate(layers[1:], start=1):
            expected = (layer_width, split_size + layer_width)
            if tuple(linear.weight.shape) != expected:
                raise ValueError(
                    f"spinal_ops: layers[{index}] must be Linear({split_size + layer_width}, {layer_width}) "
                    f"reading [x_window, h_prev], got weight of shape {tuple(linear.weight.shape)}"
                )
        if batchnorms is not None and len(batchnorms) != len(layers):
            raise ValueError(
                f"spinal_ops: from_linears got {len(batchnorms)} batchnorms for {len(layers)} layers; "
                "give one BatchNorm1d per layer or None"
            )
        folded = [
            _folded_layer(linear, None if batchnorms is None else batchnorms[index], index)
            for index, linear in enumerate(layers)
        ]
        has_bias = any(bias is not None for _, bias in folded) or (output is not None and output.bias is not None)
        reference_weight = layers[0].weight
        spinal = cls(
            in_features,
            None if output is None else output.out_features,
            layer_width=layer_width,
            num_layers=len(layers),
            split_size=split_size,
            activation=activation,
            negative_slope=negative_slope,
            bias=has_bias,
            device=reference_weight.device,
            dtype=reference_weight.dtype,
            **kwargs,
        )
        if output is not None and output.in_features != spinal.config.hidden_features:
            raise ValueError(
                f"spinal_ops: output must be Linear({spinal.config.hidden_features}, M), "
                f"got Linear({output.in_features}, {output.out_features})"
            )
        with torch.no_grad():
            for layer, (weight, bias) in enumerate(folded):
                spinal.weight_in[layer].copy_(weight[:, :split_size])
                if layer > 0:
                    spinal.weight_hidden[layer - 1].copy_(weight[:, split_size:])
                if has_bias:
                    spinal.bias[layer].copy_(0 if bias is None else bias)
            if output is not None:
                spinal.weight_out.copy_(output.weight)
                if has_bias:
                    spinal.bias_out.copy_(0 if output.bias is None else output.bias)
        return spinal


def _folded_layer(
    linear: nn.Linear, batchnorm: Optional[nn.BatchNorm1d], index: int
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weight and bias of ``batchnorm(linear(v))`` as one affine map, with BN's running statistics.

    BN(z) = gamma * (z - mean) / sqrt(var + eps) + beta, so W' = scale * W and
    b' = scale * (b - mean) + beta with scale = gamma / sqrt(var + eps). Computed in float64
    so that folding adds no rounding beyond the final cast.
    """
    if batchnorm is None:
        return linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    width = linear.out_features
    if not isinstance(batchnorm, nn.BatchNorm1d) or batchnorm.num_features != width:
        raise ValueError(f"spinal_ops: batchnorms[{index}] must be BatchNorm1d({width}), got {batchnorm!r}")
    if batchnorm.running_mean is None or batchnorm.running_var is None:
        raise ValueError(
            f"spinal_ops: batchnorms[{index}] has no running statistics (track_running_stats=False); "
            "it normalises with batch statistics, which cannot be folded into weights"
        )
    mean = batchnorm.running_mean.detach().double()
    scale = torch.rsqrt(batchnorm.running_var.detach().double() + batchnorm.eps)
    shift = torch.zeros_like(mean)
    if batchnorm.affine:
        scale = scale * batchnorm.weight.detach().double()
        shift = batchnorm.bias.detach().double()
    bias = -mean if linear.bias is None else linear.bias.detach().double() - mean
    dtype = linear.weight.dtype
    return (linear.weight.detach().double() * scale[:, None]).to(dtype), (bias * scale + shift).to(dtype)
