"""``spinal-bench`` / ``python -m spinal_ops.bench``: spinal layer vs dense layer, per backend.

With no arguments this is the README's main command: the small presets on CPU, batches
64/1024/4096, backends cpu, reference and dense, modes train, frozen and infer, JSON and PNG
under bench-out/ (about four minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import MODES
from .plot import plot_records
from .heads import BASELINES, baseline_note
from .presets import DEFAULT_PRESETS, PRESETS, parse_presets
from .report import terminal_report
from .results import device_name, device_slug, results_document, write_json
from .runner import Matrix, run_matrix
from .workloads import IMPLS

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_BATCHES = (64, 1024, 4096)
DEFAULT_BACKENDS = ("cpu", "reference", "dense")  # compiled_reference: ~10 s of compiling per case on 2 cores
QUICK_BATCHES = (64,)
MIN_RUN_TIME_S = 0.3
QUICK_MIN_RUN_TIME_S = 0.02


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spinal-bench",
        description="Benchmark the spinal layer (every backend) against eager reference, "
        "torch.compile(reference) and a dense baseline: the dense layer of equal hidden width, or "
        "with --baseline authors the dense head the spinal layer replaces in the paper's models.",
        epilog="{device} in --json/--plot paths becomes the device name, e.g. "
        "--json 'benchmarks/results/{device}.json'.",
    )
    parser.add_argument("--preset", nargs="+", default=list(DEFAULT_PRESETS), metavar="PRESET",
                        help=f"{', '.join(PRESETS)}, all, or custom N,w,L,M[,k] (M may be none); "
                        f"default: {' '.join(DEFAULT_PRESETS)}")
    parser.add_argument("--batch", nargs="+", type=int, metavar="B",
                        help=f"batch sizes (default: {' '.join(map(str, DEFAULT_BATCHES))}; "
                        f"with --quick {' '.join(map(str, QUICK_BATCHES))})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=["float32"], metavar="DTYPE",
                        help=f"{', '.join(DTYPES)} (default: float32)")
    parser.add_argument("--backends", nargs="+", choices=IMPLS + ("all",), default=list(DEFAULT_BACKENDS),
                        metavar="IMPL", help=f"{', '.join(IMPLS)} or all (default: {' '.join(DEFAULT_BACKENDS)})")
    parser.add_argument("--baseline", choices=BASELINES, default="equal-width",
                        help="what 'dense' in --backends measures and E divides by: equal-width (default): "
                        "Linear(N, L*w) -> phi -> Linear(L*w, M); authors: the dense head of the preset's "
                        "source model (mnist 320-50-10, vgg5 256-512-10, cifar_vgg 512-4096-4096-10, "
                        "cnn_cifar 4096-1024-512-10, resnet_head 2048-1000, vgg_head 25088-4096-4096-1000), "
                        "recorded as 'authors_dense'; a custom preset has none and keeps equal-width (the run "
                        "says so). The E goals are set against equal-width and are not checked under authors.")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES), metavar="MODE",
                        help="train (forward+backward, gradients for x and every parameter), frozen "
                        "(forward+backward, x without grad), infer (forward under no_grad); default: all three")
    parser.add_argument("--json", default="bench-out/results.json", metavar="PATH",
                        help="results JSON (default: bench-out/results.json)")
    parser.add_argument("--plot", default="bench-out/results.png", metavar="PATH",
                        help="PNG plot (default: bench-out/results.png)")
    parser.add_argument("--min-run-time", type=float, metavar="S",
                        help=f"seconds of measurement per case (default {MIN_RUN_TIME_S}; "
                        f"with --quick {QUICK_MIN_RUN_TIME_S})")
    parser.add_argument("--threads", nargs="+", type=int, metavar="T",
                        help="CPU threads for torch; several counts run the matrix once per count "
                        "(default: torch's default for this machine)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also time every implementation's step captured once in a CUDA graph and replayed "
                        "(the dense baseline and the reference included), beside the eager figures; --device cuda")
    parser.add_argument("--quick", action="store_true", help="smoke run: one batch, short measurements")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def matrix_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Matrix:
    try:
        presets = parse_presets(args.preset)
    except ValueError as error:
        parser.error(str(error))
    batches = tuple(args.batch or (QUICK_BATCHES if args.quick else DEFAULT_BATCHES))
    if any(batch < 1 for batch in batches):
        parser.error(f"--batch sizes must be >= 1, got {batches}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.cuda_graphs and device.type != "cuda":
        parser.error("--cuda-graphs needs --device cuda")
    min_run_time = args.min_run_time or (QUICK_MIN_RUN_TIME_S if args.quick else MIN_RUN_TIME_S)
    threads = tuple(dict.fromkeys(args.threads or (torch.get_num_threads(),)))
    if any(count < 1 for count in threads):
        parser.error(f"--threads must be >= 1, got {threads}")
    return Matrix(
        presets=presets,
        batches=batches,
        dtypes=tuple(DTYPES[name] for name in dict.fromkeys(args.dtype)),
        impls=IMPLS if "all" in args.backends else tuple(dict.fromkeys(args.backends)),
        modes=tuple(dict.fromkeys(args.mode)),
        threads=threads,
        device=device,
        min_run_time=min_run_time,
        baseline=args.baseline,
        cuda_graphs=args.cuda_graphs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    matrix = matrix_from_args(args, parser)
    torch.manual_seed(0)
    name = device_name(matrix.device)
    print(f"spinal-bench on {name} ({matrix.device.type}, {'/'.join(map(str, matrix.threads))} threads), "
          f"torch {torch.__version__}: {matrix.num_cases()} cases", flush=True)
    started = time.perf_counter()
    if "dense" in matrix.impls:
        print(f"dense baseline ({args.baseline}):", flush=True)
        for preset, config in matrix.presets.items():
            print(f"  {baseline_note(args.baseline, preset, config)}", flush=True)
    records, skips = run_matrix(matrix, progress=not args.no_progress)
    print(terminal_report(records, skips, matrix.device.type))
    json_path = Path(args.json.replace("{device}", device_slug(name)))
    write_json(json_path, results_document(records, matrix.device))
    outputs = [str(json_path)]
    if records:
        plot_path = Path(args.plot.replace("{device}", device_slug(name)))
        plot_records(records, plot_path, title=f"spinal vs dense ({args.baseline}) on {name}")
        outputs.append(str(plot_path))
    print(f"\nwrote {' and '.join(outputs)} in {time.perf_counter() - started:.0f} s")
    return 0
