"""Convert the SpinalNet authors' trained models (dipuk0506/SpinalNet) to ``SpinalLinear`` (contract §7).

Each helper reads one naming scheme from a ``state_dict`` (or a module) and returns layers that
compute what the authors' forward computes in eval mode, and train as their heads train:

* ``from_mnist_script`` - ``SpinalNet_MNIST.py``: ``fc1``, ``fc1_1`` ... ``fc1_5``, output ``fc2``.
  The forward alternates the two halves of the 320 conv features: N = 2*s.
* ``from_arch2_mnist`` - ``Arch2_*.py``: three chains ``fcp2*``, ``fcp*``, ``fc1*`` without
  output projection (``out_features=None``), each over the two halves of its own input.
* ``from_customizable`` - ``spinalnettorch.py``: ``fc1`` ... ``fcN``, output ``fcx``; the
  forward tiles ``x`` so layer l reads columns ``(l*s + j) mod N``: the windows of docs/contract.md exactly.
* ``from_spinal_head`` - the VGG / transfer-learning heads: ``fc_spinal_layerI`` and ``fc_out``
  are ``nn.Sequential`` holding Dropout, a Linear and, in the VGG heads, a BatchNorm1d, over the
  two halves of the features. The batch norm becomes the layer's own (``norm="batch"``); the
  dropout probability is read from a module's Dropout children (a state_dict holds none: pass
  ``dropout=``).

``from_spinalnet`` picks the scheme from the keys. Activations are not stored in a state_dict:
pass the one the model used (the authors' scripts use ReLU, the default).
"""
from __future__ import annotations

import re
from typing import Mapping, Optional, Union

import torch
from torch import nn

from .module import SpinalLinear

StateDict = Mapping[str, torch.Tensor]
StateOrModule = Union[StateDict, nn.Module]

ARCH2_CHAINS = ("fcp2", "fcp", "fc1")  # the order of their outputs in Arch2's concatenation


def from_mnist_script(
    state_dict: StateOrModule, *, prefix: str = "", activation: str = "relu", **kwargs
) -> SpinalLinear:
    """``SpinalLinear`` equal to ``fc2(H)`` of ``SpinalNet_MNIST.py`` (before its log_softmax).

    ``kwargs`` go to ``SpinalLinear`` (``backend``, ``negative_slope``).
    """
    state = _state(state_dict, prefix)
    layers = _chain(state, prefix, "fc1")
    output = _linear(state, prefix, "fc2")
    return _halves_model(layers, output, activation=activation, **kwargs)


def from_arch2_mnist(
    state_dict: StateOrModule, *, prefix: str = "", activation: str = "relu", **kwargs
) -> dict[str, SpinalLinear]:
    """The three spinal chains of the Arch2 MNIST models, by chain name, in concatenation order.

    Arch2 feeds ``cat([fcp2(image), fcp(conv1 features), fc1(conv2 features)])`` to its own
    ``fc2 -> relu -> fc3``; each chain here has ``out_features=None`` and returns its
    ``[h_0, ..., h_{L-1}]``. Keep the model's ``fc2``/``fc3`` as they are.
    """
    state = _state(state_dict, prefix)
    return {
        name: _halves_model(_chain(state, prefix, name), None, activation=activation, **kwargs)
        for name in ARCH2_CHAINS
    }


def from_customizable(
    state_dict: StateOrModule, *, in_features: int, prefix: str = "", activation: str = "relu", **kwargs
) -> SpinalLinear:
    """``SpinalLinear`` equal to the customizable ``SpinalNet(Input_Size=in_features, ...)``.

    ``in_features`` is the model's ``Input_Size`` (not stored in its weights). Its split size
    ``round(Input_Size / Number_of_Split)`` is read from ``fc1``; the forward's tiling of ``x``
    makes layer l read columns ``(l*s + j) mod in_features``, which is SpinalConfig's window.
    """
    state = _state(state_dict, prefix)
    layers = _numbered(state, prefix, "fc", first=1)
    output = _linear(state, prefix, "fcx")
    return SpinalLinear.from_linears(layers, output, in_features=in_features, activation=activation, **kwargs)


