#include "dropout_factors.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <string>
#include <type_traits>

namespace spinal_ops::chain {
namespace {

constexpr auto kDeviceTypes = static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES);

std::array<DropoutFactorsKernel, kDeviceTypes>& kernels() {
  static std::array<DropoutFactorsKernel, kDeviceTypes> table{};
  return table;
}

// The first Philox words of `count` consecutive counters base, base + 1, ... into `words`
// (contract §1: key = the seed's two 32-bit halves, counter = (c mod 2^32, c div 2^32, 0, 0)).
// Scalar here; vectorised below where the CPU has AVX2 or AVX-512F: Philox is integer arithmetic,
// so every version gives the same words. The words are most of what dropout costs a narrow layer:
// a training step of mnist draws ~2100 per row (every dropout site in the forward and again in the
// backward), at ~5.4 ns each scalar (the timings below) as long as the rest of its step per row.
void philox_words_scalar(uint64_t seed, uint64_t base, int64_t count, uint32_t* words) {
  for (int64_t i = 0; i < count; ++i) words[i] = philox_first_word(seed, base + static_cast<uint64_t>(i));
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPINAL_PHILOX_SIMD 1

// The vector versions keep each 32-bit word of the Philox state in a 64-bit lane: vpmuludq then
// gives a round's whole 64-bit product per lane (its high word by one shift; its low word is the
// lane itself, whose upper half the next vpmuludq ignores and the final narrowing drops), and the
// counters are 64-bit additions. 16 counters per step, as two (AVX-512) or four (AVX2) vectors
// whose rounds interleave (fewer for a shorter last run: a narrow layer's 8 hidden sites).
// Measured on an AMD EPYC (Zen 4), 1 thread, runs of 160 counters: 1.7 ns per word with AVX-512,
// 2.9 with AVX2, 5.9 scalar (`python benchmarks/philox_words.py`); the same 16 words packed in one
// AVX-512 vector of 32-bit lanes, whose high words need a second vpmuludq on the odd lanes and
// blends, took ~10 % longer.

// The first words of V vectors of consecutive counters from `first` (V <= 2, fully unrolled so the
// state stays in registers).
template <int V>
__attribute__((target("avx512f"))) inline void philox_vectors_avx512(uint64_t seed, uint64_t first, __m256i* words) {
  constexpr __mmask8 kAll = 0xFF;  // zero-masking forms: no undefined pass-through (GCC 12 warns on it)
  const __m512i round_a = _mm512_set1_epi64(0xD2511F53u), round_b = _mm512_set1_epi64(0xCD9E8D57u);
  const __m512i lanes = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  __m512i c0[V], c1[V], c2[V], c3[V];
  for (int v = 0; v < V; ++v) {
    c0[v] = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(first + 8 * v)), lanes);
    c1[v] = _mm512_maskz_srli_epi64(kAll, c0[v], 32);
    c2[v] = c3[v] = _mm512_setzero_si512();
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = _mm512_set1_epi64(k0), key1 = _mm512_set1_epi64(k1);
    for (int v = 0; v < V; ++v) {
      const __m512i product_a = _mm512_maskz_mul_epu32(kAll, c0[v], round_a);
      const __m512i product_b = _mm512_maskz_mul_epu32(kAll, c2[v], round_b);
      c0[v] = _mm512_ternarylogic_epi64(_mm512_maskz_srli_epi64(kAll, product_b, 32), c1[v], key0, 0x96);  // xor3
      c1[v] = product_b;
      c2[v] = _mm512_ternarylogic_epi64(_mm512_maskz_srli_epi64(kAll, product_a, 32), c3[v], key1, 0x96);
      c3[v] = product_a;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int v = 0; v < V; ++v) words[v] = _mm512_maskz_cvtepi64_epi32(kAll, c0[v]);
}

__attribute__((target("avx512f"))) void philox_words_avx512(uint64_t seed, uint64_t base, int64_t count,
                                                            uint32_t* words) {
  int64_t j = 0;
  for (; j + 16 <= count; j += 16) {
    __m256i out[2];
    philox_vectors_avx512<2>(seed, base + static_cast<uint64_t>(j), out);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + j), out[0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + j + 8), out[1]);
  }
  if (j == count) return;
  alignas(32) uint32_t last[16];
  __m256i out[2];
  if (count - j > 8) {
    philox_vectors_avx512<2>(seed, base + static_cast<uint64_t>(j), out);
    _mm256_store_si256(reinterpret_cast<__m256i*>(last + 8), out[1]);
  } else {  // a last run of at most 8 (a narrow layer's w = 8 hidden sites): one vector
    philox_vectors_avx512<1>(seed, base + static_cast<uint64_t>(j), out);
  }
  _mm256_store_si256(reinterpret_cast<__m256i*>(last), out[0]);
  std::copy(last, last + (count - j), words + j);
}

