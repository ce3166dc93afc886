// The chain's float32 GEMMs on AVX2 or AVX-512 register tiles (scheme in tile_gemm.h).
#include "tile_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "avx2_tiles.h"

namespace spinal_ops::cpu {
namespace {

constexpr int64_t kMaxPanelColumns = 48;  // 3 vectors of 16 floats (AVX-512) or of 8 (AVX2: 24)
constexpr int64_t kRowBlock = 128;        // rows of c per task, at most
constexpr int64_t kMinRowBlock = 16;      // ... and at least, where tasks are split for threads
constexpr int64_t kDepthChunk = 128;      // depth per b panel: at most 24 KB, within a 32 KB L1
// b's panel is read in place only when its rows are at most this many floats apart: rows 4 KB
// apart fall into the same L1 sets, and a panel of 64 such rows evicts itself (a [64, 1024] @
// [1024, 256] product ran at 0.75 of MKL's speed in place, at 1.05 packed: `python
// benchmarks/tile_gemm_vs_blas.py --preset resnet_head --batch 64` against a build with this raised).
constexpr int64_t kInPlaceMaxRowStride = 256;
// The largest products (multiply-adds) tile_gemm takes: up to here the AVX2 tiles take 0.9-1.0 of
// MKL's time on the presets' shapes (1 thread); beyond, MKL's cache blocking of both operands
// pays off. Reproduce: `python benchmarks/tile_gemm_vs_blas.py --preset vgg5 cifar_vgg resnet_head
// cnn_cifar --batch 64 256 --min-run-time 0.5` (it reports both kernels on every product).
constexpr int64_t kMaxMultiplyAdds = int64_t{1} << 24;

#if SPINAL_HAVE_AVX2_PATH

#define SPINAL_AVX512 __attribute__((target("avx512f,avx2,fma")))

// Whether the AVX-512 tiles may run: the CPU has AVX-512F and PyTorch's own kernels use AVX-512
// (ATEN_CPU_CAPABILITY=avx2 turns both off).
bool cpu_has_avx512() {
  static const bool has = at::get_cpu_capability() == "AVX512" && __builtin_cpu_supports("avx512f");
  return has;
}

// panel_product (avx2_tiles.h) on 16-float vectors. On a core that runs 512-bit FMAs at the rate
// of 256-bit ones (AMD Zen 4), a 4 x 32 tile still needs half the loads and broadcasts per FMA of
// the 4 x 24 AVX2 tile: [64, 128] @ [128, 128] runs at ~110 GFLOP/s against ~105 (1 thread;
// `python benchmarks/tile_gemm_vs_blas.py --preset vgg5 --batch 64` with ATEN_CPU_CAPABILITY=avx2
// for the AVX2 tiles).
template <int V, bool kAccumulate>
SPINAL_AVX512 void wide_panel_product(const float* const* a, int64_t a_step, int64_t depth, const float* b,
                                      int64_t ldb, float* c, int64_t ldc, const float* start) {
  constexpr int kWideLanes = 16;
  __m512 acc[kTileRows][V];
#pragma GCC unroll 4
  for (int r = 0; r < kTileRows; ++r) {
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) {
      acc[r][v] = start && !kAccumulate ? _mm512_loadu_ps(start + v * kWideLanes) : _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    __m512 bk[V];
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) bk[v] = _mm512_loadu_ps(b + k * ldb + v * kWideLanes);
#pragma GCC unroll 4
    for (int r = 0; r < kTileRows; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r][k * a_step]);
#pragma GCC unroll 3
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(ar, bk[v], acc[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kTileRows; ++r) {
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) {
      float* out = c + r * ldc + v * kWideLanes;
      _mm512_storeu_ps(out, kAccumulate ? _mm512_add_ps(_mm512_loadu_ps(out), acc[r][v]) : acc[r][v]);
    }
  }
}

// One 4-row tile of 1 to 3 vectors, c = start + A @ panel (kAccumulate false) or c += A @ panel.
struct Avx2Tiles {
  static constexpr int64_t kVectorLanes = kLanes;
  template <bool kAccumulate>
  SPINAL_AVX2 static void tile(int vectors, const float* const* a_rows, int64_t a_step, int64_t depth,
                               const float* panel, int64_t ldp, float* out, int64_t ldo, const float* start) {
    if (vectors == 3) return panel_product<3, kAccumulate>(a_rows, a_step, depth, panel, ldp, out, ldo, start);
    if (vectors == 2) return panel_product<2, kAccumulate>(a_rows, a_step, depth, panel, ldp, out, ldo, start);
    panel_product<1, kAccumulate>(a_rows, a_step, depth, panel, ldp, out, ldo, start);
  }
};

struct Avx512Tiles {
  static constexpr int64_t kVectorLanes = 16;
  template <bool kAccumulate>
  SPINAL_AVX512 static void tile(int vectors, const float* const* a_rows, int64_t a_step, int64_t depth,
                                 const float* panel, int64_t ldp, float* out, int64_t ldo, const float* start) {
    if (vectors == 3) return wide_panel_product<3, kAccumulate>(a_rows, a_step, depth, panel, ldp, out, ldo, start);
    if (vectors == 2) return wide_panel_product<2, kAccumulate>(a_rows, a_step, depth, panel, ldp, out, ldo, start);
    wide_panel_product<1, kAccumulate>(a_rows, a_step, depth, panel, ldp, out, ldo, start);
  }
};

// c's columns in panels of 3 vectors, the last ones of 2: a panel of 1 vector keeps only 4
// accumulators in flight, half of what the FMA units' latency needs (w = 128 in AVX2 vectors:
// 3+3+3+3+2+2, not 3+3+3+3+3+1; in AVX-512 vectors: 3+3+2).
struct Panels {
  int64_t vectors;  // ceil(n / lanes)
  int64_t triples;  // panels of 3 vectors, then `pairs` of 2 (or one of 1 where n <= lanes)
  int64_t pairs;