def from_spinal_head(
    state_dict: StateOrModule,
    *,
    in_features: Optional[int] = None,
    prefix: str = "",
    activation: str = "relu",
    batchnorm_eps: float = 1e-5,
    **kwargs,
) -> SpinalLinear:
    """``SpinalLinear`` computing an authors' VGG / transfer-learning head, with its dropout and
    batch norm.

    Reads ``fc_spinal_layer1``, ``fc_spinal_layer2``, ... and ``fc_out`` (``nn.Sequential``; the
    Linear and an optional BatchNorm1d are found by their keys at whatever index they sit).
    The head reads ``x[:, 0:s]`` and ``x[:, s:2s]`` alternately, so ``in_features`` must be
    ``2*s`` (the default); ``batchnorm_eps`` is BatchNorm1d's eps (not stored in a state_dict; a
    module's own eps and momentum are used). From a module the dropout probability is that of
    its Dropout children; ``dropout=`` overrides it (and gives it for a state_dict).
    """
    state = _state(state_dict, prefix)
    blocks = _numbered_names(state, prefix, "fc_spinal_layer", first=1)
    if not blocks:
        raise KeyError(f"spinal_ops: no '{prefix}fc_spinal_layer1.*' keys in the state_dict")
    if isinstance(state_dict, nn.Module) and "dropout" not in kwargs:
        kwargs["dropout"] = _head_dropout(state_dict, prefix, [*blocks, "fc_out"])
    layers, batchnorms = [], []
    for block in blocks:
        module = state_dict if isinstance(state_dict, nn.Module) else None
        linear, batchnorm = _sequential_block(state, prefix, block, batchnorm_eps, module)
        layers.append(linear)
        batchnorms.append(batchnorm)
    output, output_batchnorm = _sequential_block(state, prefix, "fc_out", batchnorm_eps)
    if output_batchnorm is not None:
        raise ValueError(f"spinal_ops: '{prefix}fc_out' has a BatchNorm1d; the authors' heads have none there")
    if all(batchnorm is None for batchnorm in batchnorms):
        batchnorms = None
    elif any(batchnorm is None for batchnorm in batchnorms):
        raise ValueError("spinal_ops: some fc_spinal_layer blocks have a BatchNorm1d and others do not")
    return _halves_model(
        layers, output, in_features=in_features, activation=activation, batchnorms=batchnorms, **kwargs
    )


def from_spinalnet(state_dict: StateOrModule, *, prefix: str = "", **kwargs) -> SpinalLinear:
    """Pick the naming scheme from the keys and convert (single-layer schemes; Arch2 has its own).

    ``kwargs`` go to the scheme's helper (``in_features`` is required for the customizable model).
    """
    state = _state(state_dict, prefix)
    if f"{prefix}fc_spinal_layer1" in _module_names(state):
        return from_spinal_head(state_dict, prefix=prefix, **kwargs)  # a module: its dropout too
    if f"{prefix}fcx.weight" in state:
        return from_customizable(state, prefix=prefix, **kwargs)
    if f"{prefix}fcp.weight" in state:
        raise ValueError("spinal_ops: this is an Arch2 model (three chains); use from_arch2_mnist")
    if f"{prefix}fc1_1.weight" in state:
        return from_mnist_script(state, prefix=prefix, **kwargs)
    raise KeyError(
        f"spinal_ops: no SpinalNet naming scheme found under prefix {prefix!r}: expected "
        "'fc_spinal_layer1.*' (VGG/transfer heads), 'fc1'..'fcN' + 'fcx' (customizable model) "
        "or 'fc1', 'fc1_1', ... + 'fc2' (MNIST script)"
    )


# ---- helpers -----------------------------------------------------------------------------


def _state(state_dict: StateOrModule, prefix: str) -> StateDict:
    state = state_dict.state_dict() if isinstance(state_dict, nn.Module) else state_dict
    if not any(key.startswith(prefix) for key in state):
        raise KeyError(f"spinal_ops: no key of the state_dict starts with prefix {prefix!r}")
    return state


def _module_names(state: StateDict) -> set[str]:
    """Every module path that owns a key (``a.b.weight`` gives ``a.b`` and ``a``)."""
    names = set()
    for key in state:
        parts = key.split(".")[:-1]
        names.update(".".join(parts[: end + 1]) for end in range(len(parts)))
    return names


def _linear(state: StateDict, prefix: str, name: str) -> nn.Linear:
    """An ``nn.Linear`` holding ``state[prefix + name + '.weight' / '.bias']`` (same dtype, device)."""
    key = f"{prefix}{name}.weight"
    if key not in state:
        raise KeyError(f"spinal_ops: missing '{key}' in the state_dict")
    weight = state[key]
    if weight.dim() != 2:
        raise ValueError(f"spinal_ops: '{key}' must be a Linear weight [out, in], got shape {tuple(weight.shape)}")
    bias = state.get(f"{prefix}{name}.bias")
    linear = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _chain(state: StateDict, prefix: str, name: str) -> list[nn.Linear]:
    """``name``, ``name_1``, ``name_2``, ... (the MNIST scripts' layer names) as Linears."""
    layers = [_linear(state, prefix, name)]
    while f"{prefix}{name}_{len(layers)}.weight" in state:
        layers.append(_linear(state, prefix, f"{name}_{len(layers)}"))
    return layers


