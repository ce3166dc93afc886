"""Runs the benchmark matrix (presets x dtypes x implementations x batches x passes)."""
from __future__ import annotations

import gc
import itertools
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..config import SpinalConfig
from . import roofline
from .results import Record, Skip, dtype_name
from .timing import median_seconds
from .workloads import ImplUnavailable, build_impl, cost, make_step


@dataclass(frozen=True)
class Matrix:
    presets: dict[str, SpinalConfig]
    batches: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    impls: tuple[str, ...]
    passes: tuple[str, ...]
    device: torch.device
    min_run_time: float  # seconds of measurement per case (after warm-up)

    def num_cases(self) -> int:
        return len(self.presets) * len(self.dtypes) * len(self.impls) * len(self.batches) * len(self.passes)


def run_matrix(matrix: Matrix, progress: bool = True) -> tuple[list[Record], list[Skip]]:
    """Time every case; an unavailable implementation is skipped once per preset/dtype with its reason."""
    records: list[Record] = []
    skips: list[Skip] = []
    bandwidth = roofline.copy_bandwidth(matrix.device, matrix.min_run_time) if matrix.device.type == "cuda" else None
    bar = tqdm(total=matrix.num_cases(), unit="case", disable=not progress, leave=False)
    for (preset, config), dtype, impl in itertools.product(matrix.presets.items(), matrix.dtypes, matrix.impls):
        bar.set_description(f"{preset} {dtype_name(dtype)} {impl}")
        cases = list(itertools.product(matrix.batches, matrix.passes))
        measured = 0
        try:
            model = build_impl(impl, config, dtype, matrix.device)
            for batch, pass_name in cases:
                records.append(_measure(matrix, preset, config, dtype, impl, model, batch, pass_name, bandwidth))
                measured += 1
                bar.update()
        except ImplUnavailable as error:
            skips.append(Skip(preset, dtype_name(dtype), impl, str(error)))
        except RuntimeError as error:  # a backend that fails at run time is reported, not fatal
            skips.append(Skip(preset, dtype_name(dtype), impl, f"failed: {str(error).splitlines()[0]}"))
        bar.update(len(cases) - measured)
        model = None
        gc.collect()  # free one implementation's weights before building the next
    bar.close()
    return records, skips


def _measure(matrix: Matrix, preset: str, config: SpinalConfig, dtype: torch.dtype, impl: str,
             model: torch.nn.Module, batch: int, pass_name: str, bandwidth: float | None) -> Record:
    step = make_step(model, config, batch, pass_name, dtype, matrix.device)
    seconds = median_seconds(step, matrix.device, matrix.min_run_time)
    flops, params = cost(impl, config, batch, pass_name)
    record = Record(preset, batch, dtype_name(dtype), impl, pass_name, seconds * 1e3, flops, params)
    if bandwidth is not None:
        gemm = roofline.gemm_tflops(flops, batch, dtype, matrix.device, matrix.min_run_time)
        moved = roofline.min_bytes(config, batch, pass_name, params, dtype.itemsize)
        record.extras = {"gemm_eff": record.tflops / gemm, "bw_eff": moved / seconds / bandwidth}
    return record
