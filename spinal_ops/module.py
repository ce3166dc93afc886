"""SpinalLinear: the spinal layer as a drop-in ``nn.Module``."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .config import SpinalConfig, SpinalNorm, SpinalParams
from .dispatch import check_backend_name
from .functional import apply_spinal


class SpinalLinear(nn.Module):
    """SpinalNet fully-connected layer (Kabir et al., 2020), computed by one fused op.

    Input ``[..., in_features]`` -> output ``[..., out_features]`` (or ``[..., L*w]``, the
    hidden concatenation, when ``out_features`` is None). Layer ``l`` reads the input columns
    ``(l*s + j) mod in_features``, ``j < s``, plus the previous layer's output.

    As the SpinalNet authors train their heads, ``dropout=p`` drops each layer's input and the
    output projection's input in ``train()`` mode, and ``norm="batch"`` puts a BatchNorm1d on each
    layer's pre-activation (``Dropout -> Linear -> BatchNorm1d -> activation``; ``norm_eps``,
    ``norm_momentum``, ``norm_affine`` as BatchNorm1d's eps, momentum, affine). In ``eval()``
    mode neither costs anything: the batch norm is folded into the weights.

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
        dropout: float = 0.0,
        norm: Optional[str] = None,
        norm_eps: float = 1e-5,
        norm_momentum: Optional[float] = 0.1,
        norm_affine: bool = True,
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
            dropout=dropout,
            norm=norm,
            norm_eps=norm_eps,
            norm_momentum=norm_momentum,
            norm_affine=norm_affine,
        )
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        for name, shape in self.config.parameter_shapes().items():
            param = None if shape is None else nn.Parameter(torch.empty(shape, **factory))
            self.register_parameter(name, param)
        if self.config.norm is not None:
            # nn.BatchNorm1d's state, one row per layer: [L, w] (running statistics kept in the
            # parameters' dtype, as BatchNorm1d keeps them).
            rows = (self.config.num_layers, self.config.layer_width)
            affine = self.config.norm_affine
            # Registered even when None (no affine), as BatchNorm1d registers them: norm_state reads them by name.
            self.register_parameter("norm_weight", nn.Parameter(torch.empty(rows, **factory)) if affine else None)
            self.register_parameter("norm_bias", nn.Parameter(torch.empty(rows, **factory)) if affine else None)
            self.register_buffer("running_mean", torch.zeros(rows, **factory))
            self.register_buffer("running_var", torch.ones(rows, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.reset_parameters()

    # nn.Linear-style read-only views of the configuration
    in_features = property(lambda self: self.config.in_features)
    out_features = property(lambda self: self.config.out_features)
    layer_width = property(lambda self: self.config.layer_width)
    num_layers = property(lambda self: self.config.num_layers)
    split_size = property(lambda self: self.config.split_size)
    activation = property(lambda self: self.config.activation)
    dropout = property(lambda self: self.config.dropout)
    norm = property(lambda self: self.config.norm)

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
            if config.norm is not None:
                self.reset_running_stats()
                if config.norm_affine:
                    self.norm_weight.fill_(1.0)
                    self.norm_bias.zero_()

    def reset_running_stats(self) -> None:
        """As nn.BatchNorm1d.reset_running_stats: mean 0, variance 1, no batches counted."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def params(self) -> SpinalParams:
        # Straight from the parameter dict: nn.Module.__getattr__ per name costs more than the rest of
        # a small layer's Python.
        p = self._parameters
        return SpinalParams(p["weight_in"], p["weight_hidden"], p["bias"], p["weight_out"], p["bias_out"])

    def norm_state(self) -> Optional[SpinalNorm]:
        """The batch-norm state (None without ``norm``)."""
        if self.config.norm is None:
            return None
        p, b = self._parameters, self._buffers
        return SpinalNorm(p["norm_weight"], p["norm_bias"], b["running_mean"], b["running_var"], b["num_batches_tracked"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.config.has_training_stages:
            return apply_spinal(x, self.params(), self.config, self.backend)
        return apply_spinal(x, self.params(), self.config, self.backend, training=self.training, norm=self.norm_state())

    def extra_repr(self) -> str:
        c = self.config
        text = (
            f"in_features={c.in_features}, out_features={c.out_features}, layer_width={c.layer_width}, "
            f"num_layers={c.num_layers}, split_size={c.split_size}, activation={c.activation!r}"
        )
        if c.activation == "leaky_relu":
            text += f", negative_slope={c.negative_slope}"
        if c.dropout:
            text += f", dropout={c.dropout}"
        if c.norm is not None:
            text += f", norm={c.norm!r}, norm_eps={c.norm_eps}, norm_momentum={c.norm_momentum}, norm_affine={c.norm_affine}"
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
        constructor (``backend``, ``dropout``, for example). Weights are copied; the result has the
        layers' dtype and device.

        ``batchnorms`` (one ``BatchNorm1d(w)`` per layer, as in the authors' VGG and transfer heads
        ``Linear -> BatchNorm1d -> activation``) become the layer's own batch norm (``norm="batch"``
        with their eps, momentum, affine parameters and running statistics), so the result trains
        as the authors' head does and computes what it computes in eval mode. A layer or output
        without bias gets a zero bias when any other one has a bias.
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
        if batchnorms is not None:
            kwargs.update(_norm_arguments(batchnorms, len(layers), layer_width))
        has_bias = any(linear.bias is not None for linear in layers) or (output is not None and output.bias is not None)
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
            for layer, linear in enumerate(layers):
                spinal.weight_in[layer].copy_(linear.weight[:, :split_size])
                if layer > 0:
                    spinal.weight_hidden[layer - 1].copy_(linear.weight[:, split_size:])
                if has_bias:
                    spinal.bias[layer].copy_(0 if linear.bias is None else linear.bias)
            if output is not None:
                spinal.weight_out.copy_(output.weight)
                if has_bias:
                    spinal.bias_out.copy_(0 if output.bias is None else output.bias)
            for layer, batchnorm in enumerate(batchnorms or ()):
                spinal.running_mean[layer].copy_(batchnorm.running_mean)
                spinal.running_var[layer].copy_(batchnorm.running_var)
                if batchnorm.affine:
                    spinal.norm_weight[layer].copy_(batchnorm.weight)
                    spinal.norm_bias[layer].copy_(batchnorm.bias)
            if batchnorms:
                spinal.num_batches_tracked.copy_(batchnorms[0].num_batches_tracked)
        return spinal


def _norm_arguments(batchnorms: Sequence[nn.BatchNorm1d], num_layers: int, width: int) -> dict:
    """SpinalLinear's norm arguments for one BatchNorm1d(w) per layer, which must agree on them."""
    if len(batchnorms) != num_layers:
        raise ValueError(
            f"spinal_ops: from_linears got {len(batchnorms)} batchnorms for {num_layers} layers; "
            "give one BatchNorm1d per layer or None"
        )
    for index, batchnorm in enumerate(batchnorms):
        if not isinstance(batchnorm, nn.BatchNorm1d) or batchnorm.num_features != width:
            raise ValueError(f"spinal_ops: batchnorms[{index}] must be BatchNorm1d({width}), got {batchnorm!r}")
        if batchnorm.running_mean is None or batchnorm.running_var is None:
            raise ValueError(
                f"spinal_ops: batchnorms[{index}] has no running statistics (track_running_stats=False); "
                "the layer's batch norm keeps running statistics for eval mode"
            )
    settings = {(b.eps, b.momentum, b.affine) for b in batchnorms}
    if len(settings) > 1:
        raise ValueError(f"spinal_ops: the batchnorms differ in (eps, momentum, affine): {sorted(settings, key=str)}")
    ((eps, momentum, affine),) = settings
    return {"norm": "batch", "norm_eps": eps, "norm_momentum": momentum, "norm_affine": affine}