// As philox_vectors_avx512 with 4 counters per vector (V <= 4).
template <int V>
__attribute__((target("avx2"))) inline void philox_vectors_avx2(uint64_t seed, uint64_t first, uint64_t* words) {
  const __m256i round_a = _mm256_set1_epi64x(0xD2511F53u), round_b = _mm256_set1_epi64x(0xCD9E8D57u);
  const __m256i lanes = _mm256_setr_epi64x(0, 1, 2, 3);
  __m256i c0[V], c1[V], c2[V], c3[V];
  for (int v = 0; v < V; ++v) {
    c0[v] = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(first + 4 * v)), lanes);
    c1[v] = _mm256_srli_epi64(c0[v], 32);
    c2[v] = c3[v] = _mm256_setzero_si256();
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi64x(k0), key1 = _mm256_set1_epi64x(k1);
    for (int v = 0; v < V; ++v) {
      const __m256i product_a = _mm256_mul_epu32(c0[v], round_a);
      const __m256i product_b = _mm256_mul_epu32(c2[v], round_b);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(product_b, 32), c1[v]), key0);
      c1[v] = product_b;
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(product_a, 32), c3[v]), key1);
      c3[v] = product_a;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int v = 0; v < V; ++v) _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + 4 * v), c0[v]);
}

__attribute__((target("avx2"))) void philox_words_avx2(uint64_t seed, uint64_t base, int64_t count,
                                                       uint32_t* words) {
  alignas(32) uint64_t lane_words[16];
  for (int64_t j = 0; j < count; j += 16) {
    const int64_t n = std::min<int64_t>(16, count - j);
    const uint64_t first = base + static_cast<uint64_t>(j);
    switch ((n + 3) / 4) {  // as many vectors as the run needs
      case 1: philox_vectors_avx2<1>(seed, first, lane_words); break;
      case 2: philox_vectors_avx2<2>(seed, first, lane_words); break;
      case 3: philox_vectors_avx2<3>(seed, first, lane_words); break;
      default: philox_vectors_avx2<4>(seed, first, lane_words); break;
    }
    for (int64_t i = 0; i < n; ++i) words[j + i] = static_cast<uint32_t>(lane_words[i]);
  }
}
#else
#define SPINAL_PHILOX_SIMD 0
#endif

using PhiloxWords = void (*)(uint64_t seed, uint64_t base, int64_t count, uint32_t* words);

// The widest version this CPU runs, chosen once, as far as PyTorch's own kernels go
// (at::get_cpu_capability(): ATEN_CPU_CAPABILITY=avx2 or default selects the AVX2 or the scalar
// words, which the tests use to check each version; all give the same words).
PhiloxWords philox_words() {
  static const PhiloxWords chosen = [] {
#if SPINAL_PHILOX_SIMD
    __builtin_cpu_init();
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512" && __builtin_cpu_supports("avx512f")) return &philox_words_avx512;
    if ((capability == "AVX512" || capability == "AVX2") && __builtin_cpu_supports("avx2")) return &philox_words_avx2;
#endif
    return &philox_words_scalar;
  }();
  return chosen;
}

