"""Ahead-of-time compile of the Triton kernels for a GPU target, on a machine without a GPU.

Runs Triton's real compiler (frontend, TTGIR, LLVM, ptxas) on every kernel for the block
shapes the backend launches (the one-block kernels of kernels.py and the tiled kernels of
tiled.py with their TILED_BLOCKS row for the target), and reports registers and spills from ptxas. Used by
tests/test_triton_backend.py (in a subprocess: it needs TRITON_INTERPRET unset) and by hand:

    PYTHONPATH=$PWD python scripts/triton_aot.py [ARCH] [--quick]   # one line per compiled variant
"""
from __future__ import annotations

import itertools
import re
import subprocess
import sys
import tempfile

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from spinal_ops.activations import ACTIVATIONS
from spinal_ops.backends.triton import kernels as triton_kernels
from spinal_ops.backends.triton import tiled as tiled_kernels

KERNELS = ("_forward_kernel", "_backward_data_kernel", "_backward_weights_kernel")
TILED_KERNELS = ("_tiled_forward_kernel", "_tiled_backward_data_kernel", "_tiled_backward_weights_kernel",
                 "_reduce_splits_kernel")
TRITON_TYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "workspace_ptr":  # the split weight gradients' fp32 partial sums
            signature[name] = "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = f"*{TRITON_TYPE[dtype]}"
        elif name in ("negative_slope", "scale"):
            signature[name] = "fp32"
        elif name in ("seed", "threshold"):  # a 63-bit seed and floor(p * 2^32) arrive as int64
            signature[name] = "i64"
        else:
            signature[name] = "i32"
    return signature


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill stores in bytes) reported by ptxas -v (Hopper/Ampere ptxas)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        log = subprocess.run(
            [knobs.nvidia.ptxas.path, "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
             source.name, "-o", "/dev/null"],
            capture_output=True, text=True, check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    return registers, spills


def _tiled_blocks(kernel_name: str, dtype: str, arch: int) -> dict:
    """The launch's block sizes from the TILED_BLOCKS row of the target's generation and dtype."""
    known = sorted(key for key in tiled_kernels.TILED_BLOCKS if isinstance(key, int))
    generation = tiled_kernels.TILED_BLOCKS[max([k for k in known if k <= arch // 10] or known[:1])]
    table = generation["float32" if dtype == "float32" else "half"]
    if kernel_name == "_reduce_splits_kernel":
        return dict(BLOCK_R=table["BLOCK_R"], num_warps=4)
    blocks = {key: table[key] for key in tiled_kernels.LAUNCH_KEYS}
    if kernel_name == "_tiled_backward_weights_kernel":
        blocks["BLOCK_WB"] = table["BLOCK_WB"]
        blocks.pop("BLOCK_B")
    return blocks


def compile_variant(kernel_name: str, dtype: str, layer_width: int, has_out: bool, activation: str, arch: int,
                    split: bool = True, dropout: bool = False):
    """Compile one kernel for sm_<arch>; returns (registers, spill bytes). ``split``: the tiled
    weight-gradient kernel's variant that writes partial sums; ``dropout``: the variant that draws
    the dropout masks."""
    tiled = kernel_name in TILED_KERNELS
    kernel = getattr(tiled_kernels if tiled else triton_kernels, kernel_name)
    blocks = _tiled_blocks(kernel_name, dtype, arch) if tiled else triton_kernels.launch_config(layer_width)
    num_warps = blocks.pop("num_warps")
    constexprs = dict(blocks)
    if "HAS_OUT" in kernel.arg_names:
        constexprs.update(HAS_OUT=has_out, ACTIVATION=ACTIVATIONS.index(activation))
    if "HAS_BIAS" in kernel.arg_names:
        constexprs["HAS_BIAS"] = True
    if "HAS_BIAS_OUT" in kernel.arg_names:
        constexprs["HAS_BIAS_OUT"] = has_out
    if "SPLIT" in kernel.arg_names:
        constexprs["SPLIT"] = split
    if "DROPOUT" in kernel.arg_names:
        constexprs["DROPOUT"] = dropout
    source = ASTSource(kernel, _signature(kernel, dtype, constexprs), constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
    return _ptxas_usage(compiled.asm["ptx"], arch)


# One variant per kernel and tile kind the CI compiles: fp32 with a narrow odd width, and
# bfloat16 (tensor-core path, not testable in the interpreter) at the widest supported width; the
# bfloat16 one again with dropout (the masks' registers on top of the widest tiles).
QUICK_VARIANTS = [
    (kernel, dtype, width, True, activation, dropout)
    for kernel in KERNELS
    for dtype, width, activation, dropout in (("float32", 24, "gelu_tanh", False), ("bfloat16", 128, "gelu", False),
                                              ("bfloat16", 128, "gelu", True))
]
# The tiled kernels' block sizes do not depend on the width: fp32 and bfloat16, every kernel, and
# bfloat16 with dropout for every kernel that draws masks.
QUICK_TILED_VARIANTS = [
    (kernel, dtype, 512, True, activation, False)
    for kernel in TILED_KERNELS
    for dtype, activation in (("float32", "gelu_tanh"), ("bfloat16", "relu"))
] + [(kernel, "bfloat16", 512, True, "relu", True) for kernel in TILED_KERNELS if kernel != "_reduce_splits_kernel"]


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    arch = next((int(a) for a in argv[1:] if a.isdigit()), 90)
    variants = QUICK_VARIANTS + QUICK_TILED_VARIANTS if quick else [
        (kernel, dtype, width, has_out, "gelu", dropout)
        for kernel, dtype, width, has_out, dropout in itertools.product(KERNELS, TRITON_TYPE, (8, 64, 128),
                                                                       (True, False), (False, True))
    ] + [
        (kernel, dtype, 512, has_out, "gelu", dropout)
        for kernel, dtype, has_out, dropout in itertools.product(TILED_KERNELS, TRITON_TYPE, (True, False),
                                                                (False, True))
        if not (dropout and kernel == "_reduce_splits_kernel")
    ]
    for kernel, dtype, width, has_out, activation, dropout in variants:
        registers, spills = compile_variant(kernel, dtype, width, has_out, activation, arch, dropout=dropout)
        shape = "tiled" if kernel in TILED_KERNELS else f"w={width}"
        print(f"sm_{arch} {kernel} {dtype} {shape} has_out={has_out} {activation}{' dropout' if dropout else ''}: "
              f"{registers} registers, {spills} bytes spilled")


if __name__ == "__main__":
    main(sys.argv)
