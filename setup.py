"""Build of spinal_ops._C: the C++ CPU op always, the CUDA kernels when nvcc is found.

Environment:
  SPINAL_OPS_CPU_ONLY=1    skip the CUDA sources even where nvcc exists
  SPINAL_OPS_FORCE_CUDA=1  build the CUDA sources (fails clearly if nvcc is missing)
  TORCH_CUDA_ARCH_LIST     GPU architectures; default "7.5;8.0;9.0+PTX" (T4, A100, H100/H200, and PTX that
                           newer GPUs compile at load instead of failing with "no kernel image")
  MAX_JOBS                 parallel compile jobs (ninja)
  CXX                      the C++ compiler (default c++); without one the package installs reference-only

Every build writes spinal_ops/_build_info.py beside the extension: the torch version it was
compiled against (checked at import before _C is loaded) and what was built, or why not.

The extension only loads into the torch release it was compiled against, so the package depends
on exactly that release, and a build whose torch differs from the one already installed where the
package goes (pip's default isolated build environment fetches its own torch) stops with a message
instead of installing a package that would run reference-only.
"""
import glob
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys

from setuptools import setup


def _installed_torch_outside_build_env() -> str:
    """The torch release installed in the environment being installed into, or "" if none. pip's
    isolated build overlays its build environment on this interpreter through PYTHONPATH; `-I`
    ignores that overlay, so the probe sees what the package will run with."""
    probe = subprocess.run(
        [sys.executable, "-I", "-c", "import importlib.metadata as m; print(m.version('torch'))"],
        capture_output=True, text=True,
    )
    return probe.stdout.strip() if probe.returncode == 0 else ""


def _check_build_torch() -> str:
    """The torch release this build compiles against; exits with a message if the environment the
    package installs into has another one."""
    building = importlib.metadata.version("torch")
    installed = _installed_torch_outside_build_env()
    if installed and installed != building:
        sys.exit(
            f"spinal_ops: this build compiles against torch {building} (pip's isolated build environment), "
            f"but torch {installed} is installed where spinal_ops goes, and the compiled extension only loads "
            "into the torch it was built against. Install with: pip install --no-build-isolation <this package>"
        )
    return building


BUILD_TORCH = _check_build_torch()

# A `nvcc` wrapper on PATH (e.g. /usr/local/bin/nvcc) makes torch guess CUDA_HOME wrongly;
# prefer the toolkit directory when it exists.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, pattern)))


# The CUDA library headers that csrc/cuda/lt_engine.cu includes through ATen's CUDA context
# (ATen/cuda/CUDAContextLight.h): cuBLASLt's, and those that header includes beside it.
CUDA_LIBRARY_HEADERS = ("cublasLt.h", "cublas_v2.h", "cusparse.h", "cusolverDn.h")


def _cuda_library_include_dirs() -> tuple[list[str], list[str]]:
    """(directories to add, headers found nowhere) for CUDA_LIBRARY_HEADERS. The toolkit's include
    directory comes first; a toolkit assembled from pip wheels (nvcc, cudart) has no cuBLAS, and then
    the headers come from the nvidia wheels torch itself runs on (nvidia/cu13/include, or
    nvidia/<library>/include for CUDA 12)."""
    toolkit = os.path.join(CUDA_HOME, "include") if CUDA_HOME else None
    candidates = [toolkit] if toolkit else []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec is not None else None) or []:
        candidates += sorted(glob.glob(os.path.join(root, "*", "include")))
    found, missing = [], []
    for header in CUDA_LIBRARY_HEADERS:
        where = next((d for d in candidates if os.path.exists(os.path.join(d, header))), None)
        if where is None:
            missing.append(header)
        elif where != toolkit and where not in found:
            found.append(where)
    return found, missing


