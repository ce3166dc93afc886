"""Training end to end on scikit-learn's digits (offline, a few seconds): the op-pair backends
train as the reference does, and every head learns.

The model and the loop are examples/digits_train.py's: a small CNN with a dense head or
SpinalLinear(256, 10, layer_width=16, num_layers=4) (float32 on the CPU: the CPU narrow chain).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from spinal_ops import available_backends

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
_spec = importlib.util.spec_from_file_location("digits_train", EXAMPLES / "digits_train.py")
digits_train = sys.modules["digits_train"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(digits_train)

EPOCHS = 3  # 66 steps of 64 rows
CHANCE = 0.1
LEARNED = 0.8  # test accuracy every head must pass after LEARN_EPOCHS (they reach ~0.9 here)
LEARN_EPOCHS = 5
# Loss values near 2.3 are stored in float32 with a spacing of 2.4e-7: atol is a few units of that.
ATOL = 1e-6


def sgd(parameters):
    # SGD, as the authors train: a wrong gradient moves the weights in proportion to its error.
    # (Adam divides each gradient by its running scale, so a gradient off by a constant factor
    # would barely change its steps.)
    return torch.optim.SGD(parameters, lr=0.05, momentum=0.9)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only add synchronisation
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return digits_train.load_data()


@pytest.fixture(scope="module")
def reference_curves():
    """Loss curves of the reference backend in float32 and float64 (same seed, init and batches)."""
    float32 = digits_train.train(digits_train.build_model("spinal", "reference"), digits_train.load_data(),
                                 EPOCHS, optimizer=sgd).losses
    float64 = digits_train.train(digits_train.build_model("spinal", "reference", dtype=torch.float64),
                                 digits_train.load_data(torch.float64), EPOCHS, optimizer=sgd).losses
    return float32, float64


def curve_violations(losses: list[float], reference_curves) -> list[str]:
    """The steps where a float32 training run leaves the reference's band.

    As contract §4 judges one call, a training run is judged against the float64 reference run:
    at step k its loss may differ from the float64 loss by at most 2x the largest difference the
    float32 reference run itself has had up to step k (float32 rounding, compounded by the steps
    so far) plus ATOL. The band is as tight as the reference's own rounding early and widens only
    as far as the reference's own float32 run drifts later; a wrong gradient leaves it within a
    few dozen steps (test_curve_check_catches_a_wrong_gradient)."""
    float32, float64 = reference_curves
    assert len(losses) == len(float64)
    violations, drift = [], 0.0
    for step, (loss, loss32, loss64) in enumerate(zip(losses, float32, float64)):
        drift = max(drift, abs(loss32 - loss64))
        bound = 2 * drift + ATOL
        if abs(loss - loss64) > bound:
            violations.append(f"step {step}: loss {loss:.7f}, float64 reference {loss64:.7f}, bound {bound:.2e}")
    return violations


def test_reference_runs_learn_and_agree_across_dtypes(reference_curves):
    float32, float64 = reference_curves
    assert float32[-1] < 0.5 * float32[0]  # the comparison below is over a run that learns
    assert max(abs(a - b) for a, b in zip(float32, float64)) < 1e-5  # float32 rounding only


@pytest.mark.skipif(not available_backends()["cpu"], reason=available_backends()["cpu"].reason)
def test_cpu_backend_trains_like_the_reference(data, reference_curves):
    losses = digits_train.train(digits_train.build_model("spinal", "cpu"), data, EPOCHS, optimizer=sgd).losses
    assert curve_violations(losses, reference_curves) == []


@pytest.mark.skipif(not available_backends()["cpu"], reason=available_backends()["cpu"].reason)
def test_curve_check_catches_a_wrong_gradient(data, reference_curves):
    """The check above can fail: the cpu backend with its recurrence weights' gradient 1% off."""
    model = digits_train.build_model("spinal", "cpu")
    model[-1].weight_hidden.register_hook(lambda grad: grad * 1.01)
    losses = digits_train.train(model, data, EPOCHS, optimizer=sgd).losses
    assert curve_violations(losses, reference_curves) != []


