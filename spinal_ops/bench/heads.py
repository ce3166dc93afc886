"""The dense heads a spinal layer is compared with, and their analytic costs.

``--baseline equal-width`` (the default) compares each preset with the dense layer of the same
hidden width, ``Linear(N, L*w) -> phi -> Linear(L*w, M)`` (contract §6). ``--baseline authors``
compares it with the dense head that the spinal layer replaces in the model the preset comes
from (``AUTHORS_HEADS``), as written in the authors' scripts (github.com/dipuk0506/SpinalNet)
or, for the ImageNet heads, in torchvision's models. Only the Linear layers and phi are timed:
the heads' Dropout and BatchNorm1d do no matrix multiplies and are left out, as they are for the
spinal layer. A preset without an entry (a custom ``N,w,L,M``) keeps the equal-width baseline
and the run says so.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import SpinalConfig, mode_flops

BASELINES: tuple[str, ...] = ("equal-width", "authors")
EQUAL_WIDTH_IMPL = "dense"  # the implementation name of the equal-width dense layer in the records
AUTHORS_IMPL = "authors_dense"  # ... and of the authors' dense head
BASELINE_IMPLS: tuple[str, ...] = (EQUAL_WIDTH_IMPL, AUTHORS_IMPL)


@dataclass(frozen=True)
class DenseHead:
    """``Linear(widths[0], widths[1]) -> phi -> ... -> Linear(widths[-2], widths[-1])``: phi after
    every Linear but the last."""

    widths: tuple[int, ...]
    source: str = ""  # where the head comes from
    bias: bool = True

    def __post_init__(self) -> None:
        if len(self.widths) < 2 or any(width < 1 for width in self.widths):
            raise ValueError(f"a dense head needs at least two positive widths, got {self.widths}")

    @property
    def layers(self) -> list[tuple[int, int]]:
        return list(zip(self.widths, self.widths[1:]))

    def describe(self) -> str:
        return " -> ".join(f"Linear({a}, {b})" for a, b in self.layers).replace(") -> ", ") -> phi -> ")

    def num_parameters(self) -> int:
        return sum(a * b + (b if self.bias else 0) for a, b in self.layers)

    def forward_flops(self, batch: int) -> int:
        """Matrix-multiply FLOPs of one forward (2 per multiply-add, as FlopCounterMode counts)."""
        return 2 * batch * sum(a * b for a, b in self.layers)

    def step_flops(self, batch: int, mode: str) -> int:
        """FLOPs of one step in ``mode``; frozen skips the first Linear's gradient w.r.t. x."""
        first = 2 * batch * self.widths[0] * self.widths[1]
        return mode_flops(mode, self.forward_flops(batch), first)

    def build(self, activation: nn.Module, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> nn.Sequential:
        modules: list[nn.Module] = []
        for index, (a, b) in enumerate(self.layers):
            if index:
                modules.append(activation)
            modules.append(nn.Linear(a, b, bias=self.bias, dtype=dtype, device=device))
        return nn.Sequential(*modules)


# preset -> the dense head its spinal layer replaces. N and M match the preset's.
AUTHORS_HEADS: dict[str, DenseHead] = {
    "mnist": DenseHead((320, 50, 10), "the MNIST CNN's head (SpinalNet_MNIST.py, default_pytorch_MNIST.py): "
                                      "fc1 -> ReLU -> Dropout -> fc2"),
    "vgg5": DenseHead((256, 512, 10), "VGG-5's classifier (MNIST_VGG/*_VGG_and_SpinalVGG.py): "
                                      "Dropout -> Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear"),
    "cifar_vgg": DenseHead((512, 4096, 4096, 10), "VGG's CIFAR-10 classifier (CIFAR-10/VGG_default_and_SpinalFC_"
                                                  "CIFAR10.py): three Linear with ReLU and Dropout"),
    "cnn_cifar": DenseHead((4096, 1024, 512, 10), "the CIFAR-10 CNN's head (CIFAR-10/CNN_dropout_CIFAR10.py)"),
    "resnet_head": DenseHead((2048, 1000), "ResNet-50's fc (torchvision), the layer a spinal head replaces "
                                           "in transfer learning"),
    "vgg_head": DenseHead((25088, 4096, 4096, 1000), "VGG's ImageNet classifier (torchvision vgg11..vgg19): "
                                                     "three Linear with ReLU and Dropout"),
}


def authors_head(preset: str, config: SpinalConfig | None = None) -> DenseHead | None:
    """The authors' dense head of ``preset``; None for a preset without one, or when ``config``
    (a custom shape under a preset's name) has another N or M."""
    head = AUTHORS_HEADS.get(preset)
    if head is None or config is None:
        return head
    if (config.in_features, config.out_features) != (head.widths[0], head.widths[-1]) or config.bias != head.bias:
        return None
    return head


def baseline_impl(baseline: str, preset: str, config: SpinalConfig) -> str:
    """The implementation that is the dense baseline of ``preset`` under ``--baseline``."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; expected one of {', '.join(BASELINES)}")
    if baseline == "authors" and authors_head(preset, config) is not None:
        return AUTHORS_IMPL
    return EQUAL_WIDTH_IMPL


def baseline_note(baseline: str, preset: str, config: SpinalConfig) -> str:
    """One line naming the baseline of ``preset`` (what a run prints before it starts)."""
    if baseline == "equal-width":
        return (f"{preset}: equal-width dense Linear({config.in_features}, {config.hidden_features}) -> phi"
                + (f" -> Linear({config.hidden_features}, {config.out_features})" if config.out_features else ""))
    head = authors_head(preset, config)
    if head is None:
        return (f"{preset}: no dense head from the paper for this shape; "
                f"baseline is the equal-width dense layer ({EQUAL_WIDTH_IMPL})")
    return f"{preset}: {head.describe()} ({head.num_parameters():,} parameters), {head.source}"
