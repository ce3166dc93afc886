"""CUDA yardsticks measured in the same run: a dense GEMM of the same FLOPs, copy bandwidth, the
peak GEMM rate and the time of one dependent launch.

A case's GEMM efficiency is its TFLOP/s over the TFLOP/s of one ``[B, n] @ [n, n]`` matmul with
(about) the same FLOPs and the same dtype; its bandwidth efficiency is the bytes it must move at
least (``min_bytes``) per second over the bandwidth of a large device-to-device copy.

A case's floor is the least time any implementation of it could take on this GPU:

    floor = max(FLOPs / peak GEMM rate, min_bytes / copy bandwidth) + passes * launch

peak GEMM rate: a large square matmul in the case's dtype; passes: the dependent kernel launches
the step needs at least (infer 1: one forward kernel; train and frozen 2: a forward and a
backward kernel); launch: one kernel of a chain of one-element kernels issued from Python (the
host's issue time where that is slower than the GPU's launch latency). Measured time / floor
says how far above the GPU's limits a case runs.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..config import SpinalConfig
from .timing import median_seconds

COPY_BYTES = 512 * 2**20  # large enough to leave every cache behind
GEMM_ALIGN = 16  # tensor-core friendly inner sizes
PEAK_GEMM_SIZE = 8192  # a square matmul this large runs at the GPU's sustained GEMM rate
LAUNCH_CHAIN = 200  # one-element kernels per timed chain
PASSES = {"infer": 1, "frozen": 2, "train": 2}  # dependent launches a step needs at least


def copy_bandwidth(device: torch.device, min_run_time: float) -> float:
    """Bytes per second of ``dst.copy_(src)`` (each byte read once and written once)."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, min_run_time)
    return 2 * COPY_BYTES / seconds


@functools.lru_cache(maxsize=None)  # one GEMM per distinct size in a run
def gemm_tflops(flops: int, batch: int, dtype: torch.dtype, device: torch.device, min_run_time: float) -> float:
    """Achieved TFLOP/s of a ``[batch, n] @ [n, n]`` GEMM with 2*batch*n*n ~= ``flops``."""
    n = max(GEMM_ALIGN, round(math.sqrt(flops / (2 * max(batch, 1))) / GEMM_ALIGN) * GEMM_ALIGN)
    a = torch.randn(max(batch, 1), n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    seconds = median_seconds(lambda: torch.mm(a, b), device, min_run_time)
    return 2 * a.shape[0] * n * n / seconds / 1e12


def min_bytes(config: SpinalConfig, batch: int, mode: str, params: int, itemsize: int) -> int:
    """Bytes an implementation with ``params`` parameters and hidden width L*w must move at least.

    infer: read x and the parameters, write the output. train: that, plus writing Z (the
    pre-activations kept for backward), then reading grad_out, x, Z and the parameters and writing
    grad_x and every parameter gradient. frozen: train without writing grad_x.
    """
    x = batch * config.in_features
    out = batch * config.output_features
    if mode == "infer":
        elements = x + params + out
    else:
        pre_activation = batch * config.hidden_features
        elements = (3 if mode == "train" else 2) * x + 3 * params + 2 * out + 2 * pre_activation
    return elements * itemsize


@dataclass(frozen=True)
class Yardsticks:
    """What bounds any step on this GPU, measured once per run."""

    device: torch.device
    min_run_time: float
    copy_bandwidth: float  # bytes read + written per second
    launch_seconds: float  # one dependent kernel launch

    def floor_seconds(self, flops: int, moved_bytes: int, mode: str, dtype: torch.dtype) -> float:
        compute = flops / (peak_gemm_tflops(dtype, self.device, self.min_run_time) * 1e12)
        return max(compute, moved_bytes / self.copy_bandwidth) + PASSES[mode] * self.launch_seconds


def measure_yardsticks(device: torch.device, min_run_time: float) -> Yardsticks:
    return Yardsticks(device, min_run_time, copy_bandwidth(device, min_run_time),
                      launch_seconds(device, min_run_time))


def launch_seconds(device: torch.device, min_run_time: float) -> float:
    """Seconds per kernel of a chain of dependent one-element kernels."""
    counter = torch.zeros(1, device=device)

    def chain() -> None:
        for _ in range(LAUNCH_CHAIN):
            counter.add_(1)

    return median_seconds(chain, device, min_run_time) / LAUNCH_CHAIN


@functools.lru_cache(maxsize=None)  # once per dtype in a run
def peak_gemm_tflops(dtype: torch.dtype, device: torch.device, min_run_time: float) -> float:
    """TFLOP/s of a PEAK_GEMM_SIZE^3 matmul in ``dtype`` (float32 as torch's TF32 setting has it)."""
    a = torch.randn(PEAK_GEMM_SIZE, PEAK_GEMM_SIZE, dtype=dtype, device=device)
    b = torch.randn(PEAK_GEMM_SIZE, PEAK_GEMM_SIZE, dtype=dtype, device=device)
    seconds = median_seconds(lambda: torch.mm(a, b), device, min_run_time)
    return 2 * PEAK_GEMM_SIZE**3 / seconds / 1e12
