"""The compiled extension ``spinal_ops._C``: its build stamp, whether it loads, and what it runs.

setup.py writes ``spinal_ops/_build_info.py`` when it builds the package. It is read here before
``_C`` is loaded, so that a torch upgrade after the build shows up as a clear message naming both
versions instead of an undefined-symbol error from ``_C``. Loading ``_C`` defines the compiled op
pairs (``native_*``, ``hoisted_*``, ``normed_*``); this module gives them their fake kernels (the
normed pair's autograd is registered by backends/normed.py). If ``_C`` is
missing or was built for another torch, spinal_ops still works with the reference (and triton)
backends and ``extension_status()`` says why.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType
from typing import Optional

import torch

from .ops import (
    BACKWARD_SCHEMA,
    FORWARD_SCHEMA,
    NORMED_BACKWARD_SCHEMA,
    NORMED_FORWARD_SCHEMA,
    fake_backward,
    fake_forward,
    fake_normed_backward,
    fake_normed_forward,
)
from .support import Support

COMPILED_PAIRS = ("native", "hoisted")


def build_info() -> Optional[ModuleType]:
    """The build stamp written by setup.py, or None for a tree that setup.py never built."""
    try:
        return importlib.import_module("spinal_ops._build_info")
    except ModuleNotFoundError:
        return None


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


def compiled_schema_mismatches(forward_schema: str = FORWARD_SCHEMA, backward_schema: str = BACKWARD_SCHEMA) -> list[str]:
    """The compiled ops whose schemas differ from these strings (an in-place build left over from
    other sources would otherwise fail on its first call)."""
    expected = {f"{pair}_{direction}": schema for pair in COMPILED_PAIRS
                for direction, schema in (("forward", forward_schema), ("backward", backward_schema))}
    expected.update(normed_forward=NORMED_FORWARD_SCHEMA, normed_backward=NORMED_BACKWARD_SCHEMA)
    return [
        name
        for name, schema in expected.items()
        if not hasattr(torch.ops.spinal_ops, name)
        or getattr(torch.ops.spinal_ops, name).default._schema != torch._C.parse_schema(f"spinal_ops::{name}{schema}")
    ]


def _load() -> Support:
    not_built = extension_not_built()
    if not_built:
        return Support.no(not_built)
    # Checked before loading _C: a _C built against another torch fails with undefined symbols.
    mismatch = extension_torch_mismatch()
    if mismatch:
        warnings.warn(f"spinal_ops: {mismatch}; only the reference backend runs", RuntimeWarning, stacklevel=3)
        return Support.no(mismatch)
    try:
        importlib.import_module("spinal_ops._C")  # defines the native_* and hoisted_* ops
    except ModuleNotFoundError:
        return Support.no(
            "compiled extension spinal_ops._C is not built (pip install --no-build-isolation -e . builds it)"
        )
    except ImportError as error:
        return Support.no(f"compiled extension spinal_ops._C failed to load: {error}")
    stale = compiled_schema_mismatches()
    if stale:
        return Support.no(
            f"compiled extension spinal_ops._C was built from other sources (op schemas differ: {', '.join(stale)}); "
            "rebuild it (pip install --no-build-isolation -e .)"
        )
    for pair in COMPILED_PAIRS:  # their autograd is registered by _C (csrc/autograd.cpp)
        torch.library.register_fake(f"spinal_ops::{pair}_forward")(fake_forward)
        torch.library.register_fake(f"spinal_ops::{pair}_backward")(fake_backward)
    torch.library.register_fake("spinal_ops::normed_forward")(fake_normed_forward)
    torch.library.register_fake("spinal_ops::normed_backward")(fake_normed_backward)
    return Support.yes()


_STATUS: Support = _load()


def extension_status() -> Support:
    """Whether the compiled extension loaded (its ops exist), and why not."""
    return _STATUS


def _compiled() -> ModuleType:
    return importlib.import_module("spinal_ops._C")


@functools.lru_cache(maxsize=None)
def cpu_vector_kernels() -> bool:
    """Whether the CPU op runs narrow float32 layers (w <= 32) with its AVX2+FMA kernels on this
    machine; elsewhere (no AVX2, ``ATEN_CPU_CAPABILITY=default``) it runs the portable ATen chain."""
    return bool(_STATUS) and bool(_compiled().cpu_vector_kernels())


@functools.lru_cache(maxsize=None)
def cpu_tile_gemm() -> str | None:
    """The instruction set ("AVX-512" or "AVX2") of the register-tiled kernel that runs the CPU
    op's float32 products of up to 2^24 multiply-adds on wider layers, or None where BLAS or ATen
    runs them all (no AVX2+FMA in use, e.g. ``ATEN_CPU_CAPABILITY=default``, or
    ``SPINAL_OPS_DIRECT_BLAS=0``)."""
    return _compiled().cpu_tile_gemm() if _STATUS else None


@functools.lru_cache(maxsize=None)
def cpu_direct_blas() -> bool:
    """Whether the CPU op's BLAS chain calls PyTorch's BLAS (sgemm_/dgemm_ of libtorch_cpu) on
    pointers; where not (a PyTorch without those symbols, SPINAL_OPS_DIRECT_BLAS=0) it makes a
    view per block and calls ATen's GEMMs."""
    return bool(_STATUS) and bool(_compiled().cpu_direct_blas())


@functools.lru_cache(maxsize=None)
def cpu_bf16_gemm() -> bool:
    """Whether the CPU op runs bfloat16 calls of the hoisted chain (layers wider than the narrow
    chain's, or every layer where the AVX2 kernels are off) on the bfloat16 tensors themselves,
    each product one of ATen's bfloat16 GEMMs (oneDNN's AVX512_BF16/AMX kernels, float32
    accumulation inside); where not (no AVX512_BF16, PyTorch without oneDNN,
    ``SPINAL_OPS_CPU_BF16_GEMM=0``) bfloat16 is widened to float32 for the float32 kernels."""
    if not _STATUS:
        return False
    query = getattr(_compiled(), "cpu_bf16_gemm", None)  # absent from a build older than the query
    return bool(query()) if query is not None else False


@functools.lru_cache(maxsize=None)
def cpu_bf16_tile_gemm() -> bool:
    """Whether the bfloat16 chain (``cpu_bf16_gemm()``) runs its products of up to 2^24
    multiply-adds on the extension's AVX512_BF16 register tiles (vdpbf16ps, float32 accumulation,
    one rounding per output) and its ReLU-like activations as loops, larger products on oneDNN;
    where not (``ATEN_CPU_CAPABILITY`` below avx512) every product is oneDNN's."""
    if not _STATUS:
        return False
    query = getattr(_compiled(), "cpu_bf16_tile_gemm", None)  # absent from a build older than the query
    return bool(query()) if query is not None else False


@functools.lru_cache(maxsize=None)
def cuda_kernels_compiled() -> bool:
    """Whether the extension was built with the CUDA kernels (nvcc present at build time)."""
    return bool(_STATUS) and bool(_compiled().cuda_compiled())