@pytest.mark.slow
@pytest.mark.skipif(not available_backends()["triton"], reason=available_backends()["triton"].reason)
def test_triton_backend_trains_like_the_reference(data, reference_curves):
    # Under TRITON_INTERPRET a step takes ~1.5 s here: only the first steps, which catch a
    # gross error (a missing or mis-signed gradient term), not a 1% one.
    steps = 4
    losses = digits_train.train(digits_train.build_model("spinal", "triton"), data, EPOCHS, optimizer=sgd,
                                max_steps=steps).losses
    float32, float64 = reference_curves
    assert curve_violations(losses, (float32[:steps], float64[:steps])) == []


HEADS = [("dense", "auto"), ("spinal", "reference"), ("spinal", "cpu")]


@pytest.mark.parametrize(("head", "backend"), HEADS, ids=[f"{h}-{b}" for h, b in HEADS])
def test_every_head_learns(data, head, backend):
    if head == "spinal" and not available_backends()[backend]:
        pytest.skip(available_backends()[backend].reason)
    model = digits_train.build_model(head, backend)
    history = digits_train.train(model, data, LEARN_EPOCHS)
    assert digits_train.accuracy(model, data) > LEARNED
    assert history.losses[-1] < 0.5 * history.losses[0]


def test_learning_check_can_fail(data):
    """A head that does not learn (no step taken) stays near chance and fails the bound above."""
    model = digits_train.build_model("spinal", "reference")
    digits_train.train(model, data, 1, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    assert digits_train.accuracy(model, data) < min(LEARNED, 3 * CHANCE)


# ---- examples/fashion_mnist.py: its reader, its cost columns, and its committed page ------------

_fashion_spec = importlib.util.spec_from_file_location("fashion_mnist", EXAMPLES / "fashion_mnist.py")
fashion_mnist = sys.modules["fashion_mnist"] = importlib.util.module_from_spec(_fashion_spec)
_fashion_spec.loader.exec_module(fashion_mnist)
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.mark.parametrize("compressed", [False, True])
def test_read_idx(tmp_path, compressed):
    import gzip

    import numpy as np

    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    payload = bytes([0, 0, 0x08, 3]) + b"".join(n.to_bytes(4, "big") for n in images.shape) + images.tobytes()
    path = tmp_path / "images-idx3-ubyte"
    path.write_bytes(gzip.compress(payload) if compressed else payload)
    np.testing.assert_array_equal(fashion_mnist.read_idx(path), images)
    path.write_bytes(payload[:-1])
    with pytest.raises(ValueError, match="values for shape"):
        fashion_mnist.read_idx(path)


def test_fashion_heads_costs():
    # hand-computed: weights + biases; 2 FLOPs per multiply-add of one row's forward
    assert fashion_mnist.head_costs("dense-authors")[:2] == (320 * 50 + 50 + 50 * 10 + 10, 2 * (320 * 50 + 50 * 10))
    assert fashion_mnist.head_costs("dense-equal")[:2] == (320 * 48 + 48 + 48 * 10 + 10, 2 * (320 * 48 + 48 * 10))
    spinal = (6 * 8 * 160 + 5 * 8 * 8 + 6 * 8 + 10 * 48 + 10, 2 * (6 * 8 * 160 + 5 * 8 * 8 + 10 * 48))
    assert fashion_mnist.head_costs("spinal-reference")[:2] == fashion_mnist.head_costs("spinal-auto")[:2] == spinal
    for head in fashion_mnist.HEADS:  # the model that trains has the counted parameters
        model = fashion_mnist.build_model(head, seed=0)
        assert sum(p.numel() for p in model.head.parameters()) == fashion_mnist.head_costs(head)[0]
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("page", sorted(RESULTS.glob("accuracy-*.md")), ids=lambda path: path.name)
def test_accuracy_pages_are_renderings_of_their_results_files(page):
    """Every figure on a committed accuracy page comes from the results file it links."""
    json_path = RESULTS / "accuracy" / page.name.removeprefix("accuracy-").replace(".md", ".json")
    document = __import__("json").loads(json_path.read_text())
    assert fashion_mnist.page(document, json_path.name) == page.read_text()
    for head in document["heads"].values():
        assert [run["seed"] for run in head["runs"]] == document["seeds"]
        assert all(len(run["epoch_seconds"]) == document["epochs"] for run in head["runs"])
