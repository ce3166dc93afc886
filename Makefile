# The README's commands. Every target sets up .venv first (idempotent, incremental):
#   make bench   - the FC-vs-spinal benchmark on CPU (JSON + PNG under bench-out/)
#   make test    - the test suite (pytest), a smoke run of the benchmark suite, the C++ test (CMake + ctest)
#   make sanitize - compute-sanitizer memcheck + racecheck over the presets' CUDA forward/backward (GPU)
#   make bench-suite    - the pytest-benchmark suite (benchmarks/)
#   make bench-results  - re-measure the committed CPU results (benchmarks/results/; ~4 min: the goal presets, three modes)
#   make dist           - the sdist and a wheel for the installed torch, under dist/
#   make sdist-check    - build the sdist, install it (CPU-only) into a fresh venv, check the installed package
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# nvcc on PATH may be a wrapper; point torch at the toolkit itself when it is there.
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export MAX_JOBS ?= 2
NATIVE_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py

.PHONY: setup bench test ctest bench-suite bench-results sanitize dist sdist-check clean

setup: $(VENV)/.built

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(NATIVE_SOURCES)
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

bench: setup
	$(PY) -m spinal_ops.bench

test: setup
	$(PY) -m pytest -q
	# the pytest-benchmark suite, each case run once so that it cannot rot (timings: make bench-suite)
	$(PY) -m pytest benchmarks -q --benchmark-disable
	$(MAKE) ctest

ctest: setup
	$(VENV)/bin/cmake -S . -B build/cmake -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	$(VENV)/bin/cmake --build build/cmake --parallel $(MAX_JOBS)
	cd build/cmake && $(abspath $(VENV)/bin/ctest) --output-on-failure

bench-suite: setup
	$(PY) -m pytest benchmarks -q

# SANITIZER may point at a compute-sanitizer outside PATH (default: the CUDA toolkit's).
SANITIZER ?= $(if $(CUDA_HOME),$(CUDA_HOME)/bin/compute-sanitizer,compute-sanitizer)
SANITIZE_ARGS ?=
sanitize: setup
	$(SANITIZER) --tool memcheck --error-exitcode 1 $(PY) scripts/sanitize.py $(SANITIZE_ARGS)
	$(SANITIZER) --tool racecheck --racecheck-report all --error-exitcode 1 $(PY) scripts/sanitize.py $(SANITIZE_ARGS)
# One thread: on a shared machine a second thread waits for a busy core and the timings become noise.
BENCH_THREADS ?= 1
# vgg_head (N = 25088) is left out: its reference forward+backward at batch 4096 takes seconds per call on 2 cores.
BENCH_PRESETS ?= mnist vgg5 cifar_vgg cnn_cifar resnet_head
bench-results: setup
	$(PY) -m spinal_ops.bench --preset $(BENCH_PRESETS) --batch 64 4096 --backends cpu reference dense \
		--threads $(BENCH_THREADS) --min-run-time 1 --json 'benchmarks/results/cpu-{device}.json' --plot 'benchmarks/results/cpu-{device}.png'
	{ echo "# Benchmark results: CPU"; echo; echo 'Command: `make bench-results` (= `python -m spinal_ops.bench --preset $(BENCH_PRESETS) --batch 64 4096 --backends cpu reference dense --threads $(BENCH_THREADS) --min-run-time 1`). GPU results: [NVIDIA H200](gpu-nvidia-h200.md), [NVIDIA H100](gpu-nvidia-h100.md). Against the authors'\'' dense heads: [CPU](authors-baseline-cpu-amd-epyc.md). Accuracy: [Fashion-MNIST](accuracy-fashion-mnist-amd-epyc.md).'; echo; \
	  $(PY) -m spinal_ops.bench.report benchmarks/results/cpu-*.json --note "CPU, $(BENCH_THREADS) thread(s)."; } \
		> benchmarks/results/README.md

dist: setup
	rm -rf dist
	$(PY) -m build --sdist --no-isolation --outdir dist
	$(PY) -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps -w dist dist/spinal_ops-*.tar.gz

# A new user's install from the sdist, in a fresh venv that sees the project's torch (and its
# dependencies) through a .pth file but not the checkout's editable spinal_ops. CPU-only keeps it short.
SDIST_VENV := build/sdist-venv
SDIST_PIP := $(SDIST_VENV)/bin/python -m pip -q --disable-pip-version-check
sdist-check: setup
	rm -rf dist $(SDIST_VENV)
	$(PY) -m build --sdist --no-isolation --outdir dist
	$(PY) -m venv $(SDIST_VENV)
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
		> "$$($(SDIST_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/project-torch.pth"
	$(SDIST_PIP) install ninja 'setuptools>=77' wheel
	SPINAL_OPS_CPU_ONLY=1 $(SDIST_PIP) wheel --no-build-isolation --no-deps -w dist dist/spinal_ops-*.tar.gz
	$(SDIST_PIP) install --force-reinstall --no-deps dist/spinal_ops-*.whl
	cd $(SDIST_VENV) && bin/python $(abspath scripts/check_install.py)

clean:
	rm -rf build dist spinal_ops/_C*.so spinal_ops/_build_info.py *.egg-info $(VENV)/.built
