"""The CPU's Philox words for dropout (csrc/chain/dropout_factors.cpp): ns per word of each version
this CPU runs (scalar, AVX2, AVX-512), on runs of consecutive counters as the kernels draw them
(a layer's s window sites, w hidden sites, a row's L*w projection sites).

Every dropout site costs one word in the forward and one in the backward, so these figures times
~2 words per site and row are the least that dropout adds to a training step on one thread.
It builds the source with torch.utils.cpp_extension.load_inline on first use (~1 minute).

    python benchmarks/philox_words.py --run 8 160 1024
"""
from __future__ import annotations

import argparse
import os

import torch
from torch.utils.cpp_extension import load_inline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The versions are internal to dropout_factors.cpp: the harness holds its text (so that an edit of
# it rebuilds the harness), then the timing loop.
HARNESS = r"""
#include <chrono>

namespace {
// Median over `repeats` of ns per word for `total` words drawn in runs of `run` counters.
double ns_per_word(int64_t version, int64_t run, int64_t total, int64_t repeats) {
  using namespace spinal_ops::chain;
  const auto words_of = version == 0 ? &philox_words_scalar : version == 1 ? &philox_words_avx2 : &philox_words_avx512;
  std::vector<uint32_t> words(run);
  std::vector<double> times;
  uint32_t sink = 0;
  for (int64_t repeat = 0; repeat < repeats; ++repeat) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t first = 0; first < total; first += run) {
      words_of(0x0123456789ABCDEFull, static_cast<uint64_t>(first), run, words.data());
      sink ^= words[0];
    }
    times.push_back(std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count() /
                    static_cast<double>(total));
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2] + (sink == 1 ? 1e-30 : 0.0);
}
}  // namespace

TORCH_LIBRARY(spinal_philox_words, m) { m.def("ns_per_word(int version, int run, int total, int repeats) -> float", &ns_per_word); }
"""


def source() -> str:
    with open(os.path.join(ROOT, "csrc", "chain", "dropout_factors.cpp")) as handle:
        return handle.read() + HARNESS

VERSIONS = {"scalar": (0, None), "AVX2": (1, "avx2"), "AVX-512": (2, "avx512f")}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return {flag for line in cpuinfo if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs="+", type=int, default=[8, 160, 1024], help="consecutive counters per draw")
    parser.add_argument("--words", type=int, default=1 << 22, help="words per timing")
    args = parser.parse_args()
    load_inline("spinal_philox_words", cpp_sources=[source()], extra_include_paths=[os.path.join(ROOT, "csrc", "chain")],
                extra_cflags=["-O3"], is_python_module=False)
    flags = cpu_flags()
    print("| run | " + " | ".join(f"{name} ns/word" for name in VERSIONS) + " |")
    print("| ---: |" + " ---: |" * len(VERSIONS))
    for run in args.run:
        cells = []
        for version, flag in VERSIONS.values():
            if flag is not None and flag not in flags:
                cells.append("-")
                continue
            total = args.words // run * run
            cells.append(f"{torch.ops.spinal_philox_words.ns_per_word(version, run, total, 7):.2f}")
        print(f"| {run} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