  Panels(int64_t n, int64_t lanes) : vectors((n + lanes - 1) / lanes) {
    triples = vectors % 3 == 1 && vectors > 1 ? (vectors - 4) / 3 : vectors / 3;
    pairs = (vectors - 3 * triples) / 2;
  }
  int64_t count() const { return vectors == 1 ? 1 : triples + pairs; }
  int64_t first_vector(int64_t panel) const { return panel <= triples ? 3 * panel : 3 * triples + 2 * (panel - triples); }
  int vector_count(int64_t panel) const { return vectors == 1 ? 1 : panel < triples ? 3 : 2; }
};

// Rows per task: kRowBlock, halved while there are fewer than two tasks per thread (vgg5's
// [64, 128] products make 3 panels of one row block: with 2 threads one thread would do two of
// the three). One thread keeps whole blocks: smaller ones would pack b's panels more often.
int64_t rows_per_task(int64_t m, int64_t panel_count) {
  const int64_t threads = at::get_num_threads();
  int64_t rows = kRowBlock;
  while (threads > 1 && rows > kMinRowBlock && (m + rows - 1) / rows * panel_count < 2 * threads) rows /= 2;
  return rows;
}

struct Product {
  int64_t m, n, k;
  MatrixOperand a, b;
  bool b_rows_contiguous;  // b[k, :] contiguous (else its columns are)
  float* c;
  int64_t ldc;
  bool accumulate;
  const float* bias;
};

// packed[kk, 0:padded) = b[k0 + kk, col0 : col0 + columns), zero past `columns`.
SPINAL_AVX2 void pack_panel(const Product& p, int64_t k0, int64_t depth, int64_t col0, int64_t columns,
                            int64_t padded, float* packed) {
  const MatrixOperand& b = p.b;
  if (p.b_rows_contiguous) {
    for (int64_t kk = 0; kk < depth; ++kk) {
      std::memcpy(packed + kk * padded, b.data + (k0 + kk) * b.row_stride + col0, columns * sizeof(float));
    }
  } else {  // b's columns are rows of a row-major [n, k] array: transpose a [columns, depth] block of it
    transpose(b.data + col0 * b.col_stride + k0, columns, depth, b.col_stride, packed, padded);
  }
  if (columns < padded) {
    for (int64_t kk = 0; kk < depth; ++kk) std::fill(packed + kk * padded + columns, packed + (kk + 1) * padded, 0.f);
  }
}

// c[row0 : row0 + rows, col0 : col0 + vectors * lanes) of the product (fewer columns at c's
// right edge).
template <typename Tiles>
SPINAL_AVX2 void run_block(const Product& p, int64_t row0, int64_t rows, int64_t col0, int vectors) {
  alignas(64) float packed[kDepthChunk * kMaxPanelColumns];
  alignas(64) float edge[kTileRows * kMaxPanelColumns];
  alignas(64) float bias_row[kMaxPanelColumns] = {};
  const int64_t padded = vectors * Tiles::kVectorLanes, columns = std::min(padded, p.n - col0);
  const bool whole_panel = columns == padded;
  const float* start = nullptr;
  if (p.bias) {
    std::memcpy(bias_row, p.bias + col0, columns * sizeof(float));
    start = bias_row;
  }
  const MatrixOperand& a = p.a;
  for (int64_t k0 = 0; k0 < p.k; k0 += kDepthChunk) {
    const int64_t depth = std::min(kDepthChunk, p.k - k0);
    const float* panel = p.b.data + k0 * p.b.row_stride + col0;
    int64_t ldp = p.b.row_stride;
    if (!(p.b_rows_contiguous && whole_panel && p.b.row_stride <= kInPlaceMaxRowStride)) {
      pack_panel(p, k0, depth, col0, columns, padded, packed);
      panel = packed;
      ldp = padded;
    }
    const bool first = k0 == 0 && !p.accumulate;
    for (int64_t i = row0; i < row0 + rows; i += kTileRows) {
      const int64_t valid = std::min(kTileRows, row0 + rows - i);
      const float* a_rows[kTileRows];
      for (int64_t r = 0; r < kTileRows; ++r) {
        a_rows[r] = a.data + (i + std::min(r, valid - 1)) * a.row_stride + k0 * a.col_stride;
      }
      // Whole tiles write c in place; edge tiles go through a scratch tile.
      const bool in_place = valid == kTileRows && whole_panel;
      float* out = in_place ? p.c + i * p.ldc + col0 : edge;
      const int64_t ldo = in_place ? p.ldc : kMaxPanelColumns;
      if (!in_place && !first) {
        for (int64_t r = 0; r < valid; ++r) std::memcpy(edge + r * kMaxPanelColumns, p.c + (i + r) * p.ldc + col0, columns * sizeof(float));
      }
      if (first) {
        Tiles::template tile<false>(vectors, a_rows, a.col_stride, depth, panel, ldp, out, ldo, start);
      } else {
        Tiles::template tile<true>(vectors, a_rows, a.col_stride, depth, panel, ldp, out, ldo, nullptr);
      }
      if (!in_place) {
        for (int64_t r = 0; r < valid; ++r) std::memcpy(p.c + (i + r) * p.ldc + col0, edge + r * kMaxPanelColumns, columns * sizeof(float));
      }
    }
  }
}

// Products of at most kDotMaxRows rows whose b is the transpose of a row-major [n, k] matrix (the
// forward's weights W^T): c[i, j] is the dot product of a's row i and W's row j, both contiguous, so
// W streams once from where it lies, as a GEMV reads it. The register tiles would transpose W into
// panels and multiply 4-row tiles of repeated rows: at batch 1 cifar_vgg's forward took 2.2x the
// dense head's time on an AMD EPYC (`python scripts/host_profile.py --device cpu --dtype float32
// --batch 1 --split-only --preset cifar_vgg`). Each step takes dot_columns<R>() rows of W and keeps
// R x that many vector accumulators (at most 8, with R + 4 loads in flight: within AVX2's 16
// registers); a parallel task takes kDotGrain such steps.
constexpr int64_t kDotMaxRows = 4;
constexpr int64_t kDotGrain = 16;

template <int R>
constexpr int dot_columns() { return R <= 2 ? 4 : 2; }

SPINAL_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  return _mm_cvtss_f32(_mm_add_ss(sum, _mm_movehdup_ps(sum)));
}

