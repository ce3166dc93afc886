// The bfloat16 chain's GEMMs on AVX512_BF16 register tiles (scheme in bf16_tile_gemm.h).
#include "bf16_tile_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPINAL_HAVE_BF16_PATH 1
#include <immintrin.h>
#define SPINAL_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))
#else
#define SPINAL_HAVE_BF16_PATH 0
#endif

namespace spinal_ops::cpu {
namespace {

constexpr int64_t kLanes = 16;          // fp32 lanes (bfloat16 pairs) of a zmm register
constexpr int64_t kMaxPanelVectors = 4;  // 4 x 16 columns: 16 accumulators for a 4-row tile
constexpr int64_t kRowBlock = 64;  // rows of c per task
constexpr int64_t kDepthPairs = 64;  // depth (in pairs) per chunk: 64 x 64 columns = 16 KB of the panel
// The largest products (multiply-adds) bf16_tile_gemm takes. Against oneDNN on views (1 thread, AMD
// EPYC with AVX512_BF16; this limit and 0, every product oneDNN's, in alternating rounds of one
// process): vgg5 at batch 64 ran inference in 0.28 against 0.56 ms and training in 1.43 against
// 2.25 ms, cifar_vgg's inference in 1.61 against 1.81 ms; 2^26 and no limit at all changed
// resnet_head, cnn_cifar and batch 4096 by no more than the noise, so oneDNN's cache blocking keeps
// the larger products. Reproduce: `spinal-bench --preset vgg5 cifar_vgg resnet_head cnn_cifar
// --batch 64 4096 --backends cpu reference --dtype bfloat16 --threads 1` against a build with this
// at 0 (and at 2^26).
constexpr int64_t kMaxMultiplyAdds = int64_t{1} << 24;

#if SPINAL_HAVE_BF16_PATH

// A matrix of bfloat16 pairs, word (p, i) = x(i, 2p) | x(i, 2p + 1) << 16 at words[p * pair_step +
// i * row_step]: a row-major operand read in place (row_step its row stride in words, pair_step 1)
// or one packed pair-major (pair_step the packed row count, row_step 1).
struct PairMatrix {
  const uint32_t* words;
  int64_t row_step;
  int64_t pair_step;
};

uint32_t bits(const c10::BFloat16& v) { return v.x; }

// The 16 x 16 matrix of 32-bit words in r[0..16) (r[i] its row i) transposed in place.
SPINAL_AVX512_BF16 inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// Packs x(i, k) = data[i * rs + k * cs] (rows [0, rows), depth k) pair-major into out[p * ldo + i],
// zero past k's end and past `rows` up to ldo (a multiple of kLanes).
SPINAL_AVX512_BF16 void pack_pairs(const c10::BFloat16* data, int64_t rs, int64_t cs, int64_t rows, int64_t k,
                                   uint32_t* out, int64_t ldo) {
  const int64_t pairs = (k + 1) / 2;
  if (rs == 1 || rows == 1) {
    // x's columns are contiguous: two depth steps interleave 16 rows at a time.
    const auto* raw = reinterpret_cast<const uint16_t*>(data);
    for (int64_t p = 0; p < pairs; ++p) {
      const uint16_t* lo = raw + 2 * p * cs;
      const uint16_t* hi = 2 * p + 1 < k ? lo + cs : nullptr;
      uint32_t* dst = out + p * ldo;
      for (int64_t i = 0; i < ldo; i += kLanes) {
        const __mmask16 mask = static_cast<__mmask16>(
            i + kLanes <= rows ? 0xFFFF : (i < rows ? (1u << (rows - i)) - 1 : 0));
        const __m512i l = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, lo + i));
        const __m512i h = hi ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, hi + i)) : _mm512_setzero_si512();
        _mm512_storeu_si512(dst + i, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
      }
    }
    return;
  }
  if (cs == 1) {
    // x's rows are contiguous: 16 rows by 16 pairs loaded as vectors and transposed.
    const int64_t rounded_rows = (rows + kLanes - 1) / kLanes * kLanes;
    for (int64_t i0 = 0; i0 < rounded_rows; i0 += kLanes) {
      for (int64_t p0 = 0; p0 < pairs; p0 += kLanes) {
        const int64_t elements = k - 2 * p0;
        const __mmask32 mask = elements >= 2 * kLanes ? 0xFFFFFFFFu : (1u << elements) - 1;
        __m512i block[kLanes];
        for (int64_t r = 0; r < kLanes; ++r) {
          block[r] = i0 + r < rows ? _mm512_maskz_loadu_epi16(mask, data + (i0 + r) * rs + 2 * p0)
                                   : _mm512_setzero_si512();
        }
        transpose16(block);
        for (int64_t q = 0; q < std::min(kLanes, pairs - p0); ++q) _mm512_storeu_si512(out + (p0 + q) * ldo + i0, block[q]);
      }
    }
    for (int64_t i = rounded_rows; i < ldo; ++i) {
      for (int64_t p = 0; p < pairs; ++p) out[p * ldo + i] = 0;
    }
    return;
  }
  for (int64_t i = 0; i < ldo; ++i) {
    if (i >= rows) {
      for (int64_t p = 0; p < pairs; ++p) out[p * ldo + i] = 0;
      continue;
    }
    const c10::BFloat16* row = data + i * rs;
    for (int64_t p = 0; p < pairs; ++p) {
      const uint32_t lo = bits(row[2 * p * cs]);
      const uint32_t hi = 2 * p + 1 < k ? bits(row[(2 * p + 1) * cs]) : 0;
      out[p * ldo + i] = lo | (hi << 16);
    }
  }
}

