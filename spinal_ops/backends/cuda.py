"""The ``cuda`` backend: hand-written CUDA kernels (csrc/cuda/) and the hoisted cuBLAS chain.

Each call runs one of two op pairs, chosen by the cost model of cuda_cost.py from the call's
shape, batch and device: ``native_forward``/``native_backward`` (the native kernels: one forward
launch, two backward launches, for layers up to ``tile_kernel_width_limit()`` wide: ``tile_kernel_max_width()``,
or less on devices whose shared memory per block is smaller) or ``hoisted_forward``/
``hoisted_backward`` (csrc/chain/hoisted_chain.h on cuBLAS: large batches and wide layers, and bfloat16 on
GPUs without bf16 tensor cores, compute capability < 8.0 such as the T4). Both keep Z
in the same layout and compute the same function.

A training call with dropout runs the hoisted pair, which applies the masks itself. The native
kernels apply them too (csrc/cuda/: each factor where its operand is staged), proven in the CPU
model of CUDA but not yet timed on a GPU, so the cost model has no figures for them: they run under
``forced_path("native")``, and where the native ops are called directly.

``SPINAL_OPS_CUDA_PERSISTENT=1`` (read per call; not yet measured on a GPU, so the cost model never
picks it): ``native_forward`` runs the persistent forward kernel (csrc/cuda/persistent_forward.cuh)
and ``native_backward`` its launch 1 on the persistent backward kernel
(csrc/cuda/persistent_backward.cuh), both at every width, and this backend sends every call without
dropout to the native pair.

``SPINAL_OPS_CUDA_LT=1`` (read per call by the ops; it has not run on a GPU, so neither ``auto`` nor the
cost model chooses it, and the path choice is the same with it): every hoisted chain call (the
``hoisted`` pair, and the native ops' calls too wide for their kernels) runs on the cuBLASLt engine
(csrc/cuda/lt_engine.cu), which computes each recurrence step of relu and gelu_tanh as one matmul with
the activation in its epilogue and gelu_tanh's backward steps with its derivative there; other
activations and calls cuBLASLt cannot take run as before.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..config import SpinalConfig, SpinalParams, TrainingStages
from .._extension import cuda_kernels_compiled, extension_status
from ..support import Support
from . import normed
from .cuda_cost import GpuModel, PathChoice, choose_path, model_for
from .op_pair import OpPairBackend, tf32_allowed

CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# fp16 tensor-core WMMA; the build targets sm_75 (T4), sm_80 and sm_90. Before 8.0 bf16 has no tensor
# cores and takes the hoisted chain (the op's native_kernels_refusal says so), float32 runs exact fp32.
MIN_COMPUTE_CAPABILITY = (7, 5)
PATHS = ("native", "hoisted")
PERSISTENT_ENV = "SPINAL_OPS_CUDA_PERSISTENT"


def persistent_forward_requested() -> bool:
    """Whether native_forward and native_backward run the persistent kernels (the ops read the same
    variable)."""
    return os.environ.get(PERSISTENT_ENV) == "1"


@dataclass(frozen=True)
class CudaDevice:
    """What the backend needs to know of one GPU, read once at import so that supports() and the
    path choice only read plain values inside a torch.compile trace."""

    capability: tuple[int, int]
    model: GpuModel
    # (dtype, TF32 allowed) -> widest native-kernel w on this device, from the op's own routing
    width_limits: dict[tuple[torch.dtype, bool], int]
    # dtype -> why the native kernels run no layer of it on this device (bf16 before compute
    # capability 8.0), from the op's own routing; absent where they run
    refusals: dict[torch.dtype, str] = field(default_factory=dict)


def _probe_devices() -> tuple[int, tuple[int, int], dict[int, CudaDevice]]:
    """(kTileKernelMaxWidth of csrc/cuda/tile_mma.cuh, (widest w, most outputs M) of the narrow kernels,
    every visible GPU); (0, (0, 0), {}) without kernels or GPU."""
    if not (cuda_kernels_compiled() and torch.cuda.is_available()):
        return 0, (0, 0), {}
    devices = {}
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        capability = (properties.major, properties.minor)
        limits, refusals = {}, {}
        if capability >= MIN_COMPUTE_CAPABILITY:
            for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.float16, False),
                                (torch.bfloat16, False)):
                limits[(dtype, tf32)] = int(torch.ops.spinal_ops.cuda_tile_kernel_width_limit(index, dtype, tf32))
            for dtype in CUDA_DTYPES:
                refusal = str(torch.ops.spinal_ops.cuda_native_kernels_refusal(index, dtype))
                if refusal:
                    refusals[dtype] = refusal
        devices[index] = CudaDevice(capability, model_for(properties.name, properties.multi_processor_count, capability), limits,
                                    refusals)
    narrow_width, narrow_out = torch.ops.spinal_ops.cuda_narrow_limits()
    return int(torch.ops.spinal_ops.cuda_tile_kernel_max_width()), (int(narrow_width), int(narrow_out)), devices


TILE_KERNEL_MAX_WIDTH, NARROW_LIMITS, DEVICES = _probe_devices()
_forced_path: Optional[str] = None
# (config, batch, dtype, device, training, forced path, TF32) -> the forward op of that call's path:
# the cost model's arithmetic and its reason string cost ~5-10 us of host time per call, which a
# small batch's step on a GPU is made of. Bounded: a workload of ever-new batch sizes recomputes.
_FORWARD_OPS: dict[tuple, Callable] = {}
_FORWARD_OPS_MAX = 1024


def tile_kernel_max_width() -> int:
    """Widest layer (w) the native kernels run on any device; wider layers take the hoisted path."""
    return TILE_KERNEL_MAX_WIDTH


def tile_kernel_width_limit(device: int, dtype: torch.dtype, allow_tf32: bool = False) -> int:
    """Widest layer the native kernels run on CUDA device ``device`` for ``dtype`` (TF32 policy for
    float32 when ``allow_tf32``): ``tile_kernel_max_width()``, or less where the device's opt-in shared
    memory per block is smaller than the kernels need."""
    known = DEVICES.get(device)
    if known is None:
        return TILE_KERNEL_MAX_WIDTH
    return known.width_limits.get((dtype, allow_tf32 and dtype == torch.float32), TILE_KERNEL_MAX_WIDTH)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _width_limit_for(device: torch.device, dtype: torch.dtype) -> int:
    return tile_kernel_width_limit(_device_index(device), dtype, tf32_allowed(dtype))


def native_kernels_refusal(device: int, dtype: torch.dtype) -> str:
    """Why the native kernels run no layer of ``dtype`` on CUDA device ``device`` ("" where they
    do): bfloat16 before compute capability 8.0 (T4), which the op sends to the hoisted chain."""
    known = DEVICES.get(device)
    return "" if known is None else known.refusals.get(dtype, "")


DROPOUT_REASON = "hoisted cuBLAS chain: the native kernels' dropout is not yet timed on a GPU"


def _refusal_reason(index: int, refusal: str) -> str:
    return f"hoisted cuBLAS chain: the native kernels do not run on device {index}: {refusal}"


@contextlib.contextmanager
def forced_path(path: str) -> Iterator[None]:
    """Run every cuda-backend call inside the block on one path ("native" or "hoisted"; the native
    kernels only where the layer fits them): for benchmarks that calibrate the cost model."""
    global _forced_path
    if path not in PATHS:
        raise ValueError(f"spinal_ops: unknown CUDA path {path!r}; expected one of {', '.join(PATHS)}")
    previous, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = previous


def narrow_kernels_fit(config: SpinalConfig) -> bool:
    """Whether the native path of ``config`` runs the narrow kernels (one thread per row, for the
    forward and backward launch 1; the op decides the same from its own limits,
    csrc/cuda/narrow_kernels.cuh)."""
    max_width, max_out = NARROW_LIMITS
    return config.layer_width <= max_width and (config.out_features or 0) <= max_out


def cuda_path(config: SpinalConfig, batch: int, dtype: torch.dtype, device: torch.device,
              training: bool) -> PathChoice:
    """The path the cuda backend runs for this call, and why."""
    # Only a training call's config has a dropout (eval runs inference_config()).
    if config.dropout > 0 and _forced_path != "native":
        return PathChoice("hoisted", DROPOUT_REASON)
    refusal = native_kernels_refusal(_device_index(device), dtype)
    if refusal:
        return PathChoice("hoisted", _refusal_reason(_device_index(device), refusal))
    limit = _width_limit_for(device, dtype)
    if _forced_path is not None and (_forced_path == "hoisted" or config.layer_width <= limit):
        return PathChoice(_forced_path, f"{_forced_path} path forced")
    if persistent_forward_requested():
        return PathChoice("native", f"persistent kernels ({PERSISTENT_ENV}=1)")
    return choose_path(config, batch, dtype, DEVICES[_device_index(device)].model, training, limit,
                       narrow_kernels_fit(config))


class CudaBackend(OpPairBackend):
    name = "cuda"
    device_types = ("cuda",)
    dtypes = CUDA_DTYPES
    # Dropout alone runs on the hoisted pair (cuda_path; the native pair when forced); batch norm,
    # with or without dropout, on the normed op pair (backends/normed.py).
    runs_dropout = True
    runs_batch_norm = True
    auto_runs_training_stages = False  # both stages wait for a GPU run (tests/test_dropout_ops.py, test_batchnorm_ops.py)

    def availability(self) -> Support:
        if not extension_status():
            return extension_status()
        if not cuda_kernels_compiled():
            return Support.no("spinal_ops was built without CUDA kernels (no nvcc at build time, or SPINAL_OPS_CPU_ONLY=1)")
        if not DEVICES:
            return Support.no("no CUDA device is available")
        return Support.yes()

    def supports_call(self, config: SpinalConfig, dtype: torch.dtype, device: torch.device) -> Support:
        index = _device_index(device)
        known = DEVICES.get(index)
        capability = known.capability if known is not None else (0, 0)
        if capability < MIN_COMPUTE_CAPABILITY:
            minimum = ".".join(map(str, MIN_COMPUTE_CAPABILITY))
            return Support.no(f"needs compute capability >= {minimum}, device {index} has {capability[0]}.{capability[1]}")
        if config.norm is not None:
            return Support.yes("normed op pair (ATen on cuBLAS) in training; native kernels or hoisted chain in eval")
        if config.dropout > 0:
            return Support.yes(DROPOUT_REASON)
        refusal = native_kernels_refusal(index, dtype)
        if refusal:
            return Support.yes(_refusal_reason(index, refusal))
        limit = _width_limit_for(device, dtype)
        if config.layer_width > limit:
            why = "" if limit == tile_kernel_max_width() else f" (the native kernels' shared memory does not fit device {index})"
            return Support.yes(f"hoisted cuBLAS chain: w={config.layer_width} > {limit}{why}")
        return Support.yes("native kernels or hoisted cuBLAS chain, per call by the cost model")

    def forward(self, x: torch.Tensor, params: SpinalParams, config: SpinalConfig,
                stages: Optional[TrainingStages] = None) -> torch.Tensor:
        if stages is not None and stages.norm is not None:
            return normed.forward(x, params, config, stages)
        return super().forward(x, params, config, stages)

    def forward_op(self, config: SpinalConfig, x: torch.Tensor, training: bool) -> Callable:
        if torch.compiler.is_compiling():  # the batch may be symbolic: no cache key
            return _path_forward_op(config, x, training)
        key = (config, x.shape[0], x.dtype, x.device, training, _forced_path, tf32_allowed(x.dtype),
               persistent_forward_requested())
        op = _FORWARD_OPS.get(key)
        if op is None:
            if len(_FORWARD_OPS) >= _FORWARD_OPS_MAX:
                _FORWARD_OPS.clear()
            op = _FORWARD_OPS[key] = _path_forward_op(config, x, training)
        return op


def _path_forward_op(config: SpinalConfig, x: torch.Tensor, training: bool) -> Callable:
    choice = cuda_path(config, x.shape[0], x.dtype, x.device, training)
    return getattr(torch.ops.spinal_ops, f"{choice.path}_forward").default