def _numbered_names(state: StateDict, prefix: str, stem: str, first: int) -> list[str]:
    """``stem{first}``, ``stem{first+1}``, ... while such a module exists in the state_dict."""
    names = _module_names(state)
    found = []
    while f"{prefix}{stem}{first + len(found)}" in names:
        found.append(f"{stem}{first + len(found)}")
    # a gap (fc1, fc2, fc4) would silently drop layers: refuse it
    pattern = re.compile(rf"^{re.escape(prefix)}{re.escape(stem)}(\d+)$")
    numbers = {int(m.group(1)) for m in map(pattern.match, names) if m}
    if numbers - set(range(first, first + len(found))):
        raise ValueError(
            f"spinal_ops: '{prefix}{stem}*' layers are not numbered consecutively from {first}: {sorted(numbers)}"
        )
    return found


def _numbered(state: StateDict, prefix: str, stem: str, first: int) -> list[nn.Linear]:
    names = _numbered_names(state, prefix, stem, first)
    if not names:
        raise KeyError(f"spinal_ops: missing '{prefix}{stem}{first}.weight' in the state_dict")
    return [_linear(state, prefix, name) for name in names]


def _sequential_block(
    state: StateDict, prefix: str, block: str, batchnorm_eps: float, module: Optional[nn.Module] = None
) -> tuple[nn.Linear, Optional[nn.BatchNorm1d]]:
    """The Linear and the optional BatchNorm1d after it in ``nn.Sequential`` ``block``.

    Dropout and activations hold no state; BatchNorm1d is recognised by its running_mean, the
    Linear by its 2-D weight. From the ``module`` the state came from, the BatchNorm1d keeps its
    own eps and momentum (which a state_dict does not hold).
    """
    base = f"{prefix}{block}."
    children = {key[len(base):].split(".")[0] for key in state if key.startswith(base)}
    if not children or not all(child.isdigit() for child in children):
        raise ValueError(
            f"spinal_ops: '{prefix}{block}' must be an nn.Sequential in the state_dict, got children {sorted(children)}"
        )
    indices = sorted(int(child) for child in children)
    linears = [i for i in indices if state.get(f"{base}{i}.weight", torch.empty(0)).dim() == 2]
    norms = [i for i in indices if f"{base}{i}.running_mean" in state]
    if len(linears) != 1 or len(norms) > 1 or (norms and norms[0] < linears[0]):
        raise ValueError(
            f"spinal_ops: '{prefix}{block}' must be an nn.Sequential with one Linear, optionally followed by "
            f"one BatchNorm1d (Linear at {linears}, BatchNorm1d at {norms})"
        )
    linear = _linear(state, prefix, f"{block}.{linears[0]}")
    if not norms:
        return linear, None
    key = f"{base}{norms[0]}"
    mean = state[f"{key}.running_mean"]
    batchnorm = nn.BatchNorm1d(
        mean.shape[0], eps=batchnorm_eps, affine=f"{key}.weight" in state, device=mean.device, dtype=mean.dtype
    )
    if module is not None:
        source = module.get_submodule(key)
        batchnorm.eps, batchnorm.momentum = source.eps, source.momentum
    with torch.no_grad():
        for name in ("running_mean", "running_var", "weight", "bias", "num_batches_tracked"):
            if getattr(batchnorm, name) is not None and f"{key}.{name}" in state:
                getattr(batchnorm, name).copy_(state[f"{key}.{name}"])
    return linear, batchnorm.eval()


def _head_dropout(module: nn.Module, prefix: str, blocks: list[str]) -> float:
    """The one dropout probability of the head's blocks (0 where they have no Dropout)."""
    found = {
        child.p
        for block in blocks
        for child in module.get_submodule(f"{prefix}{block}".rstrip(".")).children()
        if isinstance(child, nn.Dropout)
    }
    if len(found) > 1:
        raise ValueError(
            f"spinal_ops: the head's Dropout modules differ ({sorted(found)}); SpinalLinear has one dropout "
            "probability: pass dropout=p"
        )
    return found.pop() if found else 0.0


def _halves_model(
    layers: list[nn.Linear], output: Optional[nn.Linear], *, in_features: Optional[int] = None, **kwargs
) -> SpinalLinear:
    """A model whose forward alternates ``x[:, 0:s]`` and ``x[:, s:2s]``: N must be 2*s."""
    split_size = layers[0].in_features
    if in_features is None:
        in_features = 2 * split_size
    if in_features != 2 * split_size:
        raise ValueError(
            f"spinal_ops: this model reads x[:, 0:{split_size}] and x[:, {split_size}:{2 * split_size}] "
            f"alternately and ignores any later column, which the windows (l*s + j) mod N cannot express "
            f"for in_features={in_features}; feed x[..., :{2 * split_size}] to a layer with "
            f"in_features={2 * split_size}"
        )
    return SpinalLinear.from_linears(layers, output, in_features=in_features, **kwargs)