__mmask16 column_mask(int64_t columns) {
  if (columns <= 0) return 0;
  return static_cast<__mmask16>(columns >= kLanes ? 0xFFFF : (1u << columns) - 1);
}

// Where a tile's sum starts and where it goes: the first depth chunk starts from c (accumulate),
// the bias row or zero, later ones from the fp32 partial tile; the last chunk rounds into c,
// earlier ones store the partial tile.
constexpr int64_t kPartialStride = kMaxPanelVectors * kLanes;  // floats per row of a partial tile
struct TileEnds {
  bool first, last, accumulate;
  const c10::BFloat16* bias;
  float* partial;  // [tile rows][kPartialStride]
  const Bf16Epilogue* epilogue;  // its h and z at the tile's first row and column
};

// The epilogue on 16 (a zmm's worth, as __m256i) or 8 (a ymm's, as __m128i) rounded outputs:
// the value c gets, and for kActivation the value h gets. Float compares decide as the chain's
// bit tests do (ordered <= 0: zero and the negatives, not NaN).
SPINAL_AVX512_BF16 inline __m512 widen_bits(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
SPINAL_AVX512_BF16 inline __m256 widen_bits(__m128i v) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
SPINAL_AVX512_BF16 inline __m256i scaled(__m512 v, float slope) {
  return (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(v, _mm512_set1_ps(slope)));
}
SPINAL_AVX512_BF16 inline __m128i scaled(__m256 v, float slope) {
  return (__m128i)_mm256_cvtneps_pbh(_mm256_mul_ps(v, _mm256_set1_ps(slope)));
}
SPINAL_AVX512_BF16 inline __m256i select(__mmask16 take_b, __m256i a, __m256i b) {
  return _mm256_mask_blend_epi16(take_b, a, b);
}
SPINAL_AVX512_BF16 inline __m128i select(__mmask8 take_b, __m128i a, __m128i b) {
  return _mm_mask_blend_epi16(take_b, a, b);
}
template <int kPredicate>
SPINAL_AVX512_BF16 inline __mmask16 compare(__m512 v) {
  return _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), kPredicate);
}
template <int kPredicate>
SPINAL_AVX512_BF16 inline __mmask8 compare(__m256 v) {
  return _mm256_cmp_ps_mask(v, _mm256_setzero_ps(), kPredicate);
}