// sums[r][c] = a_rows[r][0:k) . w[c * ldw + 0:k) for R rows of a and C rows of W.
template <int R, int C>
SPINAL_AVX2 void dot_tile(const float* const* a_rows, const float* w, int64_t ldw, int64_t k, float (&sums)[R][C]) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  }
  const int64_t whole = k / kLanes * kLanes;
  for (int64_t kk = 0; kk < whole; kk += kLanes) {
    __m256 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm256_loadu_ps(a_rows[r] + kk);
    for (int c = 0; c < C; ++c) {
      const __m256 wv = _mm256_loadu_ps(w + c * ldw + kk);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(a[r], wv, acc[r][c]);
    }
  }
  if (whole < k) {  // the last k % 8 elements, the lanes past them read as zero
    const __m256i mask = first_lanes(k - whole);
    __m256 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm256_maskload_ps(a_rows[r] + whole, mask);
    for (int c = 0; c < C; ++c) {
      const __m256 wv = _mm256_maskload_ps(w + c * ldw + whole, mask);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(a[r], wv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) sums[r][c] = horizontal_sum(acc[r][c]);
  }
}

// c[0:R, j0 : j0 + C) = start + the dot products of a's R rows with W's rows j0.. (C of them).
template <int R, int C>
SPINAL_AVX2 void dot_block(const Product& p, int64_t j0) {
  const float* a_rows[R];
  for (int r = 0; r < R; ++r) a_rows[r] = p.a.data + r * p.a.row_stride;
  float sums[R][C];
  dot_tile<R, C>(a_rows, p.b.data + j0 * p.b.col_stride, p.b.col_stride, p.k, sums);
  for (int r = 0; r < R; ++r) {
    float* out = p.c + r * p.ldc + j0;
    for (int c = 0; c < C; ++c) {
      out[c] = sums[r][c] + (p.accumulate ? out[c] : p.bias ? p.bias[j0 + c] : 0.f);
    }
  }
}

