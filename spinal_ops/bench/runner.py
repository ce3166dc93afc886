"""Runs the benchmark matrix (thread counts x presets x dtypes x implementations x batches x modes)."""
from __future__ import annotations

import gc
import itertools
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from ..config import SpinalConfig
from . import roofline
from .heads import EQUAL_WIDTH_IMPL, baseline_impl
from .memory import peak_bytes
from .results import Record, Skip, dtype_name
from .timing import alternating_medians
from .workloads import ImplUnavailable, build_impl, cost, make_step


@dataclass(frozen=True)
class Matrix:
    presets: dict[str, SpinalConfig]
    batches: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    impls: tuple[str, ...]
    modes: tuple[str, ...]
    threads: tuple[int, ...]  # torch's CPU thread counts; the whole matrix runs once per count
    device: torch.device
    min_run_time: float  # seconds of measurement per case (after warm-up)
    baseline: str = "equal-width"  # which dense head "dense" in impls stands for (heads.BASELINES)

    def impls_for(self, preset: str, config: SpinalConfig) -> tuple[str, ...]:
        """``impls`` with the dense baseline resolved for ``preset``: under ``--baseline authors``
        the authors' head where the preset has one, the equal-width dense layer otherwise."""
        chosen = baseline_impl(self.baseline, preset, config)
        return tuple(chosen if impl == EQUAL_WIDTH_IMPL else impl for impl in self.impls)

    def num_cases(self) -> int:
        return (len(self.threads) * len(self.presets) * len(self.dtypes) * len(self.impls) * len(self.batches)
                * len(self.modes))


def run_matrix(matrix: Matrix, progress: bool = True) -> tuple[list[Record], list[Skip]]:
    """Time every case; an unavailable implementation is skipped once per preset/dtype with its reason.
    torch's thread count is restored afterwards."""
    threads_before = torch.get_num_threads()
    try:
        return _run(matrix, progress)
    finally:
        torch.set_num_threads(threads_before)


def _run(matrix: Matrix, progress: bool) -> tuple[list[Record], list[Skip]]:
    records: list[Record] = []
    skips: list[Skip] = []
    bandwidth = roofline.copy_bandwidth(matrix.device, matrix.min_run_time) if matrix.device.type == "cuda" else None
    cases = list(itertools.product(matrix.batches, matrix.modes))
    bar = tqdm(total=matrix.num_cases(), unit="case", disable=not progress, leave=False)
    for threads in matrix.threads:
        torch.set_num_threads(threads)
        for (preset, config), dtype in itertools.product(matrix.presets.items(), matrix.dtypes):
            models: dict[str, torch.nn.Module] = {}
            for impl in matrix.impls_for(preset, config):
                try:
                    models[impl] = build_impl(impl, config, dtype, matrix.device, preset)
                except ImplUnavailable as error:
                    skips.append(Skip(preset, dtype_name(dtype), impl, str(error)))
                    bar.update(len(cases))
            for batch, mode in cases:
                bar.set_description(f"{threads} thread(s) {preset} {dtype_name(dtype)} batch {batch} {mode}")
                measured, failures = _measure_case(matrix, models, config, batch, mode, dtype)
                for impl in list(models):
                    if impl in failures:  # a backend that fails at run time is reported, not fatal
                        skips.append(Skip(preset, dtype_name(dtype), impl, f"failed: {failures[impl]}"))
                        del models[impl]
                        bar.update(len(cases))
                        continue
                    seconds, peak = measured[impl]
                    records.append(_record(matrix, preset, config, dtype, impl, batch, mode, threads, seconds, peak,
                                           bandwidth))
                    bar.update()
            models.clear()
            gc.collect()  # free this preset's weights before building the next
    bar.close()
    return records, skips


def _measure_case(matrix: Matrix, models: dict[str, torch.nn.Module], config: SpinalConfig, batch: int, mode: str,
                  dtype: torch.dtype) -> tuple[dict[str, tuple[float, int]], dict[str, str]]:
    """({impl: (median seconds, peak bytes)}, {impl: first line of the error} for those that failed).

    The untimed peak-memory call comes after the warm-up (torch.compile's own allocations are not
    the step's); the implementations are then timed in alternating blocks (timing.py)."""
    steps: dict[str, Callable[[], object]] = {}
    peaks: dict[str, int] = {}
    failures: dict[str, str] = {}
    for impl, model in models.items():
        try:
            step = make_step(model, config, batch, mode, dtype, matrix.device)
            step()  # warm-up
            peaks[impl] = peak_bytes(step, matrix.device)
            steps[impl] = step
        except RuntimeError as error:
            failures[impl] = str(error).splitlines()[0]
    seconds, timing_failures = alternating_medians(steps, matrix.device, matrix.min_run_time)
    failures.update(timing_failures)
    return {impl: (seconds[impl], peaks[impl]) for impl in seconds}, failures


def _record(matrix: Matrix, preset: str, config: SpinalConfig, dtype: torch.dtype, impl: str, batch: int,
            mode: str, threads: int, seconds: float, peak: int, bandwidth: float | None) -> Record:
    flops, params = cost(impl, config, batch, mode, preset)
    record = Record(preset, batch, dtype_name(dtype), impl, mode, threads, seconds * 1e3, flops, params, peak / 1e6)
    if bandwidth is not None:
        gemm = roofline.gemm_tflops(flops, batch, dtype, matrix.device, matrix.min_run_time)
        moved = roofline.min_bytes(config, batch, mode, params, dtype.itemsize)
        record.extras = {"gemm_eff": record.tflops / gemm, "bw_eff": moved / seconds / bandwidth}
    return record