// phi of rounded values: ReLU zeroes the negatives (-0 and NaN kept), leaky ReLU scales what is
// <= 0 and rounds to nearest even.
template <typename Bits>
SPINAL_AVX512_BF16 inline Bits activated(Bits v, const Bf16Epilogue& e) {
  const auto f = widen_bits(v);
  if (e.act == Activation::ReLU) return select(compare<_CMP_LT_OQ>(f), v, Bits{});
  return select(compare<_CMP_LE_OQ>(f), v, scaled(f, e.negative_slope));
}

// Rounded dz times phi'(z): ReLU zeroes dz where z <= 0, leaky ReLU scales it where z > 0 is
// false (NaN included).
template <typename Bits>
SPINAL_AVX512_BF16 inline Bits times_activation_grad(Bits dz, Bits z, const Bf16Epilogue& e) {
  const auto fz = widen_bits(z);
  if (e.act == Activation::ReLU) return select(compare<_CMP_LE_OQ>(fz), dz, Bits{});
  return select(compare<_CMP_NGT_UQ>(fz), dz, scaled(widen_bits(dz), e.negative_slope));
}

SPINAL_AVX512_BF16 inline __m256i load_bits(const c10::BFloat16* p, __mmask16 mask) {
  return _mm256_maskz_loadu_epi16(mask, p);
}
SPINAL_AVX512_BF16 inline __m128i load_bits(const c10::BFloat16* p, __mmask8 mask) {
  return _mm_maskz_loadu_epi16(mask, p);
}
// 16 (mask: __mmask16) or 8 (__mmask8) bfloat16 values widened to fp32, zero where masked off.
template <typename Mask>
SPINAL_AVX512_BF16 inline auto widen(const c10::BFloat16* src, Mask mask) {
  return widen_bits(load_bits(src, mask));
}
SPINAL_AVX512_BF16 inline void store_bits(c10::BFloat16* p, __mmask16 mask, __m256i v) {
  _mm256_mask_storeu_epi16(p, mask, v);
}
SPINAL_AVX512_BF16 inline void store_bits(c10::BFloat16* p, __mmask8 mask, __m128i v) {
  _mm_mask_storeu_epi16(p, mask, v);
}

// Row r, columns [column, column + lanes) of a tile's rounded outputs: to c, through the
// epilogue (null: none).
template <typename Bits, typename Mask>
SPINAL_AVX512_BF16 inline void store(Bits rounded, int64_t r, int64_t column, Mask mask, c10::BFloat16* c,
                                     int64_t ldc, const Bf16Epilogue* e) {
  if (e && e->kind == Bf16Epilogue::Kind::kActivationGrad) {
    rounded = times_activation_grad(rounded, load_bits(e->z + r * e->ldz + column, mask), *e);
  }
  store_bits(c + r * ldc + column, mask, rounded);
  if (e && e->kind == Bf16Epilogue::Kind::kActivation) {
    store_bits(e->h + r * e->ldh + column, mask, activated(rounded, *e));
  }
}

// c[0:valid, 0:columns) (or the partial tile) = start + sum over pairs p of a(r, p) . panel(p, :),
// for R rows and a panel V vectors wide; rows past `valid` repeat the last one and are not stored.
// With kHalfLast the last vector holds at most 8 columns and runs as a ymm (its upper 8 lanes,
// zero in the panel, are not computed): a 24-column product (mnist's window groups) costs 3
// ymm-widths per pair, not 4.
template <int V, bool kHalfLast, int R>
SPINAL_AVX512_BF16 void tile(const uint32_t* const* a_rows, int64_t a_step, int64_t pairs, const uint32_t* panel,
                             int64_t valid, int64_t columns, c10::BFloat16* c, int64_t ldc, const TileEnds& ends) {
  constexpr int F = kHalfLast ? V - 1 : V;  // full zmm vectors
  constexpr int64_t kHalfColumn = (V - 1) * kLanes;
  __m512 acc[R][F > 0 ? F : 1];
  __m256 half[R];
  __mmask16 masks[V];
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) masks[v] = column_mask(columns - v * kLanes);
  const __mmask8 half_mask = static_cast<__mmask8>(masks[V - 1]);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* partial = ends.partial + r * kPartialStride;
