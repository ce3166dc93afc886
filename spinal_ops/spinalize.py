"""spinalize: swap ``nn.Linear`` layers of an existing model for ``SpinalLinear``."""
from __future__ import annotations

from typing import Callable, Iterable, Union

from torch import nn
from torch.nn.parameter import UninitializedParameter

from .module import SpinalLinear

Target = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


def spinalize(
    model: nn.Module,
    *,
    layer_width: int,
    num_layers: int,
    num_splits: int = 2,
    activation: str = "relu",
    target: Target = None,
) -> nn.Module:
    """Replace ``nn.Linear`` modules of ``model`` with freshly initialised ``SpinalLinear`` in place.

    Each chosen ``Linear(in, out)`` becomes ``SpinalLinear(in, out, layer_width=..., num_layers=...,
    num_splits=..., activation=...)`` with the same bias setting, device, dtype and train/eval
    mode. ``target`` chooses which:

    * ``None`` (default): the last ``nn.Linear`` in module order, usually the classifier;
    * a module name (``"head.fc"``) or several names;
    * a predicate ``(name, module) -> bool`` called on every ``nn.Linear``.

    Raises ``ValueError`` when nothing matches or a named module is not an ``nn.Linear``.
    Returns ``model`` (or the new layer when ``model`` itself is the replaced ``nn.Linear``).

    Example::

        model = torchvision.models.resnet18(num_classes=10)
        spinalize(model, layer_width=64, num_layers=4)   # model.fc is now a SpinalLinear
    """
    # remove_duplicate=False: a Linear shared under two names can be targeted by either
    modules = dict(model.named_modules(remove_duplicate=False))
    linears = {name: module for name, module in modules.items() if isinstance(module, nn.Linear)}
    chosen = _choose(model, modules, linears, target)
    replacements = {id(linear): _spinal_like(linear, name, layer_width, num_layers, num_splits, activation)
                    for name, linear in chosen.items()}
    if "" in chosen:
        return replacements[id(model)]
    # every parent that holds a chosen Linear (a shared Linear may have several parents)
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    return model


def _choose(
    model: nn.Module, modules: dict[str, nn.Module], linears: dict[str, nn.Linear], target: Target
) -> dict[str, nn.Linear]:
    if target is None:
        if not linears:
            raise ValueError(f"spinalize: {type(model).__name__} contains no nn.Linear to replace")
        name = list(linears)[-1]
        return {name: linears[name]}
    if callable(target):
        chosen = {name: linear for name, linear in linears.items() if target(name, linear)}
        if not chosen:
            raise ValueError(f"spinalize: the target predicate matched none of the nn.Linear modules {list(linears)}")
        return chosen
    names = [target] if isinstance(target, str) else list(target)
    if not names:
        raise ValueError("spinalize: target is an empty list of module names")
    for name in names:
        if name not in modules:
            raise ValueError(f"spinalize: no module named {name!r}; nn.Linear modules are {list(linears)}")
        if name not in linears:
            raise ValueError(f"spinalize: module {name!r} is a {type(modules[name]).__name__}, not an nn.Linear")
    return {name: linears[name] for name in names}


def _spinal_like(
    linear: nn.Linear, name: str, layer_width: int, num_layers: int, num_splits: int, activation: str
) -> SpinalLinear:
    if isinstance(linear.weight, UninitializedParameter):
        raise ValueError(f"spinalize: {name or 'the model'} is a LazyLinear that has not run yet; run it once first")
    spinal = SpinalLinear(
        linear.in_features,
        linear.out_features,
        layer_width=layer_width,
        num_layers=num_layers,
        num_splits=num_splits,
        activation=activation,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    return spinal.train(linear.training)
