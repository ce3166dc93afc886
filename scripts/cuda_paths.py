"""Times the cuda backend's two paths (native kernels, hoisted cuBLAS chain), its automatic choice
and the dense layer on the presets: the data the cost model of spinal_ops/backends/cuda_cost.py
is calibrated from, and a check of its choices.

    python scripts/cuda_paths.py --json paths.json [--preset ...] [--batch ...] [--dtype ...]

Per case it prints each path's median time, the path the model picks and its predictions, and
the time lost by the choice (chosen / fastest); modes: train (x requires grad) and infer.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from spinal_ops.backends.cuda import cuda_path, forced_path, tile_kernel_max_width, narrow_kernels_fit
from spinal_ops.backends.cuda_cost import native_seconds, hoisted_seconds, model_for
from spinal_ops.bench.presets import PRESETS
from spinal_ops.bench.timing import median_seconds
from spinal_ops.bench.workloads import dense_baseline, make_step, spinal_layer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = ("train", "infer")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 64, 1024, 8192, 65536])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    parser.add_argument("--min-run-time", type=float, default=0.03)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    properties = torch.cuda.get_device_properties(device)
    model = model_for(properties.name, properties.multi_processor_count)
    records = []
    print(f"{'preset':>11} {'dtype':>8} {'batch':>6} {'mode':>5} {'native':>9} {'hoisted':>9} {'dense':>9} "
          f"{'pred f':>9} {'pred h':>9} {'choice':>7} {'lost':>5}")
    for name in args.preset:
        config = PRESETS[name]
        for dtype_name in args.dtype:
            dtype = DTYPES[dtype_name]
            torch.manual_seed(0)
            layer = spinal_layer(config, "cuda", dtype, device)
            dense = dense_baseline(config, dtype, device)
            for batch in args.batch:
                for mode in MODES:
                    training = mode == "train"
                    times = {}
                    for path in ("native", "hoisted"):
                        if path == "native" and config.layer_width > tile_kernel_max_width():
                            continue
                        with forced_path(path):
                            step = make_step(layer, config, batch, mode, dtype, device)
                            times[path] = median_seconds(step, device, args.min_run_time)
                    times["dense"] = median_seconds(make_step(dense, config, batch, mode, dtype, device), device,
                                                    args.min_run_time)
                    choice = cuda_path(config, batch, dtype, device, training).path
                    fastest = min(times[p] for p in ("native", "hoisted") if p in times)
                    record = {
                        "preset": name, "dtype": dtype_name, "batch": batch, "mode": mode,
                        "native_ms": times.get("native", float("nan")) * 1e3, "hoisted_ms": times["hoisted"] * 1e3,
                        "dense_ms": times["dense"] * 1e3,
                        "predicted_native_ms": native_seconds(config, batch, dtype, model, training,
                                                            narrow_kernels_fit(config)) * 1e3,
                        "predicted_hoisted_ms": hoisted_seconds(config, batch, dtype, model, training) * 1e3,
                        "choice": choice, "lost": times[choice] / fastest,
                    }
                    records.append(record)
                    print(f"{name:>11} {dtype_name:>8} {batch:>6} {mode:>5} {record['native_ms']:9.4f} "
                          f"{record['hoisted_ms']:9.4f} {record['dense_ms']:9.4f} {record['predicted_native_ms']:9.4f} "
                          f"{record['predicted_hoisted_ms']:9.4f} {choice:>7} {record['lost']:5.2f}", flush=True)
    with open(args.json, "w") as handle:
        json.dump({"device": properties.name, "torch": torch.__version__, "records": records}, handle, indent=1)
    worst = max(records, key=lambda r: r["lost"])
    print(f"worst choice: {worst['lost']:.2f}x slower than the faster path "
          f"({worst['preset']} {worst['dtype']} batch {worst['batch']} {worst['mode']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