#pragma GCC unroll 4
    for (int v = 0; v < F; ++v) {
      if (!ends.first) {
        acc[r][v] = _mm512_loadu_ps(partial + v * kLanes);
      } else if (ends.accumulate && r < valid) {
        acc[r][v] = widen(c + r * ldc + v * kLanes, masks[v]);
      } else if (ends.bias) {
        acc[r][v] = widen(ends.bias + v * kLanes, masks[v]);
      } else {
        acc[r][v] = _mm512_setzero_ps();
      }
    }
    if constexpr (kHalfLast) {
      if (!ends.first) {
        half[r] = _mm256_loadu_ps(partial + kHalfColumn);
      } else if (ends.accumulate && r < valid) {
        half[r] = widen(c + r * ldc + kHalfColumn, half_mask);
      } else if (ends.bias) {
        half[r] = widen(ends.bias + kHalfColumn, half_mask);
      } else {
        half[r] = _mm256_setzero_ps();
      }
    }
  }
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh bv[F > 0 ? F : 1];
#pragma GCC unroll 4
    for (int v = 0; v < F; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(panel + (p * V + v) * kLanes);
    __m256bh bh{};
    if constexpr (kHalfLast) bh = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + (p * V + V - 1) * kLanes));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      // One broadcast from memory; the ymm product reads its lower half.
      const __m512i ar = _mm512_set1_epi32(static_cast<int>(a_rows[r][p * a_step]));
#pragma GCC unroll 4
      for (int v = 0; v < F; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)ar, bv[v]);
      if constexpr (kHalfLast) half[r] = _mm256_dpbf16_ps(half[r], (__m256bh)_mm512_castsi512_si256(ar), bh);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* partial = ends.partial + r * kPartialStride;
#pragma GCC unroll 4
    for (int v = 0; v < F; ++v) {
      if (!ends.last) {
        _mm512_storeu_ps(partial + v * kLanes, acc[r][v]);
      } else if (r < valid) {
        store((__m256i)_mm512_cvtneps_pbh(acc[r][v]), r, v * kLanes, masks[v], c, ldc, ends.epilogue);
      }
    }
    if constexpr (kHalfLast) {
      if (!ends.last) {
        _mm256_storeu_ps(partial + kHalfColumn, half[r]);
      } else if (r < valid) {
        store((__m128i)_mm256_cvtneps_pbh(half[r]), r, kHalfColumn, half_mask, c, ldc, ends.epilogue);
      }
    }
  }
}

struct Product {
  int64_t m, n, k, pairs;
  PairMatrix a;
  // Panel-major: panel from vector f at packed_b + pairs * f * kLanes. Null where each task packs
  // its panel's depth chunks from b itself as it reaches them (fused_b_packing).
  const uint32_t* packed_b;
  Bf16Operand b;
  c10::BFloat16* c;
  int64_t ldc;
  bool accumulate;
  const c10::BFloat16* bias;
  Bf16Epilogue epilogue;
};

