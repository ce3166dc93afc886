"""CUDA yardsticks measured in the same run: a dense GEMM of the same FLOPs and copy bandwidth.

A case's GEMM efficiency is its TFLOP/s over the TFLOP/s of one ``[B, n] @ [n, n]`` matmul with
(about) the same FLOPs and the same dtype; its bandwidth efficiency is the bytes it must move at
least (``min_bytes``) per second over the bandwidth of a large device-to-device copy.
"""
from __future__ import annotations

import functools
import math

import torch

from ..config import SpinalConfig
from .timing import median_seconds

COPY_BYTES = 512 * 2**20  # large enough to leave every cache behind
GEMM_ALIGN = 16  # tensor-core friendly inner sizes


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
