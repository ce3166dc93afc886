"""What this installation of spinal_ops is: its version, the torch it was built against, what the
compiled extension runs on this machine, and which backends can run (``python -m spinal_ops`` or
``spinal_ops.info()``)."""
from __future__ import annotations

import os
import platform
import sys
from typing import Optional, TextIO

import torch

from ._extension import build_info, cpu_bf16_gemm, cpu_bf16_tile_gemm, cpu_direct_blas, cpu_tile_gemm, cpu_vector_kernels, extension_torch_mismatch
from ._version import __version__
from .dispatch import available_backends


def _cpu_op_lines() -> list[str]:
    """Which kernels the CPU op runs on this machine (its dispatch reads the CPU at load)."""
    narrow = "AVX2 kernels" if cpu_vector_kernels() else "portable ATen chain (no AVX2+FMA in use)"
    blas = "PyTorch's BLAS on pointers" if cpu_direct_blas() else "ATen GEMMs on views"
    tiles = cpu_tile_gemm()
    tiled = f"{tiles} register tiles" if tiles else "as the rest (no AVX2+FMA in use, or direct BLAS off)"
    if cpu_bf16_tile_gemm():
        bf16 = ("on bfloat16 tensors: AVX512_BF16 register tiles (vdpbf16ps, float32 accumulation) for products "
                "up to 2^24 multiply-adds, oneDNN's bfloat16 GEMMs beyond")
    elif cpu_bf16_gemm():
        bf16 = "on bfloat16 tensors: oneDNN's bfloat16 GEMMs (AVX512_BF16; float32 accumulation inside each)"
    else:
        bf16 = "widened to float32, float32 kernels (no AVX512_BF16 or oneDNN here, or SPINAL_OPS_CPU_BF16_GEMM=0)"
    return [
        f"  CPU op on narrow float32 layers (w <= 32): {narrow}",
        f"  CPU op's BLAS chain (wider layers, float64): {blas}",
        f"  its float32 products up to 2^24 multiply-adds: {tiled}",
        f"  bfloat16 on the BLAS chain: {bf16}",
    ]


def report() -> str:
    """The text that ``info()`` prints."""
    stamp = build_info()
    lines = [
        f"spinal_ops {__version__} ({os.path.dirname(__file__)})",
        f"python {platform.python_version()} on {platform.machine()} {platform.system()}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}) running",
    ]
    if stamp is None:
        lines.append("build: no build stamp (spinal_ops/_build_info.py): not built with setup.py")
    else:
        lines.append(f"build: against torch {stamp.TORCH_VERSION} (CUDA {stamp.TORCH_CUDA_VERSION or 'none'})")
        if stamp.EXTENSION_BUILT:
            cuda = "built" if stamp.CUDA_BUILT else f"not built: {stamp.CUDA_NOTE}"
            lines.append(f"  C++ CPU op: built; CUDA kernels: {cuda}")
            if not extension_torch_mismatch():
                lines += _cpu_op_lines()
        else:
            lines.append(f"  compiled extension: not built: {stamp.EXTENSION_NOTE}")
    lines.append("backends:")
    for name, support in available_backends().items():
        state = "available" if support.ok else f"unavailable: {support.reason}"
        lines.append(f"  {name:<10} {state}")
    return "\n".join(lines)


def info(file: Optional[TextIO] = None) -> None:
    """Print the version, the torch built against and running, and each backend or why not."""
    print(report(), file=file if file is not None else sys.stdout)
