// AVX2+FMA building blocks of the narrow-chain kernels (narrow_chain_forward.cpp,
// narrow_chain_backward.cpp): a register-tiled small-matrix product and vectorised activations.
//
// Only functions marked SPINAL_AVX2 are compiled for AVX2 and FMA; the rest of the extension stays
// portable. They run only after cpu_has_avx2_fma() said yes.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPINAL_HAVE_AVX2_PATH 1
#include <immintrin.h>
#define SPINAL_AVX2 __attribute__((target("avx2,fma")))
#else
#define SPINAL_HAVE_AVX2_PATH 0
#endif

#include <ATen/Version.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "../common/activation.h"

namespace spinal_ops::cpu {

constexpr int64_t kTileRows = 4;  // rows of a register tile
constexpr int64_t kLanes = 8;     // floats per ymm register

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Whether the AVX2 kernels may run: the CPU has AVX2 and FMA and PyTorch's own kernels use them
// (torch.backends.cpu.get_cpu_capability(); ATEN_CPU_CAPABILITY=default turns both off).
inline bool cpu_has_avx2_fma() {
#if SPINAL_HAVE_AVX2_PATH
  static const bool has = [] {
    const std::string capability = at::get_cpu_capability();
    return (capability == "AVX2" || capability == "AVX512") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

#if SPINAL_HAVE_AVX2_PATH

// c[i, 0:8V) += sum_k a[i][k * a_step] * b[k * ldb + 0:8V) for the kTileRows rows i: kTileRows x V
// accumulators in registers for the whole k loop (V <= 3: 12 of the 16 ymm registers), one
// broadcast per row and one load per vector for every k. a_step = 1 reads rows of a row-major A;
// a_step = lda reads its columns (A^T: the weight-gradient products, summed over rows).
// The sum starts from zero and c is added once at the end, as BLAS adds beta * c: a long product
// built as a few such sums rounds like a blocked sum, not like one chain through all of k.
// With kAccumulate false, c is overwritten instead (c = start + A @ b, start the row `start`
// broadcast over the rows, or zero where it is null): no need to fill c first.
template <int V, bool kAccumulate = true>
SPINAL_AVX2 inline void panel_product(const float* const* a, int64_t a_step, int64_t depth, const float* b,
                                      int64_t ldb, float* c, int64_t ldc, const float* start = nullptr) {
  // Loops over r and v are unrolled so that the accumulators are registers, not stack slots.
  __m256 acc[kTileRows][V];
#pragma GCC unroll 4
  for (int r = 0; r < kTileRows; ++r) {
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) acc[r][v] = start && !kAccumulate ? _mm256_loadu_ps(start + v * kLanes) : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < depth; ++k) {
    __m256 bk[V];
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) bk[v] = _mm256_loadu_ps(b + k * ldb + v * kLanes);
#pragma GCC unroll 4
    for (int r = 0; r < kTileRows; ++r) {
      const __m256 ar = _mm256_broadcast_ss(a[r] + k * a_step);
#pragma GCC unroll 3
      for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(ar, bk[v], acc[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kTileRows; ++r) {
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) {
      float* out = c + r * ldc + v * kLanes;
      _mm256_storeu_ps(out, kAccumulate ? _mm256_add_ps(_mm256_loadu_ps(out), acc[r][v]) : acc[r][v]);
    }
  }
}

// c[i, 0:columns) += A[i, 0:depth) @ b[depth, columns] for kTileRows rows (columns a multiple of
// 8; b's rows ldb apart), in panels of 3 vectors and a last one of 1 or 2.
SPINAL_AVX2 inline void tile_product(const float* const* a, int64_t a_step, int64_t depth, const float* b,
                                     int64_t ldb, int64_t columns, float* c, int64_t ldc) {
  int64_t column = 0;
  for (; column + 3 * kLanes <= columns; column += 3 * kLanes) {
    panel_product<3>(a, a_step, depth, b + column, ldb, c + column, ldc);
  }
  if (columns - column == 2 * kLanes) panel_product<2>(a, a_step, depth, b + column, ldb, c + column, ldc);
  if (columns - column == kLanes) panel_product<1>(a, a_step, depth, b + column, ldb, c + column, ldc);
}

// The products over a block of rows, column panels outer: each panel of b (depth x 24 floats) stays
// in L1 while every group of kTileRows output rows reads it. row_pointer(i) is A's row i, its
// elements a_step apart; out_rows is a multiple of kTileRows. c[i, 0:columns) (+)= A[i, :] @ b.
template <bool kAccumulate, typename RowPointer>
SPINAL_AVX2 inline void panels_over_rows(RowPointer row_pointer, int64_t a_step, int64_t out_rows, int64_t depth,
                                         const float* b, int64_t ldb, int64_t columns, float* c, int64_t ldc) {
  for (int64_t column = 0; column < columns; column += 3 * kLanes) {
    const int64_t vectors = std::min<int64_t>(3, (columns - column) / kLanes);
    for (int64_t i = 0; i < out_rows; i += kTileRows) {
      const float* rows[kTileRows] = {row_pointer(i), row_pointer(i + 1), row_pointer(i + 2), row_pointer(i + 3)};
      float* out = c + i * ldc + column;
      if (vectors == 3) panel_product<3, kAccumulate>(rows, a_step, depth, b + column, ldb, out, ldc);
      if (vectors == 2) panel_product<2, kAccumulate>(rows, a_step, depth, b + column, ldb, out, ldc);
      if (vectors == 1) panel_product<1, kAccumulate>(rows, a_step, depth, b + column, ldb, out, ldc);
    }
  }
}

// c[i, 0:columns) += sum_k A[i, k] * b[k, 0:columns) for i < out_rows (a multiple of kTileRows),
// A[i, k] = a[i + k * lda] (A^T read from a row-major [depth, lda] array): a weight gradient, the
// sum over the rows of a block.
SPINAL_AVX2 inline void transposed_product(const float* a, int64_t lda, int64_t out_rows, int64_t depth,
                                           const float* b, int64_t ldb, int64_t columns, float* c, int64_t ldc) {
  panels_over_rows<true>([a](int64_t i) { return a + i; }, lda, out_rows, depth, b, ldb, columns, c, ldc);
}

// c[0:rows, 0:columns) (+)= a[0:rows, 0:depth) @ b[depth, columns] for a row-major a (rows lda
// apart, rows a multiple of kTileRows): a product over a block of rows.
template <bool kAccumulate>
SPINAL_AVX2 inline void block_product(const float* a, int64_t lda, int64_t rows, int64_t depth, const float* b,
                                      int64_t ldb, int64_t columns, float* c, int64_t ldc) {
  panels_over_rows<kAccumulate>([a, lda](int64_t i) { return a + i * lda; }, 1, rows, depth, b, ldb, columns, c,
                                ldc);
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols: a transpose in 8x8 blocks held in
// registers (unpack pairs of rows, shuffle pairs of pairs, swap 128-bit halves), the edges element
// by element. Packing the forward's weights with it costs a fifth of a scalar loop's time.
SPINAL_AVX2 inline void transpose(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd) {
  const int64_t full_rows = rows / kLanes * kLanes, full_cols = cols / kLanes * kLanes;
  for (int64_t r = 0; r < full_rows; r += kLanes) {
    for (int64_t c = 0; c < full_cols; c += kLanes) {
      __m256 row[kLanes], pair[kLanes], quad[kLanes];
      for (int i = 0; i < kLanes; ++i) row[i] = _mm256_loadu_ps(src + (r + i) * lds + c);
      for (int i = 0; i < kLanes; i += 2) {
        pair[i] = _mm256_unpacklo_ps(row[i], row[i + 1]);
        pair[i + 1] = _mm256_unpackhi_ps(row[i], row[i + 1]);
      }
      for (int i = 0; i < kLanes; i += 4) {
        quad[i] = _mm256_shuffle_ps(pair[i], pair[i + 2], 0x44);
        quad[i + 1] = _mm256_shuffle_ps(pair[i], pair[i + 2], 0xEE);
        quad[i + 2] = _mm256_shuffle_ps(pair[i + 1], pair[i + 3], 0x44);
        quad[i + 3] = _mm256_shuffle_ps(pair[i + 1], pair[i + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(dst + (c + i) * ldd + r, _mm256_permute2f128_ps(quad[i], quad[i + 4], 0x20));
        _mm256_storeu_ps(dst + (c + i + 4) * ldd + r, _mm256_permute2f128_ps(quad[i], quad[i + 4], 0x31));
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = r < full_rows ? full_cols : 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
}

// Ask for the cache lines of the floats [first, first + count) ahead of their use: kLevel 1 into
// L1, 2 into L2 only (for data read after other work, which would evict it from L1 first).
// Not SPINAL_AVX2: prefetches are baseline x86-64, and GCC drops the prefetches of an AVX2-target
// function inlined into a caller compiled without that target (the backward's parallel loop).
template <int kLevel>
inline void prefetch_floats(const float* first, int64_t count) {
  static_assert(kLevel == 1 || kLevel == 2, "prefetch into L1 or L2");
  const char* bytes = reinterpret_cast<const char*>(first);
  for (int64_t offset = 0; offset < count * static_cast<int64_t>(sizeof(float)); offset += 64) {
    __builtin_prefetch(bytes + offset, 0, kLevel == 1 ? 3 : 2);  // locality 3: prefetcht0, 2: prefetcht1
  }
}

// Lanes [0, count) set (count may exceed 8: all set): the mask of masked loads and stores of a
// vector that holds the last columns of a w-wide row.
SPINAL_AVX2 inline __m256i first_lanes(int64_t count) {
  const __m256i lane_ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(count < kLanes ? count : kLanes)), lane_ids);
}

// Loads and stores of the vector holding a row's columns [8v, 8v+8) of a w-wide layer: plain when
// the vector is whole (every lane a column of the layer), masked otherwise (mask: first_lanes).
// Masked ones only where needed: on some cores they do not forward from recent stores, and a
// masked store costs several plain ones.
SPINAL_AVX2 inline __m256 load_layer_vector(const float* p, __m256i mask, bool whole) {
  return whole ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask);
}

SPINAL_AVX2 inline void store_layer_vector(float* p, __m256i mask, bool whole, __m256 value) {
  if (whole) {
    _mm256_storeu_ps(p, value);
  } else {
    _mm256_maskstore_ps(p, mask, value);
  }
}

// phi(z): ReLU, leaky ReLU and identity in registers, the others lane by lane (libm).
template <Activation kAct>
SPINAL_AVX2 inline __m256 activate_vector(__m256 z, float negative_slope) {
  if constexpr (kAct == Activation::ReLU) {
    return _mm256_max_ps(_mm256_setzero_ps(), z);  // max returns its second operand for a NaN: kept
  } else if constexpr (kAct == Activation::LeakyReLU) {
    const __m256 positive = _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GT_OQ);
    return _mm256_blendv_ps(_mm256_mul_ps(z, _mm256_set1_ps(negative_slope)), z, positive);
  } else if constexpr (kAct == Activation::Identity) {
    return z;
  } else {
    alignas(32) float lanes[kLanes];
    _mm256_store_ps(lanes, z);
    for (float& lane : lanes) lane = activate(kAct, lane, negative_slope);
    return _mm256_load_ps(lanes);
  }
}

// dz * phi'(z), with phi' as activate_grad (ReLU passes the gradient where z is NaN, as torch does).
template <Activation kAct>
SPINAL_AVX2 inline __m256 times_activation_grad(__m256 dz, __m256 z, float negative_slope) {
  if constexpr (kAct == Activation::ReLU) {
    return _mm256_andnot_ps(_mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LE_OQ), dz);
  } else if constexpr (kAct == Activation::LeakyReLU) {
    const __m256 positive = _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GT_OQ);
    return _mm256_blendv_ps(_mm256_mul_ps(dz, _mm256_set1_ps(negative_slope)), dz, positive);
  } else if constexpr (kAct == Activation::Identity) {
    return dz;
  } else {
    alignas(32) float lanes[kLanes];
    _mm256_store_ps(lanes, z);
    for (float& lane : lanes) lane = activate_grad(kAct, lane, negative_slope);
    return _mm256_mul_ps(dz, _mm256_load_ps(lanes));
  }
}

#endif  // SPINAL_HAVE_AVX2_PATH

}  // namespace spinal_ops::cpu
