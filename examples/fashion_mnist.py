"""Test accuracy of the MNIST CNN of the SpinalNet paper on Fashion-MNIST with four heads.

The backbone is the authors' small MNIST CNN (dipuk0506/SpinalNet, MNIST/SpinalNet_MNIST.py):
conv 1->10 (5x5), max-pool, ReLU, conv 10->20 (5x5), Dropout2d, max-pool, ReLU -> 320 features.
Heads, each trained from the same seeds (same backbone initialisation and batch order per seed):

  dense-authors     the authors' default head: Linear(320, 50) -> ReLU -> Dropout -> Linear(50, 10)
  dense-equal       the same with the spinal head's hidden width: Linear(320, 48) -> ReLU -> Dropout -> Linear(48, 10)
  spinal-reference  SpinalLinear(320, 10, layer_width=8, num_layers=6, backend="reference")
  spinal-auto       the same layer on backend="auto" (the fastest backend usable here)

As in the authors' script: SGD (lr 0.01, momentum 0.5), batch 64, 8 epochs by default, no
augmentation, inputs normalised with the training set's mean and standard deviation. Prints and
writes the test accuracy (mean and sd over seeds), the head's parameters and FLOPs per row, and
the time per epoch; ``--json`` and ``--page`` write the results file and its markdown page.

    # Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist  (IDX files in /usr/share/datasets/fashion-mnist)
    python examples/fashion_mnist.py --epochs 8 --seeds 0 1 2
    python examples/fashion_mnist.py --download --data-dir ./data            # torchvision downloads it
    python examples/fashion_mnist.py --render results.json --page results.md  # the page from a results file
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import spinal_ops
from spinal_ops import SpinalLinear
from spinal_ops.bench.heads import DenseHead
from spinal_ops.bench.results import device_name
from spinal_ops.dispatch import select_backend

FEATURES, CLASSES = 320, 10
SPINAL = {"layer_width": 8, "num_layers": 6}  # the paper's MNIST head: 6 layers of width 8 over two halves
DEFAULT_DATA_DIRS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist", "mnist": "/usr/share/datasets/mnist"}
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
HEADS = ("dense-authors", "dense-equal", "spinal-reference", "spinal-auto")
# The paper's own Fashion-MNIST figure for this CNN, shown beside ours on the page; None: no
# figure could be checked against the paper, and the page says so instead of quoting one.
PAPER_FIGURE: dict[str, str] | None = None


# ---- data -------------------------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip'd or not) as a numpy array: big-endian magic (0, 0, dtype code, ndim), dims."""
    opener = gzip.open if path.read_bytes()[:2] == b"\x1f\x8b" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != math.prod(shape):
        raise ValueError(f"{path}: {array.size} values for shape {shape}")
    return array.reshape(shape)


