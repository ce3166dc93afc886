"""Loading the compiled extension ``spinal_ops._C`` (C++ CPU op, CUDA kernels where built).

Importing it registers the ``spinal_ops::fused_*`` and ``hoisted_*`` schemas and their CPU (and
CUDA) kernels with the dispatcher; here we add the fake kernels and autograd once.
If it is missing, ``spinal_ops`` still works with the reference backend and this module keeps
the reason for ``available_backends()``.
"""
from __future__ import annotations

import functools
import importlib
import warnings

import torch

from .about import extension_not_built, extension_torch_mismatch
from .backends.base import Support
from .backends.fused import fake_backward, fake_forward, register_fused_autograd


@functools.lru_cache(maxsize=None)
def load_extension() -> Support:
    not_built = extension_not_built()
    if not_built:
        return Support.no(not_built)
    # Checked before loading _C: a _C built against another torch fails with undefined symbols.
    mismatch = extension_torch_mismatch()
    if mismatch:
        warnings.warn(f"spinal_ops: {mismatch}; only the reference backend runs", RuntimeWarning, stacklevel=2)
        return Support.no(mismatch)
    try:
        importlib.import_module("spinal_ops._C")  # registers the ops on import
    except ModuleNotFoundError:
        return Support.no(
            "compiled extension spinal_ops._C is not built (pip install --no-build-isolation -e . builds it)"
        )
    except ImportError as error:
        return Support.no(f"compiled extension spinal_ops._C failed to load: {error}")
    for pair, backends in (("fused", "cpu/cuda"), ("hoisted", "cuda")):
        torch.library.register_fake(f"spinal_ops::{pair}_forward")(fake_forward)
        torch.library.register_fake(f"spinal_ops::{pair}_backward")(fake_backward)
        register_fused_autograd(getattr(torch.ops.spinal_ops, f"{pair}_forward").default,
                                getattr(torch.ops.spinal_ops, f"{pair}_backward").default, backends)
    return Support.yes()


@functools.lru_cache(maxsize=None)
def cuda_kernels_compiled() -> bool:
    """Whether the extension was built with the CUDA kernels (nvcc present at build time)."""
    if not load_extension():
        return False
    return bool(importlib.import_module("spinal_ops._C").cuda_compiled())
