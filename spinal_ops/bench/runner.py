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
from .graphs import graphed_step
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
    cuda_graphs: bool = False  # also time every implementation's step replayed from a CUDA graph

    @property
    def launches(self) -> tuple[str, ...]:
        return ("eager", "graph") if self.cuda_graphs else ("eager",)

    def impls_for(self, preset: str, config: SpinalConfig) -> tuple[str, ...]:
        """``impls`` with the dense baseline resolved for ``preset``: under ``--baseline authors``
        the authors' head where the preset has one, the equal-width dense layer otherwise."""
        chosen = baseline_impl(self.baseline, preset, config)
        return tuple(chosen if impl == EQUAL_WIDTH_IMPL else impl for impl in self.impls)

    def num_cases(self) -> int:
        return (len(self.threads) * len(self.presets) * len(self.dtypes) * len(self.impls) * len(self.batches)
                * len(self.modes) * len(self.launches))


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
    yardsticks = (roofline.measure_yardsticks(matrix.device, matrix.min_run_time) if matrix.device.type == "cuda"
                  else None)
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
                    bar.update(len(cases) * len(matrix.launches))
            for batch, mode in cases:
                bar.set_description(f"{threads} thread(s) {preset} {dtype_name(dtype)} batch {batch} {mode}")
                measured, failures = _measure_case(matrix, models, config, batch, mode, dtype)
                for (impl, launch), reason in failures.items():  # failing at run time is reported, not fatal
                    skips.append(Skip(preset, dtype_name(dtype), impl if launch == "eager" else f"{impl} ({launch})",
                                      f"failed: {reason}"))
                    if launch == "eager":  # without its eager step the implementation leaves the run
                        del models[impl]
                        bar.update(len(cases) * len(matrix.launches))
                for (impl, launch), (seconds, peak) in measured.items():
                    if impl in models:
                        records.append(_record(matrix, preset, config, dtype, impl, batch, mode, threads, launch,
                                               seconds, peak, yardsticks))
                bar.update(len(measured))
            models.clear()
            gc.collect()  # free this preset's weights before building the next
    bar.close()
    return records, skips


def _measure_case(matrix: Matrix, models: dict[str, torch.nn.Module], config: SpinalConfig, batch: int, mode: str,
                  dtype: torch.dtype) -> tuple[dict[tuple[str, str], tuple[float, int | None]],
                                              dict[tuple[str, str], str]]:
    """({(impl, launch): (median seconds, peak bytes)}, {(impl, launch): first line of the error}
    for those that failed).

    The untimed peak-memory call comes after the warm-up (torch.compile's own allocations are not
    the step's); a graphed step's replay allocates nothing, so its peak is not measured. The steps
    are then timed in alternating blocks (timing.py)."""
    steps: dict[tuple[str, str], Callable[[], object]] = {}
    peaks: dict[tuple[str, str], int | None] = {}
    failures: dict[tuple[str, str], str] = {}
    for impl, model in models.items():
        try:
            step = make_step(model, config, batch, mode, dtype, matrix.device)
            step()  # warm-up
            peaks[impl, "eager"] = peak_bytes(step, matrix.device)
            steps[impl, "eager"] = step
        except RuntimeError as error:
            failures[impl, "eager"] = str(error).splitlines()[0]
            continue
        if matrix.cuda_graphs:
            try:
                steps[impl, "graph"] = graphed_step(step, matrix.device)
                peaks[impl, "graph"] = None
            except RuntimeError as error:
                failures[impl, "graph"] = str(error).splitlines()[0]
    names = {f"{impl} ({launch})": (impl, launch) for impl, launch in steps}
    seconds, timing_failures = alternating_medians({name: steps[key] for name, key in names.items()}, matrix.device,
                                                   matrix.min_run_time)
    failures.update({names[name]: reason for name, reason in timing_failures.items()})
    return {names[name]: (value, peaks[names[name]]) for name, value in seconds.items()}, failures


def _record(matrix: Matrix, preset: str, config: SpinalConfig, dtype: torch.dtype, impl: str, batch: int,
            mode: str, threads: int, launch: str, seconds: float, peak: int | None,
            yardsticks: roofline.Yardsticks | None) -> Record:
    flops, params = cost(impl, config, batch, mode, preset)
    record = Record(preset, batch, dtype_name(dtype), impl, mode, threads, seconds * 1e3, flops, params,
                    None if peak is None else peak / 1e6, launch)
    if yardsticks is not None:
        gemm = roofline.gemm_tflops(flops, batch, dtype, matrix.device, matrix.min_run_time)
        moved = roofline.min_bytes(config, batch, mode, params, dtype.itemsize)
        record.floor_ms = yardsticks.floor_seconds(flops, moved, mode, dtype) * 1e3
        record.extras = {"gemm_eff": record.tflops / gemm, "bw_eff": moved / seconds / yardsticks.copy_bandwidth}
    return record
