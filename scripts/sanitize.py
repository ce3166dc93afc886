"""Forward and backward of the cuda backend on every benchmark preset, for compute-sanitizer.

Run it under the sanitizer (``make sanitize`` does both tools):
    compute-sanitizer --tool memcheck  --error-exitcode 1 python scripts/sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python scripts/sanitize.py
Small and odd batch sizes (37 hits partial row tiles, 1 a single row, 300 split-K weight
gradients) in every dtype; the output is also checked for finiteness so a run that reads
garbage is visible even without the sanitizer. Exits non-zero without a CUDA device.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from spinal_ops.bench.presets import PRESETS
from spinal_ops.config import SpinalConfig, SpinalParams
from spinal_ops.functional import apply_spinal

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run_case(config: SpinalConfig, dtype: torch.dtype, batch: int) -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    params = SpinalParams(*(
        None if shape is None else (torch.rand(shape, device="cuda", generator=generator) * 0.1 - 0.05)
        .to(dtype).requires_grad_(True)
        for shape in config.parameter_shapes().values()
    ))
    x = torch.randn(batch, config.in_features, device="cuda", generator=generator).to(dtype).requires_grad_(True)
    y = apply_spinal(x, params, config, "cuda")
    y.backward(torch.randn_like(y))
    torch.cuda.synchronize()
    for name, tensor in [("output", y), ("grad_x", x.grad), *((f"grad_{i}", p.grad) for i, p in enumerate(params)
                                                               if p is not None)]:
        if not torch.isfinite(tensor).all():
            raise SystemExit(f"non-finite {name} for {config} {dtype} batch {batch}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--batch", nargs="+", type=int, default=[37, 1, 300])
    parser.add_argument("--path", choices=["auto", "native", "hoisted"], default="auto",
                        help="CUDA path: the cost model's choice, or forced (native applies where w fits)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("sanitize.py: no CUDA device", file=sys.stderr)
        return 2
    from spinal_ops.backends.cuda import cuda_path, forced_path

    with contextlib.nullcontext() if args.path == "auto" else forced_path(args.path):
        for name in args.preset:
            for dtype_name in args.dtype:
                for batch in args.batch:
                    run_case(PRESETS[name], DTYPES[dtype_name], batch)
                    path = cuda_path(PRESETS[name], batch, DTYPES[dtype_name], torch.device("cuda"), True)
                    print(f"ok {name} {dtype_name} batch={batch} ({path.path} path)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
