"""Runs the benchmark matrix (presets x dtypes x implementations x batches x passes)."""
from __future__ import annotations

import gc
import itertools
import statistics
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


# Each case is timed in rounds that alternate between the implementations, and each keeps the
# median of its rounds: load drift on a shared machine then hits every implementation alike, so
# the ratios of one run compare like with like.
ROUNDS = 5


def run_matrix(matrix: Matrix, progress: bool = True) -> tuple[list[Record], list[Skip]]:
    """Time every case; an unavailable implementation is skipped once per preset/dtype with its reason."""
    records: list[Record] = []
    skips: list[Skip] = []
    bandwidth = roofline.copy_bandwidth(matrix.device, matrix.min_run_time) if matrix.device.type == "cuda" else None
    cases = list(itertools.product(matrix.batches, matrix.passes))
    bar = tqdm(total=matrix.num_cases(), unit="case", disable=not progress, leave=False)
    for (preset, config), dtype in itertools.product(matrix.presets.items(), matrix.dtypes):
        models: dict[str, torch.nn.Module] = {}
        for impl in matrix.impls:
            try:
                models[impl] = build_impl(impl, config, dtype, matrix.device)
            except ImplUnavailable as error:
                skips.append(Skip(preset, dtype_name(dtype), impl, str(error)))
                bar.update(len(cases))
        for batch, pass_name in cases:
            bar.set_description(f"{preset} {dtype_name(dtype)} batch {batch} {pass_name}")
            rounds: dict[str, list[float]] = {impl: [] for impl in models}
            for _ in range(ROUNDS):
                for impl in list(rounds):
                    try:
                        step = make_step(models[impl], config, batch, pass_name, dtype, matrix.device)
                        rounds[impl].append(median_seconds(step, matrix.device, matrix.min_run_time / ROUNDS))
                    except RuntimeError as error:  # a backend that fails at run time is reported, not fatal
                        skips.append(Skip(preset, dtype_name(dtype), impl, f"failed: {str(error).splitlines()[0]}"))
                        del rounds[impl], models[impl]
                        bar.update(len(cases))
            for impl, seconds in rounds.items():
                records.append(_record(matrix, preset, config, dtype, impl, batch, pass_name,
                                       statistics.median(seconds), bandwidth))
                bar.update()
        models.clear()
        gc.collect()  # free this preset's weights before building the next
    bar.close()
    return records, skips


def _record(matrix: Matrix, preset: str, config: SpinalConfig, dtype: torch.dtype, impl: str, batch: int,
            pass_name: str, seconds: float, bandwidth: float | None) -> Record:
    flops, params = cost(impl, config, batch, pass_name)
    record = Record(preset, batch, dtype_name(dtype), impl, pass_name, seconds * 1e3, flops, params)
    if bandwidth is not None:
        gemm = roofline.gemm_tflops(flops, batch, dtype, matrix.device, matrix.min_run_time)
        moved = roofline.min_bytes(config, batch, pass_name, params, dtype.itemsize)
        record.extras = {"gemm_eff": record.tflops / gemm, "bw_eff": moved / seconds / bandwidth}
    return record