template <typename T>
void fill_factors_of(const Dropout& dropout, int64_t row, int64_t first_site, int64_t count, T* out) {
  if (!dropout.active) {
    std::fill(out, out + count, T(1));
    return;
  }
  const T kept = std::is_same_v<T, double> ? static_cast<T>(dropout.exact_scale) : static_cast<T>(dropout.scale);
  const uint32_t threshold = dropout.threshold;
  const PhiloxWords words_of = philox_words();
  constexpr int64_t kChunk = 256;  // words per call, on the stack
  uint32_t words[kChunk];
  const uint64_t base = dropout.counter(row, first_site);
  for (int64_t j = 0; j < count; j += kChunk) {
    const int64_t n = std::min(kChunk, count - j);
    words_of(dropout.seed, base + static_cast<uint64_t>(j), n, words);
    for (int64_t i = 0; i < n; ++i) out[j + i] = words[i] >= threshold ? kept : T(0);
  }
}

// Rows 0 .. rows - 1 of `out`.
void cpu_dropout_factors(const Dropout& dropout, int64_t row_begin, int64_t first_site, const at::Tensor& out,
                         int64_t rows) {
  const int64_t width = out.size(1);
  const auto run = [&](auto* data) {
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(width, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) fill_factors(dropout, row_begin + r, first_site, width, data + r * width);
    });
  };
  switch (out.scalar_type()) {
    case at::kFloat: run(out.mutable_data_ptr<float>()); return;
    case at::kDouble: run(out.mutable_data_ptr<double>()); return;
    default:
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dropout_factors", [&] {
        scalar_t* data = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r)
            for (int64_t j = 0; j < width; ++j)
              data[r * width + j] = static_cast<scalar_t>(dropout.factor(row_begin + r, first_site + j));
        });
      });
  }
}

}  // namespace

void fill_factors(const Dropout& dropout, int64_t row, int64_t first_site, int64_t count, float* out) {
  fill_factors_of(dropout, row, first_site, count, out);
}

void fill_factors(const Dropout& dropout, int64_t row, int64_t first_site, int64_t count, double* out) {
  fill_factors_of(dropout, row, first_site, count, out);
}

Dropout make_dropout(const std::optional<at::Tensor>& seed, double p, const SpinalShape& shape) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "spinal_ops: dropout_p must be a probability in [0, 1), got ", p);
  if (seed.has_value()) {
    const at::Tensor& s = *seed;
    TORCH_CHECK(s.dim() == 0 && s.scalar_type() == at::kLong && s.device().is_cpu(),
                "spinal_ops: dropout_seed must be a 0-dim int64 CPU tensor (spinal_ops.dropout.draw_seed()), got a ",
                s.dim(), "-dim ", s.scalar_type(), " tensor on ", s.device());
  }
  if (!seed.has_value() || p == 0.0) return Dropout{};
  return Dropout::make(static_cast<uint64_t>(seed->item<int64_t>()), p, shape.split_size, shape.layer_width,
                       shape.num_layers, shape.out_features > 0);
}

at::ScalarType factor_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble ? dtype : at::kFloat;
}

void register_dropout_factors_kernel(c10::DeviceType device, DropoutFactorsKernel kernel) {
  kernels()[static_cast<size_t>(device)] = kernel;
}

void dropout_factors_out(const Dropout& dropout, int64_t row_begin, int64_t first_site, const at::Tensor& out,
                         int64_t rows) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "spinal_ops: dropout factors go to a contiguous 2-D tensor");
  if (rows < 0) rows = out.size(0);
  TORCH_CHECK(rows <= out.size(0), "spinal_ops: ", rows, " rows of dropout factors into ", out.size(0));
  if (rows == 0 || out.size(1) == 0) return;
  const auto device = out.device().type();
  if (device == c10::DeviceType::CPU) {
    cpu_dropout_factors(dropout, row_begin, first_site, out, rows);
    return;
  }
  const DropoutFactorsKernel kernel = kernels()[static_cast<size_t>(device)];
  TORCH_CHECK(kernel != nullptr, "spinal_ops: no dropout kernel for device ", out.device());
  kernel(dropout, row_begin, first_site, rows == out.size(0) ? out : out.narrow(0, 0, rows));
}

at::Tensor dropout_factors(const Dropout& dropout, int64_t row_begin, int64_t rows, int64_t first_site,
                           int64_t width, const at::TensorOptions& options) {
  at::Tensor out = at::empty({rows, width}, options);
  dropout_factors_out(dropout, row_begin, first_site, out);
  return out;
}

}  // namespace spinal_ops::chain
