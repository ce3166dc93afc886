"""Transfer learning with a frozen backbone and a spinal head, the SpinalNet authors' recipe, offline.

The authors (Kabir et al., 2020) put a spinal head on a pretrained torchvision backbone, their
"VGG-style" head: four layers of ``Dropout -> Linear -> BatchNorm1d -> ReLU`` reading the two halves
of the features alternately, then ``Dropout -> Linear``. Without downloads, the pretraining is done
here: torchvision's resnet18 (random weights) learns scikit-learn's digits 0-4 (8x8 images scaled
to 32x32), then is frozen and its 512 features are used to learn digits 5-9 with four heads:

* ``dense``: ``Linear(512, 5)``, the backbone's own kind of classifier;
* ``authors``: the authors' VGG-style spinal head with BatchNorm and Dropout, in plain PyTorch;
* ``spinal``: ``SpinalLinear(512, 5, layer_width=64, num_layers=4)``, the fused op, trained directly;
* ``authors->SpinalLinear``: the trained authors' head converted by ``from_spinalnet`` (BatchNorm
  folded into the weights) for inference with the fused op: the same predictions.

The frozen backbone runs in eval mode and there is no augmentation, so its features are computed
once; the per-epoch times are those of the heads alone. Prints test accuracy and time per epoch.

    python examples/transfer_learning.py [--pretrain-epochs 3] [--epochs 30] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import spinal_ops
from spinal_ops import SpinalLinear, from_spinalnet

SEED = 0
IMAGE = 32
FEATURES = 512  # resnet18's pooled features
CLASSES = 5
LAYER_WIDTH = 64


def load_tasks() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    """Source task: digits 0-4 (all of them). Target task: digits 5-9 relabelled 0-4, split 75/25."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(IMAGE, IMAGE), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()  # 3 channels, as resnet expects
    labels = torch.tensor(digits.target)
    source = labels < CLASSES
    target = ~source
    x_train, x_test, y_train, y_test = train_test_split(
        images[target], labels[target] - CLASSES, test_size=0.25, random_state=SEED, stratify=labels[target]
    )
    return (images[source], labels[source]), (x_train, x_test, y_train, y_test)


class AuthorsSpinalHead(nn.Module):
    """The authors' VGG-style transfer-learning head (their ``fc_spinal_layerI`` / ``fc_out`` names)."""

    def __init__(self, in_features: int, layer_width: int, classes: int, num_layers: int = 4):
        super().__init__()
        self.half = in_features // 2
        for index in range(1, num_layers + 1):
            fan_in = self.half + (layer_width if index > 1 else 0)
            block = nn.Sequential(
                nn.Dropout(p=0.5), nn.Linear(fan_in, layer_width), nn.BatchNorm1d(layer_width), nn.ReLU(inplace=True)
            )
            setattr(self, f"fc_spinal_layer{index}", block)
        self.num_layers = num_layers
        self.fc_out = nn.Sequential(nn.Dropout(p=0.5), nn.Linear(layer_width * num_layers, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        halves = (x[:, : self.half], x[:, self.half : 2 * self.half])
        hidden: list[torch.Tensor] = []
        for index in range(self.num_layers):
            layer = getattr(self, f"fc_spinal_layer{index + 1}")
            window = halves[index % 2]
            hidden.append(layer(window if index == 0 else torch.cat([window, hidden[-1]], dim=1)))
        return self.fc_out(torch.cat(hidden, dim=1))


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch_size: int = 64) -> float:
    """Adam on shuffled mini-batches; returns seconds per epoch."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    order = torch.Generator().manual_seed(SEED)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        for rows in torch.randperm(len(x), generator=order).split(batch_size):
            optimizer.zero_grad()
            F.cross_entropy(model(x[rows]), y[rows]).backward()
            optimizer.step()
    return (time.perf_counter() - start) / epochs


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def pretrained_backbone(source: tuple[torch.Tensor, torch.Tensor], epochs: int) -> nn.Module:
    """resnet18 trained on the source task, then frozen, with its classifier removed."""
    torch.manual_seed(SEED)
    backbone = torchvision.models.resnet18(num_classes=CLASSES)
    seconds = fit(backbone, *source, epochs=epochs, lr=1e-3)
    print(f"backbone: resnet18 trained on digits 0-4 ({len(source[0])} images), {epochs} epochs, "
          f"{seconds:.1f} s/epoch, accuracy on them {accuracy(backbone, *source):.2%}")
    backbone.fc = nn.Identity()
    backbone.requires_grad_(False)
    return backbone.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30, help="epochs of each head")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    source, (x_train, x_test, y_train, y_test) = load_tasks()
    usable = [name for name, support in spinal_ops.available_backends().items() if support]
    print(f"digits 5-9: {len(x_train)} train / {len(x_test)} test images; torch threads {torch.get_num_threads()}, "
          f"spinal backends usable here: {', '.join(usable)}")
    backbone = pretrained_backbone(source, args.pretrain_epochs)
    with torch.no_grad():
        f_train, f_test = backbone(x_train), backbone(x_test)

    heads: dict[str, nn.Module] = {}
    torch.manual_seed(SEED)
    heads["dense"] = nn.Linear(FEATURES, CLASSES)
    torch.manual_seed(SEED)
    heads["authors"] = AuthorsSpinalHead(FEATURES, LAYER_WIDTH, CLASSES)
    torch.manual_seed(SEED)
    heads["spinal"] = SpinalLinear(FEATURES, CLASSES, layer_width=LAYER_WIDTH, num_layers=4)
    for name, head in heads.items():
        seconds = fit(head, f_train, y_train, epochs=args.epochs, lr=1e-3)
        params = sum(p.numel() for p in head.parameters())
        print(f"{name:<22} test accuracy {accuracy(head, f_test, y_test):7.2%}   head parameters {params:7d}"
              f"   {seconds * 1e3:7.1f} ms/epoch")

    converted = from_spinalnet(heads["authors"].eval())
    agree = (converted(f_test).argmax(dim=1) == heads["authors"](f_test).argmax(dim=1)).float().mean().item()
    print(f"{'authors->SpinalLinear':<22} test accuracy {accuracy(converted, f_test, y_test):7.2%}   "
          f"same prediction as the authors' head (eval mode) on {agree:.2%} of the test images")


if __name__ == "__main__":
    main()