def _cuda_decision() -> tuple[bool, str]:
    """Whether to compile the CUDA kernels, and why not when not."""
    if os.environ.get("SPINAL_OPS_CPU_ONLY") == "1":
        return False, "SPINAL_OPS_CPU_ONLY=1 at build time"
    nvcc_found = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    missing_headers = _cuda_library_include_dirs()[1] if nvcc_found else []
    if os.environ.get("SPINAL_OPS_FORCE_CUDA") == "1":
        if not nvcc_found:
            raise RuntimeError("SPINAL_OPS_FORCE_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        if missing_headers:
            raise RuntimeError(f"SPINAL_OPS_FORCE_CUDA=1 but {', '.join(missing_headers)} were not found in "
                               "CUDA_HOME/include or the nvidia pip packages")
        return True, ""
    if not nvcc_found:
        return False, "nvcc was not found at build time (set CUDA_HOME to a CUDA toolkit to build the kernels)"
    if missing_headers:
        return False, (f"{', '.join(missing_headers)} not found at build time (in CUDA_HOME/include or the "
                       "nvidia pip packages)")
    return True, ""


def _extension():
    # No -std flag: torch's cpp_extension adds the standard its headers need (C++17 or C++20).
    # -fopenmp: at::parallel_for is a header template whose OpenMP pragma is compiled into this
    # library; without the flag every parallel region of the CPU op runs on one thread. The
    # runtime is the libgomp torch itself loads (same soname), so torch.set_num_threads applies.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", *openmp]
    sources = [*_sources("csrc/*.cpp"), *_sources("csrc/common/*.cpp"), *_sources("csrc/chain/*.cpp"),
               *_sources("csrc/cpu/*.cpp")]
    if not _cuda_decision()[0]:
        return CppExtension("spinal_ops._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "7.5;8.0;9.0+PTX")
    # After torch's include flags, so the toolkit's own headers win where it has them.
    library_includes = [f"-I{d}" for d in _cuda_library_include_dirs()[0]]
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DSPINAL_OPS_WITH_CUDA", *library_includes]
    # cuBLASLt (csrc/cuda/lt_engine.cu) is not linked here: its symbols resolve at load time through
    # libtorch_cuda, which CUDAExtension links and which itself needs the libcublasLt torch runs
    # on (the nvidia wheel's or the toolkit's, loaded by `import torch`). Linking -lcublasLt would
    # pin the soname of the build machine's toolkit (libcublasLt.so.13 here), which a GPU image
    # whose torch brings another cuBLAS may lack, and the extension would then fail to load.
    return CUDAExtension(
        "spinal_ops._C",
        sources + _sources("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags + ["-DSPINAL_OPS_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=openmp,
    )


def _missing_compiler() -> str:
    """Why no C++ compiler can run, or "" (torch's cpp_extension calls $CXX, default c++)."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler was found at build time (CXX={compiler!r}); install g++ or set CXX"
    return ""


class BuildExtensionWithInfo(BuildExtension):
    """build_ext that stamps the build into spinal_ops/_build_info.py and, without a C++
    compiler, installs the pure-Python package (reference backend) instead of failing."""

    def run(self) -> None:
        missing = _missing_compiler()
        if missing:
            print(f"spinal_ops: {missing}: installing without the compiled extension "
                  "(reference backend only)", file=sys.stderr)
            self.extensions = []
            self._write_build_info(extension_note=missing)
            return
        built_cuda, cuda_note = _cuda_decision()
        if not built_cuda:
            print(f"spinal_ops: building the CPU op only ({cuda_note})", file=sys.stderr)
        super().run()
        self._write_build_info(cuda_built=built_cuda, cuda_note=cuda_note)

    def _write_build_info(self, extension_note: str = "", cuda_built: bool = False, cuda_note: str = "") -> None:
        import torch

        values = {
            "VERSION": self.distribution.get_version(),
            "TORCH_VERSION": torch.__version__,
            "TORCH_CUDA_VERSION": torch.version.cuda,
            "EXTENSION_BUILT": not extension_note,
            "EXTENSION_NOTE": extension_note,
            "CUDA_BUILT": cuda_built,
            "CUDA_NOTE": cuda_note if not extension_note else extension_note,
        }
        # Beside _C: the source tree for in-place (editable) builds, build/lib... for wheels.
        package_dir = os.path.dirname(self.get_ext_fullpath("spinal_ops._C"))
        os.makedirs(package_dir, exist_ok=True)
        lines = ['"""Written by setup.py when spinal_ops was built; read by spinal_ops.about."""']
        lines += [f"{name} = {value!r}" for name, value in values.items()]
        with open(os.path.join(package_dir, "_build_info.py"), "w") as handle:
            handle.write("\n".join(lines) + "\n")


setup(
    # The public release (no +cuXY label): pip matches it to whichever build of that release it finds.
    install_requires=[f"torch=={BUILD_TORCH.split('+')[0]}", "numpy"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtensionWithInfo.with_options(use_ninja=True)},
)