// c[row0 : row0 + rows, the panel of V vectors from first_vector): the depth in chunks of
// kDepthPairs, each chunk's part of the panel (at most 16 KB) read from L1 by every tile of the
// block, the tiles' sums carried between chunks in fp32. Tiles of R rows.
template <int V, int R>
SPINAL_AVX512_BF16 void run_panel(const Product& p, int64_t row0, int64_t rows, int64_t first_vector) {
  static_assert(kRowBlock % R == 0);
  alignas(64) float partial[kRowBlock * kPartialStride];
  alignas(64) uint32_t packed_chunk[kDepthPairs * V * kLanes];  // used where b is not packed whole
  const int64_t col0 = first_vector * kLanes, columns = std::min<int64_t>(V * kLanes, p.n - col0);
  const bool half_last = columns - (V - 1) * kLanes <= kLanes / 2;
  const uint32_t* panel = p.packed_b ? p.packed_b + p.pairs * first_vector * kLanes : nullptr;
  const c10::BFloat16* bias = p.bias ? p.bias + col0 : nullptr;
  for (int64_t p0 = 0; p0 < p.pairs; p0 += kDepthPairs) {
    const int64_t depth = std::min(kDepthPairs, p.pairs - p0);
    const uint32_t* chunk = panel + p0 * V * kLanes;
    if (!panel) {
      // b's rows [2 p0, 2 (p0 + depth)) of this panel, laid out as pack_b lays out that chunk.
      pack_pairs(p.b.data + col0 * p.b.col_stride + 2 * p0 * p.b.row_stride, p.b.col_stride, p.b.row_stride, columns,
                 std::min(2 * depth, p.k - 2 * p0), packed_chunk, V * kLanes);
      chunk = packed_chunk;
    }
    for (int64_t i = row0; i < row0 + rows; i += R) {
      const int64_t valid = std::min<int64_t>(R, row0 + rows - i);
      const uint32_t* a_rows[R];
      for (int64_t r = 0; r < R; ++r) {
        a_rows[r] = p.a.words + (i + std::min(r, valid - 1)) * p.a.row_step + p0 * p.a.pair_step;
      }
      Bf16Epilogue epilogue = p.epilogue;  // at the tile's first output
      if (epilogue.h) epilogue.h += i * epilogue.ldh + col0;
      if (epilogue.z) epilogue.z += i * epilogue.ldz + col0;
      const TileEnds ends{p0 == 0, p0 + depth == p.pairs, p.accumulate, bias, partial + (i - row0) * kPartialStride,
                          p.epilogue.kind == Bf16Epilogue::Kind::kNone ? nullptr : &epilogue};
      c10::BFloat16* out = p.c + i * p.ldc + col0;
      if (half_last) {
        tile<V, true, R>(a_rows, p.a.pair_step, depth, chunk, valid, columns, out, p.ldc, ends);
      } else {
        tile<V, false, R>(a_rows, p.a.pair_step, depth, chunk, valid, columns, out, p.ldc, ends);
      }
    }
  }
}

// Panels of one or two vectors (narrow products: mnist's window groups, the recurrence, few
// outputs) take 8-row tiles, so that enough independent sums are in flight to cover the dot
// product's latency; wider panels have enough with 4 rows (at most 16 accumulators).
SPINAL_AVX512_BF16 void run_block(const Product& p, int64_t row0, int64_t rows, int64_t first_vector, int vectors) {
  switch (vectors) {
    case 4: run_panel<4, 4>(p, row0, rows, first_vector); break;
    case 3: run_panel<3, 4>(p, row0, rows, first_vector); break;
    case 2: run_panel<2, 8>(p, row0, rows, first_vector); break;
    default: run_panel<1, 8>(p, row0, rows, first_vector);
  }
}

// b's columns in panels of kMaxPanelVectors vectors, the last one narrower; each packed
// [pairs][panel columns] pair-major, back to back.
SPINAL_AVX512_BF16 void pack_b(const Bf16Operand& b, int64_t k, int64_t n, int64_t pairs, uint32_t* packed) {
  const int64_t vectors = (n + kLanes - 1) / kLanes;
  for (int64_t f = 0; f < vectors; f += kMaxPanelVectors) {
    const int64_t width = std::min(kMaxPanelVectors, vectors - f) * kLanes, col0 = f * kLanes;
    // b's columns are the rows of the pair matrix.
    pack_pairs(b.data + col0 * b.col_stride, b.col_stride, b.row_stride, std::min(width, n - col0), k,
               packed + pairs * col0, width);
  }
}

