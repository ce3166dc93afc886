"""Median latency of callables timed in alternating short blocks: perf_counter on CPU, CUDA events on GPU.

Every implementation of a benchmark case is timed by ``alternating_medians``: the steps take
turns of one short block each, so that a slow phase of a shared machine (another tenant, a
frequency change) falls on all of them alike and the ratios of one run compare like with like.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

WARMUP_CALLS = 1  # the first call compiles (torch.compile) and allocates; never timed
BLOCKS = 150  # a step's measuring time is cut into this many blocks
MIN_BLOCKS = 5  # even a step slower than its whole measuring time gets this many
CUDA_MAX_REPS = 2000

Step = Callable[[], object]
Block = Callable[[], tuple[float, float]]  # one timed block -> (seconds per call, seconds spent)


def median_seconds(fn: Step, device: torch.device, min_run_time: float, warmup_calls: int = WARMUP_CALLS) -> float:
    """Median seconds per call of ``fn`` after ``warmup_calls`` untimed calls, measuring for at
    least ``min_run_time``."""
    for _ in range(warmup_calls):
        fn()
    medians, failures = alternating_medians({"fn": fn}, device, min_run_time)
    if failures:
        raise RuntimeError(failures["fn"])
    return medians["fn"]


def alternating_medians(steps: dict[str, Step], device: torch.device,
                        min_run_time: float) -> tuple[dict[str, float], dict[str, str]]:
    """({name: median seconds per call}, {name: first line of its error}) of steps already warmed up.

    The steps take turns, one block of about ``min_run_time / BLOCKS`` each, in an order that
    reverses every turn (no step always follows the same one). A step leaves the rotation once it
    has been timed for ``min_run_time`` and ``MIN_BLOCKS`` blocks; the others go on. A step that
    raises RuntimeError leaves it too, and its error is returned instead of a time.
    """
    block_seconds = min_run_time / BLOCKS
    failures: dict[str, str] = {}
    blocks: dict[str, Block] = {}
    for name, step in steps.items():
        try:
            blocks[name] = _block_timer(step, device, block_seconds)
        except RuntimeError as error:
            failures[name] = str(error).splitlines()[0]
    per_call: dict[str, list[float]] = {name: [] for name in blocks}
    spent = dict.fromkeys(blocks, 0.0)
    order = list(blocks)
    while order:
        for name in order:
            try:
                seconds, elapsed = blocks[name]()
            except RuntimeError as error:
                failures[name] = str(error).splitlines()[0]
                del per_call[name]
                continue
            per_call[name].append(seconds)
            spent[name] += elapsed
        order = [name for name in reversed(order)
                 if name in per_call and (spent[name] < min_run_time or len(per_call[name]) < MIN_BLOCKS)]
    return {name: statistics.median(times) for name, times in per_call.items()}, failures


def _block_timer(fn: Step, device: torch.device, block_seconds: float) -> Block:
    """A function timing one block of calls of ``fn``, sized from one timed call to last about
    ``block_seconds``."""
    if device.type == "cuda":
        return _cuda_block_timer(fn, device, block_seconds)
    start = time.perf_counter()
    fn()
    number = max(1, int(block_seconds / max(time.perf_counter() - start, 1e-9)))

    def block() -> tuple[float, float]:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - start
        return elapsed / number, elapsed

    return block


def _cuda_block_timer(fn: Step, device: torch.device, block_seconds: float) -> Block:
    """Each call of a block bracketed by CUDA events on the current stream; the block's median."""
    with torch.cuda.device(device):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        estimate_s = max(start.elapsed_time(end) / 1e3, 1e-6)
    reps = int(min(CUDA_MAX_REPS, max(1, block_seconds / estimate_s)))

    def block() -> tuple[float, float]:
        with torch.cuda.device(device):
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            times = [start.elapsed_time(end) / 1e3 for start, end in events]
        return statistics.median(times), sum(times)

    return block
