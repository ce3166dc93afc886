// The output projection for few columns on AVX2 (scheme in skinny_product.h).
#include "skinny_product.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "avx2_tiles.h"

namespace spinal_ops::cpu {
namespace {

constexpr int64_t kTileGrain = 16;  // tiles per parallel task

#if SPINAL_HAVE_AVX2_PATH

template <int V>
SPINAL_AVX2 void product_tiles(const float* a, int64_t lda, int64_t rows, int64_t depth, const float* panel,
                               int64_t n, const float* bias, float* c, int64_t ldc) {
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  at::parallel_for(0, tiles, kTileGrain, [&](int64_t begin, int64_t end) {
    float scratch[kTileRows * kSkinnyMaxColumns];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t first = tile * kTileRows, valid = std::min(kTileRows, rows - first);
      const float* tile_rows[kTileRows];
      for (int64_t r = 0; r < kTileRows; ++r) tile_rows[r] = a + (first + std::min(r, valid - 1)) * lda;
      panel_product<V, false>(tile_rows, 1, depth, panel, kSkinnyMaxColumns, scratch, kSkinnyMaxColumns);
      for (int64_t r = 0; r < valid; ++r) {
        float* out = c + (first + r) * ldc;
        const float* sum = scratch + r * kSkinnyMaxColumns;
        for (int64_t j = 0; j < n; ++j) out[j] = (bias ? bias[j] : 0.f) + sum[j];
      }
    }
  });
}

#endif  // SPINAL_HAVE_AVX2_PATH

}  // namespace

bool skinny_product(const float* a, int64_t lda, int64_t rows, int64_t depth, const float* b, int64_t ldb, int64_t n,
                    const float* bias, float* c, int64_t ldc) {
#if SPINAL_HAVE_AVX2_PATH
  if (n > kSkinnyMaxColumns || n < 1 || !cpu_has_avx2_fma()) return false;
  if (rows == 0) return true;
  std::vector<float> panel(depth * kSkinnyMaxColumns, 0.f);  // panel[k, j] = b[j, k]
  transpose(b, n, depth, ldb, panel.data(), kSkinnyMaxColumns);
  if (n <= kLanes) {
    product_tiles<1>(a, lda, rows, depth, panel.data(), n, bias, c, ldc);
  } else {
    product_tiles<2>(a, lda, rows, depth, panel.data(), n, bias, c, ldc);
  }
  return true;
#else
  return false;
#endif
}

}  // namespace spinal_ops::cpu
