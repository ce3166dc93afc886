"""Peak memory of one benchmark step: the bytes the step itself allocates at its peak.

CUDA: the caching allocator's peak counter, minus what was allocated before the step.
CPU: torch.profiler's allocation events (every allocation and free of the CPU allocator, with
its size), summed in time order; the peak is the largest running sum.
"""
from __future__ import annotations

import itertools
import os
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# kineto logs every profiler start and stop to stderr, once per case; level 6 silences it (a
# level the user set wins). Read when the profiler first starts, so setting it here is in time.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated by one call of ``fn`` at its peak, above what was allocated before it."""
    if device.type == "cuda":
        return _cuda_peak_bytes(fn, device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    # The raw kineto events (no public accessor): FunctionEvents fold an op's allocations into the
    # op and net out the temporaries it frees before returning, which would hide a fused op's workspace.
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    return max(itertools.accumulate((nbytes for _, nbytes in events), initial=0))


def _cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    with torch.cuda.device(device):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
