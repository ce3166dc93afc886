"""Dense head vs spinal head on scikit-learn's bundled 8x8 digits (offline, CPU, well under a minute each).

The same small CNN is trained from the same seed with a dense head
``Linear(256, 64) -> ReLU -> Linear(64, 10)`` and with a spinal layer of the same hidden width
(``SpinalLinear(256, 10, layer_width=16, num_layers=4)``), on the reference backend and on the
fastest backend here. Prints test accuracy, parameter counts and time per epoch.

    python examples/digits_train.py [--epochs 20] [--threads 1]

The functions are importable (``tests/test_training.py`` trains with them): ``load_data``,
``build_model``, ``train``, ``accuracy``.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import spinal_ops
from spinal_ops import SpinalLinear

SEED = 0
FEATURES = 256  # the CNN's flattened output
HIDDEN = 64  # dense hidden width = spinal num_layers * layer_width
SPINAL = {"layer_width": HIDDEN // 4, "num_layers": 4}
Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def load_data(dtype: torch.dtype = torch.float32) -> Data:
    """1797 8x8 images scaled to [0, 1], stratified 75/25 split: x_train, x_test, y_train, y_test."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=dtype).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=SEED, stratify=labels
    )
    return x_train, x_test, y_train, y_test


def cnn(head: nn.Module) -> nn.Sequential:
    """Two 3x3 conv layers and a 2x2 max-pool: 8x8 -> 16 channels of 4x4 = FEATURES features."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        head,
    )


def build_model(head: str = "spinal", backend: str = "auto", seed: int = SEED,
                dtype: torch.dtype = torch.float32, **spinal_options: Any) -> nn.Sequential:
    """``head`` "dense": Linear(256, 64) -> ReLU -> Linear(64, 10); "spinal":
    SpinalLinear(256, 10, layer_width=16, num_layers=4, backend=backend, **spinal_options). The same
    seed gives the same weights: the backbone is built first, and the spinal layer's
    initialisation does not depend on the backend."""
    torch.manual_seed(seed)
    if head == "dense":
        return cnn(nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))).to(dtype)
    if head != "spinal":
        raise ValueError(f"unknown head {head!r}; expected 'dense' or 'spinal'")
    return cnn(SpinalLinear(FEATURES, 10, **SPINAL, backend=backend, **spinal_options)).to(dtype)


@dataclass
class History:
    losses: list[float] = field(default_factory=list)  # training loss of every step
    epoch_seconds: list[float] = field(default_factory=list)


def train(model: nn.Module, data: Data, epochs: int, batch_size: int = 64, seed: int = SEED,
          optimizer: Callable[[Any], torch.optim.Optimizer] | None = None, max_steps: int | None = None) -> History:
    """Minibatch training with a seeded batch order (the same for every model of a seed); Adam
    (lr 3e-3) unless ``optimizer`` builds another from the parameters."""
    x_train, _, y_train, _ = data
    opt = optimizer(model.parameters()) if optimizer else torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(seed)
    history = History()
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        for rows in torch.randperm(len(x_train), generator=order).split(batch_size):
            if max_steps is not None and len(history.losses) >= max_steps:
                return history
            opt.zero_grad()
            loss = F.cross_entropy(model(x_train[rows]), y_train[rows])
            loss.backward()
            opt.step()
            history.losses.append(loss.item())
        history.epoch_seconds.append(time.perf_counter() - start)
    return history


def accuracy(model: nn.Module, data: Data) -> float:
    _, x_test, _, y_test = data
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(dim=1) == y_test).float().mean().item()


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def report(name: str, model: nn.Sequential, data: Data, epochs: int) -> None:
    history = train(model, data, epochs)
    per_epoch = sum(history.epoch_seconds) / epochs
    print(
        f"{name:<17} test accuracy {accuracy(model, data):6.2%}   parameters: model {count(model):6d}, "
        f"head {count(model[-1]):6d}   {per_epoch * 1e3:6.1f} ms/epoch"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    # the model is tiny: more threads mostly add synchronisation (and stall on a busy machine)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    data = load_data()
    backends = ", ".join(name for name, support in spinal_ops.available_backends().items() if support)
    print(
        f"digits: {len(data[0])} train / {len(data[1])} test images, {args.epochs} epochs, "
        f"torch threads {args.threads}, spinal backends usable here: {backends}"
    )
    report("dense", build_model("dense"), data, args.epochs)
    model = build_model("spinal", backend="auto")
    print(f"spinal head: {model[-1]}")
    report("spinal (auto)", model, data, args.epochs)
    report("spinal (reference)", build_model("spinal", backend="reference"), data, args.epochs)


if __name__ == "__main__":
    main()