def _find_idx(data_dir: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        for candidate in (data_dir / name, data_dir / "raw" / name):
            if candidate.exists():
                return candidate
    raise FileNotFoundError(
        f"{stem}[.gz] not found in {data_dir}; on Debian/Ubuntu `apt-get install dataset-fashion-mnist` "
        "installs it in /usr/share/datasets/fashion-mnist, or pass --download (needs internet and torchvision)"
    )


def load_arrays(dataset: str, data_dir: Path, download: bool) -> dict[str, np.ndarray]:
    """{train,test}_{images,labels} as uint8 arrays: from IDX files, or through torchvision."""
    if download:
        import torchvision

        cls = {"fashion-mnist": torchvision.datasets.FashionMNIST, "mnist": torchvision.datasets.MNIST}[dataset]
        train, test = (cls(str(data_dir), train=flag, download=True) for flag in (True, False))
        return {"train_images": train.data.numpy(), "train_labels": train.targets.numpy(),
                "test_images": test.data.numpy(), "test_labels": test.targets.numpy()}
    return {key: read_idx(_find_idx(data_dir, stem)) for key, stem in IDX_FILES.items()}


def to_tensors(arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images [n, 1, 28, 28] in float32, normalised with the training set's mean and sd; int64 labels."""
    train = torch.from_numpy(arrays["train_images"].astype(np.float32) / 255.0).unsqueeze(1)
    test = torch.from_numpy(arrays["test_images"].astype(np.float32) / 255.0).unsqueeze(1)
    mean, std = train.mean(), train.std()
    return ((train - mean) / std, torch.from_numpy(arrays["train_labels"].astype(np.int64)),
            (test - mean) / std, torch.from_numpy(arrays["test_labels"].astype(np.int64)))


# ---- models -----------------------------------------------------------------------------------

class MnistCNN(nn.Module):
    """The authors' MNIST CNN with a replaceable head on its 320 features."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def dense_head(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Dropout(), nn.Linear(hidden, CLASSES))


def spinal_head(backend: str, **options: Any) -> SpinalLinear:
    """``options`` go to SpinalLinear as they are (e.g. further layer options where the installed
    version has them)."""
    return SpinalLinear(FEATURES, CLASSES, **SPINAL, backend=backend, **options)


HEAD_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "dense-authors": lambda: dense_head(50),
    "dense-equal": lambda: dense_head(SPINAL["layer_width"] * SPINAL["num_layers"]),
    "spinal-reference": lambda: spinal_head("reference"),
    "spinal-auto": lambda: spinal_head("auto"),
}


def build_model(head: str, seed: int) -> MnistCNN:
    """The same seed gives every head the same backbone initialisation (the backbone is built first)."""
    torch.manual_seed(seed)
    conv = MnistCNN(nn.Identity())
    conv.head = HEAD_BUILDERS[head]()
    return conv


def head_costs(head: str) -> tuple[int, int, str]:
    """(parameters, forward FLOPs per row, description) of a head, from the analytic counts."""
    if head.startswith("dense"):
        hidden = 50 if head == "dense-authors" else SPINAL["layer_width"] * SPINAL["num_layers"]
        dense = DenseHead((FEATURES, hidden, CLASSES))
        return dense.num_parameters(), dense.forward_flops(1), f"{dense.describe().replace('phi', 'ReLU -> Dropout')}"
    layer = spinal_head("reference", device="meta")
    backend = "reference" if head == "spinal-reference" else select_backend(
        "auto", layer.config, torch.float32, torch.device("cpu")).name
    return (layer.config.num_parameters(), layer.config.forward_flops(1),
            f"SpinalLinear(320, 10, layer_width=8, num_layers=6), backend {backend}")


# ---- training ---------------------------------------------------------------------------------

def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(images[start:start + batch_size])
            correct += (logits.argmax(1) == labels[start:start + batch_size]).sum().item()
    return correct / len(images)


def train_run(head: str, seed: int, data, epochs: int, batch_size: int = 64, lr: float = 0.01,
              momentum: float = 0.5, log: Callable[[str], None] = print) -> dict[str, Any]:
    x_train, y_train, x_test, y_test = data
    model = build_model(head, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    order = torch.Generator().manual_seed(seed)
    run: dict[str, Any] = {"seed": seed, "epoch_seconds": [], "train_loss": [], "test_accuracy_per_epoch": []}
    for epoch in range(epochs):
        model.train()
        total, batches = 0.0, 0
        start = time.perf_counter()
        for rows in torch.randperm(len(x_train), generator=order).split(batch_size):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x_train[rows]), y_train[rows])
            loss.backward()
            optimizer.step()
            total += loss.item()
            batches += 1
        run["epoch_seconds"].append(time.perf_counter() - start)
        run["train_loss"].append(total / batches)
        run["test_accuracy_per_epoch"].append(evaluate(model, x_test, y_test))
        log(f"  {head:<16} seed {seed} epoch {epoch + 1}/{epochs}: train loss {run['train_loss'][-1]:.4f}, "
            f"test accuracy {run['test_accuracy_per_epoch'][-1]:.2%}, {run['epoch_seconds'][-1]:.1f} s")
    run["test_accuracy"] = run["test_accuracy_per_epoch"][-1]
    return run


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    accuracies = [run["test_accuracy"] for run in runs]
    seconds = [s for run in runs for s in run["epoch_seconds"]]
    return {
        "accuracy_mean": statistics.fmean(accuracies),
        "accuracy_sd": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "epoch_seconds_median": statistics.median(seconds),
    }


# ---- results file and page --------------------------------------------------------------------

def table(document: dict[str, Any]) -> str:
    lines = ["| head | test accuracy (mean ± sd) | head parameters | head FLOPs / row | s / epoch (median) |",
             "|---|---:|---:|---:|---:|"]
    for name, head in document["heads"].items():
        summary = summarise(head["runs"])
        lines.append(f"| {name}: {head['description']} | {100 * summary['accuracy_mean']:.2f}% ± "
                     f"{100 * summary['accuracy_sd']:.2f} | {head['params']:,} | {head['flops_per_row']:,} | "
                     f"{summary['epoch_seconds_median']:.1f} |")
    return "\n".join(lines)


def per_seed_table(document: dict[str, Any]) -> str:
    seeds = document["seeds"]
    lines = ["| head | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
             "|---|" + "---:|" * len(seeds)]
    for name, head in document["heads"].items():
        by_seed = {run["seed"]: run["test_accuracy"] for run in head["runs"]}
        lines.append(f"| {name} | " + " | ".join(f"{100 * by_seed[s]:.2f}%" if s in by_seed else "-"
                                                 for s in seeds) + " |")
    return "\n".join(lines)


def page(document: dict[str, Any], json_name: str) -> str:
    """The markdown results page; every figure comes from ``document``."""
    dataset = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST"}[document["dataset"]]
    paper = document.get("paper")
    paper_text = (f"The paper's figure for this CNN on {dataset}: **{paper['accuracy']}** ({paper['source']})."
                  if paper else
                  f"The paper's figure for this CNN on {dataset}: not quoted here; no figure could be "
                  "checked against the paper (arXiv 2007.03347) when this page was written.")
    return "\n\n".join([
        f"# Accuracy: the SpinalNet MNIST CNN on {dataset}",
        f"Measured on **{document['device']}** (torch {document['torch']}, {document['threads']} thread(s)), "
        f"{document['epochs']} epochs, seeds {', '.join(map(str, document['seeds']))}. Command:",
        f"```bash\n{document['command']}\n```",
        f"Data: {document['data']} ({document['train_size']:,} training, {document['test_size']:,} test images). "
        "Backbone: the authors' MNIST CNN (conv 1→10 5×5, pool, conv 10→20 5×5, Dropout2d, pool → 320 "
        f"features). {document['optimizer']}, batch {document['batch_size']}; every head of a seed starts "
        "from the same backbone weights and sees the batches in the same order. Test accuracy after the "
        "last epoch; FLOPs are the head's forward matrix-multiply FLOPs per image (2 per multiply-add); "
        "time per epoch is the whole model's training pass (the convolutions dominate it) on a machine "
        "shared with other work, so it is indicative only.",
        "As in the authors' scripts, the dense heads apply Dropout (p = 0.5) to their hidden layer and the "
        "spinal head has none. The two spinal rows train the same layer from the same weights on two "
        "backends: they differ only by float32 rounding, which compounds over the steps.",
        table(document),
        "Per seed:",
        per_seed_table(document),
        paper_text,
        f"Results file: [`{json_name}`](accuracy/{json_name}).",
    ]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--dataset", choices=tuple(DEFAULT_DATA_DIRS), default="fashion-mnist")
    parser.add_argument("--data-dir", type=Path,
                        help="folder with the four IDX files, gzip'd or not (default: the Debian package's); "
                        "with --download where torchvision stores the data (default ./data)")
    parser.add_argument("--download", action="store_true", help="fetch the data set through torchvision")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per run (default 8, as the authors' script)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    parser.add_argument("--train-subset", type=int, metavar="N", help="train on the first N images only (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", type=Path, help="write the results file here")
    parser.add_argument("--page", type=Path, help="write the markdown page here (needs --json or --render)")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only write --page from an existing results file")
    args = parser.parse_args(argv)

    if args.render:
        document = json.loads(args.render.read_text())
        text = page(document, args.render.name)
        if args.page:
            args.page.write_text(text)
        else:
            print(text, end="")
        return 0

    torch.set_num_threads(args.threads)
    data_dir = args.data_dir or Path("./data" if args.download else DEFAULT_DATA_DIRS[args.dataset])
    arrays = load_arrays(args.dataset, data_dir, args.download)
    data = to_tensors(arrays)
    if args.train_subset:
        data = (data[0][:args.train_subset], data[1][:args.train_subset], data[2], data[3])
    command = "python " + " ".join(shlex.quote(a) for a in ["examples/fashion_mnist.py", *(argv or sys.argv[1:])])
    document: dict[str, Any] = {
        "dataset": args.dataset,
        "data": "torchvision download" if args.download else f"IDX files in {data_dir}",
        "train_size": len(data[0]), "test_size": len(data[2]),
        "device": device_name(torch.device("cpu")), "machine": platform.machine(),
        "torch": torch.__version__, "spinal_ops": spinal_ops.__version__, "threads": args.threads,
        "command": command, "epochs": args.epochs, "seeds": args.seeds, "batch_size": 64,
        "optimizer": "SGD, lr 0.01, momentum 0.5", "paper": PAPER_FIGURE, "heads": {},
    }
    print(f"{args.dataset}: {len(data[0])} train / {len(data[2])} test images on {document['device']}, "
          f"{args.epochs} epochs, seeds {args.seeds}, torch threads {args.threads}", flush=True)
    # Seeds outermost, heads inside: a slow phase of a shared machine falls on every head alike.
    for seed in args.seeds:
        for head in args.heads:
            params, flops, description = head_costs(head)
            entry = document["heads"].setdefault(
                head, {"description": description, "params": params, "flops_per_row": flops, "runs": []})
            entry["runs"].append(train_run(head, seed, data, args.epochs, log=lambda line: print(line, flush=True)))
            if args.json:  # after every run: an interrupted run keeps what it measured
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(document, indent=1) + "\n")
    print()
    print(table(document))
    if args.page:
        if not args.json:
            parser.error("--page needs --json (the page links its results file)")
        args.page.parent.mkdir(parents=True, exist_ok=True)
        args.page.write_text(page(document, args.json.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