template <int R>
SPINAL_AVX2 void dot_rows(const Product& p) {
  constexpr int kColumns = dot_columns<R>();
  const int64_t groups = (p.n + kColumns - 1) / kColumns;
  at::parallel_for(0, groups, kDotGrain, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      const int64_t j0 = group * kColumns;
      if (j0 + kColumns <= p.n) {
        dot_block<R, kColumns>(p, j0);
      } else {
        for (int64_t j = j0; j < p.n; ++j) dot_block<R, 1>(p, j);
      }
    }
  });
}

#endif  // SPINAL_HAVE_AVX2_PATH

}  // namespace

const char* tile_gemm_instructions() {
#if SPINAL_HAVE_AVX2_PATH
  if (cpu_has_avx2_fma()) return cpu_has_avx512() ? "AVX-512" : "AVX2";
#endif
  return nullptr;
}

bool tile_gemm_fits(int64_t m, int64_t n, int64_t k) {
  if (m == 0 || n == 0 || k == 0) return true;
  return m <= kMaxMultiplyAdds / n / k;  // m * n * k <= the limit, without overflowing
}

bool tile_gemm(int64_t m, int64_t n, int64_t k, MatrixOperand a, MatrixOperand b, float* c, int64_t ldc,
               bool accumulate, const float* bias) {
#if SPINAL_HAVE_AVX2_PATH
  if (!cpu_has_avx2_fma()) return false;
  const bool b_rows_contiguous = b.col_stride == 1 || n == 1;
  if (!b_rows_contiguous && !(b.row_stride == 1 || k == 1)) return false;
  if (m == 0 || n == 0) return true;
  if (k == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) {
        float* row = c + i * ldc;
        if (bias) {
          std::memcpy(row, bias, n * sizeof(float));
        } else {
          std::fill(row, row + n, 0.f);
        }
      }
    }
    return true;
  }
  const Product product{m, n, k, a, b, b_rows_contiguous, c, ldc, accumulate, bias};
  if (!b_rows_contiguous && m <= kDotMaxRows && (a.col_stride == 1 || k == 1)) {
    switch (m) {
      case 1: dot_rows<1>(product); break;
      case 2: dot_rows<2>(product); break;
      case 3: dot_rows<3>(product); break;
      default: dot_rows<4>(product);
    }
    return true;
  }
  const bool wide = cpu_has_avx512();
  const int64_t lanes = wide ? Avx512Tiles::kVectorLanes : Avx2Tiles::kVectorLanes;
  const Panels panels(n, lanes);
  const int64_t panel_count = panels.count(), block = rows_per_task(m, panel_count);
  const int64_t row_blocks = (m + block - 1) / block;
  at::parallel_for(0, panel_count * row_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row0 = task / panel_count * block, panel = task % panel_count;
      const int64_t rows = std::min(block, m - row0), col0 = panels.first_vector(panel) * lanes;
      if (wide) {
        run_block<Avx512Tiles>(product, row0, rows, col0, panels.vector_count(panel));
      } else {
        run_block<Avx2Tiles>(product, row0, rows, col0, panels.vector_count(panel));
      }
    }
  });
  return true;
#else
  return false;
#endif
}

}  // namespace spinal_ops::cpu
