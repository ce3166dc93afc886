"""Dense head vs spinal head on scikit-learn's bundled 8x8 digits (offline, CPU, well under a minute each).

The same small CNN is trained twice from the same seed: once with a dense head
``Linear(256, 64) -> ReLU -> Linear(64, 10)``, once with its classifier turned into a spinal
layer of the same hidden width (4 layers of 16) by ``spinalize``. Prints test accuracy,
parameter counts and time per epoch.

    python examples/digits_train.py [--epochs 20] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import spinal_ops
from spinal_ops import spinalize

SEED = 0
FEATURES = 256  # the CNN's flattened output
HIDDEN = 64  # dense hidden width = spinal num_layers * layer_width


def load_data() -> tuple[torch.Tensor, ...]:
    """1797 8x8 images scaled to [0, 1], stratified 75/25 split."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
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


def dense_model() -> nn.Sequential:
    torch.manual_seed(SEED)
    return cnn(nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10)))


def spinal_model() -> nn.Sequential:
    torch.manual_seed(SEED)
    # the classifier Linear(256, 10) becomes SpinalLinear(256, 10, layer_width=16, num_layers=4)
    return spinalize(cnn(nn.Linear(FEATURES, 10)), layer_width=HIDDEN // 4, num_layers=4)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def train_and_evaluate(name: str, model: nn.Sequential, data, epochs: int, batch_size: int = 64) -> None:
    x_train, x_test, y_train, y_test = data
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(SEED)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for rows in torch.randperm(len(x_train), generator=order).split(batch_size):
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[rows]), y_train[rows]).backward()
            optimizer.step()
    per_epoch = (time.perf_counter() - start) / epochs
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    head = model[-1]
    print(
        f"{name:<7} test accuracy {accuracy:6.2%}   parameters: model {count(model):6d}, head {count(head):6d}   "
        f"{per_epoch * 1e3:6.1f} ms/epoch"
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
    train_and_evaluate("dense", dense_model(), data, args.epochs)
    model = spinal_model()
    print(f"spinal head: {model[-1]}")
    train_and_evaluate("spinal", model, data, args.epochs)


if __name__ == "__main__":
    main()
