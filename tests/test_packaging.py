"""Distribution and installation checks: the sdist carries every source, a build without a C++
compiler installs reference-only, the build stamp guards against another torch, and
``python -m spinal_ops`` reports the installation.

(Compiling the sdist in a fresh venv is `make sdist-check`, run by CI: it takes minutes.)
"""
import importlib.metadata
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest
import torch

import spinal_ops
from spinal_ops._extension import torch_mismatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "spinal_ops", "_version.py")) as _version:
    VERSION = re.search(r'^__version__ = "([^"]+)"', _version.read(), re.MULTILINE).group(1)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (imports are per process), from outside the checkout."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=os.path.dirname(ROOT), capture_output=True, text=True,
        env={**os.environ, **env}, timeout=300,
    )


def tracked_files(prefix: str) -> set[str]:
    listing = subprocess.run(["git", "ls-files", prefix], cwd=ROOT, capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip("not a git checkout")
    return set(listing.stdout.split())


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> str:
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), ROOT],
        check=True, capture_output=True, timeout=600,
    )
    (name,) = os.listdir(out)
    return str(out / name)


def test_sdist_carries_every_source_and_header(sdist):
    assert os.path.basename(sdist) == f"spinal_ops-{VERSION}.tar.gz"
    with tarfile.open(sdist) as archive:
        prefix = f"spinal_ops-{VERSION}/"
        names = {name[len(prefix):] for name in archive.getnames()}
    needed = {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md"}
    for folder in ("csrc", "spinal_ops", "tests", "examples", "scripts"):
        needed |= tracked_files(folder)
    assert any(name.endswith((".h", ".cuh")) for name in needed)
    assert not needed - names, sorted(needed - names)
    # build outputs of this checkout stay out of it
    assert not [name for name in names if name.endswith(".so") or name.endswith("_build_info.py")]


def test_wheel_without_a_compiler_is_reference_only(sdist, tmp_path):
    """No C++ compiler at install time: a wheel without _C whose stamp says why (not a failed build)."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(tmp_path), sdist],
        capture_output=True, text=True, env={**os.environ, "CXX": "/nonexistent/c++"}, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = [name for name in os.listdir(tmp_path) if name.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / wheel) as archive:
        names = archive.namelist()
        stamp = archive.read("spinal_ops/_build_info.py").decode()
    assert not [name for name in names if name.startswith("spinal_ops/_C")]
    assert "EXTENSION_BUILT = False" in stamp and "no C++ compiler" in stamp and "/nonexistent/c++" in stamp
    assert f"TORCH_VERSION = {torch.__version__!r}" in stamp


def run_setup_py(*args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_isolated_build_with_another_torch_stops_with_a_message(tmp_path):
    # pip's isolated build puts its own environment (with the torch it fetched) before this one
    # through PYTHONPATH; a torch of another release there must stop the build, naming the cure.
    dist_info = tmp_path / "torch-0.0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 0.0.1\n")
    result = run_setup_py("--version", PYTHONPATH=str(tmp_path))
    installed = importlib.metadata.version("torch")
    assert result.returncode != 0
    assert "torch 0.0.1" in result.stderr and f"torch {installed} is installed" in result.stderr, result.stderr
    assert "pip install --no-build-isolation" in result.stderr


def test_build_against_the_installed_torch_depends_on_that_release():
    result = run_setup_py("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == VERSION
    try:
        requirements = importlib.metadata.requires("spinal_ops") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("spinal_ops is not installed here (only its metadata records the pin)")
    release = importlib.metadata.version("torch").split("+")[0]
    assert f"torch=={release}" in requirements, requirements


def test_torch_mismatch_names_both_versions():
    assert torch_mismatch("2.14.1+cu130", "2.14.1+cu130") == ""
    message = torch_mismatch("2.13.0+cpu", "2.14.1+cu130")
    assert "2.13.0+cpu" in message and "2.14.1+cu130" in message and "rebuild" in message


def test_an_extension_built_for_this_torch_loads():
    # Where setup.py stamped a build of the extension (and of the CUDA kernels) for the installed
    # torch, both must load: a library that fails to (an undefined symbol, say) would otherwise
    # only turn the compiled backends' tests into skips.
    from spinal_ops._extension import build_info, cuda_kernels_compiled, extension_status, extension_torch_mismatch

    stamp = build_info()
    if stamp is None or not stamp.EXTENSION_BUILT or extension_torch_mismatch():
        pytest.skip("no extension was built here for this torch")
    assert extension_status(), extension_status().reason
    assert cuda_kernels_compiled() == bool(stamp.CUDA_BUILT)


FAKE_STAMP = """
    import sys, types, warnings
    import torch
    stamp = types.ModuleType("spinal_ops._build_info")
    stamp.__dict__.update(VERSION="0.0.0", TORCH_VERSION={torch_version!r}, TORCH_CUDA_VERSION=None,
                          EXTENSION_BUILT={built!r}, EXTENSION_NOTE={note!r}, CUDA_BUILT=False, CUDA_NOTE="")
    sys.modules["spinal_ops._build_info"] = stamp
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import spinal_ops
    from spinal_ops import SpinalLinear, BackendUnavailableError
    from spinal_ops.reference import spinal_forward
"""


def test_extension_built_for_another_torch_is_not_loaded():
    if not spinal_ops.available_backends()["cpu"]:
        pytest.skip("the extension is not built here")
    result = run_python(FAKE_STAMP.format(torch_version="1.0.0", built=True, note="") + """
    assert "spinal_ops._C" not in sys.modules, "loaded _C despite the mismatch"
    print("WARNING", *[str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])
    print("REASON", spinal_ops.available_backends()["cpu"].reason)
    layer = SpinalLinear(7, 3, layer_width=4, num_layers=3)
    x = torch.randn(5, 7)
    assert torch.equal(layer(x), spinal_forward(x, layer.params(), layer.config))  # auto falls back
    try:
        SpinalLinear(7, 3, layer_width=4, num_layers=3, backend="cpu")(x)
    except BackendUnavailableError as error:
        print("ERROR", error)
    """)
    assert result.returncode == 0, result.stderr
    for tag in ("WARNING", "REASON", "ERROR"):
        (line,) = [line for line in result.stdout.splitlines() if line.startswith(tag)]
        assert "built against torch 1.0.0" in line and f"torch {torch.__version__} is installed" in line, line


def test_install_without_extension_says_why():
    result = run_python(FAKE_STAMP.format(torch_version=torch.__version__, built=False, note="no C++ compiler (test)") + """
    assert "spinal_ops._C" not in sys.modules
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    print(spinal_ops.available_backends()["cpu"].reason)
    """)
    assert result.returncode == 0, result.stderr
    assert "not built at install time: no C++ compiler (test)" in result.stdout


def test_python_m_spinal_ops_reports_the_installation():
    result = subprocess.run([sys.executable, "-m", "spinal_ops"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = result.stdout
    assert f"spinal_ops {VERSION}" in report and spinal_ops.__version__ == VERSION
    assert f"torch {torch.__version__}" in report and "build: against torch" in report
    for name, support in spinal_ops.available_backends().items():
        (line,) = [line for line in report.splitlines() if line.strip().startswith(name + " ")]
        assert ("available" if support.ok else support.reason) in line, line
