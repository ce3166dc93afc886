"""What this installation of spinal_ops is: its version, the torch it was built against, and
which backends it can run (``python -m spinal_ops`` or ``spinal_ops.info()``).

setup.py writes ``spinal_ops/_build_info.py`` when it builds the package. It is read here,
before the compiled extension is loaded, so that a torch upgrade after the build shows up as
a clear message naming both versions instead of an undefined-symbol error from ``_C``.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import sys
from types import ModuleType
from typing import Optional, TextIO

import torch


def build_info() -> Optional[ModuleType]:
    """The build stamp written by setup.py, or None for a tree that setup.py never built."""
    try:
        return importlib.import_module("spinal_ops._build_info")
    except ModuleNotFoundError:
        return None


def version() -> str:
    """The installed distribution's version (the build stamp's when there is no metadata)."""
    try:
        return importlib.metadata.version("spinal_ops")
    except importlib.metadata.PackageNotFoundError:
        stamp = build_info()
        return stamp.VERSION if stamp is not None else "unknown"


def torch_mismatch(built: str, running: str) -> str:
    """Why an extension compiled against torch ``built`` cannot load in torch ``running``, or "".

    The C++ ABI of torch changes between any two releases (and between +cpu/+cuXY builds of one
    release), so anything but the exact version string is refused.
    """
    if built == running:
        return ""
    return (
        f"spinal_ops._C was built against torch {built} but torch {running} is installed; "
        "rebuild spinal_ops against this torch (pip install --no-build-isolation --force-reinstall "
        "--no-deps <spinal_ops sdist or checkout>)"
    )


def extension_not_built() -> str:
    """Why setup.py built no extension (no C++ compiler), or "" when it did or left no stamp."""
    stamp = build_info()
    if stamp is None or stamp.EXTENSION_BUILT:
        return ""
    return f"compiled extension spinal_ops._C was not built at install time: {stamp.EXTENSION_NOTE}"


def extension_torch_mismatch() -> str:
    """Why the built extension must not be loaded into the running torch, or "" when it may be."""
    stamp = build_info()
    if stamp is None or not stamp.EXTENSION_BUILT:
        return ""
    return torch_mismatch(stamp.TORCH_VERSION, torch.__version__)


def report() -> str:
    """The text that ``info()`` prints."""
    from .dispatch import available_backends

    stamp = build_info()
    lines = [
        f"spinal_ops {version()} ({os.path.dirname(__file__)})",
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
                from .ops import cpu_direct_blas, cpu_tile_gemm, cpu_vector_kernels

                narrow = "AVX2 kernels" if cpu_vector_kernels() else "portable ATen chain (no AVX2+FMA in use)"
                lines.append(f"  CPU op on narrow float32 layers (w <= 32): {narrow}")
                blas = "PyTorch's BLAS on pointers" if cpu_direct_blas() else "ATen GEMMs on views"
                lines.append(f"  CPU op's BLAS chain (wider layers, float64): {blas}")
                tiles = cpu_tile_gemm()
                tiled = f"{tiles} register tiles" if tiles else "as the rest (no AVX2+FMA in use, or direct BLAS off)"
                lines.append(f"  its float32 products up to 2^24 multiply-adds: {tiled}")
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
