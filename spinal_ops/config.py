"""SpinalConfig: the one place that knows the shapes of a spinal layer.

Every backend, the module, the functional form and the benchmarks take their
shapes, column windows, validation and analytic cost from here (docs/contract.md §1, §2, §5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Optional

import torch

from .activations import ACTIVATIONS


# What a benchmark step computes (contract §6): train = forward + gradients w.r.t. the input and every
# parameter; frozen = forward + gradients w.r.t. every parameter only (a head on a frozen
# backbone: the input needs no gradient); infer = forward without autograd.
MODES: tuple[str, ...] = ("train", "frozen", "infer")


def mode_flops(mode: str, forward: int, input_products: int) -> int:
    """Step FLOPs from the forward's and those of the products that read the input x.

    Every product C = A @ B of the forward costs the same again for each gradient (dA, dB): train
    is 3x forward; frozen skips dx, the gradient of the input products w.r.t. x.
    """
    if mode == "infer":
        return forward
    if mode == "train":
        return 3 * forward
    if mode == "frozen":
        return 3 * forward - input_products
    raise ValueError(f"spinal_ops: unknown mode {mode!r}; expected one of {', '.join(MODES)}")


NORMS: tuple[str, ...] = ("batch",)


class SpinalParams(NamedTuple):
    """The packed parameters of contract §2, in schema order. Absent ones are None."""

    weight_in: torch.Tensor  # [L, w, s]
    weight_hidden: torch.Tensor  # [L-1, w, w], empty when L == 1
    bias: Optional[torch.Tensor]  # [L, w]
    weight_out: Optional[torch.Tensor]  # [M, L*w]
    bias_out: Optional[torch.Tensor]  # [M]


class SpinalNorm(NamedTuple):
    """Batch-norm state of a layer with ``norm="batch"`` (contract §1), one row per spinal layer,
    as ``nn.BatchNorm1d(w)`` holds it. Training mode normalises with the batch's statistics and
    updates the running ones in place; eval mode folds the running ones into the weights."""

    weight: Optional[torch.Tensor]  # [L, w] (gamma), None without affine
    bias: Optional[torch.Tensor]  # [L, w] (beta), None without affine
    running_mean: torch.Tensor  # [L, w]
    running_var: torch.Tensor  # [L, w]
    num_batches_tracked: torch.Tensor  # int64 scalar


class TrainingStages(NamedTuple):
    """What a training-mode call adds to the layer's math: the dropout seed (contract §1, drawn
    once per call; None without dropout) and the batch-norm state (None without norm)."""

    dropout_seed: Optional[torch.Tensor]
    norm: Optional[SpinalNorm]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"spinal_ops: {name} must be an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class SpinalConfig:
    """Hyper-parameters of one spinal layer (contract §1), validated on construction."""

    in_features: int  # N
    layer_width: int  # w
    num_layers: int  # L
    split_size: int  # s
    out_features: Optional[int]  # M, or None: the layer returns the hidden concatenation
    activation: str = "relu"
    negative_slope: float = 0.01
    bias: bool = True
    dropout: float = 0.0  # p of the dropout on each layer's input and the projection's, in training
    norm: Optional[str] = None  # "batch": BatchNorm1d on each layer's pre-activation
    norm_eps: float = 1e-5
    norm_momentum: Optional[float] = 0.1  # None: cumulative average, as nn.BatchNorm1d
    norm_affine: bool = True

    def __post_init__(self) -> None:
        _check_positive_int("in_features", self.in_features)
        _check_positive_int("layer_width", self.layer_width)
        _check_positive_int("num_layers", self.num_layers)
        _check_positive_int("split_size", self.split_size)
        if self.split_size > self.in_features:
            raise ValueError(
                f"spinal_ops: split_size must be in [1, in_features={self.in_features}], "
                f"got {self.split_size}"
            )
        if self.out_features is not None:
            _check_positive_int("out_features", self.out_features)
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"spinal_ops: unknown activation {self.activation!r}; "
                f"expected one of {', '.join(ACTIVATIONS)}"
            )
        if not math.isfinite(float(self.negative_slope)):
            raise ValueError(f"spinal_ops: negative_slope must be finite, got {self.negative_slope!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"spinal_ops: dropout must be a probability in [0, 1), got {self.dropout!r}")
        if self.norm is not None and self.norm not in NORMS:
            raise ValueError(f"spinal_ops: unknown norm {self.norm!r}; expected None or one of {', '.join(NORMS)}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"spinal_ops: norm_eps must be > 0, got {self.norm_eps!r}")
        if self.norm_momentum is not None and not (
            isinstance(self.norm_momentum, (int, float)) and 0 <= self.norm_momentum <= 1
        ):
            raise ValueError(f"spinal_ops: norm_momentum must be in [0, 1] or None, got {self.norm_momentum!r}")

    def __hash__(self) -> int:
        # Every call's backend selection looks the config up in a dict: hash the fields once per
        # object, not once per call.
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, field.name) for field in fields(self)))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self) -> dict:
        # A pickle leaves the cached hash out: a string's hash differs from process to process.
        return {name: value for name, value in self.__dict__.items() if name != "_hash"}

    @classmethod
    def build(
        cls,
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
    ) -> "SpinalConfig":
        """Config from the user-facing arguments; ``split_size`` wins over ``num_splits``."""
        _check_positive_int("in_features", in_features)
        if split_size is None:
            _check_positive_int("num_splits", num_splits)
            split_size = math.ceil(in_features / num_splits)
        return cls(
            in_features=in_features,
            layer_width=layer_width,
            num_layers=num_layers,
            split_size=split_size,
            out_features=out_features,
            activation=activation,
            negative_slope=float(negative_slope),
            bias=bias,
            dropout=dropout,
            norm=norm,
            norm_eps=norm_eps,
            norm_momentum=norm_momentum,
            norm_affine=norm_affine,
        )

    @classmethod
    def from_params(
        cls,
        in_features: int,
        params: SpinalParams,
        *,
        split_size: int,
        activation: str = "relu",
        negative_slope: float = 0.01,
        dropout: float = 0.0,
    ) -> "SpinalConfig":
        """Config implied by packed parameters (functional form); checks every shape."""
        w_in = params.weight_in
        if w_in.dim() != 3:
            raise ValueError(f"spinal_ops: weight_in must be [L, w, s], got shape {tuple(w_in.shape)}")
        num_layers, layer_width, s = w_in.shape
        if s != split_size:
            raise ValueError(
                f"spinal_ops: weight_in has split size {s} (shape {tuple(w_in.shape)}) "
                f"but split_size={split_size}"
            )
        out_features = None if params.weight_out is None else params.weight_out.shape[0]
        config = cls(
            in_features=in_features,
            layer_width=layer_width,
            num_layers=num_layers,
            split_size=split_size,
            out_features=out_features,
            activation=activation,
            negative_slope=float(negative_slope),
            bias=params.bias is not None,
            dropout=dropout,
        )
        config.check_params(params)
        return config

    # ---- derived sizes -------------------------------------------------------------------

    @property
    def has_training_stages(self) -> bool:
        """Whether training mode adds dropout or batch norm to the math (eval mode never does)."""
        return self.dropout > 0 or self.norm is not None

    def inference_config(self) -> "SpinalConfig":
        """The config of what eval mode runs: no dropout, batch norm folded into the weights (which
        then have biases whether or not the layer has)."""
        if not self.has_training_stages:
            return self
        return replace(self, dropout=0.0, norm=None, bias=self.bias or self.norm is not None)

    def dropout_sites(self) -> tuple[tuple[tuple[int, int], ...], int, int]:
        """Where each dropout site of one row starts (contract §1): per layer (x window start,
        h_{l-1} start or -1), the projection input's start (-1 without one), and D, the sites per row."""
        starts, site = [], 0
        for layer in range(self.num_layers):
            window = site
            site += self.split_size
            hidden = -1
            if layer > 0:
                hidden = site
                site += self.layer_width
            starts.append((window, hidden))
        projection = -1
        if self.out_features is not None:
            projection = site
            site += self.hidden_features
        return tuple(starts), projection, site

    @property
    def hidden_features(self) -> int:
        """Width of the hidden concatenation H, L*w."""
        return self.num_layers * self.layer_width

    @property
    def output_features(self) -> int:
        """Last dimension of the layer's output: M, or L*w when out_features is None."""
        return self.hidden_features if self.out_features is None else self.out_features

    def window_start(self, layer: int) -> int:
        """First input column read by ``layer``: (layer*s) mod N."""
        return (layer * self.split_size) % self.in_features

    def window(self, layer: int) -> tuple[tuple[int, int], ...]:
        """Column ranges [start, stop) read by ``layer``: one range, or two when it wraps past N."""
        start, n, s = self.window_start(layer), self.in_features, self.split_size
        if start + s <= n:
            return ((start, start + s),)
        return ((start, n), (0, start + s - n))

    def parameter_shapes(self) -> dict[str, Optional[tuple[int, ...]]]:
        """Shapes of contract §2 by parameter name; None for an absent parameter."""
        n_layers, w, s, m = self.num_layers, self.layer_width, self.split_size, self.out_features
        return {
            "weight_in": (n_layers, w, s),
            "weight_hidden": (n_layers - 1, w, w),
            "bias": (n_layers, w) if self.bias else None,
            "weight_out": (m, self.hidden_features) if m is not None else None,
            "bias_out": (m,) if (m is not None and self.bias) else None,
        }

    def fan_in(self, layer: int) -> int:
        """nn.Linear fan-in of the authors' per-layer Linear: s for layer 0, s + w after it."""
        return self.split_size + (self.layer_width if layer > 0 else 0)

    def num_parameters(self) -> int:
        """The layer's trainable parameters: contract §2's, plus batch norm's gamma and beta."""
        affine = 2 * self.hidden_features if (self.norm is not None and self.norm_affine) else 0
        return affine + sum(math.prod(shape) for shape in self.parameter_shapes().values() if shape is not None)

    def forward_flops(self, batch: int) -> int:
        """Matrix-multiply FLOPs of one forward pass (2 per multiply-add, as FlopCounterMode counts)."""
        n_layers, w, s = self.num_layers, self.layer_width, self.split_size
        macs = n_layers * w * s + (n_layers - 1) * w * w
        if self.out_features is not None:
            macs += self.out_features * self.hidden_features
        return 2 * batch * macs

    def step_flops(self, batch: int, mode: str) -> int:
        """Matrix-multiply FLOPs of one step in ``mode`` (one of MODES); in frozen mode the L
        input products need no gradient w.r.t. x, but dH and the recurrence's dh still do."""
        input_products = 2 * batch * self.num_layers * self.layer_width * self.split_size
        return mode_flops(mode, self.forward_flops(batch), input_products)

    def dense_baseline_parameters(self) -> int:
        """Parameters of Linear(N, L*w) -> phi -> Linear(L*w, M), the dense layer of equal hidden width."""
        hidden = self.hidden_features
        count = self.in_features * hidden + (hidden if self.bias else 0)
        if self.out_features is not None:
            count += hidden * self.out_features + (self.out_features if self.bias else 0)
        return count

    def dense_baseline_forward_flops(self, batch: int) -> int:
        macs = self.in_features * self.hidden_features
        if self.out_features is not None:
            macs += self.hidden_features * self.out_features
        return 2 * batch * macs

    def dense_baseline_step_flops(self, batch: int, mode: str) -> int:
        """The dense baseline's FLOPs of one step in ``mode``; frozen skips Linear(N, L*w)'s dx."""
        input_product = 2 * batch * self.in_features * self.hidden_features
        return mode_flops(mode, self.dense_baseline_forward_flops(batch), input_product)

    # ---- validation (contract §5) -----------------------------------------------------------

    def check_params(self, params: SpinalParams) -> None:
        """Every parameter has its contract §2 shape; all share one dtype and device."""
        reference = params.weight_in
        for name, shape in self.parameter_shapes().items():
            tensor = getattr(params, name)
            if shape is None:
                if tensor is not None:
                    raise ValueError(
                        f"spinal_ops: {name} must be None for this configuration "
                        "(bias=False gives neither bias nor bias_out; out_features=None gives no output projection)"
                    )
                continue
            if tensor is None:
                raise ValueError(f"spinal_ops: {name} of shape {shape} is missing")
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"spinal_ops: {name} must have shape {shape}, got {tuple(tensor.shape)}"
                )
            if tensor.dtype != reference.dtype:
                raise TypeError(
                    f"spinal_ops: {name} has dtype {tensor.dtype} but weight_in has {reference.dtype}"
                )
            if tensor.device != reference.device:
                raise ValueError(
                    f"spinal_ops: {name} is on {tensor.device} but weight_in is on {reference.device}"
                )

    def check_input(self, x: torch.Tensor, params: SpinalParams) -> None:
        """The input matches the layer: last dimension N, same dtype and device as the parameters."""
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"spinal_ops: expected input of shape [..., {self.in_features}] "
                f"(in_features={self.in_features}), got {tuple(x.shape)}"
            )
        if x.dtype != params.weight_in.dtype:
            raise TypeError(
                f"spinal_ops: input dtype {x.dtype} does not match parameter dtype "
                f"{params.weight_in.dtype}"
            )
        if x.device != params.weight_in.device:
            raise ValueError(
                f"spinal_ops: input is on {x.device} but parameters are on {params.weight_in.device}"
            )