bool cpu_has_avx512_bf16_kernels() {
  __builtin_cpu_init();
  return at::get_cpu_capability() == "AVX512" && __builtin_cpu_supports("avx512bf16") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

#endif  // SPINAL_HAVE_BF16_PATH

}  // namespace

bool bf16_tile_kernels_run() {
#if SPINAL_HAVE_BF16_PATH
  static const bool runs = cpu_has_avx512_bf16_kernels();
  return runs;
#else
  return false;
#endif
}

bool bf16_tile_gemm_fits(int64_t m, int64_t n, int64_t k) {
  if (m == 0 || n == 0 || k == 0) return true;
  return m <= kMaxMultiplyAdds / n / k;  // m * n * k <= the limit, without overflowing
}

bool bf16_tile_gemm(int64_t m, int64_t n, int64_t k, Bf16Operand a, Bf16Operand b, c10::BFloat16* c, int64_t ldc,
                    bool accumulate, const c10::BFloat16* bias, const Bf16Epilogue& epilogue) {
#if SPINAL_HAVE_BF16_PATH
  if (!bf16_tile_kernels_run()) return false;
  if (k == 0 && epilogue.kind != Bf16Epilogue::Kind::kNone) return false;  // no product to end
  if (m == 0 || n == 0) return true;
  const int64_t pairs = (k + 1) / 2, vectors = (n + kLanes - 1) / kLanes;
  if (k == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) {
        c10::BFloat16* row = c + i * ldc;
        if (bias) {
          std::memcpy(row, bias, n * sizeof(c10::BFloat16));
        } else {
          std::fill(row, row + n, c10::BFloat16(0.f));
        }
      }
    }
    return true;
  }
  const int64_t row_blocks = (m + kRowBlock - 1) / kRowBlock;
  // One row block: each panel of b is read by one task only, so that task packs it chunk by chunk
  // into L1 as it goes instead of the whole of b being packed to memory first (a weight gradient's
  // b is a [batch, columns] operand: mnist's windows at batch 4096 are 1.3 MB each).
  const bool fused_b_packing = row_blocks == 1 && pairs > kDepthPairs;
  std::unique_ptr<uint32_t[]> packed_b;
  if (!fused_b_packing) {
    packed_b = std::make_unique_for_overwrite<uint32_t[]>(pairs * vectors * kLanes);
    pack_b(b, k, n, pairs, packed_b.get());
  }
  // a in place where its rows are contiguous pairs, else packed pair-major.
  std::unique_ptr<uint32_t[]> packed_a;
  PairMatrix pa{reinterpret_cast<const uint32_t*>(a.data), a.row_stride / 2, 1};
  const bool in_place = (a.col_stride == 1 || k == 1) && k % 2 == 0 && a.row_stride % 2 == 0 &&
                        reinterpret_cast<uintptr_t>(a.data) % 4 == 0;
  if (!in_place) {
    const int64_t padded_rows = (m + kLanes - 1) / kLanes * kLanes;  // pack_pairs writes whole vectors
    packed_a = std::make_unique_for_overwrite<uint32_t[]>(pairs * padded_rows);
    pack_pairs(a.data, a.row_stride, a.col_stride, m, k, packed_a.get(), padded_rows);
    pa = {packed_a.get(), 1, padded_rows};
  }
  const Product product{m, n, k, pairs, pa, packed_b.get(), b, c, ldc, accumulate, bias, epilogue};
  const int64_t panel_count = (vectors + kMaxPanelVectors - 1) / kMaxPanelVectors;
  at::parallel_for(0, panel_count * row_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row0 = task / panel_count * kRowBlock, panel = task % panel_count;
      const int64_t first_vector = panel * kMaxPanelVectors;
      run_block(product, row0, std::min(kRowBlock, m - row0), first_vector,
                static_cast<int>(std::min(kMaxPanelVectors, vectors - first_vector)));
    }
  });
  return true;
#else
  return false;
#endif
}

}  // namespace spinal_ops::cpu
