"""Build of spinal_ops._C: the C++ CPU op always, the CUDA kernels when nvcc is found.

Environment:
  SPINAL_OPS_CPU_ONLY=1    skip the CUDA sources even where nvcc exists
  SPINAL_OPS_FORCE_CUDA=1  build the CUDA sources (fails clearly if nvcc is missing)
  TORCH_CUDA_ARCH_LIST     GPU architectures; default "8.0;9.0+PTX" (A100, H100/H200, and PTX that
                           newer GPUs compile at load instead of failing with "no kernel image")
  MAX_JOBS                 parallel compile jobs (ninja)
"""
import glob
import os

from setuptools import setup

# A `nvcc` wrapper on PATH (e.g. /usr/local/bin/nvcc) makes torch guess CUDA_HOME wrongly;
# prefer the toolkit directory when it exists.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, pattern)))


def _build_cuda() -> bool:
    if os.environ.get("SPINAL_OPS_CPU_ONLY") == "1":
        return False
    nvcc_found = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if os.environ.get("SPINAL_OPS_FORCE_CUDA") == "1":
        if not nvcc_found:
            raise RuntimeError("SPINAL_OPS_FORCE_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True
    return nvcc_found


def _extension():
    # No -std flag: torch's cpp_extension adds the standard its headers need (C++17 or C++20).
    cxx_flags = ["-O3"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    if not _build_cuda():
        return CppExtension("spinal_ops._C", sources, extra_compile_args={"cxx": cxx_flags})
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DSPINAL_OPS_WITH_CUDA"]
    return CUDAExtension(
        "spinal_ops._C",
        sources + _sources("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags + ["-DSPINAL_OPS_WITH_CUDA"], "nvcc": nvcc_flags},
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
