"""spinalize on real architectures with random weights (no downloads): torchvision's resnet18
(``fc``) and vgg11 (``classifier.6``), and a timm ViT whose head is replaced with
``reset_classifier`` first. Small 32x32 inputs and a few steps keep each case to seconds.

Each case checks the spinal head on the features the real backbone produces (forward and every
gradient against the float64 reference, contract §4), training, torch.compile(fullgraph=True) of
the head, a state_dict round trip, and training with the backbone frozen.
"""
import io
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from contract import assert_within_contract, check_backend
from torch import nn

from spinal_ops import SpinalLinear, spinalize
from spinal_ops.reference import spinal_forward

BATCH, CLASSES, IMAGE = 8, 10, 32


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]  # a fresh model with random weights and CLASSES outputs
    head: str  # the name of the classifier nn.Linear to spinalize
    layer_width: int
    num_splits: int


def _resnet18():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(num_classes=CLASSES)


def _vgg11():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.vgg11(num_classes=CLASSES)


def _timm_vit():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMAGE, patch_size=8)
    model.reset_classifier(CLASSES)  # how timm users put their own number of classes on a model
    return model


CASES = {
    # num_splits=3 on N=512: s=171, so layer 2's window wraps around the end of the features
    "resnet18": Case(_resnet18, "fc", layer_width=32, num_splits=3),
    "vgg11": Case(_vgg11, "classifier.6", layer_width=32, num_splits=2),
    "timm_vit_tiny": Case(_timm_vit, "head", layer_width=16, num_splits=2),
}


def spinal_model(case: Case, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = case.build()
    spinalize(model, layer_width=case.layer_width, num_layers=4, num_splits=case.num_splits, target=case.head)
    assert isinstance(model.get_submodule(case.head), SpinalLinear)
    return model


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=generator)
    return images, torch.randint(0, CLASSES, (BATCH,), generator=generator)


def head_input(model: nn.Module, head: SpinalLinear, images: torch.Tensor) -> torch.Tensor:
    """The features the backbone hands the head (captured with a forward pre-hook)."""
    captured = []
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    return captured[0]


def train(model: nn.Module, parameters, steps: int) -> list[float]:
    images, labels = batch()
    optimizer = torch.optim.SGD(parameters, lr=0.01, momentum=0.9)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(params=list(CASES))
def case(request) -> Case:
    return CASES[request.param]


def test_training_steps_and_head_against_reference(case):
    model = spinal_model(case).train()
    head = model.get_submodule(case.head)
    losses = train(model, model.parameters(), steps=4)
    assert losses[-1] < losses[0], losses  # the whole model learns the fixed batch
    model.eval()
    features = head_input(model, head, batch()[0])
    # the trained head on real features: output and every gradient within contract §4
    check_backend(head.backend, head.config, x=features.double(), params=head.params())


def test_compiled_head_fullgraph(case):
    model = spinal_model(case).eval()
    head = model.get_submodule(case.head)
    features = head_input(model, head, batch()[0]).requires_grad_(True)
    compiled = torch.compile(head, fullgraph=True)
    out = compiled(features)
    grad_out = torch.randn_like(out)
    leaves = [features, *head.parameters()]
    grads = torch.autograd.grad(out, leaves, grad_out)

    params64 = type(head.params())(*(None if p is None else p.detach().double().requires_grad_(True) for p in head.params()))
    x64 = features.detach().double().requires_grad_(True)
    out64 = spinal_forward(x64, params64, head.config)
    leaves64 = [x64, *(p for p in params64 if p is not None)]
    grads64 = torch.autograd.grad(out64, leaves64, grad_out.double())
    eager = spinal_forward(features, head.params(), head.config)
    grads_eager = torch.autograd.grad(eager, leaves, grad_out)
    names = ["output", "x", *(name for name, _ in head.named_parameters())]
    for name, got, expected, eag in zip(names, [out, *grads], [out64, *grads64], [eager, *grads_eager]):
        assert_within_contract(f"compiled {case.head} {name}", got.detach(), expected.detach(), eag.detach(), torch.float32)


def test_state_dict_round_trip(case):
    model = spinal_model(case, seed=0).train()
    train(model, model.parameters(), steps=1)  # trained weights, not the initialisation
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    restored = spinal_model(case, seed=1)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer), strict=True)
    images = batch(seed=2)[0]
    with torch.no_grad():
        assert torch.equal(restored.eval()(images), model.eval()(images))


def test_frozen_backbone(case):
    model = spinal_model(case)
    head = model.get_submodule(case.head)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in head.parameters():
        parameter.requires_grad_(True)
    model.eval()  # the backbone's BatchNorm statistics stay as they are
    head.train()
    backbone = {name: p.clone() for name, p in model.named_parameters() if not name.startswith(case.head + ".")}
    head_before = [p.detach().clone() for p in head.parameters()]
    losses = train(model, head.parameters(), steps=4)
    assert losses[-1] < losses[0], losses
    for name, parameter in model.named_parameters():
        if name in backbone:
            assert parameter.grad is None and torch.equal(parameter, backbone[name]), name
    assert all(not torch.equal(before, after) for before, after in zip(head_before, head.parameters()))
    features = head_input(model, head, batch()[0])
    check_backend(head.backend, head.config, x=features.double(), params=head.params())
