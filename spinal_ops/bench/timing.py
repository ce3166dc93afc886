"""Median latency of a callable: torch.utils.benchmark on CPU, CUDA events on GPU."""
from __future__ import annotations

import statistics
from typing import Callable

import torch
import torch.utils.benchmark as benchmark

WARMUP_CALLS = 1  # the first call compiles (torch.compile) and allocates; never timed
CPU_TARGET_BLOCKS, CPU_MIN_BLOCKS = 30, 3
CUDA_MIN_REPS, CUDA_MAX_REPS = 10, 2000


def median_seconds(fn: Callable[[], object], device: torch.device, min_run_time: float,
                   warmup_calls: int = WARMUP_CALLS) -> float:
    """Median seconds per call of ``fn`` after ``warmup_calls`` untimed calls, measuring for at
    least ``min_run_time`` (no warm-up for a callable the caller has already run)."""
    for _ in range(warmup_calls):
        fn()
    if device.type == "cuda":
        return _cuda_median_seconds(fn, device, min_run_time)
    # Timer defaults to one thread; time with the threads a user's model would get.
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    # Many short blocks rather than a few long ones: the median of blocks then ignores the
    # blocks in which a shared machine preempted us.
    per_call = timer.timeit(1).median
    number = max(1, int(min_run_time / CPU_TARGET_BLOCKS / per_call))
    # A slow call's estimate is already a block of one call: keep it rather than repeat it.
    blocks: list[float] = [per_call] if number == 1 else []
    while len(blocks) < CPU_MIN_BLOCKS or sum(blocks) * number < min_run_time:
        blocks.append(timer.timeit(number).median)
    return statistics.median(blocks)


def _cuda_median_seconds(fn: Callable[[], object], device: torch.device, min_run_time: float) -> float:
    """Each call bracketed by CUDA events on the current stream; the median of the event times."""
    with torch.cuda.device(device):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        estimate_s = max(start.elapsed_time(end) / 1e3, 1e-6)
        reps = int(min(CUDA_MAX_REPS, max(CUDA_MIN_REPS, min_run_time / estimate_s)))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events) / 1e3
